"""Is AAPO better? A paired study of AAPO against its baselines, with 95% intervals, run by Ray Tune.

Every run is a whole ``aapo train`` of the embedded model, through the library's own ``train``.
Runs are paired by seed: for one seed, every arm starts from the same warm start (its weights'
SHA-256 is recorded per run), draws prompts in the same order (``run.seed``) and is evaluated on
the same held-out problems with the same sampling seeds. A run's score is its mean held-out
accuracy over its last 3 evaluations (steps 160, 180 and 200), each on ``--eval-prompts`` held-out
problems x 4 samples at T=1. For AAPO against every other arm, per regime, the report gives the
mean paired difference, its 95% t interval, and the seeds that interval's SD says a half-width of
``--halfwidth`` needs (the power calculation; run a pilot of a few seeds first).

Regimes: ``default`` (G=6, 8 prompts per step) and ``zero_var`` (G=2, 24 prompts per step: the
same 48 policy samples per step, but most groups have no reward variance, the case the paper's
argument is about; the measured share is reported).
Arms: ``aapo``, ``grpo`` (as published: std-normalised, sequence-mean, k3 KL 0.04),
``grpo_compute_matched`` (grpo with 2G samples per prompt: AAPO's G policy + G reference
completions per step), ``gpg``, ``aapo_no_margin``, ``dr_grpo``; and two AAPO variants of the
reference-cost issue: ``aapo_precomputed`` (reference rewards from a cache built once, before the
trials) and ``aapo_overlap1`` (one-step off-policy generation). Two stand-ins for another machine:
``aapo_threads1`` (warm start built with 1 SFT thread, 1 learner thread: on the embedded model this
gives bit-identical weights and runs) and ``aapo_warmstart1`` (the warm start's SFT seed 1: a
different warm start of the same recipe, as a machine whose float arithmetic differs would get).

Every (regime, arm, seed) is one Ray Tune trial that reserves what its actors hold (a placement
group), so the study runs on any Ray cluster (``--address``). Every finished trial is written to
the results JSON at once; the next invocation skips it, so a study can be stopped and continued.

Usage:
  python benchmarks/aapo_vs_baselines.py --seeds 0-3                  # pilot
  python benchmarks/aapo_vs_baselines.py --seeds 0-11                 # more seeds: 0-3 are skipped
  python benchmarks/aapo_vs_baselines.py --regimes default --arms aapo aapo_precomputed aapo_overlap1 --seeds 0-5
  python benchmarks/aapo_vs_baselines.py --report                     # tables, power and plot only
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import ray
from ray import tune

import _common as C
from aapo_ray.compare import mean_ci, t_quantile
from aapo_ray.config import load_config
from aapo_ray.driver import train
from aapo_ray.embedded import default_model_path
from aapo_ray.launch import init_ray
from aapo_ray.metrics import read_metrics
from aapo_ray.preflight import check_reference_cache, load_prompts, resolve_model_path, run_resources
from aapo_ray.reference_build import open_reference

REGIMES = {"default": {"algo.group_size": 6, "rollout.prompts_per_step": 8},
           "zero_var": {"algo.group_size": 2, "rollout.prompts_per_step": 24}}
ARMS = {"aapo": {"algo.estimator": "aapo"},
        "grpo": {"algo.estimator": "grpo"},
        "grpo_compute_matched": {"algo.estimator": "grpo", "algo.group_size": "2G"},
        "gpg": {"algo.estimator": "gpg"},
        "aapo_no_margin": {"algo.estimator": "aapo_no_margin"},
        "dr_grpo": {"algo.estimator": "dr_grpo"},
        "aapo_precomputed": {"algo.estimator": "aapo", "algo.reference": "precomputed"},
        "aapo_overlap1": {"algo.estimator": "aapo", "rollout.overlap": 1},
        "aapo_threads1": {"algo.estimator": "aapo", "learner.torch_threads": 1, "model.path": "THREADS1"},
        "aapo_warmstart1": {"algo.estimator": "aapo", "model.path": "WARMSTART1"}}
PRIMARY = ["aapo", "grpo", "grpo_compute_matched"]
NAME = "aapo_vs_baselines"


def parse_seeds(text: list[str]) -> list[int]:
    """``["0-3", "7"]`` -> [0, 1, 2, 3, 7]."""
    out = []
    for part in text:
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def overrides(settings: dict, regime: str, arm: str, seed: int, run_dir: Path) -> dict:
    """The ``aapo train --set`` overrides of one trial."""
    out = {**settings, **REGIMES[regime]}
    for key, value in ARMS[arm].items():
        if value == "2G":
            value = 2 * REGIMES[regime]["algo.group_size"]
        elif value == "THREADS1":
            value = default_model_path(recipe={"sft": {"threads": 1}})
        elif value == "WARMSTART1":
            value = default_model_path(recipe={"sft": {"seed": 1}})
        out[key] = value
    return {**out, "run.seed": seed, "run.name": arm, "run.output_dir": str(run_dir.parent)}


def run_trial(config: dict) -> None:
    """One Tune trial: a whole training run; reports its evaluations and diagnostics."""
    spec = config["spec"]
    cfg = load_config(None, [f"{k}={v}" for k, v in spec["overrides"].items()])
    started = time.perf_counter()
    shutil.rmtree(spec["run_dir"], ignore_errors=True)  # a trial not in the results file: what it left is partial
    run_dir = train(cfg, run_dir=spec["run_dir"], progress=False)
    rows = read_metrics(run_dir)
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # the study needs the metrics only
    steps = [r for r in rows if r["step"] > 0]
    model = json.loads((Path(run_dir) / "model.json").read_text())
    tune.report({"evals": [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r],
                 "reward": [r["reward_mean"] for r in steps],
                 "zero_var_group_frac": float(np.mean([r["zero_variance_group_frac"] for r in steps])),
                 "staleness_mean": float(np.mean([r["rollout/staleness_mean"] for r in steps])),
                 "s_per_step": float(np.median([r["time/step_s"] for r in steps])),
                 "wall_s": time.perf_counter() - started, "weights_sha256": model.get("weights_sha256"),
                 "run_dir": str(run_dir)})


class RecordFinished(tune.Callback):
    """Writes every finished trial into the results file at once (what makes the study resumable)."""

    def __init__(self, result: dict, path: Path):
        self.result, self.path = result, path

    def on_trial_result(self, iteration, trials, trial, result, **info):
        spec = trial.config["spec"]
        keep = ("evals", "reward", "zero_var_group_frac", "staleness_mean", "s_per_step", "wall_s", "weights_sha256", "run_dir")
        self.result["runs"][spec["key"]] = {k: result[k] for k in keep} | {"overrides": spec["overrides"]}
        save(self.result, self.path)
        evals = result["evals"]
        print(f"  {spec['key']}: held-out {evals[0][1]:.3f} -> {evals[-1][1]:.3f}, score {score(result):.4f} "
              f"({result['wall_s']:.0f} s)", flush=True)


def save(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(path)


def score(run: dict) -> float:
    """Mean held-out accuracy of the run's last 3 evaluations."""
    return float(np.mean([a for _, a in run["evals"][-3:]]))


def build_caches(specs: list[dict]) -> None:
    """Builds each precomputed reference the trials will read, before Tune starts them (shared by
    every seed; reported as the reference's one-off cost)."""
    for spec in specs:
        if spec["overrides"].get("algo.reference") == "precomputed":
            cfg = load_config(None, [f"{k}={v}" for k, v in spec["overrides"].items()])
            model_path = resolve_model_path(cfg)
            train_prompts, _ = load_prompts(cfg, model_path)
            open_reference(cfg, model_path, train_prompts, check_reference_cache(cfg, model_path, train_prompts))


def seeds_needed(sd: float, halfwidth: float) -> int:
    """Smallest n with t_{0.975, n-1} * sd / sqrt(n) <= halfwidth (the paired design's power calculation)."""
    n = 2
    while t_quantile(0.975, n - 1) * sd / math.sqrt(n) > halfwidth and n < 10_000:
        n += 1
    return n


def report(result: dict, halfwidth: float) -> dict:
    """Per regime: arms (seeds, mean score, zero-variance share) and AAPO - arm (paired CI, seeds needed)."""
    tables = {}
    runs = result["runs"]
    for regime in REGIMES:
        arms = {}
        for key, run in runs.items():
            reg, arm, seed = key.split("/")
            if reg == regime:
                arms.setdefault(arm, {})[int(seed)] = run
        if not arms:
            continue
        rows = [{"arm": arm, "seeds": len(by_seed), "initial": float(np.mean([r["evals"][0][1] for r in by_seed.values()])),
                 "score (last 3 evals)": float(np.mean([score(r) for r in by_seed.values()])),
                 "gain step 0 -> last, min": min(r["evals"][-1][1] - r["evals"][0][1] for r in by_seed.values()),
                 "max": max(r["evals"][-1][1] - r["evals"][0][1] for r in by_seed.values()),
                 "zero-var groups": float(np.mean([r["zero_var_group_frac"] for r in by_seed.values()])),
                 "s/step": float(np.median([r["s_per_step"] for r in by_seed.values()]))}
                for arm, by_seed in arms.items()]
        pairs = []
        for arm, by_seed in arms.items():
            if arm == "aapo" or "aapo" not in arms:
                continue
            # a pair shares the warm start: runs whose initial weights differ are not paired
            seeds = sorted(s for s in set(by_seed) & set(arms["aapo"])
                           if by_seed[s].get("weights_sha256") == arms["aapo"][s].get("weights_sha256"))
            diffs = [score(arms["aapo"][s]) - score(by_seed[s]) for s in seeds]
            if not diffs:
                continue
            mean, low, high = mean_ci(diffs)
            sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
            pairs.append({"aapo minus": arm, "n": len(diffs), "mean diff": mean, "ci_low": low, "ci_high": high,
                          "sd": sd, "contains 0": None if math.isnan(low) else bool(low <= 0 <= high),
                          f"seeds for +-{halfwidth:g}": seeds_needed(sd, halfwidth) if sd == sd else None,
                          "diffs": diffs})
        tables[regime] = {"arms": rows, "pairs": pairs}
        print(f"\n## regime {regime} ({REGIMES[regime]}); score = mean held-out accuracy of the last 3 evaluations")
        print(C.table(rows, fmt="{:.4f}"))
        if pairs:
            print(C.table([{k: v for k, v in p.items() if k != "diffs"} for p in pairs], fmt="{:+.4f}"))
    result["report"] = tables
    return tables


def plot(result: dict, out: Path) -> Path:
    """Learning curves and paired differences, written to ``out`` (next to the results file)."""
    regimes = [r for r in REGIMES if r in result.get("report", {})]
    fig, axes = C.figure(2, max(1, len(regimes)), figsize=(7 * max(1, len(regimes)), 9), squeeze=False)
    for col, regime in enumerate(regimes):
        by_arm: dict[str, list] = {}
        for key, run in result["runs"].items():
            reg, arm, _ = key.split("/")
            if reg == regime:
                by_arm.setdefault(arm, []).append(run["reward"])
        ax = axes[0][col]
        for arm, curves in by_arm.items():
            n = min(map(len, curves))
            ys = np.array([np.convolve(c[:n], np.ones(10) / 10, mode="valid") for c in curves])
            x = np.arange(len(ys[0])) + 10
            ax.plot(x, ys.mean(0), label=f"{arm} (n={len(curves)})")
            if len(ys) > 1:
                half = t_quantile(0.975, len(ys) - 1) * ys.std(0, ddof=1) / math.sqrt(len(ys))
                ax.fill_between(x, ys.mean(0) - half, ys.mean(0) + half, alpha=0.15)
        ax.set(title=f"{regime}: training reward (10-step mean), 95% band over seeds", xlabel="step")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        pairs = result["report"][regime]["pairs"]
        for i, p in enumerate(pairs):
            ax.errorbar([p["mean diff"]], [i], xerr=[[p["mean diff"] - p["ci_low"]], [p["ci_high"] - p["mean diff"]]]
                        if p["n"] > 1 else None, fmt="o", capsize=4)
        ax.axvline(0, color="k", lw=0.7)
        ax.set_yticks(range(len(pairs)), [f"aapo - {p['aapo minus']} (n={p['n']})" for p in pairs])
        ax.set(title=f"{regime}: paired difference in score, 95% CI", xlabel="AAPO minus arm (held-out accuracy)")
    return C.savefig(fig, NAME, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", default=["0-3"], help="seeds, e.g. 0-3 7 (default 0-3, a pilot)")
    ap.add_argument("--arms", nargs="+", default=PRIMARY, choices=list(ARMS))
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--eval-prompts", type=int, default=1000, help="held-out problems per evaluation (x 4 samples)")
    ap.add_argument("--halfwidth", type=float, default=0.02, help="target 95%% CI half-width for the power calculation")
    ap.add_argument("--concurrent", type=int, default=1, help="trials at once (each holds ~2 logical CPUs; on 2 "
                    "cores 2 at once ran each trial ~3x slower, so raise it only with cores or nodes to spare)")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    ap.add_argument("--runs-dir", default=str(C.RESULTS / "study_runs"), help="run directories (for aapo compare)")
    ap.add_argument("--steps", type=int, default=200, help="steps per run; evaluations at the last three tenths")
    ap.add_argument("--results", default=str(C.RESULTS / f"{NAME}.json"), help="results JSON (read, extended, rewritten)")
    ap.add_argument("--report", action="store_true", help="only print the report and plot from the results file")
    args = ap.parse_args()
    path = Path(args.results)
    result = json.loads(path.read_text()) if path.is_file() else {}
    if args.report:
        report(result, args.halfwidth)
        print("plot ->", plot(result, path.with_suffix(".png")))
        return 0
    settings = {"run.steps": args.steps, "run.eval_every": args.steps // 10, "run.eval_from": args.steps - 2 * (args.steps // 10), "run.save_every": 0,
                "data.eval": f"synthetic:test:{args.eval_prompts}", "data.eval_limit": args.eval_prompts,
                "run.eval_samples": 4, "learner.torch_threads": 2}
    if result.get("settings", settings) != settings:
        raise SystemExit(f"{path} holds runs with other settings ({result['settings']}); move it away to start anew")
    result.update(settings=settings, machine=result.get("machine") or C.machine())
    result.setdefault("runs", {})
    runs_dir = Path(args.runs_dir).resolve()
    specs = []
    for seed in parse_seeds(args.seeds):  # seed-major: partial results are whole pairs
        for regime in args.regimes:
            for arm in args.arms:
                key = f"{regime}/{arm}/{seed}"
                if key in result["runs"]:
                    continue
                run_dir = runs_dir / regime / f"{arm}-seed{seed}"
                specs.append({"key": key, "run_dir": str(run_dir), "overrides": overrides(settings, regime, arm, seed, run_dir)})
    print(f"{len(specs)} trial(s) to run, {len(result['runs'])} already in {path}")
    if specs:
        init_ray(args.address, num_cpus=2 * args.concurrent, namespace="aapo-study", torch_threads=1)
        started = time.perf_counter()
        build_caches(specs)
        result.setdefault("reference_build_s", {})["last"] = time.perf_counter() - started

        def resources(config: dict) -> tune.PlacementGroupFactory:  # the trial's driver + its actors
            need = run_resources(load_config(None, [f"{k}={v}" for k, v in config["spec"]["overrides"].items()]))
            return tune.PlacementGroupFactory([{"CPU": 0.01}, {"CPU": need["CPU"], "GPU": need["GPU"]}])

        tuner = tune.Tuner(tune.with_resources(run_trial, resources),
                           param_space={"spec": tune.grid_search(specs)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrent),
                           run_config=tune.RunConfig(name=NAME, storage_path=str(runs_dir / "tune"), verbose=0,
                                                     callbacks=[RecordFinished(result, path)]))
        grid = tuner.fit()
        failed = [r for r in grid if r.error]
        for r in failed:
            print(f"  FAILED {r.config['spec']['key']}: {r.error}", file=sys.stderr)
        ray.shutdown()
    report(result, args.halfwidth)
    save(result, path)
    print("plot ->", plot(result, path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
