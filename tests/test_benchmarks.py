"""Smoke tests of the benchmark scripts' helpers (no Ray cluster, no training: seconds)."""

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_common_helpers(bench):
    C = bench("_common")
    assert C.median([3.0, 1.0, 2.0, None]) == 2.0
    assert math.isnan(C.median([]))
    rows = [{"step": 0, "time/eval_s": 1.0}, *({"step": s} for s in range(1, 6)), {"step": 6, "time/eval_s": 1.0}]
    assert [r["step"] for r in C.steady(rows)] == [3, 4, 5]
    assert C.table([{"a": 1.23456, "b": "x"}]).splitlines()[2] == "| 1.23 | x |"
    order = []
    out = C.interleave({"A": lambda r: order.append(("A", r)) or r, "B": lambda r: order.append(("B", r))}, 2, log=lambda *_: None)
    assert order == [("A", 0), ("B", 0), ("A", 1), ("B", 1)] and out["A"] == [0, 1]
    rss = C.RssSampler()
    assert rss.sample() > 10 and "driver" in rss.peak_parts


def test_list_padding_matches_arrow_padding(bench):
    """The pickle path of arrow_transport pads exactly as aapo_ray.rollout.padded_tensors does."""
    at = bench("arrow_transport")
    from aapo_ray.rollout import make_rollout_batch, padded_tensors

    prompts, completions = at._tokens(6, 40, seed=1)
    batch = make_rollout_batch(prompt_ids=prompts, completion_ids=completions, prompt_id=np.arange(6), group_index=np.arange(6),
                               sample_index=np.zeros(6), prompt=[""] * 6, completion=[""] * 6, gold=[""] * 6,
                               finish_reason=["stop"] * 6, weight_version=0)
    arrow = padded_tensors(batch, pad_id=0)
    lists = at._pad([p.tolist() for p in prompts], [c.tolist() for c in completions])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(arrow[key].to(lists[key].dtype), lists[key]), key


def test_step_anatomy_parts(bench):
    sa = bench("step_anatomy")
    row = {"step": 5, "time/generate_s": 0.3, "time/ref_generate_s": 0.4, "time/score_s": 0.05, "time/advantage_s": 0.01,
           "learner/step_s": 0.2, "time/sync_s": 0.02, "time/rollout_s": 0.5, "time/train_s": 0.25, "time/step_s": 0.8,
           "completion_tokens": 100.0}
    (parts,) = sa.ray_parts([row])
    assert parts["other"] == pytest.approx(0.8 - 0.4 - 0.05 - 0.01 - 0.2 - 0.02)


def test_baseline_summary_and_margin(bench):
    ab = bench("aapo_vs_baselines")
    rows = [{"step": 0, "eval/accuracy": 0.30}]
    for s in range(1, 9):
        rows.append({"step": s, "reward_mean": 0.3 + 0.01 * s, "zero_variance_group_frac": 0.5, "zero_advantage_frac": 0.4,
                     "advantage_abs_mean": 0.6, "time/step_s": 0.5, "margin_mean": 0.01, "margin_clipped_low_frac": 0.1,
                     "margin_clipped_high_frac": 0.2, "ref_reward_mean": 0.3, **({"eval/accuracy": 0.3 + 0.02 * s} if s % 4 == 0 else {})})
    out = ab.run_summary(rows, targets=[0.35, 0.9])
    assert out["steps_to_0.35"] == 4 and out["steps_to_0.9"] == math.inf and out["final_acc"] == pytest.approx(0.46)
    assert out["margin_abs_mean"] == pytest.approx(0.2 * 0.1 + 0.28 * 0.2)


def test_scaling_estimate_is_labelled_and_positive(bench):
    sc = bench("scaling")
    rows = sc.estimate(overhead_s=0.05, store_gb_s=1.0)
    assert {r["gpus"] for r in rows} == {4, 8}
    assert all(r["train_s"] > 0 and r["offload_s"] > 0 for r in rows)
    low, high = (float(x) for x in rows[1]["step_s"].split("-"))
    assert 0 < low <= high
