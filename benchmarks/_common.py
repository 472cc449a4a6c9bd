"""Helpers shared by the benchmark scripts: run a pipeline config and read its metrics, sample the
RSS of a whole process tree, time the in-pipeline scorers, interleave runs, medians, tables, JSON.

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
BASE_OVERRIDES = {"run.eval_every": 0, "run.save_every": 0, "data.eval_limit": 64, "run.torch_threads": 1}


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


class RssSampler:
    """Peak of the summed RSS of this process and all its descendants (Ray's GCS, raylet and every
    worker / actor started by a local cluster, reward subprocesses), sampled every ``interval`` s.
    RSS counts shared pages (object store, libraries) once per process, so the sum over-counts."""

    def __init__(self, interval: float = 0.25, pid: int | None = None):
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_mb, self.peak_parts, self.samples = 0.0, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        import psutil

        parts: dict[str, float] = {}
        for p in _tree(self.root):
            try:
                mb = p.memory_info().rss / 2**20
                name = "driver" if p.pid == self.root.pid else _role(p)
            except (psutil.Error, IndexError):
                continue
            key = name.split(".")[0] if name.startswith("ray::") else name  # ray::GeneratorActor.generate -> role
            parts[key] = parts.get(key, 0.0) + mb
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


# ----------------------------------------------------------------------------- scorer timing
from aapo_ray.scorer import RewardScorer, ScorerPool  # noqa: E402


class TimedRewardScorer(RewardScorer):
    """RewardScorer that adds its busy time to the counters dict it returns (the driver only sums
    the counter keys it knows, so the extra ``_score_s`` key is ignored by the pipeline)."""

    def score(self, batch):
        start = time.perf_counter()
        scored, counters = super().score(batch)
        return scored, dict(counters, _score_s=time.perf_counter() - start, _rows=batch.num_rows)


class TimedScorerPool(ScorerPool):
    """ScorerPool whose actors are TimedRewardScorers; remembers every ``score`` call's counter refs."""

    calls: list = []

    def __init__(self, cfg):
        TimedScorerPool.calls = []
        super().__init__(cfg)

    def _new_actor(self):
        import ray

        return ray.remote(TimedRewardScorer).options(num_cpus=self.cfg.reward.cpus_per_scorer,
                                                     max_restarts=3).remote(self.cfg)

    def score(self, batch_refs):
        out = super().score(batch_refs)
        TimedScorerPool.calls.append([c for _, c in out])
        return out


from aapo_ray.learner import LearnerActor  # noqa: E402


class ThreadedLearnerActor(LearnerActor):
    """A learner with its own torch thread count (``run.torch_threads`` sets every role's): in the synchronous
    loop the generators idle while the learner trains, so the learner may use more cores than they do."""

    THREADS = 1

    def setup(self, *args, **kwargs):
        out = super().setup(*args, **kwargs)
        import torch

        torch.set_num_threads(self.THREADS)
        return out


class _RaySwappingLearner:
    """Stands in for ``ray`` inside aapo_ray.learner: ``remote(LearnerActor)`` makes ThreadedLearnerActors."""

    def __getattr__(self, name):
        import ray

        return getattr(ray, name)

    def remote(self, *args, **kwargs):
        import ray

        if args and args[0] is LearnerActor:
            args = (ThreadedLearnerActor, *args[1:])
        return ray.remote(*args, **kwargs)


def score_seconds_per_call() -> list[float]:
    """Scorer busy seconds of each ``score`` call of the last run (1 scorer actor: they add up)."""
    import ray

    return [sum(c["_score_s"] for c in ray.get(refs)) for refs in TimedScorerPool.calls]


# ----------------------------------------------------------------------------- pipeline runs
def ensure_ray(num_cpus: int = 8) -> None:
    """One local Ray cluster for every run of this process. ``num_cpus`` is Ray's logical count (so
    that 2 learners + 2+2 generator replicas schedule on 2 physical cores); contention is real."""
    import ray
    from ray import cloudpickle

    from aapo_ray.launch import init_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import benchmarks/
    if not ray.is_initialized():
        init_ray(None, num_cpus=num_cpus, namespace="aapo-bench", torch_threads=1)


def defaults():
    """The config defaults as they are in aapo_ray/config.py now (scripts pass them explicitly)."""
    from aapo_ray.config import load_config

    return load_config(None, [])


def config(overrides: dict):
    from aapo_ray.config import load_config

    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}"
                              for k, v in {**BASE_OVERRIDES, **overrides}.items()])


def run_pipeline(overrides: dict, *, time_scoring: bool = True, keep_dir: str | None = None,
                 learner_threads: int | None = None) -> dict:
    """Train one config through ``aapo_ray.driver.train`` on the shared cluster.

    Returns ``{"rows": metrics.jsonl rows, "wall_s", "peak_rss_mb", "peak_rss_parts", "score_s"}``;
    with ``time_scoring`` each training row also gets ``time/score_s`` (scorer busy seconds);
    ``learner_threads`` gives the learner ranks that many torch threads (benchmark-side hook). The run
    directory is deleted afterwards unless ``keep_dir`` (where to create it) is given."""
    import aapo_ray.driver as driver
    import aapo_ray.learner as learner
    from aapo_ray.metrics import read_metrics

    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="aapo-bench-", dir=keep_dir))
    cfg = config({"run.output_dir": str(tmp), **overrides})
    original = driver.ScorerPool, learner.ray
    if time_scoring:
        driver.ScorerPool = TimedScorerPool
    if learner_threads:
        ThreadedLearnerActor.THREADS = learner_threads
        learner.ray = _RaySwappingLearner()  # LearnerGroup's ray.remote(LearnerActor) gets the subclass
    start = time.perf_counter()
    try:
        with RssSampler() as rss, redirect_stdout(io.StringIO()):  # the driver prints a summary
            run_dir = driver.train(cfg, run_dir=tmp / "run", progress=False)
    finally:
        driver.ScorerPool, learner.ray = original
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir)
    if time_scoring:
        per_call = score_seconds_per_call()
        train_rows = [r for r in rows if r["step"] > 0]
        evals = 1 if cfg.run.eval_every == 0 else None  # eval_every=0: calls = [eval, step 1..N, final eval]
        if evals is not None and len(per_call) == len(train_rows) + 2:
            for r, s in zip(train_rows, per_call[1:-1]):
                r["time/score_s"] = s
    if keep_dir is None:
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints of every run would fill /tmp
    return {"rows": rows, "wall_s": wall, "peak_rss_mb": rss.peak_mb, "peak_rss_parts": rss.peak_parts,
            "config": cfg.model_dump(mode="json")}


def model_dir(path: str) -> str:
    """A config's ``model.path`` as a local directory ("embedded" -> the cached default model)."""
    if path == "embedded":
        from aapo_ray.models import default_model_path

        return default_model_path(progress=False)
    return path


def larger_model_path() -> str:
    from aapo_ray.models import default_model_path

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


def savefig(fig, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{SUFFIX}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
