"""Soak: the embedded default training run for a few hundred steps, memory sampled every step.

Runs ``aapo train --no-progress run.steps=N`` (the real pipeline: generators, frozen reference,
scorers and their reward worker subprocesses, DeepSpeed learner, on a local Ray cluster) as a
subprocess and watches it from outside: whenever ``metrics.jsonl`` gains a step, the resident
set size (RSS) of every process of the run's process tree is sampled with psutil and summed per
role (the driver, each Ray actor class by its process title ``ray::GeneratorActor`` etc., the
reward worker subprocesses, Ray's own processes). Object store usage (bytes used, objects) is read
from the raylet every 10 steps, with Ray's ``internal_api`` (GCS address from the run's raylet).

Reports, per role, the RSS slope in MB per 100 steps as the least-squares fit over the second half
of the steps (warm-up excluded) against a stated bound, the RSS at start / end / peak, and the
object store at start and end. Writes ``benchmarks/results/soak.json`` and ``soak.png`` (RSS per
role vs step). Exit status 1 if the run fails or a role's slope is significantly above the bound
(slope - 2 standard errors > bound) for the driver, the actor roles or the reward workers.

``--quick`` (60 steps) is a smoke run: its fit window (steps 31-60) is still inside the warm-up,
where the learner's RSS climbs ~30 MB over the first ~100 steps before it levels off, so only a
run of a few hundred steps gives a leak verdict.

Usage: python benchmarks/soak.py [--quick (60 steps)] [--steps 300] [--bound-mb-per-100 8]
       [--run-dir DIR] [KEY=VALUE overrides for aapo train ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ACTOR_ROLES = ("GeneratorActor", "ReferenceActor", "RewardScorer", "LearnerActor")


def role_of(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    cmd = " ".join(proc.cmdline())
    for cls in ACTOR_ROLES:
        if cmd.startswith(f"ray::{cls}"):
            return cls
    if "aapo_ray.reward import _worker_main" in cmd:
        return "reward_worker"
    if cmd.startswith("ray::"):
        return "ray_worker_other"  # idle workers, Ray's own actors
    exe = proc.name()
    if exe in ("gcs_server", "raylet"):
        return exe
    return "ray_agents_other"  # dashboard agent, runtime env agent, log monitor, ...


def sample(driver_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, RSS MB) for the run's whole process tree."""
    try:
        root = psutil.Process(driver_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = (role_of(p, driver_pid), p.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def gcs_address(driver_pid: int) -> str | None:
    try:
        for p in psutil.Process(driver_pid).children(recursive=True):
            for arg in p.cmdline():
                if arg.startswith("--gcs-address="):
                    return arg.split("=", 1)[1]
    except psutil.NoSuchProcess:
        pass
    return None


def object_store(address: str) -> dict | None:
    """Plasma usage of the cluster at ``address`` (the raylet's own numbers), or None."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
        from ray._private.internal_api import get_memory_info_reply
        from ray._private.state import GlobalState
        from ray._raylet import GcsClientOptions

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # the run's local token (~/.ray)

        # internal_api.get_state_from_address would first rewrite 127.0.0.1 to this host's outward IP,
        # where a loopback-only cluster does not listen
        state = GlobalState()
        state._initialize_global_state(GcsClientOptions.create(address, None, allow_cluster_id_nil=True,
                                                               fetch_cluster_id_if_nil=False))
        s = get_memory_info_reply(state, timeout_seconds=10).store_stats
        return {"used_mb": round(s.object_store_bytes_used / 2**20, 2),
                "primary_copy_mb": round(s.object_store_bytes_primary_copy / 2**20, 2),
                "capacity_mb": round(s.object_store_bytes_avail / 2**20, 1),
                "num_local_objects": int(s.num_local_objects),
                "spilled_mb": round(s.spilled_bytes_total / 2**20, 2)}
    except Exception as exc:  # noqa: BLE001 - reported, the soak goes on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def slope_per_100(steps: list[int], values: list[float]) -> tuple[float, float] | tuple[None, None]:
    """Least-squares slope and its standard error, in MB per 100 steps."""
    if len(steps) < 4:
        return None, None
    (a, _), cov = np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1, cov=True)
    return float(a * 100), float(np.sqrt(cov[0, 0]) * 100)


def summarize(per_step: list[dict], steps: int, bound: float) -> dict:
    """Per role: slope over the second half of the steps (and its standard error), RSS first / last / peak.

    A role is within the bound unless its slope is *significantly* above it (slope - 2 SE > bound):
    a short run's slope is noisy (the learner's RSS moves by +-10 MB from step to step)."""
    train_steps = [r for r in per_step if r["step"] >= 1]
    half = [r for r in train_steps if r["step"] > steps // 2]
    report = {}
    for role in sorted({k for r in train_steps for k in r["rss"]}):
        xs = [r["step"] for r in half if role in r["rss"]]
        ys = [r["rss"][role] for r in half if role in r["rss"]]
        series = [r["rss"][role] for r in train_steps if role in r["rss"]]
        nprocs = max((r["nprocs"].get(role, 0) for r in train_steps), default=None)
        slope, se = slope_per_100(xs, ys)
        report[role] = {"processes": nprocs,
                        "slope_mb_per_100_steps_second_half": None if slope is None else round(slope, 2),
                        "slope_standard_error": None if se is None else round(se, 2),
                        "rss_mb_first_step": series[0] if series else None,
                        "rss_mb_last_step": series[-1] if series else None,
                        "rss_mb_peak": max(series) if series else None,
                        "within_bound": None if slope is None else slope - 2 * se <= bound}
    return report


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 90), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra aapo train overrides")
    ap.add_argument("--quick", action="store_true", help="60 steps")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; quick 60)")
    ap.add_argument("--bound-mb-per-100", type=float, default=8.0,
                    help="largest acceptable RSS slope per role, MB per 100 steps (default 8)")
    ap.add_argument("--run-dir", help="run directory (default: a fresh temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temp run directory")
    ap.add_argument("--max-seconds", type=float, default=None, help="wall-clock limit (default 120 + 10 s/step)")
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    ap.add_argument("--png", default=str(RESULTS / "soak.png"))
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    limit = args.max_seconds or 120 + 10 * steps
    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        tmp = tempfile.mkdtemp(prefix="aapo-soak-")
        run_dir = Path(tmp) / "run"
    metrics_path = run_dir / "metrics.jsonl"
    log_path = Path(tempfile.gettempdir()) / f"aapo-soak-{os.getpid()}.log"
    cmd = [sys.executable, "-m", "aapo_ray", "train", "--no-progress", "--run-dir", str(run_dir),
           f"run.steps={steps}", *args.overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    print(f"soak: {' '.join(cmd[2:])}  (log {log_path})", flush=True)
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    driver_rss0 = None
    per_step: list[dict] = []  # {"step", "t", "rss": {role: MB}, "nprocs": {role: processes}}
    stores: list[dict] = []
    metrics: list[dict] = []
    offset, buffer, address, querying = 0, b"", None, threading.Lock()

    def query_store(step: int) -> None:  # in a thread: sampling never waits on it
        with querying:
            stores.append({"step": step, "t": round(time.monotonic() - t_start, 2), **(object_store(address) or {})})

    try:
        while True:
            running = proc.poll() is None
            if time.monotonic() - t_start > limit:
                print(f"soak: wall-clock limit {limit:.0f}s reached, stopping the run", flush=True)
                break
            if driver_rss0 is None:
                driver_rss0 = sample(proc.pid).get(proc.pid, (None, None))[1]
            new = []
            if metrics_path.exists():
                with open(metrics_path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                new = [json.loads(line) for line in lines if line.strip()]
            if new:
                snap = sample(proc.pid)
                rss: dict[str, float] = defaultdict(float)
                for role, mb in snap.values():
                    rss[role] += mb
                for row in new:
                    metrics.append(row)
                    per_step.append({"step": row["step"], "t": round(time.monotonic() - t_start, 2),
                                     "rss": {k: round(v, 1) for k, v in rss.items()},
                                     "nprocs": {k: sum(1 for v in snap.values() if v[0] == k) for k in rss}})
                last = new[-1]["step"]
                if address is None:
                    address = gcs_address(proc.pid)
                if address and running and (last == 1 or last % 10 == 0 or last >= steps) and not querying.locked():
                    threading.Thread(target=query_store, args=(last,), daemon=True).start()
                if last >= steps:
                    print(f"soak: step {last} done", flush=True)
            if not running:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and (time.monotonic() - t_start > limit):
            stop(proc)
        try:
            proc.wait(timeout=max(10.0, limit - (time.monotonic() - t_start)))
        except subprocess.TimeoutExpired:
            stop(proc)
        with querying:  # a store query still under way finishes first
            stores.sort(key=lambda r: r["step"])
    wall = time.monotonic() - t_start
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""

    report = summarize(per_step, steps, args.bound_mb_per_100)
    checked = [r for r in ACTOR_ROLES + ("driver", "reward_worker") if r in report]
    ok = proc.returncode == 0 and bool(checked) and all(report[r]["within_bound"] for r in checked)
    step_times = [m["time/step_s"] for m in metrics if "time/step_s" in m]
    out = {
        "benchmark": "soak", "command": " ".join(cmd[2:]), "steps_requested": steps,
        "steps_logged": max((r["step"] for r in per_step), default=0), "exit_code": proc.returncode,
        "wall_s": round(wall, 1), "step_s_median": float(np.median(step_times)) if step_times else None,
        "bound_mb_per_100_steps": args.bound_mb_per_100,
        "bound_applies_to": checked,
        "slope_method": f"least squares of per-role RSS (sum over the role's processes) on steps "
                        f"{steps // 2 + 1}..{steps}, sampled when each step's metrics line appeared; "
                        "within_bound unless slope - 2 standard errors > bound",
        "pass": ok, "roles": report,
        "object_store": {"start": stores[0] if stores else None, "end": stores[-1] if stores else None,
                         "samples": stores},
        "eval_accuracy": [(m["step"], m["eval/accuracy"]) for m in metrics if "eval/accuracy" in m],
        "reward_counters_total": {k: sum(m.get(f"reward/{k}", 0) for m in metrics)
                                  for k in ("timeouts", "errors", "none", "unparseable_gold")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg": os.getloadavg()},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "log_tail": tail if proc.returncode else None,
        "per_step": per_step,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(per_step, report, steps, args.png)
    for role, r in report.items():
        print(f"soak: {role:18s} x{r['processes']}  RSS {r['rss_mb_first_step']} -> {r['rss_mb_last_step']} MB "
              f"(peak {r['rss_mb_peak']}), slope {r['slope_mb_per_100_steps_second_half']} "
              f"+- {r['slope_standard_error']} MB/100 steps")
    print(f"soak: object store start {out['object_store']['start']}  end {out['object_store']['end']}")
    print(f"soak: {'PASS' if ok else 'FAIL'} (bound {args.bound_mb_per_100} MB/100 steps) -> {args.out}")
    if proc.returncode:
        print(tail, file=sys.stderr)
    if tmp and not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def plot(per_step: list[dict], report: dict, steps: int, path: str) -> None:
    """Top: RSS per role (log scale). Bottom: growth since the first training step (linear), fitted slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in per_step if r["step"] >= 1]
    if not rows:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    for role in sorted(report, key=lambda k: -(report[k]["rss_mb_peak"] or 0)):
        xs = [r["step"] for r in rows if role in r["rss"]]
        ys = np.array([r["rss"][role] for r in rows if role in r["rss"]])
        slope = report[role]["slope_mb_per_100_steps_second_half"]
        label = f"{role} x{report[role]['processes']}" + (f" ({slope:+.1f} MB/100 steps)" if slope is not None else "")
        (line,) = top.plot(xs, ys, lw=1.2, label=label)
        bottom.plot(xs, ys - ys[0], lw=1.0, color=line.get_color())
        if slope is not None:
            fit = [(x, y) for x, y in zip(xs, ys - ys[0]) if x > steps // 2]
            fx = np.array([x for x, _ in fit], float)
            a, b = np.polyfit(fx, [y for _, y in fit], 1)
            bottom.plot(fx, a * fx + b, lw=2.2, ls="--", color=line.get_color(), alpha=0.8)
    for ax in (top, bottom):
        ax.axvline(steps // 2, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    top.set_yscale("log")
    top.set_ylabel("RSS, MB (sum over the role's processes)")
    top.set_title(f"aapo train soak, {steps} steps: RSS per role (slopes fitted after the dotted line)")
    top.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    bottom.set_ylabel("RSS growth since step 1, MB")
    bottom.set_xlabel("training step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
