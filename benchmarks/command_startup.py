"""``aapo eval``, ``aapo serve`` and ``aapo reference build`` as a user runs them: a fresh process and a fresh
local Ray cluster each time, on the embedded model (already cached).

``--command eval``: ``--problems`` problems of its synthetic test split, one sample each; the whole process's wall
seconds, and from its ``results.json`` its wait for the cluster (``ray_init_s``) and its time after the imports.
``--command serve``: ``aapo serve`` until it prints that the model is up (``up_s``), then one completion over HTTP
(must answer 200), then Ctrl-C (``stop_s``: to the exit). ``--command reference``: ``aapo reference build`` of
``--problems`` synthetic training prompts x 4 samples (``wall_s``).

Arms: ``early`` (this checkout's ``aapo``: the local cluster starts while the runner imports,
:func:`aapo_ray.launch.start_ray_early`), ``late`` (the same code with that start left to the command's own
``init_ray``, after its imports and input checks, as before) and, with ``--baseline DIR``, ``baseline``
(the ``aapo`` of another checkout, e.g. a ``git worktree`` of an earlier commit: the process starts in DIR,
which leads ``PYTHONPATH``). Rounds interleaved, the first arm rotated each round; ratios per round of the
command's main time (``wall_s``; ``up_s`` for serve) against ``late`` (or ``baseline``), with a 95% confidence
interval.

Usage: python benchmarks/command_startup.py [--command eval|serve|reference] [--rounds 6] [--problems 16]
       [--baseline DIR]
Writes benchmarks/results/command_startup_<command>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import _common as C
from aapo_ray.compare import mean_ci
# `aapo` from whichever checkout the process starts in; `aapo` with the local cluster started by the command's own
# init_ray, after its imports and input checks
from startup import BASELINE as SCRIPT, LATE_RAY as LATE, checkout_env

MAIN_TIME = {"eval": "wall_s", "serve": "up_s", "reference": "wall_s"}


def _run(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=checkout_env(cwd), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[-8:])} failed ({proc.returncode}) in {cwd}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def run_eval(script: tuple, model: str, problems: int, cwd: Path) -> dict:
    """``wall_s`` the whole process; from its results.json, ``ray_init_s`` (its wait for the local cluster;
    absent from older checkouts) and ``after_imports_s`` (from its runner's start: what the imports left)."""
    with tempfile.TemporaryDirectory(prefix="aapo-eval-startup-") as out:
        wall = _run([*script, "eval", model, "--benchmarks", f"synthetic:test:{problems}", "--samples", "1", "--quiet",
                     "--out", out], cwd)
        results = json.loads((Path(out) / "results.json").read_text())
    return {"wall_s": wall, "ray_init_s": results.get("ray_init_s", float("nan")), "after_imports_s": results["wall_s"]}


def run_reference(script: tuple, model: str, problems: int, cwd: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="aapo-reference-startup-") as out:
        wall = _run([*script, "reference", "build", "--no-progress", f"model.path={model}",
                     f"data.train=synthetic:train:{problems}", "algo.reference=precomputed", "algo.group_size=2",
                     "algo.reference_samples=4", "rollout.max_new_tokens=16", f"algo.reference_cache={out}/cache"], cwd)
    return {"wall_s": wall}


def run_serve(script: tuple, model: str, problems: int, cwd: Path) -> dict:  # noqa: ARG001 - one request
    """``up_s``: to the line saying the model is up; ``stop_s``: from Ctrl-C to the exit, after one completion."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    proc = subprocess.Popen([*script, "serve", model, "--port", str(port)], cwd=cwd, env=checkout_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("aapo serve: model "):
                up, name = time.perf_counter() - start, line.split("'")[1]
                break
        else:
            raise RuntimeError(f"aapo serve exited ({proc.wait()}) in {cwd}:\n{''.join(lines)[-3000:]}")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": name, "prompt": "Compute 1+2.\n", "max_tokens": 8}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200 and json.loads(response.read())["choices"][0]["text"]
        stop = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
        return {"up_s": up, "stop_s": time.perf_counter() - stop}
    finally:
        if proc.poll() is None:
            proc.kill()


RUNS = {"eval": run_eval, "serve": run_serve, "reference": run_reference}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", choices=sorted(RUNS), default="eval")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit (git worktree add DIR COMMIT)")
    a = ap.parse_args()
    model, key = C.model_dir("embedded"), MAIN_TIME[a.command]  # the model cached before timing
    arms = {"early": (SCRIPT, C.REPO), "late": (LATE, C.REPO)}
    if a.baseline:
        arms["baseline"] = (SCRIPT, a.baseline.resolve())
    names = list(arms)
    res = {name: [] for name in names}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            script, cwd = arms[name]
            res[name].append(RUNS[a.command](script, model, a.problems, cwd))
            print(f"  round {r + 1}/{a.rounds} {name}: {res[name][-1][key]:.1f} s", flush=True)
    print(f"\n`aapo {a.command}`, {a.rounds} interleaved rounds ({os.cpu_count()} CPUs); seconds, median (range)")
    for part in res["early"][0]:
        print(f"{part}: " + "; ".join(f"{name} {C.median([x[part] for x in res[name]]):.2f} "
                                      f"({min(x[part] for x in res[name]):.2f}-{max(x[part] for x in res[name]):.2f})"
                                      for name in names))
    ratios = {}
    for base in ("late", "baseline"):
        if base in res:
            per_round = [x[key] / y[key] for x, y in zip(res["early"], res[base])]
            ratios[f"{key.removesuffix('_s')}_early_over_{base}"] = {"per_round": per_round, "mean_ci95": mean_ci(per_round)}
            mean, low, high = mean_ci(per_round)
            print(f"{key}, early / {base} per round: " + ", ".join(f"{x:.2f}" for x in per_round)
                  + f"; mean {mean:.2f}, 95% CI [{low:.2f}, {high:.2f}]")
    path = C.save(f"command_startup_{a.command}", {
        "machine": C.machine(), "args": {**vars(a), "baseline": a.baseline and str(a.baseline)}, "runs": res,
        "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
