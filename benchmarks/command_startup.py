"""``aapo eval`` as a user runs it, whole: a fresh process and a fresh local Ray cluster each time, on the
embedded model (already cached) and ``--problems`` problems of its synthetic test split, one sample each.

Arms: ``early`` (this checkout's ``aapo``: its local cluster starts while the runner imports,
:func:`aapo_ray.launch.start_ray_early`), ``late`` (the same code with that start left to ``eval``'s own
``init_ray``, after its imports and input checks, as before) and, with ``--baseline DIR``, ``baseline``
(the ``aapo`` of another checkout, e.g. a ``git worktree`` of an earlier commit: the process starts in DIR,
which leads ``PYTHONPATH``). Per run: the process's wall seconds, and from its ``results.json`` its wait for the
cluster (``ray_init_s``) and its time after the imports. Rounds interleaved, the first arm rotated each round;
wall ratios per round against ``late`` (or ``baseline``), with a 95% confidence interval.

Usage: python benchmarks/eval_startup.py [--rounds 6] [--problems 16] [--baseline DIR]
Writes benchmarks/results/eval_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import _common as C
from aapo_ray.compare import mean_ci
# `aapo` from whichever checkout the process starts in; `aapo` with the local cluster started by the command's own
# init_ray, after its imports and input checks
from startup import BASELINE as SCRIPT, LATE_RAY as LATE, checkout_env


def one_run(script: tuple, model: str, problems: int, cwd: Path) -> dict:
    """Seconds: ``wall_s`` the whole process; from its results.json, ``ray_init_s`` (its wait for the local cluster;
    absent from older checkouts) and ``after_imports_s`` (from its runner's start: what the imports left)."""
    with tempfile.TemporaryDirectory(prefix="aapo-eval-startup-") as out:
        start = time.perf_counter()
        proc = subprocess.run([*script, "eval", model, "--benchmarks",
                               f"synthetic:test:{problems}", "--samples", "1", "--quiet", "--out", out],
                              cwd=cwd, env=checkout_env(cwd), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"aapo eval failed ({proc.returncode}) in {cwd}:\n{proc.stderr[-3000:]}")
        results = json.loads((Path(out) / "results.json").read_text())
    return {"wall_s": wall, "ray_init_s": results.get("ray_init_s", float("nan")), "after_imports_s": results["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit (git worktree add DIR COMMIT)")
    a = ap.parse_args()
    model = C.model_dir("embedded")  # cached before timing
    arms = {"early": (SCRIPT, C.REPO), "late": (LATE, C.REPO)}
    if a.baseline:
        arms["baseline"] = (SCRIPT, a.baseline.resolve())
    names = list(arms)
    res = {name: [] for name in names}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            script, cwd = arms[name]
            res[name].append(one_run(script, model, a.problems, cwd))
            print(f"  round {r + 1}/{a.rounds} {name}: {res[name][-1]['wall_s']:.1f} s", flush=True)
    print(f"\n`aapo eval` on {a.problems} synthetic problems, 1 sample each, {a.rounds} interleaved rounds "
          f"({os.cpu_count()} CPUs); seconds, median (range)")
    for key in ("wall_s", "ray_init_s", "after_imports_s"):
        print(f"{key}: " + "; ".join(f"{name} {C.median([x[key] for x in res[name]]):.2f} "
                                     f"({min(x[key] for x in res[name]):.2f}-{max(x[key] for x in res[name]):.2f})"
                                     for name in names))
    ratios = {}
    for base in ("late", "baseline"):
        if base in res:
            per_round = [x["wall_s"] / y["wall_s"] for x, y in zip(res["early"], res[base])]
            ratios[f"wall_early_over_{base}"] = {"per_round": per_round, "mean_ci95": mean_ci(per_round)}
            mean, low, high = mean_ci(per_round)
            print(f"wall_s, early / {base} per round: " + ", ".join(f"{x:.2f}" for x in per_round)
                  + f"; mean {mean:.2f}, 95% CI [{low:.2f}, {high:.2f}]")
    path = C.save("eval_startup", {"machine": C.machine(), "args": {**vars(a), "baseline": a.baseline and str(a.baseline)},
                                   "runs": res, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
