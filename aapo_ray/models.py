"""Loading a causal LM and its tokenizer from a local Hugging Face directory, checked on the way.

Every role that holds a model (generators, learners, the Serve replica, evaluation) loads it here: only
safetensors unless ``allow_pickle``, no remote code unless ``trust_remote_code``, a clear error naming the
directory for anything that is not a causal LM with an LM head and a tokenizer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = ["load_model_and_tokenizer", "eos_token_ids"]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_safetensors(p: Path) -> bool:
    return any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()


def load_model_and_tokenizer(path, *, trust_remote_code: bool = False, dtype=torch.float32,
                             allow_pickle: bool = False):
    """Load a causal LM and its tokenizer from a local HF directory (or, if ``path`` is not a
    local path and looks like ``org/name``, from the HF cache/hub).

    Only safetensors weights are loaded unless ``allow_pickle``. A tokenizer without a pad
    token gets pad = eos on the returned instance (warning logged). Padding side is left as
    the checkpoint has it: callers pad explicitly.
    """
    path = os.fspath(path)
    p = Path(path).expanduser()
    local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if local:
        if not p.is_dir():
            raise FileNotFoundError(
                f"model path {path!r} is not a directory; pass a local Hugging Face model "
                "directory (config.json, *.safetensors, tokenizer files), e.g. one written by "
                "save_pretrained, or omit it to use the built-in default model")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path!r} has no config.json; it is not "
                                    "a Hugging Face model directory (save it with "
                                    "model.save_pretrained(dir))")
        if not _has_safetensors(p):
            if any(p.glob("pytorch_model*.bin")):
                if not allow_pickle:
                    raise ValueError(
                        f"model directory {path!r} has only pickle (.bin) weights, which can "
                        "run arbitrary code when loaded; convert them to safetensors (load "
                        "and model.save_pretrained(dir, safe_serialization=True)) or pass "
                        "allow_pickle=True if you trust the files")
            else:
                raise FileNotFoundError(f"model directory {path!r} has no weights "
                                        "(*.safetensors)")
        path = str(p)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        where = "" if local else (" (not a local directory, so it was looked up as a Hugging "
                                  "Face hub id / in the HF cache)")
        raise ValueError(f"cannot read the model config of {path!r}{where}: {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
    headless = archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if headless or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (
            trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})):
        raise ValueError(
            f"{path!r} is a {config.model_type!r} checkpoint (architectures {archs}), not a "
            "causal language model with an LM head; AAPO needs a decoder-only causal LM "
            "(e.g. LlamaForCausalLM, Qwen2ForCausalLM)")
    if local and not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {path!r} has no tokenizer files (one of "
                                f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer there "
                                "with tokenizer.save_pretrained(dir)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
    except Exception as e:  # noqa: BLE001 - safetensors/shape errors do not name the directory
        raise ValueError(f"cannot load the causal LM in {path!r} (damaged or mismatched weights?): "
                         f"{type(e).__name__}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer of {path!r} (tokenizer.json / "
                         f"tokenizer_config.json; save it with tokenizer.save_pretrained): "
                         f"{e}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path!r} has neither a pad nor an eos token; "
                             "set one (tokenizer.pad_token = ...) and save it again")
        log.warning("tokenizer of %s has no pad token; using eos %r as pad", path,
                       tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer



def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids (a model may end on several)
    and the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token (generation_config.eos_token_id / tokenizer.eos_token)")
    return ids
