"""The precomputed reference (``algo.reference=precomputed``): the cache's layout, what makes it valid, and
the draws training makes from it. It is built by :mod:`aapo_ray.reference_build`.

The frozen reference never changes, so its rewards for a prompt are draws from a fixed distribution: a
cache stores ``K = algo.reference_samples`` scored samples of every training prompt and every run that
shares the reference model, data, sampling settings and reward functions reuses it (every ``run.seed``
and estimator of a study, every resumed run).

Layout of a cache directory: ``manifest.json`` (:func:`identity` plus ``complete`` and the shard size)
and ``shard-NNNNNN.parquet``, one per block of ``algo.reference_shard_prompts`` prompts in the training
data's order, rows keyed by ``(prompt_id, sample_index)`` with ``reward`` (the weighted total training
uses), ``reward/<fn>`` per function, ``length``, ``finish_reason``, ``completion`` and ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aapo_ray.config import Config, ConfigError
from aapo_ray.rollout import REWARD_PREFIX, column_numpy
from aapo_ray.scorer import reward_weights

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: every sample drawn by a generator of its own (backends.sample_rows); 1: torch's global one
# What training reads from a shard (the completion text stays on disk)
READ_COLUMNS = ("prompt_id", "sample_index", "reward", "length", "finish_reason")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def cache_dir(cfg: Config) -> Path:
    """``algo.reference_cache``, else ``run.output_dir/reference_cache/<key>`` where the key hashes the
    config fields that make a cache valid (so a changed setting gets a cache of its own)."""
    if cfg.algo.reference_cache:
        return Path(cfg.algo.reference_cache).expanduser()
    key = {"model": [cfg.model.path, cfg.model.dtype], "data": cfg.data.model_dump(mode="json"),
           "max_prompt_tokens": cfg.rollout.max_prompt_tokens, **_settings(cfg)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.run.output_dir) / "reference_cache" / digest


def _settings(cfg: Config) -> dict:
    roll = cfg.rollout
    return {"sampling": {"temperature": roll.temperature, "top_p": roll.top_p, "max_new_tokens": roll.max_new_tokens},
            "reward": {"functions": reward_weights(cfg), "timeout_s": cfg.reward.timeout_s},
            "seed": cfg.algo.reference_seed, "samples": cfg.algo.reference_samples}


def model_fingerprint(model_path: str, dtype: str) -> str:
    """SHA-256 of every file of the model directory (weights, config, tokenizer) and the dtype; a name
    that is not a directory (a hub id) hashes as the name. Reads the weights once per call (~1 s/GB)."""
    h = hashlib.sha256(dtype.encode())
    root = Path(model_path)
    if not root.is_dir():
        h.update(model_path.encode())
        return h.hexdigest()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def data_fingerprint(prompts: pa.RecordBatch) -> str:
    """SHA-256 of the training prompts as the generators see them: ids, token ids and gold answers."""
    h = hashlib.sha256()
    for name in ("prompt_id", "prompt_ids", "gold"):
        for buf in prompts.column(name).buffers():
            if buf is not None:
                h.update(buf)
    return h.hexdigest()


def identity(cfg: Config, model_path: str, prompts: pa.RecordBatch) -> dict:
    """What a cache must match to serve a run: reference model, data, sampling settings, reward config,
    the build seed and K."""
    return {"format": FORMAT_VERSION, "model": model_fingerprint(model_path, cfg.model.dtype),
            "data": data_fingerprint(prompts), "num_prompts": prompts.num_rows, **_settings(cfg)}


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def write_manifest(path: Path, manifest: dict) -> None:
    """Atomically (temp file, then rename)."""
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path / MANIFEST)


def mismatched_fields(found: dict, expected: dict, prefix: str = "") -> list[str]:
    """Dotted names of the identity fields whose values differ (nested dicts compared field by field)."""
    out = []
    for key, want in expected.items():
        have = found.get(key)
        if isinstance(want, dict) and isinstance(have, dict) and key != "functions":
            out += mismatched_fields(have, want, f"{prefix}{key}.")
        elif have != want:
            out.append(f"{prefix}{key}")
    return out


def check_manifest(path: Path, expected: dict) -> dict | None:
    """The cache's manifest if it matches ``expected`` (None: no cache yet). Raises :class:`ConfigError`
    naming each mismatching field."""
    found = read_manifest(path)
    if found is None:
        return None
    bad = mismatched_fields(found, expected)
    if bad:
        details = "; ".join(f"{name}: cache has {_value(found, name)!r}, this run {_value(expected, name)!r}"
                            for name in bad)
        raise ConfigError(f"invalid config:\n  algo.reference_cache: {path} was built for another run ({details}); "
                          f"point algo.reference_cache at another directory (or leave it unset for one derived from "
                          f"the config), or delete {path} to rebuild it")
    return found


def _value(manifest: dict, dotted: str):
    for key in dotted.split("."):
        manifest = manifest.get(key) if isinstance(manifest, dict) else None
    return manifest


def draw_samples(samples: int, group_size: int, seed: int, prompt_id: int, visit: int) -> np.ndarray:
    """The ``group_size`` stored sample indices a prompt's ``visit``-th visit (0-based) pairs with.

    A seeded permutation of the ``samples`` indices is dealt out ``group_size`` at a time, so visits see
    disjoint samples while ``samples // group_size`` visits last; then a fresh permutation (cycle) starts."""
    per_cycle = samples // group_size
    cycle, slot = divmod(visit, per_cycle)
    order = np.random.default_rng([seed, prompt_id % 2**63, cycle]).permutation(samples)
    return order[slot * group_size:(slot + 1) * group_size]


class ReferenceCache:
    """A complete cache loaded for training: the reward columns of every (prompt, sample), and
    :meth:`draw` to give a step its reference batch."""

    def __init__(self, path: Path, group_size: int, seed: int):
        self.path, self.group_size, self.seed = Path(path), group_size, seed
        manifest = read_manifest(self.path)
        if not manifest or not manifest.get("complete"):
            raise FileNotFoundError(f"{self.path}: no complete reference cache (aapo reference build --config ...)")
        self.samples = manifest["samples"]
        files = sorted(self.path.glob("shard-*.parquet"))
        schema = pq.read_schema(files[0])
        columns = list(READ_COLUMNS) + [n for n in schema.names if n.startswith(REWARD_PREFIX)]
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files]).sort_by(
            [("prompt_id", "ascending"), ("sample_index", "ascending")]).combine_chunks()
        self.table = table.to_batches()[0] if table.num_rows else None
        ids = column_numpy(self.table, "prompt_id")[::self.samples]
        if len(ids) != manifest["num_prompts"] or self.table.num_rows != len(ids) * self.samples:
            raise ValueError(f"{self.path}: {self.table.num_rows} rows for {manifest['num_prompts']} prompts x "
                             f"{self.samples} samples; delete the directory to rebuild it")
        self._first_row = dict(zip(ids.tolist(), range(0, self.table.num_rows, self.samples)))
        self.drawn = 0  # reference samples handed out so far

    def draw(self, prompt_ids: list[int], visits: list[int]) -> pa.RecordBatch:
        """The reference batch of a step: ``group_size`` stored samples of each prompt, rows ordered (group,
        sample) like a generator's, with the cache's own index in ``cache_sample``."""
        rows = np.concatenate([self._first_row[p] + draw_samples(self.samples, self.group_size, self.seed, p, v)
                               for p, v in zip(prompt_ids, visits)])
        batch = self.table.take(pa.array(rows))
        n = len(prompt_ids)
        self.drawn += len(rows)
        batch = batch.rename_columns(["cache_sample" if c == "sample_index" else c for c in batch.schema.names])
        return (batch.append_column("group_index", pa.array(np.repeat(np.arange(n, dtype=np.int32), self.group_size)))
                .append_column("sample_index", pa.array(np.tile(np.arange(self.group_size, dtype=np.int32), n))))

    def metrics(self) -> dict[str, float]:
        """The reference source in the step metrics."""
        return {"reference/precomputed": 1.0, "reference/drawn_samples": float(self.drawn)}
