"""AAPO math: advantage estimators and policy losses, in pure torch.

Read next to ``docs/aapo-spec.md`` (sections 3-5). For a prompt with policy rewards r_1..r_G
and index-aligned reference rewards r~_1..r~_G::

    A_grp_i = r_i - mean(r)            (/ (std(r) + 1e-4) if scale_rewards; std is Bessel-corrected)
    m_i     = clip(r_i - r~_i, -delta_low, +delta_high)
    A_i     = A_grp_i + m_i

and the loss is the advantage-weighted NLL over completion tokens::

    L = - sum_{i,t} M_it * A_i * log pi(o_it | q, o_i<t) / N

Baselines: ``aapo_no_margin`` (A_grp alone), ``gpg`` (GPG, arXiv 2504.02546: ``alpha * (r_i -
mean(r))``, no std, ``alpha = B / (B - M)`` with M the step's samples in zero-variance groups),
``grpo`` (PPO-clip surrogate with a k3 KL to the reference) and ``dr_grpo``.

**Split-invariant normalisation.** ``N`` is the completion-token count of the *whole step's
batch* (all learners, all micro-batches), not of the micro-batch. Pass it as ``num_tokens``:
then each micro-batch loss is a partial sum and the gradients of the pieces add up to the
gradient of the full batch, whatever the split. Data-parallel engines average gradients over
ranks and accumulation steps, so a learner multiplies each micro-batch loss by
``world_size * accumulation_steps`` to turn that average back into the sum (see
``aapo_ray/learner.py``).

**Loss aggregation** (``algo.loss_agg``, :func:`loss_weights`). Every aggregation is a weighted
token sum ``L = sum_i w_i sum_t M_it l_it / D`` with per-sequence weights ``w_i`` and one global
``D``, both computed on the driver from the whole step (``w`` travels as the ``loss_weight``
column), so any split gives the same gradient::

    token_mean               w_i = 1               D = completion tokens of the step
    seq_mean_token_mean      w_i = 1 / |o_i|       D = number of sequences     (GRPO, TRL)
    group_token_mean         w_i = 1 / T_g(i)      D = number of groups        (authors' AAPO code)
    seq_mean_token_sum_norm  w_i = 1               D = num_sequences * max_len (Dr.GRPO)

where ``T_g`` is the completion-token count of sequence i's prompt group.

Rewards that are NaN or infinite (a reward function that returned nothing) count as 0 and are
reported by :func:`advantage_diagnostics`; they never reach the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

STD_EPS = 1e-4
MarginClip = tuple[float, float] | None


def _grouped(rewards: Tensor, group_size: int, name: str = "rewards") -> Tensor:
    """Check shape, replace non-finite rewards by 0 and view as [num_prompts, group_size]."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(
            f"{name} has {rewards.numel()} entries, not a positive multiple of group_size="
            f"{group_size}; pass num_prompts * group_size rewards, each prompt's group contiguous"
        )
    rewards = rewards.detach().float()
    return torch.where(torch.isfinite(rewards), rewards, 0.0).view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, *, scale_rewards: bool = True) -> Tensor:
    """The group-relative part ``r - mean(r)`` (divided by ``std + 1e-4`` if ``scale_rewards``)."""
    r = _grouped(rewards, group_size).double()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        if group_size < 2:
            raise ValueError("scale_rewards needs group_size >= 2 (the std of one sample is undefined)")
        adv = adv / (r.std(dim=1, keepdim=True) + STD_EPS)
    # An all-equal group has no group signal: exactly 0, not the rounding error of its mean.
    all_equal = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values
    return adv.masked_fill(all_equal, 0.0).float().flatten()


def advantage_margin(rewards: Tensor, ref_rewards: Tensor, group_size: int,
                     margin_clip: MarginClip = (0.2, 0.28)) -> Tensor:
    """Index-aligned margin ``clip(r_i - r~_i, -delta_low, delta_high)``; ``None`` means no clip."""
    r = _grouped(rewards, group_size)
    if ref_rewards.shape != rewards.shape:
        raise ValueError(f"ref_rewards shape {tuple(ref_rewards.shape)} != rewards shape "
                         f"{tuple(rewards.shape)}: AAPO pairs the i-th policy and reference sample")
    margin = (r - _grouped(ref_rewards, group_size, "ref_rewards")).flatten()
    if margin_clip is None:
        return margin
    low, high = margin_clip
    if low < 0 or high < 0:
        raise ValueError(f"margin_clip bounds are magnitudes (delta_low, delta_high) >= 0, got {margin_clip}")
    return margin.clamp(-low, high)


def aapo_advantages(rewards: Tensor, ref_rewards: Tensor | None, group_size: int, *,
                    scale_rewards: bool = True, margin_clip: MarginClip = (0.2, 0.28),
                    use_margin: bool = True) -> Tensor:
    """AAPO advantage ``A_grp + clipped margin`` per sample (spec section 3). No gradient."""
    adv = group_advantages(rewards, group_size, scale_rewards=scale_rewards)
    if not use_margin:
        return adv
    if ref_rewards is None:
        raise ValueError("aapo_advantages with use_margin=True needs ref_rewards (the reference samples' rewards)")
    return adv + advantage_margin(rewards, ref_rewards, group_size, margin_clip)


def grpo_advantages(rewards: Tensor, group_size: int, *, scale_rewards: bool = True) -> Tensor:
    """GRPO's group-normalised advantage."""
    return group_advantages(rewards, group_size, scale_rewards=scale_rewards)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr.GRPO: group-centred rewards, no std scaling."""
    return group_advantages(rewards, group_size, scale_rewards=False)


def _valid_groups(rewards: Tensor, group_size: int) -> Tensor:
    r = _grouped(rewards, group_size)
    return r.max(dim=1).values != r.min(dim=1).values


def gpg_alpha(rewards: Tensor, group_size: int) -> float:
    """GPG's batch correction ``alpha = B / (B - M)``; M = samples in zero-variance groups (1 if B == M)."""
    valid = int(_valid_groups(rewards, group_size).sum()) * group_size
    return rewards.numel() / valid if valid else 1.0


def gpg_advantages(rewards: Tensor, group_size: int, *, scale_rewards: bool = False) -> Tensor:
    """GPG (arXiv 2504.02546): ``alpha * (r - mean(r)) / F_norm`` with F_norm = 1 (the paper's
    choice; ``scale_rewards`` gives its F_norm = std ablation row) and alpha from :func:`gpg_alpha`
    over the whole step's batch. verl's ``compute_gpg_outcome_advantage`` differs: its alpha is
    B / (number of samples with a non-zero reward), which equals the paper's only when exactly the
    zero-variance groups are the all-zero ones (binary rewards with no all-correct group).
    """
    return gpg_alpha(rewards, group_size) * group_advantages(rewards, group_size, scale_rewards=scale_rewards)


def gpg_fill(rewards: Tensor, group_size: int, num_groups: int) -> tuple[Tensor, float]:
    """GPG's top-up (beta_th): from the groups sampled so far (arrival order), the ``num_groups``
    to train on -- valid (reward-varying) groups first, zero-variance ones to fill -- as sorted
    group indices, and the valid-sample share of that batch. With enough valid groups in the
    first ``num_groups`` the selection is the identity."""
    valid = _valid_groups(rewards, group_size)
    order = torch.cat([valid.nonzero().flatten(), (~valid).nonzero().flatten()])[:num_groups]
    return order.sort().values, min(int(valid.sum()), num_groups) / num_groups


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(token) from logits ``[B, T, V]`` scaled by the sampling temperature, in float32."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                    temperature: float) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)  # in the head's dtype, as lm_head would
    return token_logprobs(logits, tokens, temperature)


def chunked_token_logprobs(hidden: Tensor, lm_head_weight: Tensor, tokens: Tensor, temperature: float = 1.0,
                           chunk_tokens: int = 1024, lm_head_bias: Tensor | None = None) -> Tensor:
    """``token_logprobs(lm_head(hidden), tokens, temperature)`` without full-vocabulary tensors.

    ``hidden`` ``[B, T, H]`` (final, normed hidden states) is flattened and cut into pieces of
    ``chunk_tokens`` tokens; each piece's logits exist only inside its own forward and, via
    ``torch.utils.checkpoint``, are recomputed in backward instead of being kept. Peak extra memory
    is about one chunk's ``chunk_tokens x vocab`` float32 logits, not the micro-batch's.
    Returns float32 ``[B, T]``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} disagree on [B, T]")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias))
    pieces = []
    for start in range(0, flat_t.numel(), chunk_tokens):
        h, t = flat_h[start:start + chunk_tokens], flat_t[start:start + chunk_tokens]
        if grad:
            pieces.append(torch.utils.checkpoint.checkpoint(
                _chunk_logprobs, h, lm_head_weight, lm_head_bias, t, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, lm_head_weight, lm_head_bias, t, temperature))
    if not pieces:
        return torch.zeros(tokens.shape, dtype=torch.float32, device=hidden.device)
    return torch.cat(pieces).view(tokens.shape)


LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "group_token_mean", "seq_mean_token_sum_norm")


def loss_weights(loss_agg: str, lengths, group_size: int, max_new_tokens: int) -> tuple[Tensor | None, float]:
    """``(w, D)`` of the module docstring for a step with completion ``lengths`` (tokens per row,
    groups contiguous). ``w`` is ``None`` where it is all ones (token sums, no column needed)."""
    n = torch.as_tensor(lengths, dtype=torch.float64).flatten()
    if loss_agg == "token_mean":
        return None, float(max(int(n.sum()), 1))
    if loss_agg == "seq_mean_token_sum_norm":
        return None, float(n.numel() * max_new_tokens)
    if loss_agg == "seq_mean_token_mean":
        return 1.0 / n.clamp(min=1), float(n.numel())
    if loss_agg == "group_token_mean":
        if n.numel() % group_size:
            raise ValueError(f"{n.numel()} lengths are not whole groups of {group_size}")
        per_group = n.view(-1, group_size).sum(dim=1).clamp(min=1)
        return (1.0 / per_group).repeat_interleave(group_size), float(per_group.numel())
    raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGS}")


def _denominator(mask: Tensor, num_tokens: float | Tensor | None) -> Tensor | float:
    return mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens


def _reduce(masked: Tensor, mask: Tensor, num_tokens, weights: Tensor | None) -> Tensor:
    """``sum_{i,t} masked / num_tokens``, or with per-sequence ``weights`` ``sum_i w_i sum_t masked / num_tokens``."""
    if weights is None:
        return masked.sum() / _denominator(mask, num_tokens)
    return (masked.sum(dim=1) * weights.to(masked.dtype)).sum() / (1.0 if num_tokens is None else num_tokens)


def aapo_loss(logprobs: Tensor, completion_mask: Tensor, advantages: Tensor, *,
              num_tokens: float | Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Advantage-weighted NLL summed over completion tokens / ``num_tokens``.

    ``num_tokens`` defaults to this batch's token count; pass the global count for split invariance.
    ``weights`` (per sequence) weight each sequence's token sum (see :func:`loss_weights`).
    """
    mask = completion_mask.to(logprobs.dtype)
    weighted = advantages.detach().to(logprobs.dtype)[:, None] * logprobs * mask
    return -_reduce(weighted, mask, num_tokens, weights)


def grpo_loss(logprobs: Tensor, completion_mask: Tensor, advantages: Tensor, *,
              old_logprobs: Tensor | None = None, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, ref_logprobs: Tensor | None = None,
              kl_beta: float = 0.0, num_tokens: float | Tensor | None = None,
              weights: Tensor | None = None) -> Tensor:
    """PPO-clip surrogate with optional k3 KL to the reference, token-summed / ``num_tokens``.

    ``old_logprobs=None`` means on-policy (ratio 1 with the right gradient).
    """
    mask = completion_mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)
    adv = advantages.detach().to(logprobs.dtype)[:, None]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    if kl_beta:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs")
        delta = ref_logprobs - logprobs
        per_token = per_token + kl_beta * (torch.exp(delta) - delta - 1)
    return _reduce(per_token * mask, mask, num_tokens, weights)


@dataclass(frozen=True)
class Estimator:
    """What a config string selects: how advantages are computed and which loss trains on them.

    ``needs_reference``: the step must sample the frozen reference model.
    ``normalizer``: ``"tokens"`` (global completion-token count) or ``"max_len"``
    (``num_sequences * max_new_tokens``, Dr.GRPO): the scalar ``D`` of callers that pass no
    weights; the driver uses :func:`loss_weights` with ``algo.loss_agg`` instead.
    """

    name: str
    needs_reference: bool
    advantages: Callable[..., Tensor]
    loss: Callable[..., Tensor]
    normalizer: str = "tokens"

    def loss_denominator(self, total_tokens: int, num_sequences: int, max_new_tokens: int) -> float:
        """The ``num_tokens`` every micro-batch of the step divides by."""
        if self.normalizer == "max_len":
            return float(num_sequences * max_new_tokens)
        return float(max(total_tokens, 1))


def _aapo(rewards, ref_rewards, group_size, *, scale_rewards=True, margin_clip=(0.2, 0.28)):
    return aapo_advantages(rewards, ref_rewards, group_size, scale_rewards=scale_rewards, margin_clip=margin_clip)


def _aapo_no_margin(rewards, ref_rewards, group_size, *, scale_rewards=True, margin_clip=None):
    return aapo_advantages(rewards, None, group_size, scale_rewards=scale_rewards, use_margin=False)


def _gpg(rewards, ref_rewards, group_size, *, scale_rewards=False, margin_clip=None):
    return gpg_advantages(rewards, group_size, scale_rewards=scale_rewards)


def _grpo(rewards, ref_rewards, group_size, *, scale_rewards=True, margin_clip=None):
    return grpo_advantages(rewards, group_size, scale_rewards=scale_rewards)


def _dr_grpo(rewards, ref_rewards, group_size, *, scale_rewards=False, margin_clip=None):
    return dr_grpo_advantages(rewards, group_size)


ESTIMATORS: dict[str, Estimator] = {
    "aapo": Estimator("aapo", True, _aapo, aapo_loss),
    "aapo_no_margin": Estimator("aapo_no_margin", False, _aapo_no_margin, aapo_loss),  # the margin ablation
    "gpg": Estimator("gpg", False, _gpg, aapo_loss),
    "grpo": Estimator("grpo", False, _grpo, grpo_loss),
    "dr_grpo": Estimator("dr_grpo", False, _dr_grpo, grpo_loss, normalizer="max_len"),
}


def get_estimator(name: str) -> Estimator:
    """Look up an estimator by config name (``aapo``, ``aapo_no_margin``, ``gpg``, ``grpo``, ``dr_grpo``)."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None


def advantage_diagnostics(rewards: Tensor, ref_rewards: Tensor | None, advantages: Tensor,
                          group_size: int, margin_clip: MarginClip = (0.2, 0.28)) -> dict[str, float]:
    """Per-batch numbers AAPO's story is told with, as plain floats.

    ``zero_variance_group_frac``: groups whose rewards are all equal (GRPO learns nothing there);
    ``zero_advantage_frac``: samples whose final advantage is exactly 0;
    ``margin_mean`` and ``margin_clipped_{low,high}_frac``: the applied margin and how often the
    raw margin hit each clip bound; ``nonfinite_rewards``: rewards replaced by 0.
    """
    r = _grouped(rewards, group_size)
    stats = {
        "reward_mean": r.mean().item(),
        "zero_variance_group_frac": (r.max(dim=1).values == r.min(dim=1).values).float().mean().item(),
        "zero_advantage_frac": (advantages == 0).float().mean().item(),
        "advantage_abs_mean": advantages.abs().mean().item(),
        "nonfinite_rewards": float((~torch.isfinite(rewards)).sum().item()),
    }
    if ref_rewards is not None:
        raw = (r - _grouped(ref_rewards, group_size, "ref_rewards")).flatten()
        low, high = margin_clip if margin_clip is not None else (float("inf"), float("inf"))
        stats.update(
            ref_reward_mean=_grouped(ref_rewards, group_size, "ref_rewards").mean().item(),
            margin_mean=raw.clamp(-low, high).mean().item(),
            margin_clipped_low_frac=(raw < -low).float().mean().item(),
            margin_clipped_high_frac=(raw > high).float().mean().item(),
            nonfinite_ref_rewards=float((~torch.isfinite(ref_rewards)).sum().item()),
        )
    return stats
