"""The evaluation sets ``aapo eval`` ships (``aapo_ray/eval_data/*.jsonl.gz``, byte-exact gzip copies of
the project's shared data, provenance in ``/work/shared/data/README.md``), their gold-answer formats and
the paper's evaluation protocol.

| name | file | n | prompt field | gold |
|---|---|---|---|---|
| ``aime24`` | aime24 | 30 | ``problem`` | ``answer`` as given (``raw``) |
| ``math500`` | math500 | 500 | ``question`` | last ``\\boxed{}`` of the full solution in ``answer`` (``math``) |
| ``amc23`` | amc23 | 40 | ``problem`` | ``answer`` (``raw``) |
| ``minerva`` | minerva_math | 272 | ``problem`` | ``answer`` (``raw``) |
| ``olympiadbench`` | olympiadbench | 675 | ``problem`` | ``answer`` (``raw``) |
| ``gsm8k`` | gsm8k | 1319 | ``question`` | text after ``####`` (``gsm8k``) |

A user's set is a ``.jsonl`` path with ``problem`` and ``answer`` (final answer, ``raw``) fields.

**Paper protocol** (spec section 6, AAPO arXiv 2505.14264): zero-shot, T = 0.6, top_p = 0.95, *one
sample per problem* scored with math-verify on AIME24, MATH-500, AMC23, Minerva and OlympiadBench. We keep
k = 1 on every set, AIME24 and AMC23 included: the spec's table is one sample per problem (its AIME24
entries 33.3 / 26.7 / 6.7 are multiples of 1/30, its AMC23 entries multiples of 1/40), so averaging over
k = 8 or 16 there (as some later papers do) would not reproduce it; pass ``--samples 16`` for avg@16.
The completion budget is the 1.5B run's completion length, 3584 tokens (capped at a small model's
context). GSM8K is not in the paper's table and not in the protocol's default sets.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aapo_ray.config import InputError
from aapo_ray.data import PromptDataset, load_prompt_dataset

DATA_DIR = Path(__file__).resolve().parent / "eval_data"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  # column header of the results table
    file: str  # in DATA_DIR
    question_field: str
    fmt: str  # gold format of aapo_ray.data.extract_gold
    size: int


BENCHMARKS = {b.name: b for b in (
    Benchmark("aime24", "AIME24", "aime24.jsonl.gz", "problem", "raw", 30),
    Benchmark("math500", "MATH-500", "math500.jsonl.gz", "question", "math", 500),
    Benchmark("amc23", "AMC23", "amc23.jsonl.gz", "problem", "raw", 40),
    Benchmark("minerva", "Minerva", "minerva_math.jsonl.gz", "problem", "raw", 272),
    Benchmark("olympiadbench", "Olympiad", "olympiadbench.jsonl.gz", "problem", "raw", 675),
    Benchmark("gsm8k", "GSM8K", "gsm8k.jsonl.gz", "question", "gsm8k", 1319),
)}
ALIASES = {"math-500": "math500", "math_500": "math500", "minerva_math": "minerva", "olympiad": "olympiadbench",
           "aime": "aime24", "amc": "amc23"}
#: The paper table's columns, in its order; the average is over these (those evaluated).
PAPER_SETS = ("aime24", "math500", "amc23", "minerva", "olympiadbench")
ALL_SETS = PAPER_SETS + ("gsm8k",)
PAPER_PROTOCOL = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 3584, "samples": 1,
                  "benchmarks": ",".join(PAPER_SETS)}
#: ``aapo eval``'s settings where neither a flag nor ``--protocol paper`` sets them
EVAL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 1024, "samples": 4, "benchmarks": ",".join(ALL_SETS)}
USER_FIELDS = ("problem", "answer")
MAX_SAMPLES = 1024  # largest k of ``aapo eval --samples``

log = logging.getLogger(__name__)


class EvalInputError(InputError):
    """Bad input to ``aapo eval`` found before anything starts (exit status 2)."""


@dataclass(frozen=True)
class EvalSet:
    """A benchmark to run: its name (the file's stem for a user's set), title and source."""

    name: str
    title: str
    source: str  # a packaged name or a path
    builtin: bool


def parse_benchmarks(spec: str) -> list[EvalSet]:
    """``"math500,aime24,./my.jsonl"`` -> the sets in that order; unknown names raise EvalInputError."""
    out: list[EvalSet] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        key = ALIASES.get(item.lower(), item.lower())
        if key in BENCHMARKS:
            out.append(EvalSet(key, BENCHMARKS[key].title, key, True))
        elif item.startswith("synthetic:"):  # the embedded model's own task, e.g. its held-out split
            out.append(EvalSet(item.replace(":", "-"), item, item, False))
        elif item.endswith((".jsonl", ".json")) or os.sep in item:
            if not os.path.isfile(item):
                raise EvalInputError(f"--benchmarks: {item}: no such file (a user's set is a .jsonl file "
                                     f"with {USER_FIELDS[0]!r} and {USER_FIELDS[1]!r} fields)")
            stem = Path(item).name.split(".")[0]
            out.append(EvalSet(stem, stem, item, False))
        else:
            raise EvalInputError(f"--benchmarks: unknown benchmark {item!r}; known: {', '.join(ALL_SETS)}, "
                                 f"synthetic:<split>[:<n>] (the embedded task), or a path to a .jsonl file with "
                                 f"{USER_FIELDS[0]!r} and {USER_FIELDS[1]!r} fields")
    names = [s.name for s in out]
    if not out:
        raise EvalInputError("--benchmarks: no benchmark named")
    if len(set(names)) < len(names):
        raise EvalInputError(f"--benchmarks: a set is named twice ({', '.join(names)})")
    return out


def settings_from(args, *, warn: bool = True) -> dict:
    """``aapo eval``'s sampling settings (from its parsed ``args``): explicit flags, else the protocol's, else the
    defaults; validated (:class:`EvalInputError`). ``warn``: log each flag that overrides the paper protocol."""
    base = PAPER_PROTOCOL if args.protocol == "paper" else EVAL_DEFAULTS
    s = {key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in EVAL_DEFAULTS}
    if args.protocol == "paper" and warn:
        for key in EVAL_DEFAULTS:
            if getattr(args, key) is not None and getattr(args, key) != PAPER_PROTOCOL[key]:
                log.warning("--%s %s overrides the paper protocol's %s", key.replace("_", "-"), getattr(args, key),
                            PAPER_PROTOCOL[key])
    if not 1 <= s["samples"] <= MAX_SAMPLES:
        raise EvalInputError(f"--samples must be between 1 and {MAX_SAMPLES}, got {s['samples']}")
    if s["temperature"] < 0:
        raise EvalInputError(f"--temperature must be >= 0, got {s['temperature']}")
    if not 0 < s["top_p"] <= 1:
        raise EvalInputError(f"--top-p must be in (0, 1], got {s['top_p']}")
    if s["max_new_tokens"] < 1:
        raise EvalInputError(f"--max-new-tokens must be >= 1, got {s['max_new_tokens']}")
    if args.limit is not None and args.limit < 1:
        raise EvalInputError(f"--limit must be >= 1, got {args.limit}")
    return s


def load_eval_set(item: EvalSet, limit: int | None = None) -> PromptDataset:
    """The problems of ``item`` (the first ``limit``); a bad row of a user's file raises EvalInputError
    naming the file and the row (:func:`aapo_ray.data.load_prompt_dataset` with ``bad_rows="fail"``)."""
    try:
        if item.source.startswith("synthetic:"):
            return load_prompt_dataset(item.source, limit=limit)
        if not item.builtin:
            return load_prompt_dataset(item.source, fmt="raw", question_field=USER_FIELDS[0],
                                       answer_field=USER_FIELDS[1], bad_rows="fail", limit=limit)
        bench = BENCHMARKS[item.name]
        with tempfile.TemporaryDirectory(prefix="aapo-eval-") as tmp:
            path = os.path.join(tmp, f"{item.name}.jsonl")
            with gzip.open(DATA_DIR / bench.file, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            ds = load_prompt_dataset(path, fmt=bench.fmt, question_field=bench.question_field,
                                     answer_field="answer", bad_rows="fail", limit=limit)
        ds.source = f"{item.name} ({bench.file})"
        return ds
    except (ValueError, FileNotFoundError) as exc:
        raise EvalInputError(str(exc)) from None
