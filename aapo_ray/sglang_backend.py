"""``sglang.Engine`` as a generation backend (GPU only; the optional ``gpu`` extra, pinned in pyproject.toml).

Written against the pinned release's source and tested in CI against a fake engine built from that
release's wheel (``tests/test_sglang_contract.py``, ``tests/test_sglang_backend.py``); never executed on
a GPU in CI. What the pinned release does, and what this backend does about it:

- Weights: ``update_weights_from_tensor`` / ``update_weights_from_distributed`` load nothing and return
  ``(False, message)`` outside ``begin_weight_update()`` ... ``end_weight_update()``. Every call's
  ``(success, message)`` is checked; a refusal raises with sglang's message, so a generator never
  advances its weight version on weights it did not load.
- Event loop: the engine captures the event loop of the thread that builds it, and its synchronous
  methods run ``loop.run_until_complete`` on it. Built inside a running loop (a Ray Serve replica) and
  called from another thread, that fails. Here the engine is built and always called on one private
  thread with a loop of its own, whoever calls the backend.
- Seeds: ``sampling_seed`` is honoured only with ``enable_deterministic_inference``; then each row gets
  its own seed (:func:`aapo_ray.sampling.row_seeds`), else the G copies of a prompt would be identical.
  Engines get distinct ``random_seed`` s per role and replica.
- ``skip_tokenizer_init=True`` (token ids in and out) makes the engine refuse ``stop`` strings: they are
  applied to the decoded text here, as the hf backend does.
- ``output_ids`` include the EOS; a finish reason ``abort`` (the engine dropped the request) is never a
  completion: those rows are sampled again, and a row that keeps aborting raises.
- Serving (:meth:`SGLangBackend.serve_rows`): SGLang batches continuously the requests that are in flight
  together, which synchronous ``generate`` calls one at a time never are. For ``aapo serve`` the engine's
  loop runs for good on the engine's thread and each row of each request is its own ``async_generate``
  (:class:`SGLangRows`; ``stream=True`` for a streamed one, with ``incremental_streaming_output`` off so that
  each chunk holds every token so far); a row whose reader leaves is dropped with
  ``tokenizer_manager.abort_request`` (the Engine has no abort of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from aapo_ray.models import eos_token_ids
from aapo_ray.sampling import Completions, SamplingParams, apply_stop, decode_rows, row_seeds
from aapo_ray.weights import unpack_bucket

MAX_ABORT_RETRIES = 2
LOOP_START_TIMEOUT_S = 60.0


class SGLangError(RuntimeError):
    """sglang refused a call (its message included)."""


def checked(result, what: str):
    """``result`` of a weight call is ``(success, message)``: raise unless success."""
    ok, message = result if isinstance(result, tuple) else (getattr(result, "success", True), getattr(result, "message", ""))
    if not ok:
        raise SGLangError(f"sglang {what} failed: {message}")
    return result


class SGLangBackend:
    """``sglang.Engine`` fed with token ids; every engine call runs on the backend's own thread."""

    def __init__(self, model_path: str, *, trust_remote_code: bool = False, dtype: str = "bfloat16",
                 mem_fraction: float = 0.6, seed: int = 0, deterministic: bool = False):
        try:
            import sglang  # optional (the gpu extra), GPU only
        except ImportError as exc:
            raise RuntimeError(
                "rollout.backend=sglang needs SGLang on a CUDA machine: pip install 'aapo-ray[gpu]' "
                "(with a CUDA build of torch). On CPU use rollout.backend=hf.") from exc
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.deterministic = deterministic
        self.rows: SGLangRows | None = None  # set while serving (the engine's loop runs for good)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sglang-engine")
        self.engine = self._call(sglang.Engine, model_path=model_path, dtype=dtype, mem_fraction_static=mem_fraction,
                                 random_seed=seed, skip_tokenizer_init=True, trust_remote_code=trust_remote_code,
                                 enable_deterministic_inference=deterministic,
                                 incremental_streaming_output=False)  # a stream's chunks: every token so far
        self.eos_ids = eos_token_ids(_generation_config(model_path), self.tokenizer)

    def _call(self, fn, *args, **kwargs):
        """Run ``fn`` on the engine's thread (the thread whose event loop the engine captured)."""
        if self.rows is not None:  # that thread runs the loop now; the engine's sync methods would fail there
            raise SGLangError(f"{getattr(fn, '__name__', fn)}: this engine is serving requests (serve_rows); "
                              "a served checkpoint takes no weight updates")
        return self._thread.submit(fn, *args, **kwargs).result()

    def _engine_generate(self, **kwargs) -> list[dict]:
        if self.rows is None:
            return self._call(self.engine.generate, **kwargs)
        return asyncio.run_coroutine_threadsafe(self.engine.async_generate(**kwargs), self.engine.loop).result()

    def serve_rows(self) -> SGLangRows:
        """Turn the engine over to serving: its event loop runs for good on the engine's thread, every row
        is an ``async_generate`` of its own (:class:`SGLangRows`), and :meth:`generate` goes through
        ``async_generate`` too. Weight updates are refused from then on."""
        if self.rows is None:
            loop, running = self.engine.loop, threading.Event()
            loop.call_soon(running.set)
            self._thread.submit(loop.run_forever)
            if not running.wait(LOOP_START_TIMEOUT_S):
                raise SGLangError(f"the engine's event loop did not start within {LOOP_START_TIMEOUT_S:g}s")
            self.rows = SGLangRows(self)
        return self.rows

    def completions(self, generated: list, stop: tuple[str, ...] = ()) -> Completions:
        """Sampled token rows as :class:`Completions` (:func:`~aapo_ray.sampling.decode_rows`)."""
        return decode_rows(generated, self.eos_ids, self.tokenizer, stop)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int] | None = None) -> Completions:
        """Sample every prompt in one engine call. ``seeds`` (one per row, deterministic mode only) replace
        the per-row seeds derived from ``params.seed``."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompt_ids)} rows")
        if not self.deterministic:
            seeds = None
        elif seeds is None:
            seeds = row_seeds(params.seed, len(prompt_ids))
        rows: list = [None] * len(prompt_ids)
        reasons: list = [None] * len(prompt_ids)
        todo, aborts = list(range(len(prompt_ids))), []
        for attempt in range(MAX_ABORT_RETRIES + 1):
            sampling = [self._sampling(params, None if seeds is None else seeds[i]) for i in todo]
            outputs = self._engine_generate(input_ids=[list(prompt_ids[i]) for i in todo], sampling_params=sampling)
            aborts = []
            for i, out in zip(todo, outputs):
                finish = out["meta_info"].get("finish_reason") or {}
                if finish.get("type") == "abort":
                    aborts.append((i, finish.get("message", "")))
                    continue
                rows[i] = np.asarray(out["output_ids"], dtype=np.int32)
                reasons[i] = "stop" if finish.get("type") == "stop" else "length"
            todo = [i for i, _ in aborts]
            if not todo:
                break
        if aborts:
            raise SGLangError(f"sglang aborted {len(aborts)} request(s) {MAX_ABORT_RETRIES + 1} times, e.g. row "
                              f"{aborts[0][0]}: {aborts[0][1]!r}; aborted rows are never trained on")
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        if params.stop:
            rows, texts, reasons = apply_stop(rows, texts, reasons, params.stop, self.tokenizer)
        return Completions(rows, texts, reasons)

    @staticmethod
    def _sampling(params: SamplingParams, seed: int | None) -> dict:
        out = {"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_new_tokens}
        if seed is not None:
            out["sampling_seed"] = seed
        return out

    # ------------------------------------------------------------------ weights
    def load_weights(self, buckets: list) -> int:
        """Object-store buckets through ``update_weights_from_tensor``, in one begin/end session."""
        count = 0

        def load():
            nonlocal count
            for k, bucket in enumerate(buckets):
                named = unpack_bucket(bucket)
                checked(self.engine.update_weights_from_tensor(named_tensors=named, flush_cache=k == len(buckets) - 1),
                        "update_weights_from_tensor")
                count += len(named)

        self._session(load)
        return count

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str, backend: str = "nccl") -> None:
        """Join learner rank 0's weight-update group (this engine's rank is ``rank_offset``)."""
        checked(self._call(self.engine.init_weights_update_group, master_address=master_address,
                           master_port=master_port, rank_offset=rank_offset, world_size=world_size,
                           group_name=group_name, backend=backend), "init_weights_update_group")

    def load_weights_broadcast(self, metadata: list[tuple[list[str], list[str], list[list[int]]]],
                               group_name: str) -> int:
        """Receive rank 0's broadcast of every bucket (``(names, dtypes, shapes)`` each), in one session."""
        def load():
            for k, (names, dtypes, shapes) in enumerate(metadata):
                checked(self.engine.update_weights_from_distributed(
                    names=names, dtypes=dtypes, shapes=shapes, group_name=group_name,
                    flush_cache=k == len(metadata) - 1), "update_weights_from_distributed")

        self._session(load)
        return sum(len(names) for names, _, _ in metadata)

    def _session(self, load) -> None:
        def run():
            checked(self.engine.begin_weight_update(), "begin_weight_update")
            try:
                load()
            finally:
                checked(self.engine.end_weight_update(), "end_weight_update")

        self._call(run)

    def shutdown(self) -> None:
        if self.rows is not None:  # stop serving: the loop returns the engine's thread to _call
            self.rows.close()
            self.engine.loop.call_soon_threadsafe(self.engine.loop.stop)
            self.rows = None
        self._call(self.engine.shutdown)
        self._thread.shutdown()


@dataclass
class RowOutput:
    """A row's tokens so far, as Serve's continuous path reads an engine's output (``generated_tokens``,
    ``error``, ``is_finished()``, like transformers' ``GenerationOutput``)."""

    generated_tokens: list[int] = field(default_factory=list)
    error: str | None = None
    finished: bool = True

    def is_finished(self) -> bool:
        return self.finished

    @classmethod
    def of(cls, out: dict) -> RowOutput:
        """From an ``async_generate`` result or stream chunk (``output_ids``: every token so far; a chunk's
        list is the engine's own, extended later, so it is copied here)."""
        finish = out["meta_info"].get("finish_reason")
        if finish and finish.get("type") == "abort":
            return cls(error=f"sglang aborted the request: {finish.get('message', '')}")
        return cls(list(out["output_ids"]), finished=finish is not None)


class SGLangRows:
    """Serve's continuous batching on SGLang: each row one ``async_generate`` on the engine's running loop,
    batched with every other row in flight by SGLang's scheduler. The interface of
    :class:`~aapo_ray.continuous_batching.ContinuousBatcher` that :class:`~aapo_ray.serve_continuous.ContinuousJobs`
    uses; a streamed row's tokens come as SGLang's stream chunks bring them, another row's once, at its end."""

    def __init__(self, backend: SGLangBackend):
        self.backend, self.loop = backend, backend.engine.loop
        self.running: dict[str, Future] = {}

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_output, stream: bool) -> str:
        """Start one row (called on a running event loop: ``on_output`` runs there); returns its request id."""
        rid, caller = uuid.uuid4().hex, asyncio.get_running_loop()
        # deterministic mode samples an unseeded row with seed 42: every row would be the same sample
        seed = random.getrandbits(63) if self.backend.deterministic else None
        row = self._row(rid, list(prompt_ids), self.backend._sampling(params, seed), stream, caller, on_output)
        future = asyncio.run_coroutine_threadsafe(row, self.loop)
        self.running[rid] = future
        future.add_done_callback(lambda _: self.running.pop(rid, None))  # a row that ended before the line above
        return rid

    async def _row(self, rid: str, prompt: list[int], sampling: dict, stream: bool, caller, on_output) -> None:
        engine = self.backend.engine
        try:
            if not stream:
                out = RowOutput.of(await engine.async_generate(input_ids=prompt, sampling_params=sampling, rid=rid))
            else:
                out = None
                async for chunk in await engine.async_generate(input_ids=prompt, sampling_params=sampling, rid=rid,
                                                               stream=True):  # read to its end: it closes itself
                    out = RowOutput.of(chunk)
                    if not out.is_finished():
                        caller.call_soon_threadsafe(on_output, out)
                if out is None or not out.is_finished():
                    raise RuntimeError("the stream ended before its row finished")
        except Exception as exc:  # noqa: BLE001 - this row's failure, answered to its request
            out = RowOutput(error=f"{type(exc).__name__}: {exc}")
        self.running.pop(rid, None)  # ended before its caller hears of it: a later cancel or close aborts nothing
        caller.call_soon_threadsafe(on_output, out)

    def cancel(self, rid: str) -> None:
        """Drop a row: SGLang's scheduler stops it at its next step; it delivers nothing more."""
        future = self.running.pop(rid, None)
        if future is not None:
            self.loop.call_soon_threadsafe(self._abort, rid, future)

    def _abort(self, rid: str, future: Future) -> None:
        self.backend.engine.tokenizer_manager.abort_request(rid)
        future.cancel()

    def pending_handlers(self) -> int:
        """Rows still in flight (for leak checks)."""
        return len(self.running)

    def exclusive(self):
        """Nothing to pause: a seeded request's ``generate`` joins the engine's batch like any other."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Drop every row still in flight."""
        for rid in list(self.running):
            self.cancel(rid)


def _generation_config(model_path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json
        return None

