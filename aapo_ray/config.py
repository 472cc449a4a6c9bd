"""Typed run configuration: YAML file + dotted overrides, validated before any actor starts."""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_MODEL = "embedded"  # the tiny warm-started default built locally by aapo_ray.embedded


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The policy to train (its initial weights also make the frozen reference)."""

    path: str = EMBEDDED_MODEL  # a local HF directory, or "embedded"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin (pickle) weights; safetensors only by default
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(Section):
    """Where prompts come from and how they are rendered."""

    train: str = "synthetic:train"  # jsonl / parquet / HF datasets dir, or synthetic:<split>
    eval: str | None = "synthetic:test"
    format: Literal["raw", "gsm8k", "math"] = "raw"
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    template: str | None = None  # "{question}" format string; None = dataset default
    chat_template: bool = False  # render with the tokenizer's chat template
    system_prompt: str | None = None
    bad_rows: Literal["skip", "fail"] = "skip"
    eval_limit: int | None = Field(200, ge=1)


class RewardConfig(Section):
    """Weighted rule-based rewards, scored in bounded time by RewardScorer actors."""

    functions: dict[str, float] = {"accuracy": 1.0}  # registry name or "pkg.module:fn" -> weight
    timeout_s: float = Field(5.0, gt=0)
    num_scorers: int = Field(1, ge=1)
    workers_per_scorer: int = Field(1, ge=1)
    cpus_per_scorer: float = Field(0.25, ge=0)


LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "group_token_mean", "seq_mean_token_sum_norm")
# What ``None`` means for algo.scale_rewards / loss_agg / kl_beta: each estimator as published
# (aapo: the authors' code; grpo: TRL's GRPOTrainer the AAPO paper compared against; gpg: arXiv
# 2504.02546; dr_grpo: arXiv 2503.20783). An explicit value always wins.
ESTIMATOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "aapo": {"scale_rewards": True, "loss_agg": "token_mean", "kl_beta": 0.0},
    "aapo_no_margin": {"scale_rewards": True, "loss_agg": "token_mean", "kl_beta": 0.0},
    "gpg": {"scale_rewards": False, "loss_agg": "token_mean", "kl_beta": 0.0},
    "grpo": {"scale_rewards": True, "loss_agg": "seq_mean_token_mean", "kl_beta": 0.04},
    "dr_grpo": {"scale_rewards": False, "loss_agg": "seq_mean_token_sum_norm", "kl_beta": 0.0},
}
NO_KL_ESTIMATORS = ("aapo", "aapo_no_margin", "gpg")  # their loss is plain weighted NLL, no KL term
# Named override sets a study can cite (``aapo train --set`` each, or copy into a YAML).
STUDY_ARMS: dict[str, list[str]] = {
    # GRPO with 2G samples per prompt generates as many completions per step as AAPO's G policy + G
    # reference samples (G = 6 default): the compute-matched baseline.
    "grpo_compute_matched": ["algo.estimator=grpo", "algo.group_size=12"],
}


class AlgoConfig(Section):
    """Advantage estimator and loss (docs/aapo-spec.md section 5).

    ``scale_rewards``, ``loss_agg`` and ``kl_beta`` default to ``None`` = the estimator's published
    setting (:data:`ESTIMATOR_DEFAULTS`); read them with :meth:`resolve`. ``loss_agg``:
    ``token_mean`` (sum over the step's completion tokens / their count), ``seq_mean_token_mean``
    (mean over each sequence's tokens, then over sequences), ``group_token_mean`` (token mean within
    each prompt group, then mean over groups: the authors' one-group-per-micro-batch AAPO code),
    ``seq_mean_token_sum_norm`` (token sum / (num_sequences * max_new_tokens): Dr.GRPO).
    """

    estimator: Literal["aapo", "aapo_no_margin", "gpg", "grpo", "dr_grpo"] = "aapo"
    group_size: int = Field(6, ge=1)
    scale_rewards: bool | None = None  # None: estimator default (gpg, dr_grpo: false; others: true)
    margin_clip: tuple[float, float] | None = (0.2, 0.28)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "group_token_mean", "seq_mean_token_sum_norm"] | None = None
    clip_eps: float = Field(0.2, gt=0)  # grpo / dr_grpo surrogate
    kl_beta: float | None = Field(None, ge=0)  # grpo / dr_grpo k3 KL to the reference; None: grpo 0.04, else 0
    # gpg: top the batch up with extra prompt groups while the share of samples in groups with
    # reward variance is below this (beta_th; the GPG paper's 0.6 is "gpg_valid_threshold=0.6"); 0 = off
    gpg_valid_threshold: float = Field(0.0, ge=0, le=1)
    gpg_max_topups: int = Field(2, ge=0)  # extra sampling rounds per step at most
    # where the frozen reference's rewards come from: sampled every step (online), or drawn from a cache
    # built once by ``aapo reference build`` (precomputed; built by ``aapo train`` when missing)
    reference: Literal["online", "precomputed"] = "online"
    reference_cache: str | None = None  # None: run.output_dir/reference_cache/<key of what makes it valid>
    reference_samples: int = Field(16, ge=1)  # K stored samples per prompt (>= group_size)
    reference_seed: int = 0  # the build's seed: every run.seed of a study shares one cache
    reference_shard_prompts: int = Field(64, ge=1)  # prompts per Parquet shard (the unit of resume)

    def resolve(self, key: str) -> Any:
        """The value in effect: the field if set, else the estimator's default."""
        value = getattr(self, key)
        return ESTIMATOR_DEFAULTS[self.estimator][key] if value is None else value


class RolloutConfig(Section):
    """Sampling, shared by the policy and reference pools."""

    backend: Literal["hf", "sglang"] = "hf"
    prompts_per_step: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(512, ge=1)
    policy_replicas: int = Field(1, ge=1)
    reference_replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(0.5, ge=0)
    generation_batch_size: int = Field(64, ge=1)  # completions per generate call (hf backend)
    sglang_mem_fraction: float = Field(0.6, gt=0, le=1)
    # sglang honours per-row sampling seeds only in its deterministic-inference mode (slower kernels);
    # off, each engine draws from its own random_seed (distinct per role and replica), not reproducible
    sglang_deterministic: bool = False
    weight_sync: Literal["object_store", "nccl"] = "object_store"  # nccl: generators on their own GPUs (sglang)
    # 1: sample step t+1 while the learners train step t (rows at most one weight version old); 0: on-policy
    overlap: int = Field(0, ge=0, le=1)


class LearnerConfig(Section):
    """DeepSpeed learners in one torch.distributed group."""

    num_learners: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 1
    lr: float = Field(1e-4, gt=0)  # tuned for the embedded tiny model; the paper uses 1e-6 on real models
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)  # sequences per forward/backward on one learner
    gpus_per_learner: float = Field(0.0, ge=0)
    cpus_per_learner: float = Field(0.5, ge=0)
    # torch threads per rank. None: the node's cores / learner ranks on it -- the loop is synchronous, so
    # generators and scorers idle while the learners train (run.torch_threads still bounds those roles)
    torch_threads: int | None = Field(None, ge=1)
    offload_optimizer: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward (real models on GPUs)
    logprob_chunk_tokens: int = Field(1024, ge=1)  # tokens per LM-head chunk: no full-vocabulary float32 logits
    sync_bucket_mb: float = Field(64.0, gt=0)
    collective_timeout_s: float = Field(600.0, gt=0)


class RunConfig(Section):
    """The loop: length, seeds, evaluation, checkpoints, logging."""

    steps: int = Field(200, ge=1)
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None  # run directory name; default: time stamp
    eval_every: int = Field(20, ge=0)  # 0 = only at start and end
    eval_from: int = Field(0, ge=0)  # periodic evaluations from this step on (step 0 and the last always)
    eval_temperature: float = Field(1.0, ge=0)  # 0 = greedy
    eval_samples: int = Field(4, ge=1)  # samples per held-out prompt
    eval_top_p: float | None = Field(None, gt=0, le=1)  # None: rollout.top_p (the paper evaluates at 0.95)
    save_every: int = Field(50, ge=0)  # 0 = only at the end
    keep_checkpoints: int = Field(2, ge=1)
    torch_threads: int = Field(1, ge=1)  # per generator actor; they run concurrently (learners: learner.torch_threads)
    max_learner_restarts: int = Field(1, ge=0)  # a dead learner rank: restart from the last checkpoint


class RayConfig(Section):
    """Where the actors run."""

    address: str | None = None  # None: start a local cluster; "auto" or ray://... to join
    num_cpus: int | None = None  # for a local cluster
    namespace: str = "aapo"
    role_resources: dict[str, dict[str, float]] = {}  # e.g. {"scorer": {"cpu_pool": 0.1}}
    gpu_memory_gb: float = Field(80.0, gt=0)  # per GPU, for the memory plan of GPU roles (aapo_ray/memory_plan.py)
    # keep the role actors loaded after the run, for the next run on the same cluster (aapo_ray/kept_roles.py);
    # needs a cluster that outlives the run: `ray start --head` (README: keep a local cluster warm), then --address auto
    keep_roles: bool = False
    # CPU roles in shared processes (aapo_ray/colocation.py): off (a process per role), split (two: policy +
    # scorers, learner + reference), one; None: split for a local cluster of the run's own with CPU roles only
    colocate: Literal["off", "split", "one"] | None = None

    @field_validator("colocate", mode="before")
    @classmethod
    def _colocate_bool(cls, value):
        return {True: "split", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Config(Section):
    """A whole run. Build with :func:`load_config`."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    algo: AlgoConfig = AlgoConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        algo, roll, learn = self.algo, self.rollout, self.learner
        if not self.reward.functions:
            raise ValueError("reward.functions is empty; name at least one, e.g. {accuracy: 1.0}")
        bad = {k: w for k, w in self.reward.functions.items() if not math.isfinite(w)}
        if bad:
            raise ValueError(f"reward.functions weights must be finite numbers, got {bad}")
        if algo.resolve("scale_rewards") and algo.group_size < 2 and algo.estimator != "dr_grpo":
            raise ValueError("algo.group_size=1 with algo.scale_rewards=true: the std of one sample is "
                             "undefined; use group_size >= 2 or scale_rewards=false")
        if algo.margin_clip is not None and min(algo.margin_clip) < 0:
            raise ValueError(f"algo.margin_clip bounds are magnitudes >= 0, got {algo.margin_clip}")
        if algo.resolve("kl_beta") > 0 and algo.estimator in NO_KL_ESTIMATORS:
            raise ValueError("algo.kl_beta applies to grpo/dr_grpo; AAPO has no KL term (spec section 4), "
                             "nor have aapo_no_margin and gpg")
        if algo.gpg_valid_threshold > 0 and algo.estimator != "gpg":
            raise ValueError(f"algo.gpg_valid_threshold tops up GPG batches; algo.estimator={algo.estimator} "
                             f"would ignore it (set algo.estimator=gpg or leave it 0)")
        if algo.reference == "precomputed" and algo.reference_samples < algo.group_size:
            raise ValueError(f"algo.reference_samples={algo.reference_samples} < algo.group_size={algo.group_size}: "
                             f"each visit draws group_size of the stored samples; raise algo.reference_samples")
        if roll.backend == "sglang" and roll.gpus_per_replica <= 0:
            raise ValueError("rollout.backend=sglang needs rollout.gpus_per_replica > 0 (SGLang runs on GPUs)")
        if (roll.prompts_per_step * algo.group_size) % learn.num_learners:
            raise ValueError(f"rollout.prompts_per_step * algo.group_size = {roll.prompts_per_step * algo.group_size}"
                             f" completions do not split evenly over learner.num_learners={learn.num_learners}")
        if learn.zero_stage == 3:
            raise ValueError("learner.zero_stage=3 is not supported yet (weight export gathers full "
                             "parameters from ZeRO-1/2); use 1 or 2")
        if learn.bf16 and learn.gpus_per_learner == 0:
            raise ValueError("learner.bf16=true needs GPUs (learner.gpus_per_learner > 0); CPU training is fp32")
        if roll.weight_sync == "nccl" and roll.backend != "sglang":
            raise ValueError("rollout.weight_sync=nccl needs rollout.backend=sglang (hf generators load buckets "
                             "from the object store)")
        if learn.offload_optimizer and learn.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage 1 or 2")
        return self

    @property
    def completions_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.algo.group_size


class ConfigError(ValueError):
    """A config that cannot run; the message names each field and the fix."""


class InputError(ValueError):
    """A command's argument refused before anything starts: ``aapo CMD: message``, exit status 2."""


def ray_init_args(cfg: Config) -> dict:
    """:func:`aapo_ray.launch.init_ray`'s arguments for a run of ``cfg`` (the training driver's, ``aapo reference
    build``'s, and what the ``aapo`` script starts early for them: :mod:`aapo_ray.cli_args`)."""
    return dict(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace,
                torch_threads=cfg.run.torch_threads)


def missing_run_or_model_dir(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be served or evaluated (it is no directory), or None; what it holds is
    :func:`aapo_ray.checkpoint.resolve_model_dir`'s to check."""
    if Path(path).expanduser().is_dir():
        return None
    return f"{path}: no such directory (want a run directory or a HF model directory)"


def missing_model_dir(path: str) -> str | None:
    """Why ``model.path`` ``path`` cannot load (a local path with no directory there), or None. A name that is
    no local path (its parent is no directory either) passes, for the loader to resolve or refuse."""
    local = Path(path).expanduser()
    if path == EMBEDDED_MODEL or local.is_dir() or not (path.startswith((".", "/", "~")) or local.parent.is_dir()):
        return None
    return (f"model.path={path}: no such directory; point it at a local HF model directory (config.json + "
            "*.safetensors + tokenizer files)")


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    for key in path:
        field = model.model_fields.get(str(key))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _field_names(Config, e["loc"][:-1])
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = f"unknown key" + (f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}")
        elif e["type"] not in ("value_error",):
            msg += f" (got {e.get('input')!r})"
        lines.append(f"  {loc or 'config'}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"algo.group_size=8"`` -> (["algo", "group_size"], 8); values parse as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. algo.group_size=8)")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return raw


def validate(raw: dict) -> Config:
    """Validate a raw dict: types, ranges, combinations. What needs other modules (reward functions
    resolve, the memory plan fits) is checked by :func:`aapo_ray.preflight.check_config`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (optional), apply dotted overrides, validate (:func:`validate`). Raises :class:`ConfigError`."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return validate(apply_overrides(raw, list(overrides)))


def config_source(args) -> tuple[str | Path | None, list[str]]:
    """The config file and dotted overrides an ``aapo train``, ``check-config`` or ``reference build`` command
    line (its parsed ``argparse`` namespace) names: ``--resume RUN_DIR`` reads the run's ``config.yaml``;
    ``--address`` and ``--keep-roles`` are overrides. Raises :class:`ConfigError`."""
    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    if getattr(args, "keep_roles", False):
        overrides.append("ray.keep_roles=true")
    config_path = args.config
    if getattr(args, "resume", None) and not config_path:
        config_path = Path(args.resume) / "config.yaml"
        if not config_path.exists():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
    return config_path, overrides


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written into every run directory): estimator defaults are
    written out (``algo.loss_agg: null`` becomes the value that ran), so the file reloads as is."""
    raw = cfg.model_dump(mode="json")
    raw["algo"].update({k: cfg.algo.resolve(k) for k in ESTIMATOR_DEFAULTS[cfg.algo.estimator]})
    return yaml.safe_dump(raw, sort_keys=False)
