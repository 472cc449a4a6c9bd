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


def test_study_pairs_seeds_and_sizes_the_next_study(bench):
    ab = bench("aapo_vs_baselines")
    from aapo_ray.compare import t_quantile

    assert ab.parse_seeds(["0-3", "7", "2"]) == [0, 1, 2, 3, 7]
    over = ab.overrides({"run.steps": 200}, "zero_var", "grpo_compute_matched", 5, Path("/x/zero_var/a-seed5"))
    assert over["algo.group_size"] == 4 and over["rollout.prompts_per_step"] == 24  # 2G of the regime's G=2
    assert over["run.seed"] == 5 and over["run.name"] == "grpo_compute_matched" and over["algo.estimator"] == "grpo"
    for sd, h in ((0.03, 0.02), (0.01, 0.02), (0.05, 0.01)):  # the smallest n whose t interval is narrow enough
        n = ab.seeds_needed(sd, h)
        assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= h < t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) or n == 2

    def run(last3, zv=0.5, sha="warm-start-a"):
        return {"evals": [[0, 0.3], [160, last3[0]], [180, last3[1]], [200, last3[2]]], "reward": [0.3] * 20,
                "zero_var_group_frac": zv, "s_per_step": 0.5, "weights_sha256": sha}
    diffs = [0.03, -0.01, 0.05, 0.01]
    result = {"runs": {}}
    for seed, d in enumerate(diffs):
        result["runs"][f"default/grpo/{seed}"] = run([0.4, 0.5, 0.6], zv=0.2)  # score 0.5
        result["runs"][f"default/aapo/{seed}"] = run([0.4 + d, 0.5 + d, 0.6 + d])  # score 0.5 + d
    result["runs"]["default/aapo/9"] = run([0.9, 0.9, 0.9])  # unpaired: not in the difference
    result["runs"]["default/aapo_warmstart1/0"] = run([0.9, 0.9, 0.9], sha="warm-start-b")  # another warm start: no pair
    (pair,) = ab.report(result, halfwidth=0.02)["default"]["pairs"]
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = t_quantile(0.975, 3) * sd / 2
    assert pair["n"] == 4 and pair["mean diff"] == pytest.approx(mean)
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert pair["contains 0"] is True and pair["seeds for +-0.02"] == ab.seeds_needed(sd, 0.02)
    arms = {r["arm"]: r for r in result["report"]["default"]["arms"]}
    assert arms["grpo"]["zero-var groups"] == pytest.approx(0.2) and arms["aapo"]["seeds"] == 5


def test_scaling_estimate_is_labelled_and_positive(bench):
    sc = bench("scaling")
    rows = sc.estimate(overhead_s=0.05, store_gb_s=1.0)
    assert {r["gpus"] for r in rows} == {4, 8}
    assert all(r["train_s"] > 0 and r["offload_s"] > 0 for r in rows)
    low, high = (float(x) for x in rows[1]["step_s"].split("-"))
    assert 0 < low <= high
