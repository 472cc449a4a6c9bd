"""Faults injected into real local runs: dead generators, scorers and learners (a SIGKILLed or interrupted
driver: tests/test_driver_faults.py)."""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from aapo_ray.collect import collect_scored
from aapo_ray.config import load_config
from aapo_ray.driver import train
from aapo_ray.generator import GeneratorPool
from aapo_ray.rollout import make_prompt_batch
from aapo_ray.weights import bucket_parameters
from aapo_ray.metrics import read_metrics
from aapo_ray.models import load_model_and_tokenizer
from aapo_ray.scorer import ScorerPool

ARMED = Path(tempfile.gettempdir()) / "aapo-ray-test-kill-scorer.armed"


def kill_my_scorer_once(completion: str, gold: str) -> float:
    """A reward function that SIGKILLs its scorer actor (its worker's parent) once, while armed."""
    try:
        ARMED.unlink()  # atomic: exactly one caller wins
    except FileNotFoundError:
        return 0.0
    os.kill(os.getppid(), signal.SIGKILL)
    return 0.0


def overrides(model_path, out, **extra):
    base = {"model.path": model_path, "run.output_dir": str(out), "rollout.prompts_per_step": 2, "algo.group_size": 2,
            "rollout.max_new_tokens": 12, "data.eval": "synthetic:test:8", "run.eval_every": 0, "run.eval_samples": 1,
            "learner.micro_batch_size": 4, "run.steps": 6, "run.save_every": 2}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def steps_of(run_dir):
    return [r["step"] for r in read_metrics(run_dir)]


def test_a_torn_last_line_is_not_a_row(tmp_path):
    """What a test polling a running run's log (as below) or a user's script can read: the line being appended,
    half-written. Such a read once failed this file's kill test with ``KeyError: 'step'``."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.5}\n{"step": 1, "reward_mean": 0.25}\n{"step": 2, "rew')
    assert steps_of(tmp_path) == [0, 1]


def ray_children(name):
    """This test session's own Ray worker processes running actor class ``name``."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith(f"ray::{name}"):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_collect_recovers_dead_generator_stale_weights_and_dead_scorer(ray_cluster, tiny_model_path, tmp_path):
    cfg = load_config(None, overrides(tiny_model_path, tmp_path, **{"reward.timeout_s": 10}))
    model, tok = load_model_and_tokenizer(tiny_model_path)
    for p in model.parameters():  # "learner" weights for version 1, different from the initial ones
        p.data.mul_(0.9)
    buckets = [ray.put(b) for b in bucket_parameters(model.named_parameters(), 1.0)]
    ids = tok(["Compute 1+2+3+4.\n", "Compute 9-3+2+1.\n"], add_special_tokens=False)["input_ids"]
    prompts = make_prompt_batch([0, 1], ids, ["a", "b"], ["10", "9"])
    policy, scorers = GeneratorPool(cfg, tiny_model_path, replicas=2), ScorerPool(cfg)
    try:
        policy.update_weights(buckets, version=1)
        params = policy.sampling(seed=5)
        clean, _, faults = collect_scored([(policy, policy.chunks(prompts, 2, params))], scorers)
        assert not faults
        # a replica restarts (initial weights, version 0) before the step samples
        ray.kill(policy.actors[0], no_restart=False)
        again, _, faults = collect_scored([(policy, policy.chunks(prompts, 2, params))], scorers)
        assert faults["faults/policy_regenerated"] + faults["faults/policy_stale_resampled"] >= 1
        for a, b in zip(clean[0], again[0]):  # same rows, same weights: nothing lost, nothing doubled
            assert a.column("completion_ids").equals(b.column("completion_ids"))
            assert b.column("weight_version").to_pylist() == [1] * b.num_rows
        # a scorer dies in the middle of scoring: the chunk is re-scored by its restarted actor
        cfg_kill = load_config(None, overrides(tiny_model_path, tmp_path, **{
            "reward.functions": "{accuracy: 1.0, 'tests.test_faults:kill_my_scorer_once': 0.0}"}))
        killer = ScorerPool(cfg_kill)
        ARMED.write_text("armed")
        try:
            scored, counters, faults = collect_scored([(policy, policy.chunks(prompts, 2, params))], killer)
            assert faults["faults/rescored"] >= 1 and not ARMED.exists()
            assert sum(b.num_rows for b in scored[0]) == 4
        finally:
            killer.shutdown()
    finally:
        policy.shutdown()
        scorers.shutdown()


# (ray.colocate, rollout.overlap, process killed at step 2, process killed at step 4)
KILLS = {"separate": ("off", 0, "GeneratorActor", "LearnerActor"),
         "colocated": ("split", 1, "SamplingHost", "LearningHost")}


@pytest.mark.parametrize("case", list(KILLS))
def test_training_survives_a_killed_generator_and_a_killed_learner(ray_cluster, tiny_model_path, tmp_path, case):
    """One process per role: a generator, then a learner dies. Co-located (aapo_ray/colocation.py): the process
    of the policy and the scorers dies, then that of the learner and the reference; each is replaced. With
    rollout.overlap=1 the killed generator may hold the next step's prefetched rows, and the restarted learner
    group drops the rows sampled by the dead group's weights."""
    colocate, overlap, first, second = KILLS[case]
    cfg = load_config(None, overrides(tiny_model_path, tmp_path, **{"run.steps": 7, "rollout.overlap": overlap,
                                                                     "ray.colocate": colocate}))
    run_dir = tmp_path / "run"
    errors = []
    thread = threading.Thread(target=lambda: _guard(errors, train, cfg, run_dir=run_dir, progress=False))
    thread.start()
    killed = {}
    deadline = time.time() + 600
    while thread.is_alive() and time.time() < deadline:
        logged = steps_of(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if "generator" not in killed and logged and max(logged) >= 2:
            victims = ray_children(first)
            assert victims, f"no {first} process found"
            victims[0].kill()
            killed["generator"] = max(logged)
        if "learner" not in killed and logged and max(logged) >= 4:
            victims = ray_children(second)
            assert victims, f"no {second} process found"
            victims[0].kill()
            killed["learner"] = max(logged)
        time.sleep(0.05)
    thread.join(timeout=60)
    assert not errors, errors
    assert set(killed) == {"generator", "learner"}
    assert steps_of(run_dir) == list(range(8))  # every step exactly once
    last = read_metrics(run_dir)[-1]
    assert last["faults/learner_restarts"] == 1
    rows = read_metrics(run_dir)[1:]
    assert any(r["faults/policy_replica_restarts"] >= 1 or r.get("faults/policy_regenerated", 0) for r in rows)
    assert max(r["rollout/staleness_max"] for r in rows) == overlap  # never older than rollout.overlap allows


def _guard(errors, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(repr(exc))
