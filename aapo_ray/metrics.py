"""Per-step metrics: what a step's rollouts say, ``metrics.jsonl`` (one line per step), TensorBoard
events, a PNG plot, and the end-of-run summary."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from aapo_ray.rollout import REWARD_PREFIX, column_numpy


class MetricsLogger:
    """Append-only step log. On resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # heavy; only the driver writes events

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep logging JSONL if it is broken
            pass

    def truncate_after(self, step: int) -> None:
        """Keep lines with ``step <= step`` (an interrupted run may have logged past its checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _parse(line).get("step", math.inf) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``. A torn line is skipped: a killed run's last one, or the one a running
    run is appending while this reads (a ~1 KB row written across a page boundary can be seen half-written)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [_parse(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [row for row in rows if row]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files, no display). Heavy (~0.3 s on 2 cores), so imported on first
    use, or ahead of it on a thread of its own (:func:`import_pyplot_in_background`). Not thread-safe: one thread
    of a process draws at a time."""
    import matplotlib  # heavy (~0.3 s), needed only where something is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    return plt


def import_pyplot_in_background() -> None:
    """Import :func:`pyplot` on a daemon thread, for a process with a core idle now (the driver, during a run's
    last learner update): its end-of-run plot then only draws. Not while Ray's daemons start: the import took
    the CPU they wait for (ray.init's wait 1.21 s against 0.93 s, medians of 8 rounds, 2-core VM)."""
    threading.Thread(target=pyplot, name="aapo-import-pyplot", daemon=True).start()


def plot_run_in_background(run_dir: Path) -> Future:
    """:func:`plot_run` on a thread of its own (the driver draws while its roles shut down); ``.result()`` waits for
    it and returns the PNG's path, or raises what the plot raised."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="aapo-plot")
    drawn = pool.submit(plot_run, run_dir)
    pool.shutdown(wait=False)  # the thread ends after its one job
    return drawn


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """``reward_curve.png``: training reward, held-out accuracy, and AAPO's zero-signal fractions."""
    plt = pyplot()
    rows = read_metrics(run_dir)
    out = Path(out or Path(run_dir) / "reward_curve.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = lambda key: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]  # noqa: E731
    for key, label in [("reward_mean", "train reward"), ("accuracy_mean", "train accuracy"),
                       ("eval/accuracy", "held-out accuracy")]:
        pts = series(key)
        if pts:
            axes[0].plot(*zip(*pts), marker="o" if key.startswith("eval") else None, label=label)
    axes[0].set(xlabel="step", title="reward and accuracy")
    for key, label in [("zero_variance_group_frac", "zero-variance groups"),
                       ("zero_advantage_frac", "zero-advantage samples"), ("margin_mean", "margin mean")]:
        pts = series(key)
        if pts:
            axes[1].plot(*zip(*pts), label=label)
    axes[1].set(xlabel="step", title="where the learning signal is")
    return save_figure(fig, axes, out)


def save_figure(fig, axes, path: Path) -> Path:
    """Grid and legend on every axis, tight layout, a 100-dpi PNG at ``path``; the figure is closed."""
    plt = pyplot()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rollout_stats(rollouts: pa.RecordBatch, ref_batch: pa.RecordBatch | None, counters: list[dict]) -> dict:
    """Lengths, truncation, per-function reward means, scorer counters and busy time of a step."""
    lengths = np.diff(rollouts.column("completion_ids").offsets.to_numpy())
    stats = {
        "completion_len_mean": float(lengths.mean()),
        "truncated_frac": float(np.mean(np.asarray(rollouts.column("finish_reason").to_pylist()) == "length")),
        "completion_tokens": float(lengths.sum()),
    }
    for name in rollouts.schema.names:
        if name.startswith(REWARD_PREFIX):
            stats[name.removeprefix(REWARD_PREFIX) + "_mean"] = float(np.nanmean(column_numpy(rollouts, name)))
    if ref_batch is not None and "completion_ids" in ref_batch.schema.names:  # sampled this step (online)
        stats["completion_tokens"] += float(len(ref_batch.column("completion_ids").values))
    for key in ("timeouts", "errors", "none", "unparseable_gold"):
        stats[f"reward/{key}"] = float(sum(c.get(key, 0) for c in counters))
    stats["time/score_s"] = float(sum(c["score_s"] for c in counters))  # scorer busy time (policy + reference)
    return stats


def generate_seconds(batches: list[pa.RecordBatch]) -> float:
    """Busy time of the slowest replica (replicas generate concurrently)."""
    return max((float(b.schema.metadata[b"generate_s"]) for b in batches), default=0.0)


def progress_postfix(m: dict) -> dict:
    """The few numbers the progress bar shows."""
    keys = {"reward_mean": "reward", "accuracy_mean": "acc", "zero_variance_group_frac": "zvar",
            "margin_mean": "margin", "tokens_per_s": "tok/s", "eval/accuracy": "eval"}
    return {short: f"{m[k]:.3g}" for k, short in keys.items() if k in m}


def summary(run_dir: Path) -> str:
    """Held-out accuracy first -> last evaluation, training reward first -> last fifth."""
    rows = read_metrics(run_dir)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    train = [r["reward_mean"] for r in rows if "reward_mean" in r]
    lines = [f"run directory: {run_dir}"]
    ident = Path(run_dir) / "model.json"
    if ident.is_file() and "weights_sha256" in (model := json.loads(ident.read_text())):
        lines.append(f"warm start: tiny-{model['recipe_hash']}, {model['sft_steps']} SFT steps, "
                     f"weights sha256 {model['weights_sha256'][:16]}")
    if evals:
        lines.append(f"held-out accuracy: {evals[0][1]:.3f} (step {evals[0][0]}) -> {evals[-1][1]:.3f} (step {evals[-1][0]})")
    if train:
        k = max(1, len(train) // 5)
        lines.append(f"training reward: first {k} steps {np.mean(train[:k]):.3f} -> last {k} steps {np.mean(train[-k:]):.3f}")
    return "\n".join(lines)


def _parse(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a torn last line from a killed process
        return {}


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
