"""End to end on a real local Ray cluster: a short run, its run directory, and exact resume."""

import json

import pytest
from transformers import AutoModelForCausalLM

from aapo_ray.config import load_config
from aapo_ray.driver import train
from aapo_ray.metrics import read_metrics

TRAIN_KEYS = ["reward_mean", "accuracy_mean", "zero_variance_group_frac", "zero_advantage_frac",
              "margin_mean", "completion_len_mean", "learner/loss", "learner/grad_norm"]


def small_config(model_path, tmp_path, **extra):
    overrides = {
        "model.path": model_path, "run.output_dir": str(tmp_path), "run.steps": 4, "run.save_every": 2,
        "run.eval_every": 2, "rollout.prompts_per_step": 4, "algo.group_size": 4, "rollout.max_new_tokens": 16,
        "data.eval": "synthetic:test:16", "learner.lr": 1e-3, "learner.micro_batch_size": 8, **extra,
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
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[4]
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
