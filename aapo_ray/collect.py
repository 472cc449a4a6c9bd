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

import numpy as np
import pyarrow as pa
import ray
import torch

from aapo_ray.algo import gpg_fill
from aapo_ray.config import Config
from aapo_ray.data import PromptSampler
from aapo_ray.generator import Chunk, GeneratorPool
from aapo_ray.rollout import column_numpy, concat
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


def async_start(requests: list[tuple[GeneratorPool, list[Chunk]]], scorers: ScorerPool) -> list[list[_Job]]:
    """Submit every chunk's generation and scoring; nothing is waited for (see :func:`finish`)."""
    jobs = [[_Job(pool, c, pool.async_submit(c, i)) for i, c in enumerate(chunks)] for pool, chunks in requests]
    flat = [job for per_pool in jobs for job in per_pool]
    for job, scored in zip(flat, scorers.async_score([j.generated for j in flat])):
        job.scored = scored
    return jobs


def collect_scored(requests: list[tuple[GeneratorPool, list[Chunk]]], scorers: ScorerPool, *,
                   max_attempts: int = 3) -> tuple[list[list[pa.RecordBatch]], list[dict], Counter]:
    """Scored batches per pool (in chunk order), the scorers' counters, and fault counts."""
    return finish(async_start(requests, scorers), scorers, max_attempts=max_attempts)


def finish(jobs: list[list[_Job]], scorers: ScorerPool, *, max_attempts: int = 3,
           max_staleness: int = 0) -> tuple[list[list[pa.RecordBatch]], list[dict], Counter]:
    """Wait for started jobs, retrying dead actors' chunks; a chunk sampled by weights more than
    ``max_staleness`` versions behind its pool's (a restarted replica) is sampled again."""
    flat = [job for per_pool in jobs for job in per_pool]
    faults: Counter = Counter()
    results: dict[int, tuple[pa.RecordBatch, dict]] = {}
    for attempt in range(1, max_attempts + 1):
        for k, job in enumerate(flat):
            if k in results:
                continue
            try:
                batch, counters = ray.get(list(job.scored))
                stale = job.pool.version - int(batch.column("weight_version")[0].as_py()) > max_staleness
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


def gpg_topup(cfg: Config, rollouts: pa.RecordBatch, policy: GeneratorPool, scorers: ScorerPool,
              prompts: pa.RecordBatch, sampler: PromptSampler, seed: int, counters: list[dict]) -> tuple[pa.RecordBatch, dict]:
    """GPG's threshold top-up: while fewer than ``algo.gpg_valid_threshold`` of the step's samples
    are in groups whose rewards vary, sample another ``prompts_per_step`` prompts (at most
    ``algo.gpg_max_topups`` rounds) and train on a batch of the usual size made of the valid groups
    first, zero-variance groups to fill (:func:`aapo_ray.algo.gpg_fill`); alpha = B / (B - M) of
    that batch then corrects for the zero-variance groups left in it."""
    G, num_groups = cfg.algo.group_size, rollouts.num_rows // cfg.algo.group_size
    pool, rounds = [rollouts], 0
    while True:
        order, share = gpg_fill(torch.tensor(np.concatenate([column_numpy(b, "reward") for b in pool])), G, num_groups)
        if share >= cfg.algo.gpg_valid_threshold or rounds >= cfg.algo.gpg_max_topups:
            break
        rounds += 1
        extra = prompts.take(pa.array(sampler.next_batch()))
        batches, more, _ = collect_scored([(policy, policy.chunks(extra, G, policy.sampling(seed + 250_007 * rounds)))], scorers)
        pool.append(concat(batches[0]))
        counters.extend(more)
    if rounds:
        every = concat(pool)
        rows = (order[:, None] * G + torch.arange(G)).flatten().numpy()
        picked = every.take(pa.array(rows))
        rollouts = picked.set_column(picked.schema.get_field_index("group_index"), picked.schema.field("group_index"),
                                     pa.array(np.arange(len(rows), dtype=np.int32) // G))
    return rollouts, {"gpg/topup_rounds": float(rounds), "gpg/valid_share": share}
