"""Atomic checkpoints in a run directory, finding the last complete one, and the HF model a run or
checkpoint directory serves.

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
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from aapo_ray.config import missing_run_or_model_dir

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


def resolve_model_dir(path: str | os.PathLike, checkpoint: str | None = None) -> tuple[Path, str]:
    """(HF model directory, default served name) for a run directory or a plain HF model dir.

    A run directory serves ``checkpoints/step_N/hf`` of its latest complete checkpoint (one with
    ``state.json``) or of ``checkpoint`` (``step_N``, ``step_000N`` or ``N``). A checkpoint
    directory (``.../step_N``) serves its ``hf/``. The name is the run / model directory's name.
    """
    if why := missing_run_or_model_dir(path):
        raise FileNotFoundError(why)
    p = Path(path).expanduser().resolve()
    root = checkpoints_root(p)
    if checkpoint is None and (p / "config.json").is_file():
        return p, p.name
    if checkpoint is None and (p / "hf" / "config.json").is_file() and (p / STATE).is_file():
        return p / "hf", p.parent.parent.name if p.parent.name == "checkpoints" else p.name
    if not root.is_dir():
        raise ValueError(f"{path} is neither a run directory (no checkpoints/) nor a HF model "
                         "directory (no config.json)" + (" ; --checkpoint needs a run directory" if checkpoint else ""))
    done = complete_checkpoints(p)
    if checkpoint is not None:
        m = re.fullmatch(r"(?:step_)?(\d+)", str(checkpoint).strip())
        if not m:
            raise ValueError(f"--checkpoint {checkpoint!r}: want step_N (e.g. step_20) or N")
        chosen = [c for c in done if int(c.name[len("step_"):]) == int(m.group(1))]
        if not chosen:
            raise ValueError(f"--checkpoint {checkpoint}: no complete checkpoint with that step in {root}; "
                             f"complete ones: {[c.name for c in done] or 'none'}")
        ck = chosen[0]
    elif not done:
        raise ValueError(f"{path}: no complete checkpoint in {root} (a complete one has {STATE})")
    else:
        ck = done[-1]
    if not (ck / "hf" / "config.json").is_file():
        raise ValueError(f"checkpoint {ck} has no HF model in hf/ (config.json missing)")
    return ck / "hf", p.name
