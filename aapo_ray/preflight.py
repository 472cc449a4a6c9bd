"""Everything checked and prepared before any actor starts: the config's reward functions, the model
directory, the prompts (rendered and tokenised once), and whether the Ray cluster can hold the run.
A run that cannot work fails here, in seconds, with the field and the fix named."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import ray
from transformers import AutoTokenizer

from aapo_ray.algo import get_estimator
from aapo_ray.colocation import check_colocate, role_cpus
from aapo_ray.config import EMBEDDED_MODEL, Config, ConfigError, load_config, missing_model_dir
from aapo_ray.data import load_prompt_dataset, render_prompts
from aapo_ray.embedded import default_model_path, model_identity
from aapo_ray.launch import cluster_address
from aapo_ray.memory_plan import check_memory
from aapo_ray.reference_cache import cache_dir, check_manifest, identity
from aapo_ray.reward import resolve_reward_fn
from aapo_ray.rollout import make_prompt_batch

log = logging.getLogger(__name__)


def check_config(cfg: Config) -> Config:
    """What :func:`aapo_ray.config.validate` cannot see alone: every reward function resolves (import
    paths are imported here) and the GPU roles fit their memory (:mod:`aapo_ray.memory_plan`).
    Raises :class:`ConfigError` naming the field."""
    for name in cfg.reward.functions:
        try:
            resolve_reward_fn(name)
        except Exception as exc:  # noqa: BLE001 - surface any import problem as a config error
            raise ConfigError(f"invalid config:\n  reward.functions.{name}: {exc}") from None
    if cfg.algo.reference == "precomputed" and not get_estimator(cfg.algo.estimator).needs_reference:
        raise ConfigError(f"invalid config:\n  algo.reference: precomputed, but algo.estimator={cfg.algo.estimator} "
                          f"samples no reference; leave algo.reference at online (or use estimator aapo)")
    check_colocate(cfg)
    try:  # GPU roles only; skipped when the model's architecture is unknown (aapo_ray/memory_plan.py)
        check_memory(cfg)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    return cfg


def load_checked_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """:func:`aapo_ray.config.load_config` followed by :func:`check_config`."""
    return check_config(load_config(path, overrides))


def resolve_model_path(cfg: Config) -> str:
    """``model.path``, or the embedded tiny default (built and warm-started once, then cached)."""
    if cfg.model.path == EMBEDDED_MODEL:
        return str(default_model_path())
    if why := missing_model_dir(cfg.model.path):
        raise FileNotFoundError(why)
    path = Path(cfg.model.path).expanduser()
    return str(path) if path.is_dir() else cfg.model.path


def record_model(run_dir: Path, model_path: str) -> dict:
    """Write the run's initial weights' identity to ``model.json`` and as a comment at the end of
    ``config.yaml`` (for the embedded default: recipe hash, SFT steps, weights SHA-256)."""
    ident = model_identity(model_path)
    (run_dir / "model.json").write_text(json.dumps(ident, indent=2))
    with (run_dir / "config.yaml").open("a") as f:
        f.write("# initial weights: " + ", ".join(f"{k}={v}" for k, v in ident.items()) + "\n")
    return ident


def load_prompts(cfg: Config, model_path: str) -> tuple[pa.RecordBatch, pa.RecordBatch | None]:
    """Training and held-out prompts as Arrow prompt batches (rendered and tokenised once)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    data = cfg.data

    def table(source: str, limit: int | None) -> pa.RecordBatch:
        ds = load_prompt_dataset(source, fmt=data.format, question_field=data.question_field,
                                 answer_field=data.answer_field, id_field=data.id_field,
                                 bad_rows=data.bad_rows, limit=limit)
        template = None if data.chat_template else (data.template or ds.default_template or "{question}")
        texts = render_prompts(ds.questions, template=template, tokenizer=tokenizer, system_prompt=data.system_prompt)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep = [i for i, t in enumerate(ids) if len(t) <= cfg.rollout.max_prompt_tokens]
        if len(keep) < len(ids):
            log.warning("%s: skipped %d prompts longer than rollout.max_prompt_tokens=%d",
                        source, len(ids) - len(keep), cfg.rollout.max_prompt_tokens)
        if not keep:
            raise ValueError(f"{source}: every prompt is longer than rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
        return make_prompt_batch([ds.ids[i] for i in keep], [ids[i] for i in keep],
                                 [texts[i] for i in keep], [ds.golds[i] for i in keep])

    train = table(data.train, None)
    if train.num_rows < cfg.rollout.prompts_per_step:
        raise ValueError(f"{data.train}: {train.num_rows} prompts < rollout.prompts_per_step={cfg.rollout.prompts_per_step}")
    return train, table(data.eval, data.eval_limit) if data.eval else None


def run_resources(cfg: Config) -> dict[str, float]:
    """Ray resources (CPU, GPU) that the run's actors hold together: generators, scorers, learners."""
    roll, learn, reference = cfg.rollout, cfg.learner, online_reference(cfg)
    replicas = roll.policy_replicas + (roll.reference_replicas if reference else 0)
    return {"CPU": sum(role_cpus(cfg, reference).values()),
            "GPU": replicas * roll.gpus_per_replica + learn.num_learners * learn.gpus_per_learner}


def check_cluster_fits(cfg: Config) -> None:
    """Fail before any actor starts if the connected Ray cluster cannot hold the configured roles."""
    total = ray.cluster_resources()
    need = run_resources(cfg)
    short = [f"{k}: need {v:g}, cluster has {total.get(k, 0):g}" for k, v in need.items() if v > total.get(k, 0) + 1e-9]
    if short:
        raise ValueError("the Ray cluster cannot hold this run's actors (" + "; ".join(short) + "): lower "
                         "learner.num_learners / rollout.*_replicas / cpus_per_* or add nodes (ray.num_cpus for a local cluster)")


def check_keep_roles(cfg: Config) -> None:
    """``ray.keep_roles`` keeps actors for later runs: refuse it where the cluster ends with this run."""
    if cfg.ray.keep_roles and not (cluster_address(cfg.ray.address) or ray.is_initialized()):
        raise ConfigError("ray.keep_roles=true keeps the roles loaded for the next run, but this run would start "
                          "its own local Ray cluster, which ends with it. Start one that outlives runs "
                          "(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address 127.0.0.1`; the "
                          "variable keeps it on loopback) and join it: aapo train --address auto ray.keep_roles=true")
    if cfg.ray.keep_roles and cfg.rollout.weight_sync == "nccl":  # the broadcast group is formed once per process
        raise ConfigError("ray.keep_roles=true with rollout.weight_sync=nccl: a kept learner and kept generators "
                          "cannot form a new weight-update group with each other; use rollout.weight_sync=object_store "
                          "or drop ray.keep_roles")


def check_reference_cache(cfg: Config, model_path: str, prompts: pa.RecordBatch) -> dict:
    """The identity a precomputed reference cache of this run must have
    (:func:`aapo_ray.reference_cache.identity`); a cache already at its path that does not match is
    refused here, before Ray starts, with a :class:`ConfigError` naming each mismatching field."""
    expected = identity(cfg, model_path, prompts)
    check_manifest(cache_dir(cfg), expected)
    return expected


def online_reference(cfg: Config) -> bool:
    """The run starts a reference generator pool (the estimator samples a reference, and not from a cache)."""
    return get_estimator(cfg.algo.estimator).needs_reference and cfg.algo.reference == "online"
