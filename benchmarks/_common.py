"""Helpers shared by the benchmark scripts: run a pipeline config and read its metrics, sample the
RSS of a whole process tree, interleave runs, medians, tables, JSON.

Imported by ``benchmarks/<name>.py`` (each puts this directory and the repo root on ``sys.path``).
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable
for p in (str(REPO), str(Path(__file__).parent)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/aapo_ray/torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import aapo_ray  # noqa: E402,F401  (Ray's local-only environment before ray is imported)

# The larger tiny model of step_anatomy: the embedded recipe 2x wider, 1.5x deeper (5.3M params), 150 SFT steps.
LARGER_RECIPE = {"model": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
                           "intermediate_size": 768, "max_position_embeddings": 256},
                 "sft": {"steps": 150}, "eval": {"n": 64}}
# What every pipeline run in the benchmarks shares unless a script overrides it.
# ray.colocate=off: a process per role, as the figures below were measured (and their RSS split by role);
# startup.py measures the co-located layouts that `aapo train` picks on its own.
BASE_OVERRIDES = {"run.eval_every": 0, "run.save_every": 0, "data.eval_limit": 64, "run.torch_threads": 1,
                  "ray.colocate": "off"}


# ----------------------------------------------------------------------------- statistics
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def interleave(arms: dict, repeats: int, log=print) -> dict[str, list]:
    """Call every arm once per round (A B C, A B C, ...); returns {arm: [result per round]}."""
    out = {name: [] for name in arms}
    for r in range(repeats):
        for name, fn in arms.items():
            t = time.perf_counter()
            out[name].append(fn(r))
            log(f"  round {r + 1}/{repeats} {name}: {time.perf_counter() - t:.1f} s")
    return out


def steady(rows: list[dict], skip: int = 2) -> list[dict]:
    """Training steps after the first ``skip`` (warm-up), without steps that evaluated or saved."""
    return [r for r in rows if r.get("step", 0) > skip and "time/eval_s" not in r and "time/checkpoint_s" not in r]


# ----------------------------------------------------------------------------- memory
def _tree(proc):
    import psutil

    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return [proc]


def _role(p) -> str:
    """A readable name for a process of the tree: Ray worker role, reward worker, Ray helper."""
    cmd = p.cmdline()
    if p.name().startswith("ray::") or (cmd and cmd[0].startswith("ray::")):
        return cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()
    joined = " ".join(cmd)
    for marker, label in (("_worker_main", "reward_worker"), ("log_monitor", "ray_log_monitor"),
                          ("dashboard", "ray_dashboard"), ("runtime_env", "ray_runtime_env")):
        if marker in joined:
            return label
    return p.name()


def pss_mb(pid: int) -> float:
    """Proportional set size of one process (0 where the kernel has no smaps_rollup)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class RssSampler:
    """Peak of the summed RSS of this process and all its descendants (Ray's GCS, raylet and every
    worker / actor started by a local cluster, reward subprocesses), sampled every ``interval`` s.
    RSS counts shared pages (object store, libraries) once per process, so the sum over-counts; the
    peak of the summed PSS (``peak_pss_mb``: each shared page split among the processes mapping it, from
    ``/proc/PID/smaps_rollup``) is the tree's physical footprint."""

    def __init__(self, interval: float = 0.25, pid: int | None = None):
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_mb, self.peak_parts, self.samples = 0.0, {}, 0
        self.peak_pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        import psutil

        parts: dict[str, float] = {}
        pss = 0.0
        for p in _tree(self.root):
            try:
                mb = p.memory_info().rss / 2**20
                name = "driver" if p.pid == self.root.pid else _role(p)
                pss += pss_mb(p.pid)
            except (psutil.Error, IndexError, OSError):
                continue
            key = name.split(".")[0] if name.startswith("ray::") else name  # ray::GeneratorActor.generate -> role
            parts[key] = parts.get(key, 0.0) + mb
        self.peak_pss_mb = max(self.peak_pss_mb, pss)
        total = sum(parts.values())
        if total > self.peak_mb:
            self.peak_mb, self.peak_parts = total, {k: round(v, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
        self.samples += 1
        return total

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


# ----------------------------------------------------------------------------- pipeline runs
def ensure_ray(num_cpus: int = 8) -> None:
    """One local Ray cluster for every run of this process. ``num_cpus`` is Ray's logical count (so
    that 2 learners + 2+2 generator replicas schedule on 2 physical cores); contention is real."""
    import ray

    from aapo_ray.launch import init_ray

    if not ray.is_initialized():
        init_ray(None, num_cpus=num_cpus, namespace="aapo-bench", torch_threads=1)


def defaults():
    """The config defaults as they are in aapo_ray/config.py now (scripts pass them explicitly)."""
    from aapo_ray.config import load_config

    return load_config(None, [])


def config(overrides: dict):
    from aapo_ray.config import load_config

    return load_config(None, [f"{k}={json.dumps(v) if v is None or isinstance(v, (list, tuple)) else v}"
                              for k, v in {**BASE_OVERRIDES, **overrides}.items()])


def run_pipeline(overrides: dict, *, keep_dir: str | None = None) -> dict:
    """Train one config through ``aapo_ray.driver.train`` on the shared cluster.

    Returns ``{"rows": metrics.jsonl rows, "wall_s", "peak_rss_mb", "peak_rss_parts", "config"}``. The
    run directory is deleted afterwards unless ``keep_dir`` (where to create it) is given."""
    import aapo_ray.driver as driver
    from aapo_ray.metrics import read_metrics

    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="aapo-bench-", dir=keep_dir))
    cfg = config({"run.output_dir": str(tmp), **overrides})
    start = time.perf_counter()
    with RssSampler() as rss, redirect_stdout(io.StringIO()):  # the driver prints a summary
        run_dir = driver.train(cfg, run_dir=tmp / "run", progress=False)
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir)
    if keep_dir is None:
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints of every run would fill /tmp
    return {"rows": rows, "wall_s": wall, "peak_rss_mb": rss.peak_mb, "peak_rss_parts": rss.peak_parts,
            "config": cfg.model_dump(mode="json")}


def model_dir(path: str) -> str:
    """A config's ``model.path`` as a local directory ("embedded" -> the cached default model)."""
    if path == "embedded":
        from aapo_ray.embedded import default_model_path

        return default_model_path(progress=False)
    return path


def larger_model_path() -> str:
    from aapo_ray.embedded import default_model_path

    return default_model_path(recipe=LARGER_RECIPE, progress=False)


def run_subprocess(module_file: str, flag: str, payload: dict, timeout: float = 3600) -> dict:
    """Run ``python module_file flag JSON`` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run([PYTHON, module_file, flag, json.dumps(payload)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{module_file} {flag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- output
def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def table(rows: list[dict], cols: list[str] | None = None, fmt: str = "{:.3g}") -> str:
    """A markdown table (numbers formatted with ``fmt``)."""
    cols = cols or list(rows[0])
    cell = lambda v: fmt.format(v) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


SUFFIX = ""  # "_quick" in --quick mode: a smoke run never overwrites the full run's files


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{SUFFIX}.json"
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def savefig(fig, name: str, path: Path | None = None) -> Path:
    """Write ``fig`` to ``results/<name>.png`` (or to ``path``)."""
    path = path or RESULTS / f"{name}{SUFFIX}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
