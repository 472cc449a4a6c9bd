"""Per-step metrics: ``metrics.jsonl`` (one line per step), TensorBoard events, and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Append-only step log. On resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

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
    path = Path(run_dir) / "metrics.jsonl"
    return [_parse(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """``reward_curve.png``: training reward, held-out accuracy, and AAPO's zero-signal fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
