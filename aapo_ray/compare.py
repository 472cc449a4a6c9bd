"""``aapo compare RUN_DIR... [--by algo.estimator]``: paired seed-by-seed comparison of runs.

Each run directory holds ``config.yaml`` and ``metrics.jsonl`` (what ``aapo train`` writes). Runs
are grouped by the value of one config key (``--by``, dotted) and paired across groups by
``run.seed``. A run's score is the mean of the last ``--last`` logged values of ``--metric``
(default: held-out accuracy of the last 3 evaluations). For every pair of groups (A, B) this
prints the number of common seeds n, the mean paired difference A - B and its 95% confidence
interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (Student t, sd Bessel-corrected), and says
whether the interval contains 0. It writes ``compare.json`` (everything printed, plus the
per-seed scores) and ``compare.png`` (per group: mean learning curve over seeds with a 95% band).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import yaml

from aapo_ray.metrics import pyplot, read_metrics, save_figure


class CompareError(ValueError):
    """Run directories that cannot be compared; the message says which and why."""


# ----------------------------------------------------------------------------- statistics
def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...)), df - 3 powers
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...), df - 2 powers
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom; scipy's when installed."""
    try:
        from scipy.stats import t as student_t  # optional (pulled in by ray[train]); a fallback below

        return float(student_t.ppf(p, df))
    except ImportError:
        pass
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while _t_two_sided_mass(hi, df) < target:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the t confidence interval; low = high = nan for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------- run directories
def config_value(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def load_run(run_dir: str | Path, by: str, metric: str) -> dict:
    """``{dir, group, seed, curve: [(step, value)]}`` of one run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CompareError(f"{run_dir}: no config.yaml (is it a run directory of aapo train?)")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    try:
        group, seed = config_value(config, by), config_value(config, "run.seed")
    except KeyError as exc:
        raise CompareError(f"{run_dir}/config.yaml has no key {exc.args[0]!r}") from None
    curve = sorted((r["step"], float(r[metric])) for r in read_metrics(run_dir)
                   if isinstance(r.get(metric), (int, float)) and "step" in r)
    if not curve:
        raise CompareError(f"{run_dir}/metrics.jsonl has no values of {metric!r}")
    return {"dir": str(run_dir), "group": json.dumps(group) if isinstance(group, (list, dict)) else str(group),
            "seed": seed, "curve": curve}


def group_runs(runs: list[dict]) -> dict[str, dict]:
    """``{group: {seed: run}}`` in order of first appearance; a seed twice in one group is an error."""
    groups: dict[str, dict] = {}
    for run in runs:
        seeds = groups.setdefault(run["group"], {})
        if run["seed"] in seeds:
            raise CompareError(f"group {run['group']!r} has two runs with run.seed={run['seed']} "
                               f"({seeds[run['seed']]['dir']} and {run['dir']}): pairing by seed is ambiguous")
        seeds[run["seed"]] = run
    return groups


def score(run: dict, last: int) -> float:
    """Mean of the last ``last`` values of the run's metric."""
    values = [v for _, v in run["curve"][-last:]]
    return sum(values) / len(values)


def compare(groups: dict[str, dict], last: int) -> list[dict]:
    """Paired differences A - B for every pair of groups (in order of first appearance)."""
    pairs = []
    for a, b in itertools.combinations(groups, 2):
        seeds = [s for s in groups[a] if s in groups[b]]
        diffs = [score(groups[a][s], last) - score(groups[b][s], last) for s in seeds]
        entry = {"a": a, "b": b, "n": len(seeds), "seeds": seeds, "diffs": diffs,
                 "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "contains_zero": None}
        if seeds:
            mean, low, high = mean_ci(diffs)
            entry.update(mean=mean, ci_low=low, ci_high=high,
                         contains_zero=None if math.isnan(low) else bool(low <= 0 <= high))
        pairs.append(entry)
    return pairs


def describe(pair: dict, metric: str) -> str:
    head = f"{pair['a']} - {pair['b']}: n={pair['n']} paired seed(s)"
    if pair["n"] == 0:
        return f"{head}; no seed in common, nothing to compare"
    text = f"{head}, mean difference of {metric} {pair['mean']:+.4f}"
    if pair["contains_zero"] is None:
        return text + "; 95% CI undefined with one seed (run more seeds)"
    text += f", 95% CI [{pair['ci_low']:+.4f}, {pair['ci_high']:+.4f}]"
    if pair["contains_zero"]:
        return text + " -- contains 0: no evidence of a difference at this sample size"
    better = pair["a"] if pair["mean"] > 0 else pair["b"]
    return text + f" -- excludes 0: {better} is higher"


def curve_bands(groups: dict[str, dict]) -> dict[str, dict]:
    """Per group, on the steps every seed logged: mean and 95% t band over seeds."""
    bands = {}
    for name, seeds in groups.items():
        curves = [dict(run["curve"]) for run in seeds.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_ci([c[s] for c in curves]) for s in steps]
        bands[name] = {"steps": steps, "mean": [m for m, _, _ in stats],
                       "low": [lo for _, lo, _ in stats], "high": [hi for _, _, hi in stats], "n": len(curves)}
    return bands


def plot(bands: dict[str, dict], metric: str, by: str, out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, b in bands.items():
        line, = ax.plot(b["steps"], b["mean"], marker="o", ms=3, label=f"{name} (n={b['n']})")
        if b["n"] > 1:
            ax.fill_between(b["steps"], b["low"], b["high"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} by {by}: mean and 95% CI over seeds")
    return save_figure(fig, [ax], out)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- aapo compare
def run(args: argparse.Namespace) -> int:
    try:
        if args.last < 1:
            raise CompareError(f"--last must be >= 1, got {args.last}")
        groups = group_runs([load_run(d, args.by, args.metric) for d in args.run_dirs])
        if len(groups) < 2:
            raise CompareError(f"all {len(args.run_dirs)} runs have the same {args.by}={next(iter(groups))}: "
                               f"nothing to compare (pass runs of at least two groups)")
    except CompareError as exc:
        print(f"aapo compare: {exc}", file=sys.stderr)
        return 2
    pairs = compare(groups, args.last)
    print(f"{args.metric}: mean of the last {args.last} value(s) per run; groups by {args.by}, paired by run.seed")
    for name, seeds in groups.items():
        print(f"  {name}: seeds {sorted(seeds)}  scores " +
              " ".join(f"{score(seeds[s], args.last):.4f}" for s in sorted(seeds)))
    for pair in pairs:
        print(describe(pair, args.metric))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bands = curve_bands(groups)
    result = {"by": args.by, "metric": args.metric, "last": args.last, "pairs": pairs, "curves": bands,
              "groups": {name: {"seeds": sorted(seeds), "runs": [seeds[s]["dir"] for s in sorted(seeds)],
                                "scores": {str(s): score(seeds[s], args.last) for s in sorted(seeds)}}
                         for name, seeds in groups.items()}}
    (out / "compare.json").write_text(json.dumps(_json_safe(result), indent=2))
    print(f"wrote {out / 'compare.json'} and {plot(bands, args.metric, args.by, out / 'compare.png')}")
    return 0
