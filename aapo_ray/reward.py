"""Rule-based rewards (spec section 2) and bounded-time batch scoring.

Reward functions have the signature ``fn(completion: str, gold: str) -> float | None``;
``None`` means "no reward" (counted, and treated as 0 in the weighted total).

math-verify bounds its own work with ``signal.alarm``, which only works on the main
thread of the main interpreter (it raises inside threaded / async Ray actors).  Use
:class:`BatchScorer` to score batches: it runs the reward functions on the main thread
of persistent worker subprocesses and enforces a hard per-item deadline from the
parent, so a pathological completion costs about ``timeout_s`` and is counted.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_conns
from typing import Callable, Optional, Union

import numpy as np
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

__all__ = ["RewardFn", "accuracy_reward", "format_reward", "cosine_reward", "REWARD_FUNCTIONS",
           "resolve_reward_fn", "reward_counters", "ScoreResult", "BatchScorer"]

RewardFn = Callable[[str, str], Optional[float]]
log = logging.getLogger(__name__)

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
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} "
                         "or an import path of the form 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r} ({e}); "
                         "check the spelling and that it is installed or on PYTHONPATH") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {name!r}: module {module_name!r} has no attribute "
                             f"{attr!r}; check the name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {name!r} resolves to a non-callable {type(obj).__name__}")
    return obj


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


_BOOTSTRAP = (
    "import sys, multiprocessing.connection as c; conn = c.Connection(int(sys.argv[1])); "
    "sys.path[:] = conn.recv(); from aapo_ray.reward import _worker_main; _worker_main(conn)"
)


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


# ----------------------------------------------------------------------------- parent side

COUNTER_KEYS = ("scored", "none", "errors", "timeouts", "unparseable_gold", "worker_restarts")


@dataclass
class ScoreResult:
    """Per-function scores (float32, NaN = None/error/timeout), weighted total (NaN→0), counters.

    Counters count (completion, function) cells, except ``unparseable_gold`` (once per
    completion whose gold did not parse) and ``worker_restarts``.
    """

    per_function: dict[str, np.ndarray]
    total: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)


class _Worker:
    """A worker: a fresh interpreter (spawn semantics, no fork of a threaded parent) on a
    socketpair.  Unlike multiprocessing's "spawn" it does not re-run the caller's
    ``__main__`` (unguarded scripts, training scripts, Ray's worker module)."""

    def __init__(self, specs: list[str], timeout_s: float):
        parent_sock, child_sock = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno())],
                                     pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send(list(sys.path))
        self.conn.send((specs, timeout_s))
        self.ready = False
        self.started = time.monotonic()
        self.inflight: collections.deque[int] = collections.deque()  # item indices, in order
        self.deadline = math.inf  # hard deadline of the item the worker is on

    def kill(self) -> None:
        self.proc.kill()  # no-op if already reaped
        self.proc.wait()
        self.conn.close()


def _stop_workers(workers: list[_Worker], grace_s: float = 0.0) -> None:
    for w in workers:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
    deadline = time.monotonic() + grace_s
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        w.kill()


class _Tally:
    """Results of one ``score`` call."""

    _KEY = {"none": "none", "error": "errors", "timeout": "timeouts"}

    def __init__(self, names: list[str], n: int):
        self.names = names
        self.values = np.full((len(names), n), np.nan, dtype=np.float32)
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)
        self.first_error = ""

    def record(self, idx: int, out: list, unparseable: int = 0) -> None:
        self.counters["unparseable_gold"] += int(unparseable > 0)
        for j, (status, value) in enumerate(out):
            if status == "ok":
                self.values[j, idx] = value
                self.counters["scored"] += 1
            else:
                self.counters[self._KEY[status]] += 1
                if status == "error" and not self.first_error:
                    self.first_error = f" (first error: {self.names[j]}: {value})"


class BatchScorer:
    """Scores completions with weighted reward fns in worker subprocesses, bounded per item.

    ``rewards`` maps a registry name or import path ``"pkg.mod:fn"`` to its weight.  Each
    completion gets at most ``timeout_s`` for all its reward fns together: a soft
    SIGALRM deadline in the worker (counted as a timeout, no restart) backed by a hard
    deadline (``timeout_s`` + up to 1 s grace) in the parent, which kills and respawns a
    stuck worker.  Workers persist across :meth:`score` calls; ``score`` may be called
    from any thread (calls are serialized).  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, rewards: dict[str, float], *, timeout_s: float = 5.0, num_workers: int = 1,
                 chunk_size: int = 64, start_timeout_s: float = 120.0):
        if not rewards:
            raise ValueError("BatchScorer needs at least one reward, e.g. {'accuracy': 1.0}")
        if not timeout_s > 0 or num_workers < 1 or chunk_size < 1:
            raise ValueError("timeout_s must be > 0, num_workers >= 1 and chunk_size >= 1")
        for name in rewards:  # fail here, in the caller, with a clear message
            if not isinstance(name, str):
                raise ValueError(f"reward {name!r}: pass a registry name or an import path 'pkg.mod:fn'")
            resolve_reward_fn(name)
        self.names = self._specs = list(rewards)
        self.weights = np.array([float(w) for w in rewards.values()], dtype=np.float64)
        if not np.all(np.isfinite(self.weights)):
            raise ValueError(f"reward weights must be finite, got {dict(zip(self.names, self.weights))}")
        self.timeout_s = float(timeout_s)
        self._hard_s = self.timeout_s + min(1.0, 0.25 * self.timeout_s)
        self._chunk_size = chunk_size
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []  # mutated in place: the finalizer holds this list
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._workers.extend(_Worker(self._specs, self.timeout_s) for _ in range(num_workers))

    def score(self, completions: list[str], golds: list[str]) -> ScoreResult:
        """Score ``completions[i]`` against ``golds[i]`` with every reward fn."""
        if len(completions) != len(golds):
            raise ValueError(f"got {len(completions)} completions but {len(golds)} golds")
        with self._lock:
            if self._closed:
                raise RuntimeError("BatchScorer is closed")
            tally = _Tally(self.names, len(completions))
            items = list(zip(completions, golds))
            pending = collections.deque(range(len(items)))
            try:
                while pending or any(w.inflight for w in self._workers):
                    self._step(items, pending, tally)
            except BaseException:  # e.g. KeyboardInterrupt: don't leak stale results into the next call
                for i, w in enumerate(self._workers):
                    if w.inflight:
                        self._replace(i, tally, pending, blame=None)
                raise
        c = tally.counters
        if c["timeouts"] or c["errors"]:
            log.warning("reward scoring: %d timeouts, %d errors over %d completions%s",
                           c["timeouts"], c["errors"], len(items), tally.first_error)
        total = np.nan_to_num(tally.values, nan=0.0).astype(np.float64).T @ self.weights
        return ScoreResult(per_function=dict(zip(self.names, tally.values)),
                           total=total.astype(np.float32), counters=c)

    def _step(self, items: list, pending: collections.deque, tally: _Tally) -> None:
        """Hand out chunks, wait for results or the next deadline, enforce deadlines."""
        for i, w in enumerate(self._workers):
            if w.ready and not w.inflight and pending:
                self._dispatch(i, items, pending, tally)
        workers = self._workers
        wakeup = min([w.deadline for w in workers if w.inflight]
                     + [w.started + self._start_timeout_s for w in workers if not w.ready])
        by_conn = {w.conn: i for i, w in enumerate(workers)}
        for conn in _wait_conns(list(by_conn), timeout=max(0.0, wakeup - time.monotonic())):
            i = by_conn[conn]
            w = workers[i]
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg[0] == "ready":
                        w.ready = True
                        continue
                    _, idx, out, unparseable = msg
                    w.inflight.popleft()
                    tally.record(idx, out, unparseable)
                    w.deadline = time.monotonic() + self._hard_s
            except (EOFError, OSError):
                if not w.ready:
                    raise RuntimeError(
                        f"reward worker exited during start-up (exit code {w.proc.poll()}); check "
                        f"that {self._specs} import in a fresh Python process") from None
                self._replace(i, tally, pending, blame="error")  # segfault, os._exit, OOM kill...
        now = time.monotonic()
        for i, w in enumerate(workers):
            if w.inflight and now > w.deadline:
                self._replace(i, tally, pending, blame="timeout")
            elif not w.ready and now > w.started + self._start_timeout_s:
                raise RuntimeError(f"reward worker did not start within {self._start_timeout_s}s")

    def _dispatch(self, i: int, items: list, pending: collections.deque, tally: _Tally) -> None:
        w = self._workers[i]
        ready = sum(x.ready for x in self._workers)
        size = max(1, min(self._chunk_size, -(-len(pending) // (2 * ready))))
        chunk, chars = [], 0
        while pending and len(chunk) < size and chars < 8_000_000:
            idx = pending.popleft()
            chunk.append((idx, *items[idx]))
            chars += len(items[idx][0])
        w.inflight.extend(c[0] for c in chunk)
        try:
            w.conn.send(chunk)
        except OSError:  # died while idle: retry the chunk elsewhere
            self._replace(i, tally, pending, blame=None)
            return
        w.deadline = time.monotonic() + self._hard_s

    def _replace(self, i: int, tally: _Tally, pending: collections.deque, blame: Optional[str]) -> None:
        """Kill worker i; its current item gets status ``blame``, the rest are re-queued."""
        w = self._workers[i]
        w.kill()
        if w.inflight and blame is not None:
            tally.record(w.inflight.popleft(), [(blame, "worker process died")] * len(self._specs))
        pending.extendleft(reversed(w.inflight))
        tally.counters["worker_restarts"] += 1
        self._workers[i] = _Worker(self._specs, self.timeout_s)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._finalizer.detach()
                _stop_workers(self._workers, grace_s=2.0)

    def __enter__(self) -> "BatchScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
