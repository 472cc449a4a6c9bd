"""Generation backends shared by the training generators and the Serve endpoint.

``hf``: transformers ``generate`` on CPU or GPU (the embedded default, tested here).
``sglang``: ``sglang.Engine`` on GPU (optional ``gpu`` extra). Written against SGLang's public
Engine API (``generate(input_ids=..., sampling_params=...)``, ``update_weights_from_tensor``,
``release/resume_memory_occupation``) but NOT executed in this repository's CI, which has no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Completions:
    """Sampled continuations, one row per (prompt, sample): token ids truncated after the first EOS."""

    token_ids: list[np.ndarray]
    texts: list[str]
    finish_reasons: list[str]  # "stop" (EOS) or "length"


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int | None = None
    stop: tuple[str, ...] = ()


class HFBackend:
    """transformers ``generate`` with left padding, batched, seeded."""

    def __init__(self, model_path: str, *, trust_remote_code: bool = False, dtype: str = "float32",
                 device: str | None = None, batch_size: int = 64, allow_pickle: bool = False):
        from aapo_ray.models import load_model_and_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_model_and_tokenizer(
            model_path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        rows: list[np.ndarray] = []
        reasons: list[str] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            ids, why = self._generate_batch(prompt_ids[start:start + self.batch_size], params)
            rows += ids
            reasons += why
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        if params.stop:
            rows, texts, reasons = _apply_stop(rows, texts, reasons, params.stop, self.tokenizer)
        return Completions(rows, texts, reasons)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams):
        pad = self.tokenizer.pad_token_id
        input_ids, attention = left_pad(prompts, pad)
        width = input_ids.shape[1]
        sample = params.temperature > 0
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens, do_sample=sample,
            temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
            top_k=0 if sample else None, pad_token_id=pad, eos_token_id=self.eos_ids)
        return _truncate_at_eos(out[:, width:].cpu().numpy(), self.eos_ids)

    def load_weights(self, buckets: list) -> int:
        from aapo_ray.learner import load_weight_buckets

        return load_weight_buckets(self.model, buckets)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (for checking weight sync)."""
        with torch.no_grad():
            return self.model(input_ids.to(self.device)).logits.float().cpu()

    def sleep(self) -> None:  # nothing to release on CPU
        pass

    def wake(self) -> None:
        pass


class SGLangBackend:
    """``sglang.Engine`` fed with token ids; weights synced with ``update_weights_from_tensor``."""

    def __init__(self, model_path: str, *, trust_remote_code: bool = False, dtype: str = "bfloat16",
                 mem_fraction: float = 0.6, seed: int = 0, **_):
        try:
            import sglang
        except ImportError as exc:
            raise RuntimeError(
                "rollout.backend=sglang needs SGLang on a CUDA machine: pip install 'aapo-ray[gpu]' "
                "(with a CUDA build of torch). On CPU use rollout.backend=hf.") from exc
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.engine = sglang.Engine(model_path=model_path, dtype=dtype, mem_fraction_static=mem_fraction,
                                    random_seed=seed, skip_tokenizer_init=True,
                                    trust_remote_code=trust_remote_code)
        self.eos_ids = [self.tokenizer.eos_token_id]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        sampling = {"temperature": params.temperature, "top_p": params.top_p,
                    "max_new_tokens": params.max_new_tokens}
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        outputs = self.engine.generate(input_ids=prompt_ids, sampling_params=sampling)
        rows = [np.asarray(o["output_ids"], dtype=np.int32) for o in outputs]
        reasons = [(o["meta_info"].get("finish_reason") or {}).get("type", "length") for o in outputs]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return Completions(rows, texts, ["stop" if r == "stop" else "length" for r in reasons])

    def load_weights(self, buckets: list) -> int:
        from aapo_ray.learner import unpack_bucket

        named = [pair for bucket in buckets for pair in unpack_bucket(bucket)]
        self.engine.update_weights_from_tensor(named_tensors=named)
        return len(named)

    def sleep(self) -> None:
        self.engine.release_memory_occupation()

    def wake(self) -> None:
        self.engine.resume_memory_occupation()


def make_backend(kind: str, model_path: str, **kwargs):
    """``"hf"`` or ``"sglang"``."""
    if kind == "hf":
        kwargs.pop("mem_fraction", None)
        kwargs.pop("seed", None)
        return HFBackend(model_path, **kwargs)
    if kind == "sglang":
        kwargs.pop("batch_size", None)
        kwargs.pop("device", None)
        return SGLangBackend(model_path, **kwargs)
    raise ValueError(f"unknown generation backend {kind!r}; use 'hf' or 'sglang'")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with prompts aligned to the right, as generation needs."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        attention[i, width - len(p):] = 1
    return input_ids, attention


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token (generation_config.eos_token_id / tokenizer.eos_token)")
    return ids


def _truncate_at_eos(generated: np.ndarray, eos_ids: list[int]) -> tuple[list[np.ndarray], list[str]]:
    """Keep tokens up to and including the first EOS; rows without EOS finished by length."""
    is_eos = np.isin(generated, eos_ids)
    has_eos = is_eos.any(axis=1)
    lengths = np.where(has_eos, is_eos.argmax(axis=1) + 1, generated.shape[1])
    rows = [generated[i, :n].astype(np.int32) for i, n in enumerate(lengths)]
    return rows, ["stop" if h else "length" for h in has_eos]


def _apply_stop(rows, texts, reasons, stops, tokenizer):
    """Cut texts at the first stop string (re-tokenising the kept text for the ids)."""
    for i, text in enumerate(texts):
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            texts[i] = text[:cut]
            rows[i] = np.asarray(tokenizer(texts[i], add_special_tokens=False)["input_ids"], dtype=np.int32)
            reasons[i] = "stop"
    return rows, texts, reasons
