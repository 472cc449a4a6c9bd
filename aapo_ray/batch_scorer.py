"""Bounded-time batch scoring: :class:`BatchScorer` runs reward functions on the main thread of persistent
worker subprocesses and enforces a hard per-item deadline from the parent.

math-verify bounds its own work with ``signal.alarm``, which only works on the main thread of the main
interpreter (it raises inside threaded / async Ray actors); a worker's main thread is free for it. This
module imports no math-verify: the workers load the reward functions (:mod:`aapo_ray.reward`), so the
process that owns a scorer (a training scorer actor, an eval or reference-build scoring actor) does not
pay for it (~0.5 CPU-s and ~40 MB each, benchmarks/README.md).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import math
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_conns
from typing import Callable, Optional

import numpy as np

__all__ = ["REWARD_NAMES", "import_reward_fn", "check_reward_name", "COUNTER_KEYS", "ScoreResult", "BatchScorer"]

log = logging.getLogger(__name__)

REWARD_NAMES = ("accuracy", "format", "cosine")  # the keys of aapo_ray.reward.REWARD_FUNCTIONS


def import_reward_fn(name: str) -> Callable:
    """The reward function at import path ``"pkg.mod:fn"``; a clear error for anything else."""
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: use one of {sorted(REWARD_NAMES)} "
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


def check_reward_name(name: str) -> None:
    """Raise a clear ``ValueError`` unless ``name`` is a registry name or imports as a function (the
    built-in rewards are not imported: their math-verify stays in the workers)."""
    if name not in REWARD_NAMES:
        import_reward_fn(name)


_BOOTSTRAP = (
    "import sys, multiprocessing.connection as c; conn = c.Connection(int(sys.argv[1])); "
    "sys.path[:] = conn.recv(); from aapo_ray.reward import _worker_main; _worker_main(conn)"
)

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
            check_reward_name(name)
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
