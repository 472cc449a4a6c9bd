"""Gather a step's scored rollouts, retrying any chunk whose generator or scorer actor died.

A chunk (a contiguous run of prompt groups) is sampled by one generator call and scored by one
scorer call. If either actor dies, Ray restarts it; the chunk is then re-sampled (same seed, so
the same rows on the same weights, after :meth:`GeneratorPool.heal` re-pushed them) or only
re-scored, and counted. A step is never shortened: after ``max_attempts`` it fails loudly.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray

from aapo_ray.generator import Chunk, GeneratorPool
from aapo_ray.scorer import ScorerPool

log = logging.getLogger(__name__)
# Failures of an actor's process (retried); a RayTaskError is a bug in our code (raised).
ACTOR_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)


@dataclass
class _Job:
    pool: GeneratorPool
    chunk: Chunk
    generated: ray.ObjectRef
    scored: tuple[ray.ObjectRef, ray.ObjectRef] | None = None


def collect_scored(requests: list[tuple[GeneratorPool, list[Chunk]]], scorers: ScorerPool, *,
                   max_attempts: int = 3) -> tuple[list[list[pa.RecordBatch]], list[dict], Counter]:
    """Scored batches per pool (in chunk order), the scorers' counters, and fault counts."""
    jobs = [[_Job(pool, c, pool.async_submit(c, i)) for i, c in enumerate(chunks)] for pool, chunks in requests]
    flat = [job for per_pool in jobs for job in per_pool]
    for job, scored in zip(flat, scorers.async_score([j.generated for j in flat])):
        job.scored = scored
    faults: Counter = Counter()
    results: dict[int, tuple[pa.RecordBatch, dict]] = {}
    for attempt in range(1, max_attempts + 1):
        for k, job in enumerate(flat):
            if k in results:
                continue
            try:
                batch, counters = ray.get(list(job.scored))
                stale = int(batch.column("weight_version")[0].as_py()) != job.pool.version
                if stale:  # a replica restarted between weight sync and this call sampled the initial weights
                    if attempt == max_attempts:
                        raise RuntimeError(f"policy rollout chunk (groups from {job.chunk.first_group}) sampled "
                                           f"stale weights {max_attempts} times")
                    log.warning("policy chunk from groups %d sampled stale weights; re-sampling", job.chunk.first_group)
                    faults["faults/policy_stale_resampled"] += 1
                    job.pool.heal()
                    job.generated = job.pool.async_submit(job.chunk)
                    job.scored = scorers.async_score([job.generated])[0]
                    continue
                results[k] = (batch, counters)
            except ACTOR_FAILURES as exc:
                if attempt == max_attempts:
                    raise RuntimeError(f"{job.pool.role} rollout chunk (groups from {job.chunk.first_group}) failed "
                                       f"{max_attempts} times; last error: {exc}") from exc
                if _failed(job.generated):
                    log.warning("%s generator died; re-sampling groups from %d", job.pool.role, job.chunk.first_group)
                    faults[f"faults/{job.pool.role}_regenerated"] += 1
                    job.pool.heal()
                    job.generated = job.pool.async_submit(job.chunk)
                else:
                    log.warning("reward scorer died; re-scoring groups from %d", job.chunk.first_group)
                    faults["faults/rescored"] += 1
                    scorers.heal()
                job.scored = scorers.async_score([job.generated])[0]
    batches, k = [], 0
    for per_pool in jobs:
        batches.append([results[k + i][0] for i in range(len(per_pool))])
        k += len(per_pool)
    return batches, [results[k][1] for k in range(len(flat))], faults


def _failed(ref: ray.ObjectRef) -> bool:
    try:
        ray.get(ref)
        return False
    except ACTOR_FAILURES:
        return True
