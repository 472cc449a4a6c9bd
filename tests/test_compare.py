"""``aapo compare`` on synthetic run directories: pairing by seed, hand-computed differences and
t intervals, the plain-words verdict, the JSON and PNG, and clear errors."""

import argparse
import json
import math

import pytest
import yaml

from aapo_ray import compare as C
from aapo_ray.cli_args import add_compare_parser

T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}  # printed t tables


def write_run(root, name, estimator, seed, evals, *, loss_agg="token_mean"):
    """A run directory: config.yaml and metrics.jsonl with training rows between the evaluations."""
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"algo": {"estimator": estimator, "loss_agg": loss_agg},
                                                   "run": {"seed": seed}}))
    rows = []
    for i, acc in enumerate(evals):
        rows.append({"step": 10 * i, "eval/accuracy": acc, "reward_mean": 0.1})
        rows.append({"step": 10 * i + 5, "reward_mean": 0.2})  # no eval at this step
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def parse(argv):
    parser = argparse.ArgumentParser(prog="aapo")
    add_compare_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compare", *argv])


@pytest.fixture
def runs(tmp_path):
    scores = {  # last-3-eval means; the first eval (step 0) is the warm start and is not scored
        "aapo": {0: [0.5, 0.6, 0.7], 1: [0.5] * 3, 2: [0.6] * 3, 3: [0.9] * 3},  # seed 3 has no partner
        "grpo": {0: [0.5] * 3, 1: [0.4] * 3, 2: [0.3] * 3},
        "gpg": {0: [0.5] * 3, 1: [0.3] * 3, 2: [0.45] * 3},
    }
    dirs = [write_run(tmp_path, f"{est}-{seed}", est, seed, [0.3, *ev]) for est, per in scores.items()
            for seed, ev in per.items()]
    return dirs[::-1], tmp_path  # reversed: pairing must go by run.seed, not by argument order


def test_t_quantile_matches_tables():
    for df, t in T975.items():
        assert C.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert C._t_two_sided_mass(0.0, 5) == 0.0 and C._t_two_sided_mass(1e9, 4) == pytest.approx(1.0)


def test_paired_differences_and_intervals_hand_computed(runs, capsys):
    dirs, tmp = runs
    assert C.run(parse([*dirs, "--out", str(tmp / "out")])) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp / "out" / "compare.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    # groups appear in argument order: gpg, grpo, aapo (dirs were reversed)
    assert list(result["groups"]) == ["gpg", "grpo", "aapo"]
    assert set(pairs) == {("gpg", "grpo"), ("gpg", "aapo"), ("grpo", "aapo")}

    p = pairs[("grpo", "aapo")]  # diffs grpo - aapo per seed 0, 1, 2: -0.1, -0.1, -0.3 (seed 3 unpaired)
    assert p["n"] == 3 and sorted(p["seeds"]) == [0, 1, 2]
    mean, sd = -0.5 / 3, math.sqrt(((1 / 15) ** 2 * 2 + (2 / 15) ** 2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    assert p["mean"] == pytest.approx(mean) and sd == pytest.approx(0.11547, abs=1e-5)
    assert (p["ci_low"], p["ci_high"]) == (pytest.approx(mean - half, abs=1e-4), pytest.approx(mean + half, abs=1e-4))
    assert p["contains_zero"] is True

    p = pairs[("gpg", "aapo")]  # diffs -0.1, -0.2, -0.15: mean -0.15, sd 0.05
    half = T975[2] * 0.05 / math.sqrt(3)  # 0.1242
    assert p["mean"] == pytest.approx(-0.15)
    assert (p["ci_low"], p["ci_high"]) == (pytest.approx(-0.15 - half, abs=1e-4), pytest.approx(-0.15 + half, abs=1e-4))
    assert p["contains_zero"] is False
    assert "gpg - aapo: n=3 paired seed(s)" in out and "excludes 0: aapo is higher" in out
    assert "grpo - aapo" in out and "contains 0: no evidence of a difference" in out

    assert result["groups"]["aapo"]["scores"]["0"] == pytest.approx(0.6)  # mean of 0.5, 0.6, 0.7
    band = result["curves"]["grpo"]
    assert band["steps"] == [0, 10, 20, 30] and band["n"] == 3
    assert band["mean"][1] == pytest.approx(0.4)
    assert band["high"][1] - band["mean"][1] == pytest.approx(T975[2] * 0.1 / math.sqrt(3), abs=1e-4)
    assert (tmp / "out" / "compare.png").stat().st_size > 1000


def test_by_other_key_last_and_one_seed(tmp_path, capsys):
    a = write_run(tmp_path, "a", "grpo", 0, [0.2, 0.4, 0.8], loss_agg="token_mean")
    b = write_run(tmp_path, "b", "grpo", 0, [0.2, 0.3, 0.3], loss_agg="seq_mean_token_mean")
    assert C.run(parse([a, b, "--by", "algo.loss_agg", "--last", "1", "--out", str(tmp_path / "o")])) == 0
    out = capsys.readouterr().out
    assert "token_mean - seq_mean_token_mean: n=1 paired seed(s), mean difference of eval/accuracy +0.5000" in out
    assert "CI undefined with one seed" in out
    pair = json.loads((tmp_path / "o" / "compare.json").read_text())["pairs"][0]
    assert pair["ci_low"] is None and pair["contains_zero"] is None


@pytest.mark.parametrize("case, message", [
    ("duplicate", "two runs with run.seed=0"),
    ("one_group", "nothing to compare"),
    ("no_metric", "no values of 'eval/accuracy'"),
    ("no_key", "no key 'algo.nope'"),
    ("not_a_run", "no config.yaml"),
])
def test_errors_are_clear(tmp_path, capsys, case, message):
    a = write_run(tmp_path, "a", "aapo", 0, [0.1, 0.2])
    b = write_run(tmp_path, "b", "aapo" if case in ("duplicate", "one_group") else "grpo",
                  1 if case == "one_group" else 0, [] if case == "no_metric" else [0.1, 0.3])
    argv = {"no_key": [a, b, "--by", "algo.nope"], "not_a_run": [a, str(tmp_path)]}.get(case, [a, b])
    assert C.run(parse([*argv, "--out", str(tmp_path / "o")])) == 2
    assert message in capsys.readouterr().err
