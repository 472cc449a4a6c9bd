"""Each Ray role alone on a real local cluster: generators, the frozen reference, scorers, sync."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aapo_ray.config import AlgoConfig, Config, LearnerConfig, RewardConfig, RolloutConfig
from aapo_ray.generator import GeneratorPool
from aapo_ray.launch import ACTOR_ENV
from aapo_ray.reference import ReferencePool
from aapo_ray.rollout import column_numpy, concat, learner_batch, make_prompt_batch, make_rollout_batch, padded_tensors
from aapo_ray.scorer import ScorerPool
from conftest import ENVIRON_AT_START


@pytest.fixture(scope="module")
def cfg():
    return Config(algo=AlgoConfig(group_size=3), rollout=RolloutConfig(prompts_per_step=4, max_new_tokens=16),
                  learner=LearnerConfig(lr=5e-3, micro_batch_size=6), reward=RewardConfig(timeout_s=2.0))


@pytest.fixture(scope="module")
def prompts(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    questions = ["Compute 1+2+3+4.\n", "Compute 9-3+2+1.\n", "Compute 5+5-2+7.\n", "Compute 8+1+1-4.\n"]
    ids = tok(questions, add_special_tokens=False)["input_ids"]
    return make_prompt_batch([10, 11, 12, 13], ids, questions, ["10", "9", "15", "6"])


def test_local_cluster_workers_inherit_the_actor_env_without_a_job_runtime_env(ray_cluster):
    """init_ray's own cluster: its workers have ACTOR_ENV (one torch thread) from the environment the cluster
    was started with, not from a job runtime_env (which starts every worker through Ray's setup_worker, a
    second ``import ray``); the driver's own environment is left as it was."""
    @ray.remote(num_cpus=0.1)
    def worker_env():
        return ({k: os.environ.get(k) for k in [*ACTOR_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"]},
                ray.get_runtime_context().runtime_env)

    env, runtime_env = ray.get(worker_env.remote())
    assert env == {**ACTOR_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert not runtime_env and not ray.get_runtime_context().runtime_env
    assert {k: os.environ.get(k) for k in env} == {k: ENVIRON_AT_START.get(k) for k in env}


_SHUTDOWN = """
import json, ray
from aapo_ray.launch import init_ray, shutdown_ray
init_ray(num_cpus=1, namespace="shutdown-test")
started = {kind: [i.process for i in infos] for kind, infos in ray._private.worker._global_node.all_processes.items()}
monitor = started["monitor"][0]
sent = []


def terminate():  # Ray's shutdown calls this to start the monitor's grace period
    sent.append("SIGTERM")
    type(monitor).terminate(monitor)


monitor.terminate = terminate
shutdown_ray()
print(json.dumps({"monitor": sent, "kinds": sorted(started),
                  "alive": [kind for kind, procs in started.items() for p in procs if p.poll() is None]}))
"""


def test_shutdown_skips_the_monitors_grace_period_and_leaves_no_process():
    """``shutdown_ray`` on a cluster of its own: the autoscaler monitor is gone before Ray's shutdown sends
    it SIGTERM (to which it answers by calling the GCS Ray has just stopped, for the whole one-second grace
    period), and every process of the cluster has ended."""
    out = subprocess.run([sys.executable, "-c", _SHUTDOWN], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": ""})  # exported but empty: unset, as Ray reads it
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet", "monitor", "dashboard", "log_monitor"} <= set(result["kinds"])
    assert result["monitor"] == [] and result["alive"] == []


def test_generator_pool_spreads_groups_and_is_seeded(ray_cluster, cfg, tiny_model_path, prompts):
    pool = GeneratorPool(cfg, tiny_model_path, replicas=2)
    try:
        refs = pool.async_generate(prompts, 3, pool.sampling(seed=1))
        assert len(refs) == 2  # two prompts per replica
        b = concat(ray.get(refs))
        assert b.num_rows == 12
        assert column_numpy(b, "group_index").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        assert column_numpy(b, "sample_index").tolist() == [0, 1, 2] * 4
        assert column_numpy(b, "prompt_id").tolist() == [10] * 3 + [11] * 3 + [12] * 3 + [13] * 3
        lengths = np.diff(b.column("completion_ids").offsets.to_numpy())
        assert lengths.max() <= 16 and lengths.min() >= 1
        reasons = b.column("finish_reason").to_pylist()
        eos = AutoTokenizer.from_pretrained(tiny_model_path).eos_token_id
        for ids, why in zip(b.column("completion_ids").to_pylist(), reasons):
            assert (ids[-1] == eos) == (why == "stop") and eos not in ids[:-1]
        again = concat(ray.get(pool.async_generate(prompts, 3, pool.sampling(seed=1))))
        assert again.column("completion_ids").equals(b.column("completion_ids"))
        other = concat(ray.get(pool.async_generate(prompts, 3, pool.sampling(seed=2))))
        assert not other.column("completion_ids").equals(b.column("completion_ids"))
    finally:
        pool.shutdown()


def test_scorer_pool_scores_and_counts(ray_cluster, cfg):
    # the 200k-digit answer parses in ~1 s on an idle core; under a loaded suite it has been seen
    # to pass the default 5 s deadline (a timeout, not a score). Deadlines are tested in test_reward.
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"timeout_s": 60.0})})
    completions = ["1+2=3, 3+3=6, 6+4=10. \\boxed{10}", "\\boxed{8}", "no answer", "\\boxed{" + "9" * 200_000 + "}"]
    b = make_rollout_batch(prompt_ids=[[1]] * 4, completion_ids=[[2]] * 4, prompt_id=[0] * 4, group_index=[0] * 4,
                           sample_index=range(4), prompt=["q"] * 4, completion=completions,
                           gold=["10", "9", "3", "9"], finish_reason=["stop"] * 4, weight_version=0)
    pool = ScorerPool(cfg)
    try:
        scored_ref, counters_ref = pool.async_score([ray.put(b)])[0]
        scored, counters = ray.get(scored_ref), ray.get(counters_ref)
        assert column_numpy(scored, "reward")[:3].tolist() == [1.0, 0.0, 0.0]
        assert column_numpy(scored, "reward/accuracy")[:3].tolist() == [1.0, 0.0, 0.0]
        assert counters["scored"] == 4
        assert 0 < counters["score_s"] < 60  # the call's busy seconds, logged as time/score_s
        assert scored.column("completion").equals(b.column("completion"))
        # scorer actors stay light: nothing on their path imports torch (~200 MB per process)
        assert ray.get(pool.actors[0].__ray_call__.remote(lambda self: "torch" in __import__("sys").modules)) is False
    finally:
        pool.shutdown()


def test_weight_sync_makes_generator_logits_equal_learner_and_reference_stays_frozen(
        ray_cluster, cfg, tiny_model_path, prompts, tmp_path):
    from aapo_ray.learner import LearnerGroup

    policy, reference = GeneratorPool(cfg, tiny_model_path), ReferencePool(cfg, tiny_model_path)
    learners = LearnerGroup(cfg, tiny_model_path)
    try:
        rollouts = concat(ray.get(policy.async_generate(prompts, 3, policy.sampling(seed=3))))
        batch = learner_batch(rollouts, np.linspace(-1, 1, rollouts.num_rows))
        learners.train_step(batch, float(len(batch.column("completion_ids").values)))
        policy.update_weights(learners.export_weights(1.0), version=1)
        learners.save_hf(str(tmp_path / "hf"))

        ids = padded_tensors(rollouts, pad_id=0)["input_ids"][:4]
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
        with torch.no_grad():
            want, before = trained(ids).logits, initial(ids).logits
        got = ray.get(policy.actors[0].logits.remote(ids))
        ref = ray.get(reference.actors[0].logits.remote(ids))
        assert not torch.allclose(want, before, atol=1e-4)  # the update changed the model
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # generator == learner after sync
        torch.testing.assert_close(ref, before, atol=1e-6, rtol=0)  # reference == initial weights
        assert ray.get(policy.actors[0].ready.remote())["version"] == 1
        with pytest.raises(RuntimeError, match="frozen"):
            reference.update_weights([], version=1)
    finally:
        for role in (policy, reference, learners):
            role.shutdown()
