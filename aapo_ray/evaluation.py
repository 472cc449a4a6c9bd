"""Held-out evaluation during training: the current policy's accuracy on the eval prompts, sampled by
the same generator pool and scored by the same scorers as the rollouts."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from aapo_ray.collect import collect_scored
from aapo_ray.config import Config
from aapo_ray.generator import GeneratorPool
from aapo_ray.rollout import REWARD_PREFIX, column_numpy, concat
from aapo_ray.sampling import step_seed
from aapo_ray.scorer import ScorerPool


def evaluate(cfg: Config, policy: GeneratorPool, scorers: ScorerPool, prompts: pa.RecordBatch | None) -> dict:
    """Held-out accuracy of the current policy (fixed seed, ``run.eval_temperature``)."""
    if prompts is None:
        return {}
    t0 = time.perf_counter()
    params = policy.sampling(step_seed(cfg.run.seed, None), temperature=cfg.run.eval_temperature,
                             top_p=cfg.run.eval_top_p)
    batches, _, _ = collect_scored([(policy, policy.chunks(prompts, cfg.run.eval_samples, params))], scorers)
    scored = concat(batches[0])
    acc = np.nan_to_num(column_numpy(scored, REWARD_PREFIX + "accuracy"))
    return {"eval/accuracy": float(acc.mean()), "eval/reward": float(column_numpy(scored, "reward").mean()),
            "time/eval_s": time.perf_counter() - t0}
