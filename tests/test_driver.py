"""End to end on a real local Ray cluster: a short run, its run directory, and exact resume.

The runs here keep their roles (``ray.keep_roles``): the first starts fresh actors, the later ones re-initialise
them in place, as a user's repeated runs on a kept cluster do, instead of paying a process start and torch's
imports per role and run (~20 CPU-s each time). The default layout (fresh, co-located processes) is run by
tests/test_colocation.py, tests/test_faults.py and the ``aapo train`` processes of tests/test_driver_faults.py;
a reused run equal to a fresh one is tests/test_kept_roles.py's."""

import json

import pytest
from transformers import AutoModelForCausalLM

from aapo_ray.config import load_config
from aapo_ray.driver import train
from aapo_ray.embedded import read_recipe, weights_sha256
from aapo_ray.metrics import plot_run_in_background, read_metrics, summary

pytestmark = pytest.mark.usefixtures("kept_roles_cleared")  # the first run starts fresh actors

TRAIN_KEYS = ["reward_mean", "accuracy_mean", "zero_variance_group_frac", "zero_advantage_frac",
              "margin_mean", "completion_len_mean", "learner/loss", "learner/grad_norm"]


def small_config(model_path, tmp_path, **extra):
    overrides = {
        "model.path": model_path, "run.output_dir": str(tmp_path), "run.steps": 4, "run.save_every": 2,
        "run.eval_every": 1, "run.eval_from": 2, "rollout.prompts_per_step": 4, "algo.group_size": 4, "rollout.max_new_tokens": 16,
        "data.eval": "synthetic:test:16", "learner.lr": 1e-3, "learner.micro_batch_size": 8, "ray.keep_roles": True,
        # one thread, as the default co-located learner has: kept roles are separate processes, where the learner
        # takes both cores; beside the other test worker's load its steps took 15-34 s instead of 0.1 s (one suite
        # run; two threads on a core that is busy elsewhere wait on each other)
        "learner.torch_threads": 1, **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def full_run(ray_cluster, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    return train(small_config(tiny_model_path, tmp), run_dir=tmp / "full", progress=False)


def test_run_directory_holds_everything(full_run):
    names = {p.name for p in full_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "tensorboard", "reward_curve.png", "checkpoints"} <= names
    rows = read_metrics(full_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # step 0, then every step from run.eval_from on
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3, 4]
    for r in rows[1:]:
        assert all(k in r for k in TRAIN_KEYS), set(TRAIN_KEYS) - set(r)
        assert r["completion_tokens"] > 0 and r["time/step_s"] > 0
        assert 0 < r["time/score_s"] < r["time/rollout_s"]  # busy time of the one scorer (policy + reference)
        assert 0 <= r["zero_variance_group_frac"] <= 1
    assert any(p.name.startswith("events.out.tfevents") for p in (full_run / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004"]
    state = json.loads((full_run / "checkpoints/step_000004/state.json").read_text())
    assert state["step"] == 4
    model = AutoModelForCausalLM.from_pretrained(full_run / "checkpoints/step_000004/hf")
    assert model.num_parameters() > 0


def test_the_end_of_run_plot_is_drawn_on_a_thread_and_its_errors_reach_the_caller(tmp_path):
    """The driver draws ``reward_curve.png`` while its roles shut down: ``result()`` hands back the PNG, or the
    plot's own error (here: a run directory that does not exist), never a silent miss."""
    rows = [{"step": s, "reward_mean": 0.1 * s, "eval/accuracy": 0.2} for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_run_in_background(tmp_path).result(timeout=120)
    assert png == tmp_path / "reward_curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError):
        plot_run_in_background(tmp_path / "missing").result(timeout=120)


def test_run_records_the_warm_start_fingerprint(full_run, tiny_model_path):
    model = json.loads((full_run / "model.json").read_text())
    assert model["path"] == tiny_model_path and model["weights_sha256"] == weights_sha256(tiny_model_path)
    assert model["weights_sha256"] == read_recipe(tiny_model_path)["build"]["weights_sha256"]
    assert f"weights_sha256={model['weights_sha256']}" in (full_run / "config.yaml").read_text().splitlines()[-1]
    assert load_config(full_run / "config.yaml", []).run.eval_from == 2  # the comment keeps it a valid config
    assert f"weights sha256 {model['weights_sha256'][:16]}" in summary(full_run)


def test_resume_reproduces_the_uninterrupted_run(full_run, tiny_model_path, tmp_path):
    run_dir = tmp_path / "resumed"
    train(small_config(tiny_model_path, tmp_path, **{"run.steps": 2}), run_dir=run_dir, progress=False)
    # a killed run may have logged past its checkpoint and left a torn checkpoint: both are handled
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 123.0}) + "\n{\"step\": 4, \"rew")
    (run_dir / "checkpoints/step_000003").mkdir()
    train(small_config(tiny_model_path, tmp_path), run_dir=run_dir, resume=True, progress=False)
    full, resumed = read_metrics(full_run), read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(full[1:], resumed[1:]):
        for key in TRAIN_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_a_run_the_cluster_cannot_hold_fails_before_any_actor(ray_cluster):
    from aapo_ray.preflight import check_cluster_fits

    cfg = load_config(None, ["learner.num_learners=24", "rollout.prompts_per_step=8", "algo.group_size=6"])
    with pytest.raises(ValueError, match=r"CPU: need 13\.25, cluster has 8"):
        check_cluster_fits(cfg)
    check_cluster_fits(load_config())  # the default run fits the test cluster


def test_gpg_topup_samples_more_groups_until_the_valid_share_is_reached(monkeypatch):
    """GPG's beta_th with stand-ins for the generator, scorers and sampler (no Ray): hand-made rewards."""
    import numpy as np
    import pyarrow as pa

    from aapo_ray import collect
    from aapo_ray.rollout import make_rollout_batch, with_columns

    def rollout(rewards, tag):
        n = len(rewards)
        b = make_rollout_batch(prompt_ids=[[5]] * n, completion_ids=[[tag, i] for i in range(n)], prompt_id=np.arange(n) // 2,
                               group_index=np.arange(n) // 2, sample_index=np.arange(n) % 2, prompt=[""] * n,
                               completion=[""] * n, gold=[""] * n, finish_reason=["stop"] * n, weight_version=0)
        return with_columns(b, reward=rewards)

    rounds = [rollout([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], 101), rollout([0.0, 1.0, 1.0, 1.0, 0.0, 0.0], 102)]
    seeds = []

    class Policy:
        def sampling(self, seed):
            seeds.append(seed)
            return seed

        def chunks(self, prompts, n, params):
            return prompts

    class Sampler:
        calls = 0

        def next_batch(self):
            Sampler.calls += 1
            return [0, 1, 2]

    monkeypatch.setattr(collect, "collect_scored", lambda requests, scorers: ([[rounds.pop(0)]], [{"score_s": 0.1}], {}))
    cfg = load_config(None, ["algo.estimator=gpg", "algo.gpg_valid_threshold=0.6", "algo.group_size=2",
                             "rollout.prompts_per_step=3"])
    first = rollout([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 100)  # valid share 1/3 < 0.6
    prompts = pa.record_batch({"x": [0, 1, 2]})
    counters = []
    out, stats = collect.gpg_topup(cfg, first, Policy(), None, prompts, Sampler(), 7, counters)
    # groups: 0 [1,1]  1 [0,1]*  2 [0,0] | round 1: 3 [1,0]*  4 [0,0]  5 [1,1]  (* = rewards vary)
    # -> valid 1, 3 first, then zero-variance 0 to fill 3 groups: share 2/3 >= 0.6, stop after one round
    assert stats == {"gpg/topup_rounds": 1.0, "gpg/valid_share": pytest.approx(2 / 3)}
    assert seeds == [7 + 250_007] and Sampler.calls == 1 and len(counters) == 1
    assert out.column("reward").to_pylist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [c[0] for c in out.column("completion_ids").to_pylist()] == [100, 100, 100, 100, 101, 101]
    assert out.column("group_index").to_pylist() == [0, 0, 1, 1, 2, 2] and out.num_rows == 6

    # the cap: beta_th = 1 is never reached with one more round of zero-variance groups only
    rounds[:] = [rollout([0.0] * 6, 103)]
    cfg.algo.gpg_valid_threshold, cfg.algo.gpg_max_topups = 1.0, 1
    out, stats = collect.gpg_topup(cfg, first, Policy(), None, prompts, Sampler(), 7, [])
    assert stats == {"gpg/topup_rounds": 1.0, "gpg/valid_share": pytest.approx(1 / 3)}
    assert [c[0] for c in out.column("completion_ids").to_pylist()] == [100] * 6  # groups 0, 1, 2 kept in order


def test_overlap_trains_on_rows_at_most_one_version_old_and_resumes(full_run, tiny_model_path, tmp_path):
    """rollout.overlap=1: step t+1 is sampled while the learners train step t, so its rows are exactly one
    weight version old (the first step's are fresh); overlap=0 rows are never stale. A run resumes."""
    assert all(r["rollout/staleness_max"] == 0 for r in read_metrics(full_run)[1:])
    run_dir = tmp_path / "overlap"
    train(small_config(tiny_model_path, tmp_path, **{"rollout.overlap": 1, "run.steps": 2}), run_dir=run_dir,
          progress=False)
    train(small_config(tiny_model_path, tmp_path, **{"rollout.overlap": 1}), run_dir=run_dir, resume=True,
          progress=False)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["rollout/staleness_max"] for r in rows[1:]] == [0, 1, 0, 1]  # step 3 starts fresh after the resume
    assert all(r["rollout/staleness_mean"] == r["rollout/staleness_max"] for r in rows[1:])
    for r in rows[1:]:
        assert all(k in r for k in TRAIN_KEYS)
