"""Reward scorers: Ray actors that attach reward columns to rollout batches in bounded time.

Each actor owns a :class:`aapo_ray.batch_scorer.BatchScorer` whose verifier subprocesses enforce a hard
per-completion deadline (math-verify's ``signal.alarm`` only works on a process's main thread).
A hung or crashing reward function costs at most ``reward.timeout_s`` per completion, scores 0,
and is counted; it never stops training.
"""

from __future__ import annotations

import itertools
import time

import pyarrow as pa
import ray

from aapo_ray.config import Config
from aapo_ray.actor_sources import FreshActors
from aapo_ray.kept_roles import KeepableRole
from aapo_ray.batch_scorer import BatchScorer
from aapo_ray.rollout import with_rewards

# Always scored (weight 0 unless configured) so accuracy is logged whatever the training reward.
ACCURACY = "accuracy"


def reward_weights(cfg: Config) -> dict[str, float]:
    return {ACCURACY: 0.0, **cfg.reward.functions}


class RewardScorer(KeepableRole):
    """One scorer actor; ``score`` returns the batch with ``reward/<fn>`` and ``reward`` columns.

    Nothing on its import path pulls in torch (~200 MB per actor; a user's reward function still
    may): verification is string and sympy work."""

    def __init__(self, cfg: Config):
        self.scorer = BatchScorer(reward_weights(cfg), timeout_s=cfg.reward.timeout_s,
                                  num_workers=cfg.reward.workers_per_scorer)

    def ready(self) -> bool:
        return True

    def close(self) -> None:  # its reward worker processes
        self.scorer.close()

    def score(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, dict[str, float]]:
        """The scored batch, and the scorer's counters plus ``score_s`` (this call's busy seconds)."""
        start = time.perf_counter()
        result = self.scorer.score(batch.column("completion").to_pylist(), batch.column("gold").to_pylist())
        scored = with_rewards(batch, result.per_function, result.total).replace_schema_metadata(batch.schema.metadata)
        return scored, {**result.counters, "score_s": time.perf_counter() - start}


class ScorerPool:
    """``reward.num_scorers`` actors, batches assigned round-robin by ObjectRef (no driver copy)."""

    def __init__(self, cfg: Config, *, wait: bool = True, source=None):
        """``source``: where the actors come from (default: fresh processes; :mod:`aapo_ray.actor_sources`)."""
        self.cfg, self.source = cfg, source or FreshActors()
        self.actors = [self._new_actor(i) for i in range(cfg.reward.num_scorers)]
        self._next = itertools.cycle(range(len(self.actors)))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every scorer actor has started."""
        ray.get([a.ready.remote() for a in self.actors])

    def _new_actor(self, index: int):
        resources = self.cfg.ray.role_resources.get("scorer", {})
        options = dict(num_cpus=self.cfg.reward.cpus_per_scorer, resources=resources or None, max_restarts=3)
        return self.source.start(RewardScorer, options, (self.cfg,), role="scorer", index=index)

    def async_score(self, batch_refs: list[ray.ObjectRef]) -> list[tuple[ray.ObjectRef, ray.ObjectRef]]:
        """One (scored batch ref, counters ref) per input ref, in order."""
        return [self.actors[next(self._next)].score.options(num_returns=2).remote(ref) for ref in batch_refs]

    def heal(self, timeout_s: float = 120.0) -> None:
        """Replace scorers that are out of restarts."""
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.ready.remote(), timeout=timeout_s)
                self.source.ensure(actor, (self.cfg,), timeout_s)  # restarted with another run's config?
            except ray.exceptions.RayActorError:
                self.actors[i] = self._new_actor(i)

    def shutdown(self) -> None:
        """Hand the scorers back to their source (fresh ones are killed)."""
        self.source.release(self.actors)
        self.actors = []


class ScoreShard:
    """Ray Data callable class of the reference build (:mod:`aapo_ray.reference_build`): the training
    scorer's ``reward/<fn>`` and ``reward`` columns on a shard of reference samples. It lives here, not
    with the build, so that its actors import no torch."""

    def __init__(self, cfg: Config):
        self.scorer = RewardScorer(cfg)

    def __call__(self, block: pa.Table) -> pa.Table:
        scored, _ = self.scorer.score(block.combine_chunks().to_batches()[0] if block.num_rows else
                                      pa.RecordBatch.from_pylist([], schema=block.schema))
        return pa.Table.from_batches([scored])
