"""ray.colocate: CPU roles sharing processes (aapo_ray/colocation.py), on the real local Ray cluster."""

import time

import pytest
import ray

from aapo_ray.colocation import CoLocated, colocate_mode
from aapo_ray.config import ConfigError, load_config
from aapo_ray.driver import train
from aapo_ray.metrics import read_metrics
from aapo_ray.preflight import check_config
from tests.remote_helpers import Echo

COMPARED = ("reward_mean", "ref_reward_mean", "learner/loss", "learner/grad_norm", "completion_tokens", "eval/accuracy")


def config(model_path, out, **extra):
    base = {"model.path": model_path, "run.output_dir": str(out), "rollout.prompts_per_step": 2, "algo.group_size": 2,
            "rollout.max_new_tokens": 12, "data.eval": "synthetic:test:8", "run.eval_every": 2, "run.eval_samples": 2,
            "learner.micro_batch_size": 4, "run.steps": 3, "run.save_every": 0, "rollout.overlap": 1,
            "reward.functions": "{'tests.remote_helpers:text_hash_reward': 1.0}"}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **extra}.items()])


def test_colocated_runs_equal_a_run_of_separate_processes(ray_cluster, tiny_model_path, tmp_path):
    """Same rewards (policy and reference sampled at once, in one process for 'one'), losses, grad norms and
    eval accuracy whatever the processes: sampling never draws from torch's global generator."""
    runs = {mode: read_metrics(train(config(tiny_model_path, tmp_path, **{"ray.colocate": mode}),
                                     run_dir=tmp_path / mode, progress=False)) for mode in ("off", "split", "one")}
    assert {m: r[0]["roles/processes"] for m, r in runs.items()} == {"off": 4, "split": 2, "one": 1}
    for mode in ("split", "one"):
        for a, b in zip(runs["off"], runs[mode], strict=True):
            assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}, (mode, a["step"])
    assert len({r["reward_mean"] for r in runs["off"][1:]}) > 1 and runs["off"][-1]["learner/grad_norm"] > 0


def dead_soon(role, timeout_s=30.0) -> bool:
    """Whether calls to ``role`` fail with RayActorError within ``timeout_s`` (ray.kill is asynchronous: a call
    sent at once may still be served; after a release, one that reaches the process before the kill lands is
    answered "not running")."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ray.get(role.ready.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.RayTaskError as err:
            if "not running in this process" not in str(err.cause):
                raise
        time.sleep(0.2)
    return False


def test_hosted_roles_behave_like_actor_handles(ray_cluster, tiny_model_path, tmp_path):
    cfg = config(tiny_model_path, tmp_path, **{"ray.colocate": "split"})
    source = CoLocated(cfg, "split", reference=True)
    try:
        policy = source.start(Echo, {}, ("p:",), role="policy", index=0)
        scorer = source.start(Echo, {}, ("s:",), role="scorer", index=0)
        learner = source.start(Echo, {}, ("l:",), role="learner", index=0)
        assert scorer.host != learner.host  # split: scorers beside the policy, the learner beside the reference
        # the host imported the role's class (with add's arguments) without the garbage collector, then froze the
        # imports and turned it back on before building the role (aapo_ray.import_gc)
        assert ray.get(policy.gc_state.remote()) == {"imported_with_gc": False, "on": True, "frozen": True}
        text, n = scorer.pair.options(num_returns=2).remote(ray.put("abc"))  # a top-level ref is resolved
        assert ray.get([text, n]) == ["s:abc", 3]
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(learner.fail.remote())
        assert isinstance(err.value.cause, KeyError)  # the role's own exception, as from an actor
        source.release([scorer])  # its process still holds the policy: it lives on
        assert ray.get(policy.ready.remote()) == "p:"
        with pytest.raises(ray.exceptions.RayTaskError, match="not running"):
            ray.get(scorer.ready.remote())
        ray.kill(source.hosts[1])  # the learner's process dies: a new learner gets a new process
        assert dead_soon(learner)
        learner = source.start(Echo, {}, ("L:",), role="learner")
        assert ray.get(learner.ready.remote()) == "L:"
        broken = source.start(Echo, {}, ("boom",), role="scorer")  # a role whose __init__ raises
        with pytest.raises(ValueError, match="no slot policy/1"):  # one policy replica configured
            source.start(Echo, {}, ("p1:",), role="policy", index=1)
        with pytest.raises(ray.exceptions.RayTaskError, match="boom at start") as err:
            ray.get(broken.ready.remote())  # its own error, as an actor's failed start would give
        assert isinstance(err.value.cause, ValueError)
        source.release([learner, broken])
        assert ray.get(policy.ready.remote()) == "p:"
        source.release([policy])  # the last role: its process ends
        assert dead_soon(policy)
    finally:
        for host in source.hosts:
            ray.kill(host)


def test_colocate_mode_is_chosen_for_a_local_cpu_run_and_refused_where_roles_cannot_share(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert colocate_mode(load_config(None, [])) == "split"  # the embedded default, on a cluster of its own
    assert colocate_mode(load_config(None, ["ray.address=auto"])) == "off"  # a shared cluster: one per role
    assert colocate_mode(load_config(None, ["learner.num_learners=2"])) == "off"
    assert colocate_mode(load_config(None, ["ray.colocate=one", "ray.address=auto"])) == "one"
    assert load_config(None, ["ray.colocate=true"]).ray.colocate == "split"
    assert load_config(None, ["ray.colocate=false"]).ray.colocate == "off"
    with pytest.raises(ConfigError, match="colocate"):
        load_config(None, ["ray.colocate=two"])
    for bad, why in (("learner.num_learners=2", "gloo group"), ("ray.keep_roles=true", "keep_roles"),
                     ("learner.gpus_per_learner=1", "GPU")):
        with pytest.raises(ConfigError, match=why):
            check_config(load_config(None, ["ray.colocate=split", bad]))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # inside `ray job submit`: a cluster shared with others
    assert colocate_mode(load_config(None, [])) == "off"
