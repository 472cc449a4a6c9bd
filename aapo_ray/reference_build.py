"""``aapo reference build``: the precomputed reference cache (:mod:`aapo_ray.reference_cache`) as a Ray
Data batch-inference job, and :func:`open_reference` which ``aapo train`` calls (building first when the
cache is missing or incomplete).

``ray.data.from_arrow`` of the training prompts, one block per shard still to build ->
``map_batches(SampleShard)``: ``rollout.reference_replicas`` actors on the initial weights, each building
:func:`aapo_ray.backends.make_backend` once (:class:`aapo_ray.batch_inference.BackendSampler`; hf on CPU,
sglang on GPU) and sampling ``algo.reference_samples`` completions per prompt with the run's sampling
settings -> ``map_batches(ScoreShard)``: ``reward.num_scorers`` actors scoring with the training scorer
(:class:`aapo_ray.scorer.RewardScorer`: the same reward functions and weights) -> the driver streams the
output (``iter_batches``) and writes each shard once its rows are in (temp file, then rename), so memory
stays flat in the data size and a killed build resumes: shards on disk are not built again.

Seed convention: the K samples of every prompt of shard ``s`` come from one generate call seeded with
:func:`shard_seed` (``problem_seed(algo.reference_seed, "reference", s)``), prompts in data order, each
repeated K times: exactly the call the online reference generator (:class:`aapo_ray.reference.ReferencePool`)
makes for that chunk of prompts with ``n = K`` and that seed, so the stored rows are its rows
(``tests/test_reference_cache.py`` checks it). A whole shard per call keeps generation batched
(``rollout.generation_batch_size`` rows at a time, as a single-process batched ``generate`` would be) at
the price of tying the samples to the shard layout, which the manifest records and a resumed build keeps.
Keying on the data, not the training step, is what lets every run seed of a study share one cache; the
run's own seed then only picks which stored samples each visit pairs with
(:func:`aapo_ray.reference_cache.draw_samples`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from aapo_ray.batch_inference import BackendSampler
from aapo_ray.config import Config, config_source, ray_init_args
from aapo_ray.launch import init_ray
from aapo_ray.preflight import check_reference_cache, load_checked_config, load_prompts, resolve_model_path
from aapo_ray.reference_cache import ReferenceCache, cache_dir, check_manifest, shard_name, write_manifest
from aapo_ray.sampling import problem_seed
from aapo_ray.scorer import ScoreShard

log = logging.getLogger(__name__)
SHARD_SCHEMA = pa.schema([("shard", pa.int64()), ("prompt_id", pa.int64()), ("sample_index", pa.int32()),
                          ("completion", pa.string()), ("gold", pa.string()), ("length", pa.int32()),
                          ("finish_reason", pa.string()), ("seed", pa.int64())])


def shard_seed(cfg: Config, shard: int) -> int:
    """The seed of the one generate call that samples shard ``shard`` (see the module docstring)."""
    return problem_seed(cfg.algo.reference_seed, "reference", shard)


class SampleShard(BackendSampler):
    """Ray Data callable class: K reference samples of every prompt of a block."""

    def __init__(self, *, max_new_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.max_new_tokens = max_new_tokens

    def __call__(self, block: pa.Table) -> pa.Table:
        ids, seeds = block.column("prompt_id").to_pylist(), block.column("seed").to_pylist()
        if len(set(seeds)) != 1:
            raise ValueError(f"a block holds one shard (one seed), got seeds {sorted(set(seeds))[:4]}")
        done = self.sample_together(block.column("prompt_ids").to_pylist(), self.max_new_tokens, seeds[0])
        rows = np.repeat(np.arange(len(ids)), self.k)
        return pa.table({
            "shard": block.column("shard").take(pa.array(rows)), "prompt_id": pa.array(np.asarray(ids)[rows]),
            "sample_index": pa.array(np.tile(np.arange(self.k, dtype=np.int32), len(ids))),
            "completion": [t for c in done for t in c.texts], "gold": block.column("gold").take(pa.array(rows)),
            "length": pa.array([len(t) for c in done for t in c.token_ids], pa.int32()),
            "finish_reason": [r for c in done for r in c.finish_reasons],
            "seed": pa.array(np.asarray(seeds, dtype=np.int64)[rows])}, schema=SHARD_SCHEMA)


def build_reference_cache(cfg: Config, model_path: str, prompts: pa.RecordBatch, expected: dict, *,
                          progress: bool = True, on_shard=None) -> Path:
    """Build (or finish building) the cache of ``cfg`` at :func:`cache_dir`; returns its directory.
    ``expected`` is :func:`aapo_ray.preflight.check_reference_cache`'s identity of the run (a manifest
    already there must match it). ``on_shard(shard)`` is called as each shard is written."""
    path, per_shard = cache_dir(cfg), cfg.algo.reference_shard_prompts
    found = check_manifest(path, expected)
    if found and found.get("complete"):
        return path
    per_shard = found["shard_prompts"] if found else per_shard  # a resumed build keeps its layout
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.tmp"):  # a write the kill interrupted
        stale.unlink()
    write_manifest(path, {**expected, "complete": False, "shard_prompts": per_shard})
    starts = range(0, prompts.num_rows, per_shard)
    todo = [i for i, _ in enumerate(starts) if not (path / shard_name(i)).exists()]
    bar = tqdm(total=prompts.num_rows, initial=prompts.num_rows - sum(_rows_of(prompts, i, per_shard) for i in todo),
               desc="aapo reference build", unit="prompt", disable=not progress)
    if todo:
        log.info("reference cache %s: building %d of %d shards", path, len(todo), len(starts))
        pending: dict[int, list[pa.Table]] = {}
        for block in _dataset(cfg, model_path, prompts, todo, per_shard).iter_batches(batch_format="pyarrow",
                                                                                      batch_size=None):
            for shard in np.unique(block.column("shard").to_numpy()):
                part = block.filter(pc.equal(block.column("shard"), shard))
                pending.setdefault(int(shard), []).append(part)
                done = sum(t.num_rows for t in pending[int(shard)])
                if done == _rows_of(prompts, int(shard), per_shard) * cfg.algo.reference_samples:
                    _write_shard(path, int(shard), pa.concat_tables(pending.pop(int(shard))))
                    bar.update(_rows_of(prompts, int(shard), per_shard))
                    if on_shard:
                        on_shard(int(shard))
    bar.close()
    missing = [i for i, _ in enumerate(starts) if not (path / shard_name(i)).exists()]
    if missing:
        raise RuntimeError(f"reference build {path}: shards {missing[:5]} were not written; run it again to resume")
    write_manifest(path, {**expected, "complete": True, "shard_prompts": per_shard})
    return path


def _rows_of(prompts: pa.RecordBatch, shard: int, per_shard: int) -> int:
    return min(per_shard, prompts.num_rows - shard * per_shard)


def _write_shard(path: Path, shard: int, table: pa.Table) -> None:
    table = table.drop_columns(["shard", "gold"]).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    tmp = path / (shard_name(shard) + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path / shard_name(shard))


def _dataset(cfg: Config, model_path: str, prompts: pa.RecordBatch, todo: list[int], per_shard: int):
    """The lazy pipeline over the shards still to build (one block each)."""
    blocks = []
    for i in todo:
        part = pa.Table.from_batches([prompts.slice(i * per_shard, per_shard)]).select(["prompt_id", "prompt_ids", "gold"])
        blocks.append(part.append_column("shard", pa.array(np.full(part.num_rows, i, np.int64)))
                      .append_column("seed", pa.array(np.full(part.num_rows, shard_seed(cfg, i), np.int64))))
    roll = cfg.rollout
    sampler = dict(backend=roll.backend, model_path=model_path, samples=cfg.algo.reference_samples,
                   temperature=roll.temperature, top_p=roll.top_p, dtype=cfg.model.dtype,
                   trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle,
                   torch_threads=cfg.run.torch_threads, batch_size=roll.generation_batch_size,
                   deterministic=roll.sglang_deterministic, max_new_tokens=roll.max_new_tokens)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own bar counts prompts
    ds = ray.data.from_arrow(blocks).map_batches(
        SampleShard, fn_constructor_kwargs=sampler, batch_format="pyarrow", batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=min(roll.reference_replicas, len(todo))),
        num_cpus=roll.cpus_per_replica, num_gpus=roll.gpus_per_replica or None)
    return ds.map_batches(ScoreShard, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=None,
                          compute=ray.data.ActorPoolStrategy(size=cfg.reward.num_scorers),
                          num_cpus=cfg.reward.cpus_per_scorer)


def open_reference(cfg: Config, model_path: str, prompts: pa.RecordBatch, expected: dict, *,
                   progress: bool = True) -> ReferenceCache:
    """The run's precomputed reference, built first when missing or incomplete (Ray must be up)."""
    path = build_reference_cache(cfg, model_path, prompts, expected, progress=progress)
    return ReferenceCache(path, cfg.algo.group_size, cfg.run.seed)


def run(args: argparse.Namespace) -> int:
    cfg = load_checked_config(*config_source(args))
    model_path = resolve_model_path(cfg)
    prompts, _ = load_prompts(cfg, model_path)
    expected = check_reference_cache(cfg, model_path, prompts)  # a mismatching cache fails before any actor starts
    init_ray(**ray_init_args(cfg))  # started early by the `aapo` script: aapo_ray.launch.start_ray_early
    path = build_reference_cache(cfg, model_path, prompts, expected, progress=not args.no_progress)
    print(f"reference cache: {path} ({prompts.num_rows} prompts x {cfg.algo.reference_samples} samples)")
    return 0
