"""Generation backends: the one sampling path shared by training, reference, evaluation and Serve.

``hf``: transformers ``generate`` on CPU or GPU (the embedded default, tested here). Every sampling
setting is passed explicitly, so nothing in a checkpoint's ``generation_config`` (a repetition
penalty, top-k, min-p, ...) changes what is sampled: the learner's log-probs model exactly
temperature + top-p sampling.
``sglang``: ``sglang.Engine`` on GPU (optional ``gpu`` extra), see :mod:`aapo_ray.sglang_backend`.
Pick one with :func:`make_backend`.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from aapo_ray.models import eos_token_ids, load_model_and_tokenizer
from aapo_ray.sampling import Completions, SamplingParams, TokenScores, decode_rows, row_seeds
from aapo_ray.sglang_backend import SGLangBackend
from aapo_ray.weights import load_weight_buckets


# Processors a checkpoint's generation_config could switch on, each set to its neutral value: transformers
# fills every setting left None from the model's generation_config. (min_length is not passed: min_new_tokens=0
# takes precedence over it, and passing both makes transformers warn on every call.)
NEUTRAL_GENERATION = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                          min_new_tokens=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                          length_penalty=1.0, num_beams=1, num_return_sequences=1, renormalize_logits=False)


class HFBackend:
    """transformers ``generate`` with left padding, batched, seeded, on an in-memory model."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
        self.context_length = getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def load(cls, model_path: str, *, trust_remote_code: bool = False, dtype: str = "float32",
             device: str | None = None, batch_size: int = 64, allow_pickle: bool = False) -> "HFBackend":
        """Load ``model_path`` (see :func:`aapo_ray.models.load_model_and_tokenizer`) onto ``device``."""
        model, tokenizer = load_model_and_tokenizer(
            model_path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        return cls(model, tokenizer, batch_size=batch_size)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, streamer=None,
                 seeds: list[int] | None = None) -> Completions:
        """Sample every prompt (in batches of ``batch_size``). ``streamer`` (a transformers streamer)
        sees each batch's tokens as they are generated; its ``end`` is called after each batch.

        ``seeds`` (one per row): each row is sampled with its own generator, so its completion depends on
        its prompt, its seed and ``params`` only, not on the other rows of the call (batch-invariant).
        Without them, ``params.seed`` seeds torch's global generator once for the whole call."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompt_ids)} rows")
        if params.seed is not None and seeds is None:
            torch.manual_seed(params.seed)
        rows: list[np.ndarray] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            rows += self._generate_batch(prompt_ids[start:start + self.batch_size], params, streamer,
                                         None if seeds is None else seeds[start:start + self.batch_size])
        return self.completions(rows, params.stop)

    def completions(self, generated: list, stop: tuple[str, ...] = ()) -> Completions:
        """Sampled token rows as :class:`Completions` (:func:`~aapo_ray.sampling.decode_rows`)."""
        return decode_rows(generated, self.eos_ids, self.tokenizer, stop)

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        """Every setting that shapes sampling, explicit: temperature and top-p only (no top-k)."""
        sample = params.temperature > 0
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=sample, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids, temperature=params.temperature if sample else 1.0,
            top_p=params.top_p if sample else 1.0, top_k=0 if sample else None, min_p=0.0 if sample else None,
            **NEUTRAL_GENERATION)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, streamer, seeds: list[int] | None):
        input_ids, attention = left_pad(prompts, self.tokenizer.pad_token_id)
        width = input_ids.shape[1]
        config, processors = self.generation_config(params), None
        if seeds is not None and params.temperature > 0:  # greedy over the processor's one sampled token
            config = self.generation_config(dataclasses.replace(params, temperature=0.0))
            processors = LogitsProcessorList([RowSeededSampler(params, seeds, self.device)])
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                  generation_config=config, logits_processor=processors, streamer=streamer)
        return list(out[:, width:].cpu().numpy())

    @torch.no_grad()
    def score(self, sequences: list[list[int]], starts: list[int], top_k: int,
              max_tokens: int = 8192) -> list[TokenScores]:
        """The model's own log-probs of each sequence's tokens from ``starts[i]`` (>= 1) on, and the ``top_k``
        most likely tokens at those positions: ``log_softmax`` of the logits at temperature 1 (what the
        OpenAI API and vLLM report, whatever the sampling temperature). No grad; right-padded batches (each
        row's positions and attention as alone) of at most ``batch_size`` rows and ``max_tokens`` padded
        tokens, with logits only from the earliest scored position on where the model allows it."""
        out: list[TokenScores] = []
        keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        b = 0
        while b < len(sequences):
            n = 1
            while (b + n < len(sequences) and n < self.batch_size
                   and (n + 1) * max(len(s) for s in sequences[b:b + n + 1]) <= max_tokens):
                n += 1
            rows, first = [list(s) for s in sequences[b:b + n]], starts[b:b + n]
            if any(not 1 <= st <= len(s) for s, st in zip(rows, first)):
                raise ValueError("score: every start must be in [1, len(sequence)]")
            width = max(len(s) for s in rows)
            ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(rows):
                ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            extra = {"logits_to_keep": width - min(first) + 1} if keeps else {}
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **extra).logits
            off = width - logits.shape[1]  # logits[:, j] are position off + j's
            for s, st, row in zip(rows, first, logits):
                logp = torch.log_softmax(row[st - 1 - off:len(s) - 1 - off].float(), dim=-1)
                target = torch.as_tensor(s[st:], dtype=torch.long, device=logp.device)
                top = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1)
                out.append(TokenScores(st, logp.gather(1, target[:, None])[:, 0].cpu().numpy(),
                                       top.indices.cpu().numpy(), top.values.cpu().numpy()))
            b += n
        return out

    def load_weights(self, buckets: list) -> int:
        return load_weight_buckets(self.model, buckets)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (for checking weight sync)."""
        with torch.no_grad():
            return self.model(input_ids.to(self.device)).logits.float().cpu()


class RowSeededSampler(LogitsProcessor):
    """Temperature + top-p sampling (transformers' own warpers) with one ``torch.Generator`` per row, as a
    logits processor that leaves only the drawn token for a greedy ``generate`` to take: row ``i``'s draws
    come from ``seeds[i]`` alone, whatever else is in the batch. Each row's uniforms for the whole call
    are drawn once up front (one generator call per row, not per row and step); a step then samples every
    row at once by inverting its CDF."""

    def __init__(self, params: SamplingParams, seeds: list[int], device):
        warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.uniforms = torch.stack([
            torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(int(s) % 2**64),
                       dtype=torch.float64) for s in seeds]).to(device)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = self.warpers(input_ids, scores).double().softmax(dim=-1).cumsum(dim=-1)
        u = self.uniforms[:, self.step:self.step + 1] * cdf[:, -1:]  # the first token whose CDF passes u
        self.step += 1
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


def sample_rows(backend, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
    """Sample every row with a generator of its own, row ``i`` seeded ``row_seeds(params.seed, rows)[i]``: how
    a training chunk is drawn (:meth:`aapo_ray.generator.GeneratorActor.generate`), and a reference-cache
    shard (:mod:`aapo_ray.reference_build`) with it. A row's draws do not depend on what else samples in the
    same process at the same time (co-located roles) nor on the batching."""
    return backend.generate(prompt_ids, params, seeds=row_seeds(params.seed, len(prompt_ids)))


def make_backend(kind: str, model_path: str, *, trust_remote_code: bool = False, dtype: str = "float32",
                 device: str | None = None, allow_pickle: bool = False, batch_size: int = 64,
                 mem_fraction: float = 0.6, seed: int = 0, deterministic: bool = False):
    """``"hf"`` (batch_size, device) or ``"sglang"`` (mem_fraction; seed: the engine's random seed;
    deterministic: per-row sampling seeds, sglang's deterministic-inference mode)."""
    if kind == "hf":
        return HFBackend.load(model_path, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
                              batch_size=batch_size, allow_pickle=allow_pickle)
    if kind == "sglang":
        return SGLangBackend(model_path, trust_remote_code=trust_remote_code, dtype=dtype,
                             mem_fraction=mem_fraction, seed=seed, deterministic=deterministic)
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
