"""Where the fixed cost of a run goes: ``aapo train`` as a user runs it (a fresh process and a fresh local
Ray cluster each time, the embedded model already cached), and the peak RSS of its process tree.

Per round: ``python -c "import aapo_ray.train_cli"`` (imports), ``aapo --help``, and ``aapo train`` for
``--steps`` steps with no evaluation and no checkpoint, on a cluster of its own with the roles in two processes
(``cold``: the default, ``ray.colocate`` split), in one process (``cold_one``) and in a process each
(``cold_off``: before co-location), and the default again through the old exit (``cold_full_exit``:
``sys.exit(main())``, the interpreter's full teardown, as before ``aapo_ray.cli.run``) and through a job
runtime_env (``cold_runtime_env``: the local cluster's workers get their environment from a job runtime_env,
each started through Ray's setup_worker, as before ``init_ray`` let them inherit it) and with the cluster started
only once the driver imported and checked its inputs (``cold_late_ray``: as before ``aapo_ray.launch.start_ray_early``
overlapped the two); joining a local cluster kept warm with ``ray start --head`` (``warm``:
``--address``, a process per role; ``warm_split``: two processes), and joining it with ``ray.keep_roles=true``
(``kept``: the role actors an earlier run left loaded are re-initialised in place; one untimed run first
leaves them there); and the default run of another checkout (``cold_baseline``, with ``--baseline DIR``: e.g. a
``git worktree`` of an earlier commit, whose code every process of the run then imports). From the run's step-0 metrics: ``time/ray_init_s``
(the local cluster: what of its start the driver waited for) and ``time/roles_start_s`` (every role up: generators, scorer, DeepSpeed learners,
started concurrently); ``shutdown_s``: from the last metrics row written to the process's exit (final
checkpoint, roles stopped, plot, Ray's shutdown, the interpreter's exit). Fixed cost = wall - the steps' own
time; the rest of it (interpreter, imports, config, model and prompt checks) is ``other``. Rounds are interleaved with nothing else.

Usage: python benchmarks/startup.py [--rounds 3] [--steps 12] [--arms cold cold_runtime_env ...] [--memory-every 0]
       [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from aapo_ray.compare import mean_ci

AAPO = str(Path(sys.executable).with_name("aapo"))
# `aapo` as it was before its console script skipped the interpreter's teardown (aapo_ray.cli.run)
FULL_EXIT = (sys.executable, "-c", "import sys; from aapo_ray.cli import main; sys.exit(main(start_ray_early=True))")
# `aapo` with its local cluster's workers given their environment by a job runtime_env, as before
RUNTIME_ENV = (sys.executable, "-c", "import aapo_ray.launch as launch; launch.WORKER_ENV_AS_RUNTIME_ENV = True; "
               "from aapo_ray.cli import run; run()")
# `aapo` with its local cluster started by the driver's init_ray, after its imports and input checks, as before
LATE_RAY = (sys.executable, "-c", "import aapo_ray.cli as cli; main = cli.main; "
            "cli.main = lambda **kw: main(**{**kw, 'start_ray_early': False}); cli.run()")
# `aapo` from another checkout (--baseline DIR, e.g. a `git worktree` of an earlier commit): the process starts in
# DIR, and DIR leads PYTHONPATH, which the cluster's workers inherit, so every process of the run imports its code
BASELINE = (sys.executable, "-c", "from aapo_ray.cli import run; run()")
ARMS = ("cold", "cold_baseline", "cold_late_ray", "cold_runtime_env", "cold_one", "cold_off", "cold_full_exit", "warm", "warm_split", "kept")


def checkout_env(directory: Path) -> dict:
    """This process's environment with ``directory`` (a checkout) leading ``PYTHONPATH``: a process started there,
    and the local cluster's workers that inherit its environment, import that checkout's code."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), *filter(None, [os.environ.get("PYTHONPATH")])]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_processes(temp_dir: Path, port: int) -> list:
    """The processes of the cluster this script started (matched by its temp dir or port), and their children."""
    import psutil

    marks = (str(temp_dir), f":{port}")
    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
             and any(m in arg for arg in (p.info["cmdline"] or []) for m in marks)]
    return list({p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}.values())


def stop_cluster(temp_dir: Path, port: int) -> None:
    """Kill the processes of the cluster this script started (``ray stop`` would kill every Ray here)."""
    import psutil

    procs = cluster_processes(temp_dir, port)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # a worker that died with its raylet
            pass
    psutil.wait_procs(procs, timeout=10)


# seconds between the memory sampler's looks at the process tree (it takes ~15% of a core); 0: no sampler
MEMORY_EVERY = 0.2


def timed(cmd: list[str], cwd: Path = C.REPO, **kw) -> tuple[float, float, dict, float]:
    """(wall seconds, peak RSS MB of the process tree, that peak split by role / process, peak PSS MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, **kw)
    if MEMORY_EVERY:
        with C.RssSampler(interval=MEMORY_EVERY, pid=proc.pid) as rss:
            out, err = proc.communicate()
        peaks = rss.peak_mb, rss.peak_parts, rss.peak_pss_mb
    else:
        out, err = proc.communicate()
        peaks = float("nan"), {}, float("nan")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - start, *peaks


def cluster_memory(temp_dir: Path, port: int) -> dict:
    """RSS and PSS (MB) of the kept cluster's processes and their children (daemons, idle workers, kept
    actors), after a run."""
    import psutil

    rss = pss = 0.0
    for p in cluster_processes(temp_dir, port):
        try:
            rss += p.memory_info().rss / 2**20
            pss += C.pss_mb(p.pid)
        except (psutil.NoSuchProcess, OSError):
            pass
    return {"cluster_rss_mb": rss, "cluster_pss_mb": pss}


def one_round(steps: int, address: str | None = None, env: dict | None = None, extra: tuple = (),
              command: tuple = (AAPO,), cwd: Path = C.REPO) -> dict:
    from aapo_ray.metrics import read_metrics

    imports, *_ = timed([sys.executable, "-c", "import aapo_ray.train_cli"], cwd, env=env)
    help_s, *_ = timed([*command, "--help"], cwd, env=env)
    join = ["--address", address] if address else []
    with tempfile.TemporaryDirectory(prefix="aapo-startup-") as tmp:
        wall, peak, parts_mb, pss = timed([*command, "train", *join, "--run-dir", f"{tmp}/run", "--no-progress",
                                           f"run.steps={steps}", "run.eval_every=0", "run.save_every=0", "data.eval=null",
                                           *extra], cwd, env=env)
        # from the last metrics row written to the process's exit (+ up to the RSS sampler's 0.2 s)
        shutdown = time.time() - (Path(tmp) / "run" / "metrics.jsonl").stat().st_mtime
        rows = read_metrics(Path(tmp) / "run")
    first = next(r for r in rows if r["step"] == 0)
    step_s = sum(r["time/step_s"] for r in rows if r["step"] > 0)
    fixed = wall - step_s
    parts = {"ray_init_s": first["time/ray_init_s"], "roles_start_s": first["time/roles_start_s"], "shutdown_s": shutdown}
    return {"kept_reused": first.get("roles/kept_reused", 0), "processes": first["roles/processes"], "import_s": imports, "help_s": help_s, "wall_s": wall, "steps_s": step_s, "fixed_s": fixed, **parts,
            "other_s": fixed - sum(parts.values()), "peak_rss_mb": peak, "peak_pss_mb": pss, "peak_rss_parts_mb": parts_mb}


def main() -> None:
    global MEMORY_EVERY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--arms", nargs="+", choices=ARMS, help="a subset of the arms (default: all; cold_baseline only "
                    "with --baseline)")
    ap.add_argument("--baseline", type=Path, help="for the cold_baseline arm: a checkout of another commit")
    ap.add_argument("--memory-every", type=float, default=MEMORY_EVERY,
                    help="seconds between samples of the runs' memory; 0 times them without the sampler")
    a = ap.parse_args()
    if "cold_baseline" in (a.arms or []) and not a.baseline:
        ap.error("the cold_baseline arm needs --baseline DIR (a checkout of another commit: git worktree add DIR COMMIT)")
    default_arms = [arm for arm in ARMS if arm != "cold_baseline" or a.baseline]
    a.arms = a.arms or default_arms
    baseline = a.baseline and a.baseline.resolve()
    MEMORY_EVERY = a.memory_every
    C.model_dir("embedded")  # cached before timing
    # as the README starts a kept cluster: the variable keeps `ray start` on 127.0.0.1
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    # two kept clusters: a run without ray.keep_roles kills idle kept actors that hold the CPUs it needs,
    # so the "warm" and "kept" runs must not share one
    wanted = {"warm" if arm == "warm_split" else arm for arm in a.arms} & {"warm", "kept"}
    clusters = {arm: (free_port(), Path(tempfile.mkdtemp(prefix=f"aapo-{arm}-", dir="/tmp"))) for arm in sorted(wanted)}
    for port, temp in clusters.values():
        subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
                        "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--temp-dir", str(temp),
                        "--disable-usage-stats"], env=env, check=True, capture_output=True)
    keep = ("ray.keep_roles=true",)

    def joined(arm: str, extra: tuple = ()):
        port, temp = clusters[arm]
        return {**one_round(a.steps, f"127.0.0.1:{port}", env, extra), **cluster_memory(temp, port)}

    try:
        if "kept" in clusters:
            joined("kept", keep)  # leaves the roles loaded for the timed "kept" runs
        arms = {"cold": lambda r: one_round(a.steps),
                "cold_baseline": lambda r: one_round(a.steps, command=BASELINE, cwd=baseline, env=checkout_env(baseline)),
                "cold_late_ray": lambda r: one_round(a.steps, command=LATE_RAY),
                "cold_runtime_env": lambda r: one_round(a.steps, command=RUNTIME_ENV),
                "cold_one": lambda r: one_round(a.steps, extra=("ray.colocate=one",)),
                "cold_off": lambda r: one_round(a.steps, extra=("ray.colocate=off",)),
                "cold_full_exit": lambda r: one_round(a.steps, command=FULL_EXIT),
                "warm": lambda r: joined("warm"), "warm_split": lambda r: joined("warm", ("ray.colocate=split",)),
                "kept": lambda r: joined("kept", keep)}
        res = C.interleave({arm: arms[arm] for arm in ARMS if arm in a.arms}, a.rounds)
    finally:
        for port, temp in clusters.values():
            stop_cluster(temp, port)
    if not all(r["kept_reused"] for r in res.get("kept", [])):  # the arm measures reuse, or nothing
        raise RuntimeError(f"a 'kept' run started fresh actors: {[r['kept_reused'] for r in res['kept']]}")
    keys = ["import_s", "help_s", "ray_init_s", "roles_start_s", "shutdown_s", "other_s", "fixed_s", "steps_s", "wall_s", "peak_rss_mb",
            "peak_pss_mb", "cluster_rss_mb", "cluster_pss_mb", "kept_reused", "processes"]
    print(C.table([{"": k, **{f"{arm} median": C.median([r.get(k, float("nan")) for r in res[arm]]) for arm in res},
                    **{f"{arm} range": f"{min(r.get(k, float('nan')) for r in res[arm]):.3g}-"
                                       f"{max(r.get(k, float('nan')) for r in res[arm]):.3g}" for arm in res}} for k in keys]))
    for arm, base, key in (("cold", "cold_baseline", "fixed_s"), ("cold", "cold_baseline", "roles_start_s"),
                           ("cold", "cold_baseline", "other_s"), ("cold", "cold_late_ray", "fixed_s"), ("cold", "cold_late_ray", "wall_s"),
                           ("kept", "warm", "fixed_s"), ("cold", "cold_full_exit", "shutdown_s"),
                           ("cold", "cold_full_exit", "fixed_s"), ("cold", "cold_off", "fixed_s"), ("cold_one", "cold_off", "fixed_s"),
                           ("cold", "cold_off", "steps_s"), ("cold_one", "cold_off", "steps_s"),
                           ("cold", "cold_off", "peak_pss_mb"), ("cold_one", "cold_off", "peak_pss_mb"),
                           ("cold", "cold_runtime_env", "roles_start_s"), ("cold", "cold_runtime_env", "fixed_s")):
        if arm not in res or base not in res:
            continue
        ratios = [x[key] / y[key] for x, y in zip(res[arm], res[base])]
        mean, low, high = mean_ci(ratios)
        print(f"{key}, {arm} / {base} per round: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f"; mean {mean:.2f}, 95% CI [{low:.2f}, {high:.2f}]")
    for arm in res:
        print(f"{arm}: peak RSS by role, MB (first round): " + ", ".join(
            f"{role} {mb:.0f}" for role, mb in res[arm][0]["peak_rss_parts_mb"].items()))
    print("peak RSS counts the train command's own process tree: with --address, Ray's daemons belong to "
          "`ray start` and are not in it; cluster_rss_mb is the kept cluster's processes after the run (with "
          "ray.keep_roles the loaded roles stay there)")
    name = "startup" if set(a.arms) == set(default_arms) else "_".join(["startup", *(arm for arm in ARMS if arm in a.arms)])
    name += "" if MEMORY_EVERY else "_no_memory"
    path = C.save(name, {"machine": C.machine(), "args": {**vars(a), "baseline": baseline and str(baseline)},
                         "rounds": res})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
