"""Memory-lean training forward for HF causal LMs: chunked log-probs and gradient checkpointing.

:func:`policy_logprobs` runs the decoder body for the final hidden states and turns them into
token log-probs with :func:`aapo_ray.algo.chunked_token_logprobs`, so no ``[B, T, vocab]`` logits
tensor is ever built. :func:`prepare_for_training` puts a model in train mode with every dropout
at 0 (log-probs equal eval mode, i.e. the sampler's), the KV cache off and, if asked, HF gradient
checkpointing (non-reentrant). Needs torch only; the model is any HF ``*ForCausalLM``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aapo_ray.algo import chunked_token_logprobs

# Config fields that would change logits even with every dropout at 0: refuse rather than be wrong.
_UNSUPPORTED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale",
                            "logits_scaling", "mup_width_multiplier")


def _unwrap(model):
    """The HF model inside a DeepSpeed engine (``engine.module``), or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning normed final hidden states, output embedding) of an HF causal LM."""
    model = _unwrap(model)
    for name in _UNSUPPORTED_HEAD_FIELDS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            raise NotImplementedError(f"{type(model).__name__} scales its logits ({name}={value}); "
                                      "chunked log-probs support plain linear heads only")
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "model", None)
    head = model.get_output_embeddings()
    if body is None or head is None or not hasattr(head, "weight"):
        raise NotImplementedError(f"{type(model).__name__}: cannot find the decoder body and linear lm_head")
    return body, head


def policy_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None, temperature: float = 1.0,
                    chunk_tokens: int = 1024) -> Tensor:
    """log pi(input_ids[:, 1:]) as float32 ``[B, T-1]``, equal to
    ``token_logprobs(model(...).logits[:, :-1], input_ids[:, 1:], temperature)`` without full logits."""
    body, head = decoder_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return chunked_token_logprobs(hidden[:, :-1], head.weight, input_ids[:, 1:], temperature,
                                  chunk_tokens, lm_head_bias=getattr(head, "bias", None))


def _zero_dropout_config(config, seen: set) -> list[str]:
    if config is None or id(config) in seen:
        return []
    seen.add(id(config))
    changed = []
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and value and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
            changed.append(f"config.{key}")
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested sub-config
            changed += [f"{key}.{c}" for c in _zero_dropout_config(value, seen)]
    return changed


def zero_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability to 0: config fields, ``nn.Dropout`` modules and the float
    attributes HF attention layers copy from the config at init (``attention_dropout``...).
    Returns what was changed."""
    changed = _zero_dropout_config(getattr(model, "config", None), set())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p:
            module.p = 0.0
            changed.append(f"{name or type(module).__name__}.p")
        for key, value in list(vars(module).items()):
            if (isinstance(value, float) and not isinstance(value, bool) and value
                    and ("dropout" in key or key.endswith("pdrop"))):
                setattr(module, key, 0.0)
                changed.append(f"{name}.{key}")
    return changed


def checkpointing_enabled(model) -> bool:
    """Whether HF activation (gradient) checkpointing is on, under either transformers name."""
    model = _unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool) -> dict:
    """Train mode without randomness: ``use_cache=False``, all dropout 0, checkpointing if asked.

    Checkpointing is HF's per-decoder-layer ``gradient_checkpointing_enable`` with
    ``use_reentrant=False`` (works with frozen embeddings and ``torch.no_grad`` references).
    HF only recomputes layers while ``model.training``, hence ``train()`` rather than ``eval()``.
    """
    model = _unwrap(model)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    changed = zero_dropout(model)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; "
                             "set learner.gradient_checkpointing=false")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif checkpointing_enabled(model):
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.train()
    return {"dropout_zeroed": changed, "gradient_checkpointing": bool(gradient_checkpointing)}
