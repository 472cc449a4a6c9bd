"""Secure defaults, checked on the real thing (sockets of real processes, real loaders, real dumps).

- a local cluster started by :func:`aapo_ray.launch.init_ray` (here: by ``aapo serve``, and by a
  program that imported ray first) and Serve's HTTP proxy listen on loopback only: the listening TCP
  sockets of that command's whole process tree are inspected with psutil (only processes it started,
  never the session's other clusters);
- the learners' torch.distributed rendezvous store listens on loopback only;
- model loading runs no code from the checkpoint by default: ``trust_remote_code`` is off in the
  config, the loaders and ``aapo serve``; a checkpoint whose ``auto_map`` module or pickle
  weights would write a marker file is refused and the marker never appears;
- a run's ``config.yaml`` (:func:`aapo_ray.config.dump_config`) never holds a secret passed via
  the environment, and ``aapo serve --api-key`` reaches the Serve application only as a hash.

Checked elsewhere, not repeated here:

- KubeRay manifests under ``cluster/`` run pods non-root (``runAsNonRoot``, non-zero
  ``runAsUser``), without privilege escalation, with ALL capabilities dropped, no literal secrets
  in ``env``, a ClusterIP head Service: ``tests/test_cluster.py::policy_errors``, applied by
  ``test_overlay_renders_and_validates``, ``test_base_alone_validates``, ``test_broken_manifests_fail``;
- pickle-only weights refused unless ``allow_pickle=True`` (and equal weights when allowed):
  ``tests/test_models.py::test_pickle_only_weights_refused_unless_allowed``;
- the API key is required and never echoed: ``tests/test_serve.py::test_api_key``;
  ``aapo serve`` defaults to ``--host 127.0.0.1``: ``tests/test_serve_offline.py::test_cli_defaults_and_bad_path``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listening(procs) -> list[tuple[str, int, str, int]]:
    """(process name, pid, ip, port) of every listening TCP socket of ``procs``."""
    out = []
    for p in procs:
        try:
            name = p.name()
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out += [(name, p.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- listening sockets
def test_aapo_serve_cluster_and_proxy_listen_only_on_loopback(tiny_model_path, tmp_path):
    """`aapo serve` with default flags starts a local Ray cluster (init_ray) and Serve: every port of
    that process tree (GCS, raylet, agents, workers, the HTTP proxy) is bound to loopback."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # start a cluster, join none
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "aapo_ray", "serve", tiny_model_path, "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        end = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"aapo serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"aapo serve not healthy in 300 s:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        sockets = _listening(tree)
        names = {name for name, *_ in sockets}
        assert {"gcs_server", "raylet"} <= names, names  # the check saw the cluster itself
        assert any(p == port for *_, p in sockets), f"no process of the tree listens on the HTTP port {port}"
        exposed = [s for s in sockets if not _is_loopback(s[2])]
        assert not exposed, f"listening beyond loopback (name, pid, ip, port): {exposed}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)  # aapo serve shuts Serve and its cluster down on Ctrl-C
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass


# A program that imports ray before aapo_ray (Ray reads its loopback switch when first imported): init_ray's
# cluster, with a worker started, reports back (node IP, listening sockets of its process tree beyond loopback),
# and whether another such program joins it at 127.0.0.1.
RAY_FIRST = """
import ipaddress, json, os, subprocess, sys, psutil, ray
from aapo_ray.launch import init_ray, shutdown_ray
init_ray(num_cpus=1, namespace="ray-first")
worker_pid = ray.get(ray.remote(lambda: __import__("os").getpid()).remote())
exposed = []
for p in psutil.Process().children(recursive=True):
    try:
        exposed += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
                    and not ipaddress.ip_address(c.laddr.ip.split("%")[0].removeprefix("::ffff:")).is_loopback]
    except psutil.Error:
        pass
tree = psutil.Process().children(recursive=True)
names, worker_is_child = {p.name() for p in tree}, any(p.pid == worker_pid for p in tree)
# a second such program (sys.argv[1]: JOIN) joins it at 127.0.0.1, without the variable aapo_ray sets for the
# processes it starts
env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
join = subprocess.run([sys.executable, "-c", sys.argv[1], ray.get_runtime_context().gcs_address], env=env, timeout=120,
                      capture_output=True, text=True)
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "exposed": exposed, "names": sorted(names),
                  "worker_is_child": worker_is_child,
                  "joined": join.stdout.strip().splitlines()[-1:], "join_rc": join.returncode}))
shutdown_ray()
"""
JOIN = """
import sys, ray
from aapo_ray.launch import init_ray
init_ray(sys.argv[1], namespace="ray-first")
print(ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()), ray.util.get_node_ip_address())
"""


def test_a_local_cluster_stays_on_loopback_when_ray_was_imported_first():
    """Ray decides whether 127.0.0.1 means loopback when it is first imported; a user's program that imports
    ray before aapo_ray once got a local cluster listening on every interface. init_ray keeps it on loopback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", RAY_FIRST, JOIN], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet"} <= set(report["names"]) and report["worker_is_child"], report  # saw the cluster
    assert report["node_ip"] == "127.0.0.1", report
    assert not report["exposed"], f"listening beyond loopback (name, ip): {report['exposed']}"
    assert report["join_rc"] == 0 and report["joined"] == ["127.0.0.1 127.0.0.1"], report  # a driver joins it


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.1:6379", True), ("localhost:6379", True), ("::1", True), ("[::1]:6379", True),
    ("ray://127.0.0.1:10001", True), ("auto", False), ("192.0.2.2:6379", False), ("ray://head-svc:10001", False)])
def test_which_addresses_init_ray_joins_as_loopback(address, loopback):
    from aapo_ray.launch import _is_loopback

    assert _is_loopback(address) is loopback


def test_learner_rendezvous_listens_only_on_loopback(ray_cluster, tiny_model_path):
    from aapo_ray.config import load_config
    from aapo_ray.learner import LearnerGroup

    cfg = load_config(None, ["learner.num_learners=1", "rollout.prompts_per_step=2", "algo.group_size=2"])
    group = LearnerGroup(cfg, tiny_model_path)
    try:
        pid = ray_cluster.get(group.actors[0].__ray_call__.remote(lambda self: os.getpid()))
        sockets = _listening([psutil.Process(pid)])
        assert sockets, "the learner listens on nothing: the check checked nothing"
        exposed = [s for s in sockets if not _is_loopback(s[2])]
        assert not exposed, f"learner listening beyond loopback (name, pid, ip, port): {exposed}"
    finally:
        group.shutdown()


def test_serve_proxy_default_host_is_loopback():
    """Serve's own default (``serve.start()`` without a host, e.g. ``serve run``) is loopback too."""
    from ray.serve.config import HTTPOptions

    assert _is_loopback(HTTPOptions().host)


# ----------------------------------------------------------------------------- no code from checkpoints
@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A tiny, valid causal LM directory (random weights, the embedded tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aapo_ray.embedded import build_tokenizer
    from aapo_ray.synthetic import SyntheticTask

    tok = build_tokenizer(SyntheticTask(), vocab_size=300, corpus_size=200)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    d = tmp_path_factory.mktemp("small") / "model"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_trust_remote_code_and_allow_pickle_default_off():
    import inspect

    from aapo_ray.backends import HFBackend
    from aapo_ray.cli import build_parser
    from aapo_ray.config import load_config
    from aapo_ray.models import load_model_and_tokenizer
    from aapo_ray.serve_options import ServeOptions

    cfg = load_config()
    assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False
    opts = ServeOptions()
    assert opts.trust_remote_code is False and opts.allow_pickle is False
    for fn in (load_model_and_tokenizer, HFBackend.load):
        params = inspect.signature(fn).parameters
        assert params["trust_remote_code"].default is False and params["allow_pickle"].default is False, fn
    args = build_parser().parse_args(["serve", "some/run"])
    assert args.trust_remote_code is False and args.allow_pickle is False


def test_checkpoint_code_is_not_run_by_default(small_model, tmp_path):
    """A checkpoint whose config / tokenizer point at its own Python module (``auto_map``): the model
    loader, the backend and the driver's tokenizer load refuse it, and the module never runs."""
    from aapo_ray.backends import HFBackend
    from aapo_ray.config import load_config
    from aapo_ray.preflight import load_prompts
    from aapo_ray.models import load_model_and_tokenizer

    d = tmp_path / "remote-code"
    shutil.copytree(small_model, d)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
                               "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                               "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"})
    (d / "config.json").write_text(json.dumps(config))
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    with pytest.raises(ValueError, match="custom code|trust_remote_code"):
        load_model_and_tokenizer(d)
    with pytest.raises(ValueError):
        HFBackend.load(str(d), device="cpu")
    try:  # the driver's tokenizer load: refused, or the fast tokenizer without the module; never the module
        load_prompts(load_config(None, ["data.eval=null"]), str(d))
    except Exception:  # noqa: BLE001 - transformers' own error; what matters is the marker below
        pass
    assert not marker.exists(), "code from the checkpoint ran"


class _Payload:
    """Unpickling this writes a marker file: what a malicious pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_weights_are_never_unpickled_by_default(small_model, tmp_path):
    from aapo_ray.backends import HFBackend

    d = tmp_path / "pickled"
    shutil.copytree(small_model, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "PICKLE_RAN"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    with pytest.raises(ValueError, match="pickle"):
        HFBackend.load(str(d), device="cpu")  # the loader behind the generators, the reference and aapo serve
    assert not marker.exists(), "the pickle ran"


# ----------------------------------------------------------------------------- secrets
SECRETS = {"AAPO_API_KEY": "sk-aapo-7f3c1e", "HF_TOKEN": "hf_9d8c7b6a5", "OPENAI_API_KEY": "sk-openai-2b4d",
           "WANDB_API_KEY": "wandb-5e6f7a8b", "AWS_SECRET_ACCESS_KEY": "aws/secret+0a1b"}


def test_saved_config_never_holds_env_secrets(monkeypatch, tmp_path):
    from aapo_ray.config import dump_config, load_config

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_ADDRESS", "ray://user:pw-1c2d@127.0.0.1:10001")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("model:\n  path: embedded\nrun:\n  name: secret-test\nreward:\n  functions: {accuracy: 1.0}\n")
    cfg = load_config(yaml_path, ["algo.group_size=4", "run.output_dir=" + str(tmp_path)])
    text = dump_config(cfg)
    assert "group_size: 4" in text  # the dump is the config...
    for value in [*SECRETS.values(), "pw-1c2d"]:
        assert value not in text, f"{value!r} in the saved config"  # ...and nothing from the environment


def test_serve_api_key_reaches_the_app_only_hashed(tmp_path):
    from ray import cloudpickle

    from aapo_ray.serve import build_app
    from aapo_ray.serve_options import sha256_hex as _sha256

    (tmp_path / "config.json").write_text("{}")  # resolve_model_dir only needs a HF-looking directory
    key = "sk-serve-only-hash-4e5f"
    app = build_app(str(tmp_path), api_key=key)
    blob = cloudpickle.dumps(app)  # what goes to the Serve controller and the replicas
    assert key.encode() not in blob
    assert _sha256(key).encode() in blob
