"""Where the fixed cost of a run goes: ``aapo train`` as a user runs it (a fresh process and a fresh local
Ray cluster each time, the embedded model already cached), and the peak RSS of its process tree.

Per round: ``python -c "import aapo_ray.train_cli"`` (imports), ``aapo --help``, and ``aapo train`` for
``--steps`` steps with no evaluation and no checkpoint. From the run's step-0 metrics: ``time/ray_init_s``
(the local cluster) and ``time/roles_start_s`` (every role up: generators, scorer, DeepSpeed learners,
started concurrently). Fixed cost = wall - the steps' own time; the rest of it (interpreter, imports,
config, model and prompt checks, shutdown) is ``other``. Rounds are interleaved with nothing else.

Usage: python benchmarks/startup.py [--rounds 3] [--steps 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

AAPO = str(Path(sys.executable).with_name("aapo"))


def timed(cmd: list[str], **kw) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the process tree)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=C.REPO, **kw)
    with C.RssSampler(interval=0.2, pid=proc.pid) as rss:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - start, rss.peak_mb


def one_round(steps: int) -> dict:
    from aapo_ray.metrics import read_metrics

    imports, _ = timed([sys.executable, "-c", "import aapo_ray.train_cli"])
    help_s, _ = timed([AAPO, "--help"])
    with tempfile.TemporaryDirectory(prefix="aapo-startup-") as tmp:
        wall, peak = timed([AAPO, "train", "--run-dir", f"{tmp}/run", "--no-progress", f"run.steps={steps}",
                            "run.eval_every=0", "run.save_every=0", "data.eval=null"])
        rows = read_metrics(Path(tmp) / "run")
    first = next(r for r in rows if r["step"] == 0)
    step_s = sum(r["time/step_s"] for r in rows if r["step"] > 0)
    fixed = wall - step_s
    parts = {"ray_init_s": first["time/ray_init_s"], "roles_start_s": first["time/roles_start_s"]}
    return {"import_s": imports, "help_s": help_s, "wall_s": wall, "steps_s": step_s, "fixed_s": fixed, **parts,
            "other_s": fixed - sum(parts.values()), "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    C.model_dir("embedded")  # cached before timing
    res = C.interleave({"train": lambda r: one_round(a.steps)}, a.rounds)["train"]
    keys = ["import_s", "help_s", "ray_init_s", "roles_start_s", "other_s", "fixed_s", "steps_s", "wall_s", "peak_rss_mb"]
    print(C.table([{"": k, "median": C.median([r[k] for r in res]), "min": min(r[k] for r in res),
                    "max": max(r[k] for r in res)} for k in keys]))
    path = C.save("startup", {"machine": C.machine(), "args": vars(a), "rounds": res})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
