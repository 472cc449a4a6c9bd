"""Does AAPO beat the baselines? AAPO vs GRPO vs GPG vs AAPO without margin vs Dr.GRPO.

Synthetic arithmetic task, binary accuracy reward, the embedded warm-started model, the same step
budget, lr and sampling for every estimator, 3 seeds (``run.seed``: prompt order, sampling and
evaluation draws). Runs go seed by seed, the four estimators interleaved within a seed. Held-out
accuracy is measured every ``eval_every`` steps on ``data.eval_limit`` test prompts x
``run.eval_samples`` samples. Reported (median over seeds): final, best and mean held-out accuracy
(the mean over the evaluations is an area under the curve), steps to reach each of ``--targets``
(first evaluation at or above), training reward over the last quarter, s/step; and the signal
diagnostics that explain the result: zero-variance group fraction,
zero-advantage sample fraction, and for AAPO the applied margin vs the group term. With a binary
reward the raw margin r - r~ is -1, 0 or +1, so it is always clipped: |m| = 0.2 (policy lost to the
reference) or 0.28 (won), and E|m| = 0.2 * clipped_low_frac + 0.28 * clipped_high_frac.

Usage: python benchmarks/aapo_vs_baselines.py [--quick] [--steps N] [--seeds 0 1 2] [--lr LR] [--targets 0.5 0.55]
       python benchmarks/aapo_vs_baselines.py --resummarize     # tables + plot again from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

import _common as C

ESTIMATORS = ["aapo", "grpo", "gpg", "aapo_no_margin", "dr_grpo"]
KEEP = {"step", "eval/accuracy", "eval/reward", "reward_mean", "zero_variance_group_frac", "zero_advantage_frac",
        "advantage_abs_mean", "margin_mean", "margin_clipped_low_frac", "margin_clipped_high_frac", "ref_reward_mean",
        "completion_len_mean", "learner/loss", "learner/grad_norm", "time/step_s", "time/eval_s"}  # per-step keys saved
COLORS = {"aapo": "#c44e52", "grpo": "#4c72b0", "gpg": "#55a868", "aapo_no_margin": "#ccb974", "dr_grpo": "#8172b2"}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_summary(rows: list[dict], targets: list[float]) -> dict:
    es, ev = series(rows, "eval/accuracy")
    train = [r for r in rows if r["step"] > 0]
    tail = train[-max(1, len(train) // 4):]
    reach = {f"steps_to_{t:g}": next((s for s, a in zip(es, ev) if s > 0 and a >= t), math.inf) for t in targets}
    out = {"initial_acc": ev[0], "final_acc": ev[-1], "best_acc": max(ev), "mean_eval_acc": float(np.mean(ev[1:])), **reach,
           "train_reward_last_quarter": float(np.mean([r["reward_mean"] for r in tail])),
           "zero_var_group_frac": float(np.mean([r["zero_variance_group_frac"] for r in train])),
           "zero_adv_frac": float(np.mean([r["zero_advantage_frac"] for r in train])),
           "adv_abs_mean": float(np.mean([r["advantage_abs_mean"] for r in train])),
           "s_per_step": float(np.median([r["time/step_s"] for r in C.steady(rows)] or [math.nan]))}
    if "margin_mean" in train[0]:
        m_abs = [0.2 * r["margin_clipped_low_frac"] + 0.28 * r["margin_clipped_high_frac"] for r in train]
        out.update(margin_mean=float(np.mean([r["margin_mean"] for r in train])), margin_abs_mean=float(np.mean(m_abs)),
                   margin_nonzero_frac=float(np.mean([r["margin_clipped_low_frac"] + r["margin_clipped_high_frac"] for r in train])),
                   ref_reward_mean=float(np.mean([r["ref_reward_mean"] for r in train])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 15 steps")
    ap.add_argument("--steps", type=int, default=None, help="step budget (default: config run.steps; 15 quick)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    ap.add_argument("--lr", type=float, default=None, help="learner.lr (default: the config default)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.45, 0.5, 0.55, 0.6],
                    help="held-out accuracies for 'steps to target' (first eval at or above)")
    ap.add_argument("--resummarize", action="store_true", help="recompute tables and plot from the saved JSON")
    ap.add_argument("--eval-every", type=int, default=None, help="default: steps // 10 (quick: 5)")
    ap.add_argument("--estimators", nargs="+", default=ESTIMATORS)
    args = ap.parse_args()
    C.SUFFIX = "_quick" if args.quick else ""
    if args.resummarize:
        return summarize(json.loads((C.RESULTS / f"aapo_vs_baselines{C.SUFFIX}.json").read_text()), args.targets)
    base = C.defaults()
    steps = args.steps or (15 if args.quick else base.run.steps)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    lr = args.lr or base.learner.lr
    eval_every = args.eval_every or (5 if args.quick else max(1, steps // 10))
    shared = {"run.steps": steps, "learner.lr": lr, "run.eval_every": eval_every, "data.eval_limit": base.data.eval_limit or 200,
              "run.eval_samples": 1 if args.quick else base.run.eval_samples, "run.eval_temperature": base.run.eval_temperature,
              "rollout.prompts_per_step": base.rollout.prompts_per_step, "algo.group_size": base.algo.group_size,
              "rollout.max_new_tokens": base.rollout.max_new_tokens, "rollout.temperature": base.rollout.temperature,
              "learner.lr_schedule": base.learner.lr_schedule, "learner.warmup_ratio": base.learner.warmup_ratio,
              "reward.functions": "{accuracy: 1.0}"}
    print(f"{len(args.estimators)} estimators x seeds {seeds}, {steps} steps, lr={lr}, eval every {eval_every} steps "
          f"({shared['data.eval_limit']} prompts x {shared['run.eval_samples']} samples)")
    t0 = time.perf_counter()
    result = {"machine": C.machine(), "quick": args.quick, "overrides": shared, "seeds": seeds, "runs": {}}
    for seed in seeds:
        for est in args.estimators:
            t = time.perf_counter()
            run = C.run_pipeline({**shared, "algo.estimator": est, "run.seed": seed})
            result["runs"].setdefault(est, {})[str(seed)] = [{k: v for k, v in r.items() if k in KEEP} for r in run["rows"]]
            accs = series(run["rows"], "eval/accuracy")[1]
            print(f"  seed {seed} {est:8s} eval acc {accs[0]:.3f} -> {accs[-1]:.3f}  ({time.perf_counter() - t:.0f} s)",
                  flush=True)
            C.save("aapo_vs_baselines", result)  # partial results survive an interrupted full run
    result["wall_s"] = time.perf_counter() - t0
    summarize(result, args.targets)


def summarize(result: dict, targets: list[float]) -> None:
    summary = {}
    for est, runs in result["runs"].items():
        per_seed = [run_summary(rows, targets) for rows in runs.values()]
        summary[est] = {k: C.median([p[k] for p in per_seed]) for k in per_seed[0]}
        summary[est]["per_seed"] = per_seed
    result.update(targets=targets, summary=summary)
    initial = C.median([s["initial_acc"] for s in summary.values()])
    reach = [f"steps_to_{t:g}" for t in targets]
    print(f"\nmedian over {len(result['seeds'])} seed(s) of {result['overrides']['run.steps']} steps; warm-start held-out "
          f"accuracy {initial:.3f}; steps_to_X = first evaluation at or above X (inf: never)")
    print(C.table([{"estimator": e, **s} for e, s in summary.items()],
                  ["estimator", "final_acc", "best_acc", "mean_eval_acc", *reach, "train_reward_last_quarter", "s_per_step"]))
    print("\nsignal diagnostics (mean over steps, median over seeds)")
    print(C.table([{"estimator": e, **s} for e, s in summary.items()],
                  ["estimator", "zero_var_group_frac", "zero_adv_frac", "adv_abs_mean", "margin_abs_mean",
                   "margin_nonzero_frac", "margin_mean", "ref_reward_mean"]))
    print("\nper seed: final accuracy / " + reach[-2])
    print(C.table([{"estimator": e, **{f"seed {k}": f"{p['final_acc']:.3f} / {p[reach[-2]]}"
                                       for k, p in zip(result["runs"][e], s["per_seed"])}} for e, s in summary.items()]))
    print(f"wall time {result.get('wall_s', 0):.0f} s -> {C.save('aapo_vs_baselines', result)}")
    plot(result)


def _smooth(x, ys, k: int = 9):
    """Centred k-step moving average (only where the window is full)."""
    if len(x) < k:
        return x, ys
    return x[k // 2: len(x) - k // 2], np.array([np.convolve(y, np.ones(k) / k, mode="valid") for y in ys])


def plot(result: dict) -> None:
    fig, axes = C.figure(2, 3, figsize=(15, 8))
    panels = [("eval/accuracy", "held-out accuracy"), ("reward_mean", "training reward (9-step mean)"),
              ("zero_variance_group_frac", "zero-variance group fraction (9-step mean)"),
              ("zero_advantage_frac", "zero-advantage sample fraction (9-step mean)"),
              ("advantage_abs_mean", "mean |advantage| (9-step mean)")]
    for ax, (key, title) in zip(axes.flat, panels):
        for est, runs in result["runs"].items():
            curves = [series(rows, key) for rows in runs.values()]
            n = min(len(c[1]) for c in curves)
            if n == 0:
                continue
            x, ys = curves[0][0][:n], np.array([c[1][:n] for c in curves])
            if key != "eval/accuracy":
                x, ys = _smooth(x, ys)
            ax.plot(x, np.median(ys, axis=0), color=COLORS.get(est), label=est)
            if len(ys) > 1:
                ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=COLORS.get(est), alpha=0.12)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=8)
    for t in result.get("targets", []):
        axes.flat[0].axhline(t, color="k", ls=":", lw=0.6)
    ax = axes.flat[5]  # AAPO: the margin against the whole advantage
    runs = list(result["runs"].get("aapo", {}).values())
    if runs:
        train = [[r for r in rows if r["step"] > 0] for rows in runs]
        n = min(map(len, train))
        x = [r["step"] for r in train[0][:n]]
        for label, fn, color in (("E|margin|", lambda r: 0.2 * r["margin_clipped_low_frac"] + 0.28 * r["margin_clipped_high_frac"], "#c44e52"),
                                 ("E|advantage|", lambda r: r["advantage_abs_mean"], "#333333"),
                                 ("margin mean (signed)", lambda r: r["margin_mean"], "#dd8452")):
            xs, ys = _smooth(x, np.array([[fn(r) for r in t[:n]] for t in train]))
            ax.plot(xs, np.median(ys, axis=0), color=color, label=label)
        ax.axhline(0, color="k", lw=0.5)
    ax.set(title="AAPO: margin vs whole advantage (9-step mean)", xlabel="step")
    ax.legend(fontsize=8)
    print("plot ->", C.savefig(fig, "aapo_vs_baselines"))


if __name__ == "__main__":
    sys.exit(main())
