"""Per-GPU memory plan of a run, checked at config validation (pure Python: no torch, no Ray).

Units: GB here means GiB (2**30 bytes), the unit ``nvidia-smi`` and ``torch.cuda`` report; an
"80 GB" A100/H100 is 80 GiB (81,920 MiB) of which ~79.1 usable. Psi = parameter count, N = learner
ranks (the data-parallel degree), p = bytes of a training parameter (2 with ``learner.bf16``, else 4).

**Learner model states** (parameters, gradients, optimizer), bytes per GPU. Mixed precision keeps
bf16 params and grads plus fp32 master weights, fp32 grads and Adam m, v (4 + 4 + 4 + 4 = 16 B/param):

=========  ==========================  ==========================  ======================
stage      bf16 (mixed precision)      fp32                        offload_optimizer=true
=========  ==========================  ==========================  ======================
0          2Psi + 2Psi + 16Psi         4Psi + 4Psi + 8Psi          (not allowed)
1          2Psi + 2Psi + 16Psi/N       4Psi + 4Psi + 8Psi/N        pPsi + pPsi (grads stay)
2          2Psi + 18Psi/N              4Psi + 12Psi/N              pPsi
=========  ==========================  ==========================  ======================

Stage 2 with bf16 is DeepSpeed's published ``estimate_zero2_model_states_mem_needs``
(deepspeed/runtime/zero/stage_1_and_2.py): ``gpu_mem = 2*Psi + 18*Psi/N`` ("2 = params_16bit, 18 =
2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"), and ``2*Psi`` with
``cpu_offload``. The ZeRO paper (Rajbhandari et al. 2020, sec. 5, Fig. 1) writes the same as
``2Psi + 2Psi + K*Psi/N`` (stage 1) and ``2Psi + (2 + K)Psi/N`` (stage 2) with K = 12 (fp32 params,
m, v); DeepSpeed adds the 4 B fp32 gradient partition, which we keep (K_eff = 16). Stage 1 has no
published estimator: we use the paper's form with DeepSpeed's 16. ZeRO's reduce/all-gather buckets
(``reduce_bucket_size`` = ``allgather_bucket_size`` = 5e8 elements by default) add
``2 * min(Psi, 5e8) * p`` bytes for stages 1-2.

**Activations** of one micro-batch, n = micro_batch_size * (max_prompt_tokens + max_new_tokens)
tokens, per Llama/Qwen2 decoder layer in HF transformers with a fused SDPA kernel (no s^2 scores),
a = 2 B (bf16) or 4 B, h = hidden, I = intermediate, counted from what autograd saves:
2 RMSNorms (fp32 input 4h + normed a*h each), q/k/v input a*h, RoPE 2a(h + kv), SDPA q, k, v, out with
GQA heads repeated 4a*h, MLP input a*h, gate/up/silu/product 4a*I:
``act_layer = n * (8h + 10a*h + 2a*kv + 4a*I)`` bytes, i.e. 71*h B/token for Qwen2.5-7B -- same
order as Korthikanti et al. 2022 ("Reducing Activation Recomputation", eq. 2: ``34*s*b*h + 5*a*s^2*b``
per layer for GPT with a 4h MLP); eager attention adds their ``5*heads*s^2*b`` term.
Without checkpointing all L layers are stored; with HF per-layer checkpointing only each layer's
input (``n*a*h``, Korthikanti's ``2sbh``) is stored, plus one layer's activations and as much again
for its gradients while it is recomputed in backward: ``L*n*a*h + 2*act_layer``.

**Log-probs**: about 16 B per (token x vocab) for a float32 logsumexp/gather forward and backward
(held logits, float copy, softmax, gradient; measured ~3 float32 copies on CPU), over the whole
micro-batch unchunked, or over ``logprob_chunk_tokens`` tokens chunked, plus one lm-head weight
gradient ``p*V*h``. **Reference** (only if ``algo.kl_beta > 0``): frozen weights ``p*Psi`` plus its
no-grad transients. **Overhead**: 2.0 GB for the CUDA context, NCCL buffers and allocator slack.

**Generator** (SGLang): ``mem_fraction_static`` of the GPU holds weights (``model.dtype``) + KV
cache; the KV cache must hold at least one full sequence, KV bytes/token = ``2 * L * kv_heads *
head_dim * dtype_bytes``. The HF backend holds weights + KV for ``generation_batch_size`` sequences.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GiB = 1024 ** 3
OVERHEAD_GB = 2.0            # CUDA context (~0.5-1), NCCL buffers, caching-allocator fragmentation
ZERO_BUCKET_ELEMS = 5e8      # DeepSpeed's reduce_bucket_size / allgather_bucket_size defaults
LOGPROB_BYTES_PER_ELEM = 16  # per (token x vocab) element of the log-prob path, forward + backward
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The paper's two models (HF config.json fields), used when the model directory is not on this machine.
KNOWN_ARCHS: dict[str, dict] = {
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(
        model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_theta=10000.0),
    "Qwen2.5-Math-7B": dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=4096, rope_theta=10000.0),
}


@dataclass(frozen=True)
class ModelArch:
    """The shape numbers of a Llama/Qwen2-style decoder (from an HF config.json)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; negligible either way

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArch":
        cfg = cfg.get("text_config", cfg)
        heads = int(cfg["num_attention_heads"])
        return cls(hidden_size=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.hd, self.num_kv_heads * self.hd
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.hd * dtype_bytes


# ----------------------------------------------------------------------------- formulas (bytes)
def model_state_bytes(psi: float, zero_stage: int, world: int, bf16: bool, offload: bool) -> dict[str, float]:
    """Parameters, gradients and optimizer states per GPU (see the module table)."""
    p = 2 if bf16 else 4
    opt = 16 if bf16 else 8  # fp32 master + fp32 grads + m + v, or m + v alone
    if offload and zero_stage in (1, 2):
        return {"params": p * psi, "grads": p * psi if zero_stage == 1 else 0.0, "optimizer": 0.0}
    if zero_stage == 0:
        return {"params": p * psi, "grads": p * psi, "optimizer": opt * psi}
    if zero_stage == 1:
        return {"params": p * psi, "grads": p * psi, "optimizer": opt * psi / world}
    if zero_stage == 2:
        return {"params": p * psi, "grads": p * psi / world, "optimizer": opt * psi / world}
    # stage 3 (refused by Config; kept for completeness): everything partitioned
    return {"params": p * psi / world, "grads": p * psi / world, "optimizer": opt * psi / world}


def deepspeed_zero2_estimate(psi: float, num_gpus: int, cpu_offload: bool) -> float:
    """DeepSpeed's ``estimate_zero2_model_states_mem_needs`` GPU bytes, restated for comparison."""
    return 2 * psi if cpu_offload else 2 * psi + int(18 * psi / num_gpus)


def layer_activation_bytes(arch: ModelArch, tokens: int, seq_len: int, micro_batch: int, act_bytes: int,
                           attn_impl: str = "sdpa") -> float:
    """Saved activations of one decoder layer for ``tokens`` tokens (module docstring)."""
    h, kv, inter = arch.hidden_size, arch.num_kv_heads * arch.hd, arch.intermediate_size
    per_token = 8 * h + 10 * act_bytes * h + 2 * act_bytes * kv + 4 * act_bytes * inter
    scores = 5 * arch.num_heads * seq_len ** 2 * micro_batch if attn_impl == "eager" else 0
    return tokens * per_token + scores


def activation_bytes(arch: ModelArch, micro_batch: int, seq_len: int, act_bytes: int, checkpointing: bool,
                     attn_impl: str = "sdpa") -> float:
    """Activations of a micro-batch's forward kept for backward, at their peak."""
    n = micro_batch * seq_len
    layer = layer_activation_bytes(arch, n, seq_len, micro_batch, act_bytes, attn_impl)
    final_norm = n * (4 + 2 * act_bytes) * arch.hidden_size
    if checkpointing:
        return arch.num_layers * n * act_bytes * arch.hidden_size + 2 * layer + final_norm
    return arch.num_layers * layer + final_norm


def logprob_bytes(arch: ModelArch, tokens: int, param_bytes: int) -> float:
    """The log-prob path for ``tokens`` tokens at once, plus one lm-head weight gradient."""
    return LOGPROB_BYTES_PER_ELEM * tokens * arch.vocab_size + param_bytes * arch.vocab_size * arch.hidden_size


# ----------------------------------------------------------------------------- the plan
@dataclass
class RolePlan:
    """One role's per-GPU memory: named parts in GB, the total and the verdict."""

    role: str
    parts: dict[str, float]
    budget_gb: float
    notes: list[str] = field(default_factory=list)
    extra_check: str | None = None  # a failed condition besides the total (e.g. no room for one sequence)

    @property
    def total_gb(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.budget_gb and self.extra_check is None


@dataclass
class MemoryPlan:
    """Per-role plans for one config on GPUs of ``gpu_memory_gb``."""

    gpu_memory_gb: float
    num_params: int
    roles: list[RolePlan]
    variants: dict[str, float] = field(default_factory=dict)  # learner totals of the alternatives

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.roles)

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.role == name)

    def format_table(self) -> str:
        lines = [f"memory plan: {self.num_params / 1e9:.2f}B parameters, {self.gpu_memory_gb:g} GB GPUs"]
        for r in self.roles:
            verdict = "fits" if r.fits else "DOES NOT FIT"
            lines.append(f"  {r.role}: {r.total_gb:.1f} / {r.budget_gb:.1f} GB  {verdict}")
            lines += [f"    {k:<42}{v:8.2f} GB" for k, v in r.parts.items()]
            lines += [f"    note: {n}" for n in r.notes]
            if r.extra_check:
                lines.append(f"    {r.extra_check}")
        lines += [f"  learner total if {k}: {v:.1f} GB" for k, v in self.variants.items()]
        return "\n".join(lines)


def learner_parts(arch: ModelArch, *, micro_batch: int, seq_len: int, zero_stage: int, world: int, bf16: bool,
                   offload: bool, checkpointing: bool, chunk_tokens: int | None, kl_ref: bool,
                   attn_impl: str = "sdpa") -> dict[str, float]:
    """One learner rank's memory in GB by part (module docstring), for explicit settings."""
    psi, p = arch.num_params, (2 if bf16 else 4)
    states = model_state_bytes(psi, zero_stage, world, bf16, offload)
    n = micro_batch * seq_len
    lp_tokens = n if not chunk_tokens else min(chunk_tokens, n)
    parts = {
        "parameters": states["params"],
        "gradients": states["grads"],
        "optimizer states": states["optimizer"],
        "zero buckets": 2 * min(psi, ZERO_BUCKET_ELEMS) * p if zero_stage in (1, 2) else 0.0,
        "activations" + (" (checkpointed)" if checkpointing else ""):
            activation_bytes(arch, micro_batch, seq_len, p, checkpointing, attn_impl),
        "log-probs" + (f" ({lp_tokens}-token chunk)" if chunk_tokens else " (unchunked)"):
            logprob_bytes(arch, lp_tokens, p),
    }
    if kl_ref:  # frozen reference: weights, one no-grad layer, its (chunked) log-probs
        parts["KL reference model"] = (p * psi + layer_activation_bytes(arch, n, seq_len, micro_batch, p, attn_impl)
                                       + LOGPROB_BYTES_PER_ELEM / 2 * lp_tokens * arch.vocab_size)
    parts = {k: v / GiB for k, v in parts.items()}
    parts["CUDA context + allocator"] = OVERHEAD_GB
    return parts


def _generator_role(name: str, arch: ModelArch, cfg, gpu_gb: float) -> RolePlan:
    roll = cfg.rollout
    dtype_b = DTYPE_BYTES.get(cfg.model.dtype, 4)
    seq = roll.max_prompt_tokens + roll.max_new_tokens
    weights = arch.num_params * dtype_b / GiB
    per_seq = arch.kv_bytes_per_token(dtype_b) * seq / GiB
    replicas = roll.policy_replicas if name == "policy generator" else roll.reference_replicas
    per_replica = math.ceil(cfg.completions_per_step / max(replicas, 1))
    if roll.backend == "sglang":
        static = roll.sglang_mem_fraction * gpu_gb
        kv = static - weights
        parts = {"weights": weights, "KV cache (mem_fraction_static - weights)": max(kv, 0.0),
                 "outside mem_fraction_static": gpu_gb - static}  # SGLang's activations, CUDA graphs
        role = RolePlan(name, parts, budget_gb=gpu_gb,
                        notes=[f"mem_fraction_static {roll.sglang_mem_fraction} x {gpu_gb:g} GB = {static:.1f} GB; "
                               f"{per_seq:.3f} GB per {seq}-token sequence -> {max(kv, 0) / per_seq:.0f} sequences "
                               f"(step needs {per_replica} per replica)"])
        if kv < per_seq:
            role.extra_check = (f"KV cache {kv:.2f} GB cannot hold one {seq}-token sequence ({per_seq:.3f} GB); "
                                f"raise rollout.sglang_mem_fraction or use a larger GPU")
        elif kv < per_seq * per_replica:
            role.notes.append("fewer concurrent sequences than the step's batch: SGLang queues the rest (slower)")
        return role
    batch = min(roll.generation_batch_size, per_replica)
    parts = {"weights": weights, f"KV cache ({batch} sequences)": per_seq * batch,
             "logits + sampling": batch * arch.vocab_size * 4 * 3 / GiB, "CUDA context + allocator": OVERHEAD_GB}
    return RolePlan(name, parts, budget_gb=gpu_gb)


def plan_memory(cfg, gpu_memory_gb: float, arch: ModelArch | dict) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg`` (an :class:`aapo_ray.config.Config`) for ``arch``."""
    arch = arch if isinstance(arch, ModelArch) else ModelArch.from_hf_config(arch)
    lc, roll = cfg.learner, cfg.rollout
    ckpt = bool(getattr(lc, "gradient_checkpointing", True))
    chunk = getattr(lc, "logprob_chunk_tokens", 1024)
    common = dict(micro_batch=min(lc.micro_batch_size, cfg.completions_per_step // lc.num_learners),
                  seq_len=roll.max_prompt_tokens + roll.max_new_tokens, zero_stage=lc.zero_stage,
                  world=lc.num_learners, bf16=lc.bf16, offload=lc.offload_optimizer, kl_ref=cfg.algo.resolve("kl_beta") > 0)
    parts = learner_parts(arch, checkpointing=ckpt, chunk_tokens=chunk, **common)
    roles = [RolePlan("learner", parts, budget_gb=gpu_memory_gb,
                      notes=[f"micro-batch {common['micro_batch']} x {common['seq_len']} tokens, ZeRO-{lc.zero_stage} "
                             f"over {lc.num_learners} ranks, offload={lc.offload_optimizer}, bf16={lc.bf16}"])]
    variants = {}
    for label, kw in (("checkpointing off", dict(checkpointing=False, chunk_tokens=chunk)),
                      ("checkpointing on", dict(checkpointing=True, chunk_tokens=chunk)),
                      ("log-probs unchunked", dict(checkpointing=ckpt, chunk_tokens=None))):
        if (kw["checkpointing"], kw["chunk_tokens"]) != (ckpt, chunk):
            variants[label] = sum(learner_parts(arch, **kw, **common).values())
    if roll.gpus_per_replica > 0:
        roles.append(_generator_role("policy generator", arch, cfg, gpu_memory_gb))
        if cfg.algo.estimator == "aapo":  # AAPO samples the frozen reference too
            roles.append(_generator_role("reference generator", arch, cfg, gpu_memory_gb))
    return MemoryPlan(gpu_memory_gb, arch.num_params, roles, variants)


def _fixes(plan: MemoryPlan, cfg) -> str:
    lc = cfg.learner
    tips = []
    if lc.micro_batch_size > 1:
        tips.append(f"learner.micro_batch_size={max(1, lc.micro_batch_size // 2)}")
    if not getattr(lc, "gradient_checkpointing", True):
        tips.append("learner.gradient_checkpointing=true")
    if not getattr(lc, "logprob_chunk_tokens", 1024):
        tips.append("learner.logprob_chunk_tokens=1024")
    if lc.zero_stage < 2:
        tips.append("learner.zero_stage=2")
    if not lc.offload_optimizer:
        tips.append("learner.offload_optimizer=true")
    tips.append(f"more learners (learner.num_learners > {lc.num_learners}) to split the optimizer states")
    return "; ".join(tips)


def check_memory(cfg, gpu_memory_gb: float | None = None, model_arch: ModelArch | dict | None = None) -> MemoryPlan | None:
    """Raise ValueError naming the role, the numbers and the fix when a GPU role cannot fit.

    ``gpu_memory_gb`` defaults to ``ray.gpu_memory_gb`` (80); ``model_arch`` to :func:`resolve_arch`.
    Returns the plan, or None when nothing runs on GPUs or the architecture is unknown.
    """
    if cfg.learner.gpus_per_learner <= 0 and cfg.rollout.gpus_per_replica <= 0:
        return None
    gpu = gpu_memory_gb if gpu_memory_gb is not None else float(getattr(cfg.ray, "gpu_memory_gb", 80.0))
    arch = model_arch if model_arch is not None else resolve_arch(cfg.model.path)
    if arch is None:
        return None
    plan = plan_memory(cfg, gpu, arch)
    if cfg.learner.gpus_per_learner <= 0:
        plan.roles = [r for r in plan.roles if r.role != "learner"]
    if cfg.rollout.gpus_per_replica <= 0:
        plan.roles = [r for r in plan.roles if not r.role.endswith("generator")]
    bad = [r for r in plan.roles if not r.fits]
    if bad:
        msgs = []
        for r in bad:
            why = r.extra_check or f"needs {r.total_gb:.1f} GB of a {r.budget_gb:.1f} GB budget"
            fix = _fixes(plan, cfg) if r.role == "learner" else "raise rollout.sglang_mem_fraction or use larger GPUs"
            msgs.append(f"{r.role}: {why}; try {fix}")
        raise ValueError("the run cannot fit in GPU memory:\n  " + "\n  ".join(msgs) + "\n" + plan.format_table())
    return plan


def resolve_arch(model_path: str) -> ModelArch | None:
    """``model_path/config.json`` if present, else :data:`KNOWN_ARCHS` by the directory's name, else None."""
    cfg_file = os.path.join(model_path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            raw: dict[str, Any] = json.load(f)
        try:
            return ModelArch.from_hf_config(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.info("memory plan skipped: %s lacks %s", cfg_file, exc)
            return None
    name = os.path.basename(os.path.normpath(model_path))
    known = {k.lower(): v for k, v in KNOWN_ARCHS.items()}
    if name.lower() in known:
        return ModelArch.from_hf_config(known[name.lower()])
    log.info("memory plan skipped: no %s and %r is not a known architecture", cfg_file, name)
    return None
