"""The frozen reference pool AAPO samples from (docs/aapo-spec.md section 1).

Same actor as the policy generators, loaded from the initial weights and never synced: the
margin compares each policy sample with the index-aligned sample of this frozen model.
"""

from __future__ import annotations

from aapo_ray.config import Config
from aapo_ray.generator import FROZEN, GeneratorActor, GeneratorPool


class ReferenceActor(GeneratorActor):
    """A reference replica: the generator actor under its own name, so that its processes are titled
    ``ray::ReferenceActor`` (``ps``, Ray's state API, the memory report tell the two roles apart)."""


class ReferencePool(GeneratorPool):
    """``rollout.reference_replicas`` generators on the initial weights; ``update_weights`` refuses."""

    role = "reference"
    actor_class = ReferenceActor

    def __init__(self, cfg: Config, model_path: str, *, wait: bool = True, source=None):
        super().__init__(cfg, model_path, replicas=cfg.rollout.reference_replicas, wait=wait, source=source)

    def update_weights(self, buckets, version):  # noqa: ARG002
        raise RuntimeError(FROZEN)
