"""Learner -> policy generators after every update. Two paths, one call (:func:`sync_policy`):

- ``object_store`` (CPU, the hf backend, and any replica that restarted): rank 0 puts flat buckets into
  Ray's object store and every replica loads them.
- ``nccl`` (sglang engines on GPUs of their own): rank 0 and every engine form one process group once;
  each sync, the engines open a weight-update session and receive rank 0's broadcast, bucket by bucket.
  A replica that dies cannot rejoin the group: the run stops with the resume command (no replica ever
  samples weights it did not receive; see ``GeneratorPool.heal``).
"""

from __future__ import annotations

import ray

from aapo_ray.generator import GeneratorPool
from aapo_ray.learner import LearnerGroup
GROUP_NAME = "aapo_weight_sync"


def sync_policy(policy: GeneratorPool, learners: LearnerGroup, version: int) -> None:
    """Bring every policy replica to the learners' current weights, labelled ``version``."""
    if policy.cfg.rollout.weight_sync == "nccl":
        _broadcast(policy, learners, version)
    else:
        policy.update_weights(learners.export_weights(policy.cfg.learner.sync_bucket_mb), version=version)


def _broadcast(policy: GeneratorPool, learners: LearnerGroup, version: int) -> None:
    mb, rank0 = policy.cfg.learner.sync_bucket_mb, learners.rank0()
    backend = "nccl" if policy.cfg.learner.gpus_per_learner > 0 else "gloo"
    if not policy.broadcast_group:  # once: rank 0 and every engine rendezvous (all must call together)
        address, port = ray.get(rank0.weight_group_address.remote())
        world = 1 + len(policy.actors)
        ray.get([rank0.init_weight_group.remote(world, GROUP_NAME)] +
                [a.join_weight_group.remote(address, port, 1 + i, world, GROUP_NAME, backend)
                 for i, a in enumerate(policy.actors)])
        policy.broadcast_group = True
    metadata = ray.get(rank0.weight_metadata.remote(mb))
    receive = [a.receive_weights.remote(metadata, GROUP_NAME, version) for a in policy.actors]
    ray.get([rank0.broadcast_weights.remote(mb)] + receive)
    policy.mark_synced(version)
