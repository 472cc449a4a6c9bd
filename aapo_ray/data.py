"""Prompt datasets: loading, gold-answer extraction, prompt rendering and batch sampling.

A record is ``(prompt_id, prompt, gold)``. Sources are local JSON-Lines files, Parquet files,
directories written by ``datasets.Dataset.save_to_disk`` or ``"synthetic:<split>[:<n>]"`` for
the built-in arithmetic task (:mod:`aapo_ray.synthetic`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from aapo_ray.synthetic import DEFAULT_SPLIT_SIZES, PROMPT_TEMPLATE, SPLITS, SyntheticTask

__all__ = ["R1_SYSTEM_PROMPT", "GOLD_FORMATS", "DEFAULT_MAX_ROW_CHARS", "PromptDataset",
           "PromptSampler", "extract_gold", "last_boxed", "load_prompt_dataset", "render_prompts"]

log = logging.getLogger(__name__)

#: The system prompt of the paper's R1-Distill-Qwen-1.5B run (open-rs ``recipes/grpo.yaml``),
#: verbatim, including its literal ``\boxed{{}}``.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer, and put your final answer within \\boxed{{}} . The "
    "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. Note that respond by English, NOT use other languages."
)

GOLD_FORMATS = ("gsm8k", "math", "raw")
DEFAULT_MAX_ROW_CHARS = 100_000
_MAX_PROBLEMS_KEPT = 10
_BOX_COMMANDS = ("\\boxed", "\\fbox")


# ----------------------------------------------------------------------------- gold answers
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces
    matched), also the brace-less form ``\\boxed 5``; None when there is none (or it is
    unclosed)."""
    # Walk back over occurrences so an unclosed last box does not hide an earlier one.
    positions = sorted((i, cmd) for cmd in _BOX_COMMANDS for i in _find_all(text, cmd))
    for pos, cmd in reversed(positions):
        j = pos + len(cmd)
        if j < len(text) and text[j].isalpha():  # e.g. \boxedfoo: another command
            continue
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[j + 1 : k]
            continue  # unclosed
        if j > pos + len(cmd):  # "\boxed 5": up to the next space or "$"
            end = j
            while end < len(text) and text[end] not in " $\n":
                end += 1
            if end > j:
                return text[j:end]
    return None


def _find_all(text: str, sub: str) -> Iterator[int]:
    i = text.find(sub)
    while i != -1:
        yield i
        i = text.find(sub, i + 1)


def extract_gold(text: str, fmt: str) -> str:
    """The gold answer in ``text`` for ``fmt``:

    - ``gsm8k``: text after the last ``####``, stripped, thousands commas removed;
    - ``math``: content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched;
    - ``raw``: ``text`` stripped.

    Raises ValueError when no answer is found or it is empty.
    """
    if not isinstance(text, str):
        raise ValueError(f"gold is not a string ({type(text).__name__})")
    if fmt == "gsm8k":
        if "####" not in text:
            raise ValueError("no '####' answer marker (fmt='gsm8k')")
        gold = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif fmt == "math":
        boxed = last_boxed(text)
        if boxed is None:
            raise ValueError("no complete \\boxed{...} answer (fmt='math')")
        gold = boxed.strip()
    elif fmt == "raw":
        gold = text.strip()
    else:
        raise ValueError(f"unknown gold format {fmt!r}; expected one of {GOLD_FORMATS}")
    if not gold:
        raise ValueError(f"empty gold answer (fmt={fmt!r})")
    return gold


# ----------------------------------------------------------------------------- datasets
@dataclass
class PromptDataset:
    """Loaded prompt records. ``ids[i]`` is the configured id field, else the 0-based row index
    in the source (stable under skipping). ``problems`` holds the first few skip reasons."""

    ids: list[int]
    questions: list[str]
    golds: list[str]
    source: str = ""
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    #: Template the source was made for (the synthetic task's), else None.
    default_template: str | None = None

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> tuple[int, str, str]:
        return self.ids[i], self.questions[i], self.golds[i]


class _BadRow(Exception):
    pass


def _iter_jsonl(path: str, max_row_chars: int) -> Iterator[tuple[int, str, Any]]:
    """Yields (row index, location label, row dict or _BadRow)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            where = f"row {i} (line {i + 1})"
            if not raw.strip():
                continue
            if len(raw) > 4 * max_row_chars:  # cheap pre-check before decoding
                yield i, where, _BadRow(f"row is too long ({len(raw)} bytes; max_row_chars="
                                        f"{max_row_chars})")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, where, _BadRow(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, where, _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield i, where, _BadRow(f"JSON value is a {type(row).__name__}, not an object")
                continue
            yield i, where, row


def _iter_parquet(path: str) -> Iterator[dict]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _open_hf_dir(path: str, split: str | None):
    import datasets  # ~1 s to import, only for save_to_disk directories

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            if len(names) != 1:
                raise ValueError(f"{path}: dataset has splits {names}; pass split=<one of them>")
            split = names[0]
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; available: {names}")
        ds = ds[split]
    return ds


def _text_field(row: dict, name: str, what: str) -> str:
    if name not in row or row[name] is None:
        raise _BadRow(f"missing {what} field {name!r}")
    v = row[name]
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRow(f"{what} field {name!r} is not valid UTF-8") from None
    if not isinstance(v, str):
        raise _BadRow(f"{what} field {name!r} is not a string ({type(v).__name__})")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # e.g. a JSON escape of a lone surrogate, "\ud800"
        raise _BadRow(f"{what} field {name!r} is not valid UTF-8 text (lone surrogate)") from None
    if not v.strip():
        raise _BadRow(f"empty {what} field {name!r}")
    return v


def _row_id(row: dict, name: str) -> int:
    if name not in row or row[name] is None:
        raise _BadRow(f"missing id field {name!r}")
    v = row[name]
    if isinstance(v, bool):
        raise _BadRow(f"id field {name!r} is a bool, not an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    raise _BadRow(f"id field {name!r} is not an integer ({v!r:.40})")


def _load_synthetic(spec: str, limit: int | None) -> PromptDataset:
    parts = spec.split(":")
    split = parts[1] if len(parts) > 1 else ""
    if split not in SPLITS or len(parts) > 3:
        raise ValueError(f"bad synthetic source {spec!r}; use 'synthetic:train', "
                         "'synthetic:test' or 'synthetic:<split>:<n>'")
    n = DEFAULT_SPLIT_SIZES[split]
    if len(parts) == 3:
        try:
            n = int(parts[2])
        except ValueError:
            raise ValueError(f"bad synthetic size in {spec!r}: {parts[2]!r}") from None
    if limit is not None:
        n = min(n, limit)
    if n <= 0:
        raise ValueError(f"{spec}: empty data set (n={n})")
    probs = SyntheticTask().problems(split, n)
    return PromptDataset(
        ids=list(range(len(probs))), questions=[p[0] for p in probs],
        golds=[p[1] for p in probs], source=spec, default_template=PROMPT_TEMPLATE,
    )


def load_prompt_dataset(
    source: str,
    *,
    fmt: str = "gsm8k",
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    bad_rows: str = "skip",
    max_row_chars: int = DEFAULT_MAX_ROW_CHARS,
    limit: int | None = None,
    split: str | None = None,
) -> PromptDataset:
    """Load prompt records from ``source``: a ``.jsonl``/``.json`` (JSON Lines) file, a
    ``.parquet`` file, a ``datasets.save_to_disk`` directory (``split`` picks one of a
    DatasetDict), or ``"synthetic:<split>[:<n>]"`` (``fmt`` etc. are then ignored).

    ``bad_rows="skip"`` skips and counts bad rows (``skipped``, first reasons in
    ``problems``); ``"fail"`` raises ValueError naming file, row and problem. ``limit`` caps
    the number of good records. Raises ValueError for an empty result and duplicate ids.
    """
    source = os.fspath(source)
    if source.startswith("synthetic:") or source == "synthetic":
        return _load_synthetic(source, limit)
    if fmt not in GOLD_FORMATS:
        raise ValueError(f"unknown gold format {fmt!r}; expected one of {GOLD_FORMATS}")
    if bad_rows not in ("skip", "fail"):
        raise ValueError(f"bad_rows must be 'skip' or 'fail', got {bad_rows!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if not os.path.exists(source):
        raise FileNotFoundError(f"prompt data source {source!r} does not exist")

    if os.path.isdir(source):
        rows = ((i, f"row {i}", r) for i, r in enumerate(_open_hf_dir(source, split)))
    elif source.endswith(".parquet"):
        rows = ((i, f"row {i}", r) for i, r in enumerate(_iter_parquet(source)))
    elif source.endswith((".jsonl", ".json")):
        rows = _iter_jsonl(source, max_row_chars)
    else:
        raise ValueError(f"{source}: unsupported data file type; expected .jsonl, .json (JSON "
                         "Lines), .parquet or a datasets.save_to_disk directory")

    ds = PromptDataset(ids=[], questions=[], golds=[], source=source)
    id_rows: dict[int, int] = {}
    for i, where, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise row
            q = _text_field(row, question_field, "question")
            if answer_field not in row or row[answer_field] is None:
                raise _BadRow(f"missing answer field {answer_field!r}")
            a = row[answer_field]
            if not isinstance(a, str):
                raise _BadRow(f"answer field {answer_field!r} is not a string "
                              f"({type(a).__name__})")
            if len(q) + len(a) > max_row_chars:
                raise _BadRow(f"row is too long ({len(q) + len(a)} chars > max_row_chars="
                              f"{max_row_chars})")
            try:
                gold = extract_gold(a, fmt)
            except ValueError as e:
                raise _BadRow(f"answer field {answer_field!r}: {e}") from None
            pid = _row_id(row, id_field) if id_field is not None else i
        except _BadRow as e:
            msg = f"{source}: {where}: {e}"
            if bad_rows == "fail":
                raise ValueError(msg) from None
            ds.skipped += 1
            if len(ds.problems) < _MAX_PROBLEMS_KEPT:
                ds.problems.append(msg)
            continue
        if pid in id_rows:
            raise ValueError(f"{source}: duplicate prompt id {pid!r} in {id_field!r} at row "
                             f"{id_rows[pid]} and row {i}")
        id_rows[pid] = i
        ds.ids.append(pid)
        ds.questions.append(q)
        ds.golds.append(gold)
        if limit is not None and len(ds) >= limit:
            break

    if ds.skipped:
        log.warning("%s: skipped %d bad row(s); first: %s", source, ds.skipped,
                       "; ".join(ds.problems[:3]))
    if not len(ds):
        detail = f" ({ds.skipped} bad row(s) skipped; first: {ds.problems[0]})" if ds.skipped else ""
        raise ValueError(f"{source}: empty data set, no usable prompt rows{detail}")
    return ds


# ----------------------------------------------------------------------------- prompts
def render_prompts(
    questions: Sequence[str],
    *,
    template: str | None,
    tokenizer=None,
    system_prompt: str | None = None,
) -> list[str]:
    """Prompts for ``questions``: ``template.format(question=q)`` (a ``{system_prompt}``
    placeholder, if present, gets ``system_prompt``), or, with ``template=None``, the
    tokenizer's chat template with an optional system message and the generation prompt."""
    if template is not None:
        if system_prompt is not None and "{system_prompt}" not in template:
            raise ValueError("system_prompt given but the prompt template has no "
                             "{system_prompt} placeholder (use template=None for the chat "
                             "template)")
        try:
            return [template.format(question=q, system_prompt=system_prompt or "")
                    for q in questions]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad prompt template {template!r} ({type(e).__name__}: {e}); "
                             "it is a str.format string with {question}: write literal "
                             "braces as {{ and }}") from None
    if tokenizer is None:
        raise ValueError("render_prompts needs a template or a tokenizer with a chat template")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                         "template; pass a template such as '{question}\\n'")
    out = []
    for q in questions:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs.append({"role": "user", "content": q})
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                 tokenize=False))
    return out


# ----------------------------------------------------------------------------- sampling
class PromptSampler:
    """Deterministic shuffled epochs over ``range(num_prompts)``.

    ``next_batch()`` always returns ``batch_size`` indices; a batch that reaches the end of
    an epoch continues with the next epoch's permutation (epoch ``e`` is a permutation seeded
    by ``(seed, e)``). ``state_dict()`` / ``load_state_dict()`` resume the exact index
    stream (the batch size may differ on resume; num_prompts and seed must match).
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0):
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be positive, got {num_prompts}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_prompts, self.batch_size, self.seed = int(num_prompts), int(batch_size), int(seed)
        self.epoch, self.pos = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_batch(self) -> list[int]:
        return self.next_batch_with_visits()[0]

    def next_batch_with_visits(self) -> tuple[list[int], list[int]]:
        """The next batch and each index's visit number: the epoch it is drawn in (every prompt is drawn
        exactly once per epoch, so this counts its earlier visits; no state beyond the sampler's)."""
        out: list[int] = []
        visits: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= self.num_prompts:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
            if self._perm is None:
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.num_prompts - self.pos)
            out.extend(int(x) for x in self._perm[self.pos : self.pos + take])
            visits.extend([self.epoch] * take)
            self.pos += take
        return out, visits

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "batch_size": self.batch_size,
                "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_prompts", "seed"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler has "
                                 f"{getattr(self, k)}")
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None
