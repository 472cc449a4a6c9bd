"""ray.keep_roles: role actors kept loaded between runs on a cluster that outlives them (aapo_ray/kept_roles.py)."""

import subprocess
import sys
import time

import pytest
import ray

from aapo_ray.config import ConfigError, load_config
from aapo_ray.driver import train
from aapo_ray.kept_roles import KeepableRole, KeptRoles, make_room
from aapo_ray.kept_roles import kept_actor_names as kept_names
from aapo_ray.metrics import read_metrics
from aapo_ray.scorer import ScorerPool

COMPARED = ("reward_mean", "ref_reward_mean", "learner/loss", "learner/grad_norm", "completion_tokens", "eval/accuracy")




def wait_for_kept(count, timeout_s=30.0):
    """The kept actors' names once ``count`` remain (ray.kill is asynchronous), or after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while len(kept_names()) > count and time.time() < deadline:
        time.sleep(0.2)
    return kept_names()


def kill_kept():
    for name in kept_names():
        ray.kill(ray.get_actor(name))
    wait_for_kept(0)


def config(model_path, out, keep=True, **extra):
    base = {"model.path": model_path, "run.output_dir": str(out), "rollout.prompts_per_step": 2, "algo.group_size": 2,
            "rollout.max_new_tokens": 12, "data.eval": "synthetic:test:8", "run.eval_every": 2, "run.eval_samples": 1,
            "learner.micro_batch_size": 4, "run.steps": 3, "run.save_every": 0, "ray.keep_roles": keep}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **extra}.items()])


def test_a_reused_run_equals_a_fresh_one_and_hands_its_actors_back(ray_cluster, tiny_model_path, tmp_path):
    kill_kept()
    try:
        first = read_metrics(train(config(tiny_model_path, tmp_path), run_dir=tmp_path / "first", progress=False))
        assert first[0]["roles/kept_reused"] == 0
        held = kept_names()
        assert [n.split("/")[1] for n in held] == ["learner", "policy", "reference", "scorer"], held
        # another seed in between: the kept policy and learner end it on other weights and optimizer state
        train(config(tiny_model_path, tmp_path, **{"run.seed": 7}), run_dir=tmp_path / "other", progress=False)
        again = read_metrics(train(config(tiny_model_path, tmp_path), run_dir=tmp_path / "again", progress=False))
        assert again[0]["roles/kept_reused"] == 4
        assert kept_names() == held  # the same four actors, handed back again
        for a, b in zip(first, again, strict=True):
            assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}, a["step"]
    finally:
        kill_kept()


@ray.remote
class _Probe(KeepableRole):
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def test_a_held_actor_is_never_shared_and_a_released_one_is_reinitialised(ray_cluster):
    kill_kept()
    try:
        run_a, run_b = KeptRoles(), KeptRoles()
        options = {"num_cpus": 0}
        a = run_a.start(_Probe.__ray_actor_class__, options, ("a",), role="probe")
        b = run_b.start(_Probe.__ray_actor_class__, options, ("b",), role="probe")  # a holds slot 0
        assert ray.get([a.get.remote(), b.get.remote()]) == ["a", "b"]
        assert [n.split("/")[-1] for n in kept_names()] == ["0", "1"]
        run_a.release()
        c = KeptRoles().start(_Probe.__ray_actor_class__, options, ("c",), role="probe")
        assert c == a and ray.get(c.get.remote()) == "c"  # slot 0 again, re-initialised with the new arguments
    finally:
        kill_kept()


def test_keep_roles_without_a_lasting_cluster_fails_before_ray_starts(tiny_model_path, tmp_path):
    code = ("import sys\nfrom aapo_ray.driver import train\nfrom aapo_ray.config import load_config\n"
            f"train(load_config(None, ['model.path={tiny_model_path}', 'ray.keep_roles=true', "
            f"'run.output_dir={tmp_path}']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "ray start --head" in out.stderr and "ConfigError" in out.stderr, out.stderr[-2000:]
    assert "Started a local Ray instance" not in out.stderr


def test_keep_roles_is_a_checked_config_field():
    with pytest.raises(ConfigError, match="keep_role"):
        load_config(None, ["ray.keep_role=true"])


def test_a_run_directory_that_holds_a_run_is_not_appended_to(tmp_path):
    """A second fresh run into the same directory would interleave its steps with the first one's log."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="--resume"):
        train(config("unused", tmp_path, keep=False), run_dir=run_dir, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'  # nothing lost


def test_an_actor_whose_run_died_is_free_again(ray_cluster, tmp_path):
    """A driver killed without handing its kept actors back: Ray reports its lease token's owner as dead."""
    kill_kept()
    cfg_args = ["reward.num_scorers=1"]
    code = ("import os, ray\nfrom aapo_ray.config import load_config\nfrom aapo_ray.kept_roles import KeptRoles\n"
            "from aapo_ray.scorer import ScorerPool\n"
            f"ray.init(address={ray.get_runtime_context().gcs_address!r}, namespace='aapo-tests')\n"
            f"ScorerPool(load_config(None, {cfg_args!r}), source=KeptRoles())\n"
            "os._exit(0)  # no hand-back\n")
    try:
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
        assert len(kept_names()) == 1
        time.sleep(8)  # Ray notices a driver that vanished within ~5 s (until then its actors count as taken)
        kept = KeptRoles()
        ScorerPool(load_config(None, cfg_args), source=kept)
        assert kept.reused == 1 and len(kept_names()) == 1  # taken over, not a second actor
    finally:
        kill_kept()


def leave_an_idle_actor_holding_every_cpu():
    """A kept actor that asks for all the cluster's CPUs (scheduled once nothing else holds one), handed back."""
    run = KeptRoles()
    big = run.start(_Probe.__ray_actor_class__, {"num_cpus": ray.cluster_resources()["CPU"]}, ("big",), role="probe")
    assert ray.get(big.get.remote()) == "big"
    run.release()


def test_idle_actors_of_another_shape_give_way_when_the_cluster_is_full(ray_cluster):
    """Kept actors hold their CPUs while idle; a run that needs them for another shape kills idle ones."""
    kill_kept()
    try:
        leave_an_idle_actor_holding_every_cpu()
        other = KeptRoles().start(_Probe.__ray_actor_class__, {"num_cpus": 1}, ("small",), role="probe")
        assert ray.get(other.get.remote(), timeout=60) == "small"  # would wait for the idle one's CPUs for good
        assert len(wait_for_kept(1)) == 1
    finally:
        kill_kept()


def test_a_run_that_does_not_keep_roles_is_not_starved_by_idle_kept_ones(ray_cluster):
    kill_kept()
    try:
        held = KeptRoles()  # a live run holding one more (0 CPUs): never killed
        ray.get(held.start(_Probe.__ray_actor_class__, {"num_cpus": 0}, ("held",), role="probe").get.remote())
        leave_an_idle_actor_holding_every_cpu()
        make_room({"CPU": 1.0, "GPU": 0.0})
        assert len(wait_for_kept(1)) == 1
        assert ray.get(held.held[0].get.remote()) == "held"
    finally:
        kill_kept()


def test_keep_roles_with_an_nccl_weight_group_is_refused():
    from aapo_ray.preflight import check_keep_roles

    cfg = load_config(None, ["ray.keep_roles=true", "ray.address=auto", "rollout.backend=sglang",
                             "rollout.weight_sync=nccl", "rollout.gpus_per_replica=1", "learner.gpus_per_learner=1"])
    with pytest.raises(ConfigError, match="weight_sync=nccl"):
        check_keep_roles(cfg)
    check_keep_roles(load_config(None, ["ray.keep_roles=true", "ray.address=auto"]))  # object-store sync: fine
