"""Rule-based rewards (spec section 2), and the worker loop that runs them for
:class:`aapo_ray.batch_scorer.BatchScorer` (bounded time per item).

Reward functions have the signature ``fn(completion: str, gold: str) -> float | None``;
``None`` means "no reward" (counted, and treated as 0 in the weighted total).

math-verify bounds its own work with ``signal.alarm``, which only works on the main
thread of the main interpreter (it raises inside threaded / async Ray actors). Called
directly off the main thread, the rewards run without that bound; score batches with
``BatchScorer``, whose worker subprocesses call them on their main thread.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from typing import Callable, Optional, Union

import numpy as np
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from aapo_ray.batch_scorer import import_reward_fn

__all__ = ["RewardFn", "accuracy_reward", "format_reward", "cosine_reward", "REWARD_FUNCTIONS",
           "resolve_reward_fn", "reward_counters"]

RewardFn = Callable[[str, str], Optional[float]]

# ----------------------------------------------------------------------------- rewards

_MV_TIMEOUT_S = 5  # math-verify's own (signal.alarm) timeout, main thread only
_IN_WORKER = False  # set in BatchScorer workers, which enforce deadlines themselves
_COUNTS = {"unparseable_gold": 0}
_LAST_ACCURACY: tuple = (None, None, 0.0, True)  # 1-entry memo so cosine after accuracy is free

_BOXED_FIRST = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
_DEFAULT = [LatexExtractionConfig(), ExprExtractionConfig()]
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# GSM8K-style final answers: "#### 18", "The answer is 18", a line "A: 18".
_GSM8K_RE = re.compile(
    r"####[ \t]*(?P<a>[^\n]*)"
    r"|(?i:the[ \t]+(?:final[ \t]+)?answer[ \t]+is)[ \t]*:?[ \t]*(?P<b>[^\n]*)"
    r"|^[ \t]*A:[ \t]*(?P<c>[^\n]*)",
    re.MULTILINE,
)
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)")  # "42. Check: 6*7=42" -> "42" (not "3.5")


def _mv_timeout() -> Optional[int]:
    """math-verify's alarm timeout, or None where signals can't be used (or aren't needed)."""
    if _IN_WORKER or threading.current_thread() is not threading.main_thread():
        return None
    return _MV_TIMEOUT_S


def reward_counters() -> dict[str, int]:
    """Process-local counters of direct reward calls (``unparseable_gold``)."""
    return dict(_COUNTS)


def _parse_gold(gold: str) -> list:
    t = _mv_timeout()
    parsed = parse("\\boxed{" + gold + "}", _BOXED_FIRST, parsing_timeout=t)
    return parsed or parse(gold, _DEFAULT, parsing_timeout=t)


_SCIENTIFIC = re.compile(r"(\d[\d.]*)[eE]([+-]?\d+)\b")


def _parse_completion(completion: str) -> list:
    """``\\boxed{}`` first, then GSM8K forms, then math-verify's own last-expression rule."""
    t = _mv_timeout()
    if _BOXED_RE.search(completion):
        parsed = parse(completion, _BOXED_FIRST, parsing_timeout=t)
        if parsed:
            return parsed
    last = None
    for last in _GSM8K_RE.finditer(completion):
        pass
    if last is not None:
        snippet = next(g for g in last.groups() if g is not None)
        snippet = _SENTENCE_END.split(snippet, maxsplit=1)[0].strip()
        snippet = _SCIENTIFIC.sub(r"\1\\times10^{\2}", snippet)  # "1e5" is 10^5, not its mantissa
        if "\\" in snippet and "$" not in snippet:
            snippet = f"${snippet}$"
        parsed = parse(snippet, _DEFAULT, parsing_timeout=t) if snippet else []
        if parsed:
            return parsed
    return parse(completion, _DEFAULT, parsing_timeout=t)


def accuracy_reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer is math-equivalent to ``gold`` (math-verify), else 0.0.

    ``gold`` is an answer string ("18", "\\frac{\\pi}{2}", ...).  An unparseable gold
    gives 0.0 (the authors' code gave 1.0) and increments ``unparseable_gold``.  Direct
    calls are time-bounded (math-verify's alarm) only on the main thread; use
    :class:`BatchScorer` anywhere else.
    """
    global _LAST_ACCURACY
    memo = _LAST_ACCURACY
    if memo[1] == gold and memo[0] == completion:
        result, gold_ok = memo[2], memo[3]
    else:
        gold_parsed = _parse_gold(gold)
        gold_ok = bool(gold_parsed)
        pred = _parse_completion(completion) if gold_ok else []
        ok = bool(pred) and verify(gold_parsed, pred, timeout_seconds=_mv_timeout())
        result = 1.0 if ok else 0.0
        _LAST_ACCURACY = (completion, gold, result, gold_ok)
    if not gold_ok:
        _COUNTS["unparseable_gold"] += 1
    return result


def format_reward(completion: str, gold: Optional[str] = None) -> float:
    """1.0 if exactly one ``</think>`` closes the reasoning block, else 0.0.

    The opening ``<think>`` is usually part of the prompt; if the completion contains
    one, there must be only one and it must come before ``</think>``.
    """
    if completion.count("</think>") != 1:
        return 0.0
    opens = completion.count("<think>")
    if opens > 1 or (opens == 1 and completion.index("<think>") > completion.index("</think>")):
        return 0.0
    return 1.0


def cosine_reward(completion: str, gold: str, *, max_len: int = 1000, clamp: bool = True) -> float:
    """Length-aware accuracy: ±0.5 offset plus 0.25·(1 + cos(π·L/max_len)).

    Correct → 0.5 + 0.25·(1+cos(π·L/L_max)); wrong → −0.5 + 0.25·(1+cos(π·L/L_max)),
    with L = ``len(completion)`` in characters.  L is clamped to ``max_len`` by default;
    the authors did not clamp, so their reward oscillates for completions past L_max
    (``clamp=False`` reproduces that).
    """
    length = min(len(completion), max_len) if clamp else len(completion)
    shape = 0.25 * (1.0 + math.cos(math.pi * length / max_len))
    offset = 0.5 if accuracy_reward(completion, gold) == 1.0 else -0.5
    return offset + shape


REWARD_FUNCTIONS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward,
                                          "cosine": cosine_reward}


def resolve_reward_fn(name_or_path: Union[str, RewardFn]) -> RewardFn:
    """Return a reward fn from a registry name (``"accuracy"``) or import path (``"pkg.mod:fn"``)."""
    if callable(name_or_path):
        return name_or_path
    name = str(name_or_path)
    return REWARD_FUNCTIONS[name] if name in REWARD_FUNCTIONS else import_reward_fn(name)


# ----------------------------------------------------------------------------- worker side

class _Deadline(BaseException):
    """Raised by SIGALRM in a worker; a BaseException so library `except Exception` can't eat it."""


def _on_alarm(signum, frame):
    raise _Deadline()


def _call_one(fn: RewardFn, completion: str, gold: str) -> tuple[str, object]:
    try:
        value = fn(completion, gold)
    except Exception as e:  # noqa: BLE001 - user code; reported as an error
        return "error", f"{type(e).__name__}: {e}"[:300]
    if value is None:
        return "none", None
    if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        return "error", f"returned {value!r:.50}, not a finite number"
    return "ok", float(value)


def _worker_main(conn) -> None:
    """Worker loop: score chunks of (idx, completion, gold), streaming one result per item."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    specs, timeout_s = conn.recv()
    fns = [resolve_reward_fn(s) for s in specs]
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            chunk = None
        if chunk is None:
            return
        for idx, completion, gold in chunk:
            before = _COUNTS["unparseable_gold"]
            out: list = []
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                for fn in fns:
                    out.append(_call_one(fn, completion, gold))
                signal.setitimer(signal.ITIMER_REAL, 0)
            except _Deadline:
                pass
            signal.setitimer(signal.ITIMER_REAL, 0)
            out += [("timeout", None)] * (len(fns) - len(out))
            try:
                conn.send(("item", idx, out, _COUNTS["unparseable_gold"] - before))
            except OSError:  # parent gone
                return
