"""What a generation request is: sampling settings, sampled completions, and the seeds that make a run
reproducible. No torch here: scorers and the driver's bookkeeping import it cheaply."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completions:
    """Sampled continuations, one row per (prompt, sample): token ids truncated after the first EOS."""

    token_ids: list[np.ndarray]
    texts: list[str]
    finish_reasons: list[str]  # "stop" (EOS or a stop string), "length"; never an aborted row


@dataclass
class TokenScores:
    """The model's log-probs (temperature 1) of one sequence's tokens ``start..`` (``start >= 1``), each given
    the tokens before it: ``logprobs[j]`` of token ``start + j``, and the ``top_ids`` / ``top_logprobs`` of
    that position (``[n, k]``, most likely first)."""

    start: int
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def decode_rows(generated: list, eos_ids, tokenizer, stop: tuple[str, ...] = ()) -> Completions:
    """Sampled token rows as :class:`Completions`: each cut after its first EOS, decoded, cut at the first
    ``stop`` string (what every backend's ``generate`` returns, and Serve's continuous rows)."""
    rows, reasons = [], []
    for row in generated:
        row = np.asarray(row, dtype=np.int64)
        eos = np.flatnonzero(np.isin(row, list(eos_ids)))
        rows.append(row[:eos[0] + 1 if len(eos) else len(row)].astype(np.int32))
        reasons.append("stop" if len(eos) else "length")
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    if stop:
        rows, texts, reasons = apply_stop(rows, texts, reasons, stop, tokenizer)
    return Completions(rows, texts, reasons)


def apply_stop(rows, texts, reasons, stops, tokenizer):
    """Cut texts at the first stop string (re-tokenising the kept text for the ids)."""
    for i, text in enumerate(texts):
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            texts[i] = text[:cut]
            rows[i] = np.asarray(tokenizer(texts[i], add_special_tokens=False)["input_ids"], dtype=np.int32)
            reasons[i] = "stop"
    return rows, texts, reasons


# ----------------------------------------------------------------------------- seeds
# One place derives every seed of a run, so that the policy and the reference, each replica's chunk and
# each row draw independent streams, and a re-sampled chunk repeats its draw exactly.
_STEP_STRIDE = 1_000_003
_ROLE_OFFSET = {"policy": 0, "reference": 500_009}
_CHUNK_STRIDE = 7919
_ROW_STRIDE = 104_729
_ENGINE_STRIDE = 15_485_863


def step_seed(run_seed: int, step: int | None, role: str = "policy") -> int:
    """The sampling seed of ``role`` at training ``step`` (``None``: the held-out evaluation)."""
    if step is None:
        return run_seed
    return run_seed * _STEP_STRIDE + step + _ROLE_OFFSET[role]


def chunk_seed(seed: int | None, chunk: int) -> int | None:
    """The seed of the ``chunk``-th replica call of one request (``None`` stays unseeded)."""
    return None if seed is None else seed + _CHUNK_STRIDE * chunk


def row_seeds(seed: int | None, rows: int) -> list[int] | None:
    """One seed per completion row of a call, for engines that seed each request (SGLang)."""
    return None if seed is None else [(seed + _ROW_STRIDE * i) % 2**63 for i in range(rows)]


def engine_seed(run_seed: int, role: str, replica: int) -> int:
    """A distinct engine-level random seed per role and replica."""
    return (run_seed * _ENGINE_STRIDE + _ROLE_OFFSET[role] + replica) % 2**31


def problem_seed(base_seed: int, benchmark: str, index: int) -> int:
    """The sampling seed of one problem's (or prompt's) k samples in a batch-inference job, independent of
    batching: ``aapo eval`` (benchmark name, problem index), the reference build ("reference", shard index)."""
    return chunk_seed(base_seed + zlib.crc32(benchmark.encode()), index) % 2**63
