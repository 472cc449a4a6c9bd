"""Atomic checkpoints in a run directory, and finding the last complete one.

Layout: ``RUN_DIR/checkpoints/step_000020/{learner/, hf/, rng.pt, state.json}``. A checkpoint is
written under a ``.tmp-`` name, ``state.json`` last, then renamed: a crash mid-save leaves only a
temp directory (removed on the next save) and the previous checkpoint stays usable. A directory
without ``state.json`` is torn and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
STATE = "state.json"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, learners, state: dict, keep: int) -> Path:
    """Write learner state (DeepSpeed), HF weights, RNG and ``state`` for ``step``; keep the newest ``keep``."""
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    learners.save_checkpoint(str(tmp / "learner"))
    learners.save_hf(str(tmp / "hf"))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp / "rng.pt")
    _write_json_durably(tmp / STATE, {"step": step, **state})
    if final.exists():  # re-saving a step after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; torn ones are reported and skipped."""
    root = checkpoints_root(run_dir)
    if not root.exists():
        return []
    done = []
    for path in sorted(root.glob("step_*")):
        try:
            json.loads((path / STATE).read_text())
            done.append(path)
        except (OSError, json.JSONDecodeError):
            log.warning("skipping torn checkpoint %s (no readable %s)", path, STATE)
    return done


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def load_state(checkpoint: Path) -> dict:
    """The driver state of a checkpoint; restores the driver's RNG states as a side effect."""
    rng = torch.load(checkpoint / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return json.loads((checkpoint / STATE).read_text())


def _write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
