"""The Serve replica behind ``aapo serve``: one Ray Serve deployment, :class:`OpenAIServer`, a FastAPI
ingress that owns a generation backend (:func:`aapo_ray.backends.make_backend`, ``hf`` tested; ``sglang`` passed through,
GPU-only and unverified here). Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with ``stream: true`` as server-sent events), ``GET /v1/models``, ``GET /health``. Log-probs
(``logprobs``, ``top_logprobs``) and ``echo``: :mod:`aapo_ray.serve_logprobs`.

Batching, ``batching: continuous`` (the default): every row of every request joins one running
continuous batch (``hf``: transformers' engine; ``sglang``: SGLang's scheduler, each row its own
``async_generate``; :mod:`aapo_ray.serve_continuous`) the moment it is validated and leaves it when it
ends, whatever its sampling settings; each row streams its own tokens, and a request that times out or
whose client goes away has its rows dropped from the engine at the next step. ``batching: grouped``:
every request goes through ``@serve.batch`` (an async-generator batch handler); inside a batch, requests
are grouped by identical sampling parameters (the seed aside) and each group is one ``backend.generate``
call, streamed through a batched streamer (``hf``; ``sglang``: a stream gets its text in one chunk when
generation ends);
``batch_wait_timeout_s`` (0.01) favours latency. Either way each stream's text is decoded as its
tokens arrive, holding back a partial character or a possible stop-string prefix, and the final
text of every choice is the backend's own (EOS and stop handling included). The model directory
must be readable on every node that runs a replica.

Seeds: every choice is sampled with a seed of its own (``row_seeds(seed, choices)`` of a request's
``seed``, else random in the grouped path), so a seeded request's text does not depend on the requests
it shares a batch with, and equals what ``aapo eval`` samples locally for the same seed. The continuous
engine has one random stream, so a seeded request is generated with the engine paused.

Hostile or broken clients (all limits per replica, OpenAI-style JSON errors, tested over raw sockets):

- body larger than ``max_body_bytes`` (1 MiB): 413, from ``Content-Length`` before reading, or as
  soon as a chunked body passes the limit;
- body not complete within ``body_timeout_s`` (10 s; a client that sends headers, then trickles
  or stops sending the body): 408 ``body_timeout``. Serve hands a request to a replica once its
  headers are in, so this bounds how long such a client holds one of ``max_ongoing_requests``;
- request not answered within ``request_timeout_s`` (300 s, ``--request-timeout-s``; body, queue
  and generation together): 504 ``request_timeout``, or in a stream an ``{"error": ...}`` event
  then ``[DONE]``. Continuous batching drops such a request's rows at once; grouped batching drops
  one that times out (or whose client goes away) before its batch started from the queue, and one
  already generating finishes its share of the batch (batched generation cannot drop a row) and
  its result is discarded;
- more than ``max_pending_requests`` requests (answered or abandoned, still queued or generating)
  in the replica: 503 ``server_overloaded`` with ``Retry-After``;
- a client that stops reading a stream holds only its own connection in Serve's HTTP proxy: the
  replica finishes the generation and serves everyone else. ``aapo serve`` also sets the proxy's
  own ``request_timeout_s`` to ``request_timeout_s`` + 30 s as a backstop (a client can lift that
  one with an ``x-request-timeout-seconds`` header; the replica's deadline it cannot).

Every replica binds Serve's inter-deployment gRPC server to its node's IP (Serve's own choice is
all interfaces): with ``aapo serve`` on a local cluster nothing listens beyond 127.0.0.1 (tested).

Deploy: ``aapo serve RUN_DIR``, or ``serve run aapo_ray.serve:app_builder model=RUN_DIR`` /
a KubeRay RayService ``import_path: aapo_ray.serve:app_builder`` with ``args: {model: ...}``.
"""

import asyncio
import dataclasses
import hmac
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve._private import replica as replica_module
from starlette.exceptions import HTTPException
from transformers import AutoConfig

from aapo_ray.backends import HFBackend, make_backend
from aapo_ray.actor_process import setup_actor_process
from aapo_ray.openai_api import (MAX_PROMPTS, APIError, ChatRequest, CompletionRequest, StreamText, chunk_body,
                                 completion_body, include_usage, model_card, models_body, new_id, parse_request,
                                 prompt_token_ids, resolve_max_tokens, sse, stop_strings, usage_chunk)
from aapo_ray.sampling import Completions, SamplingParams, row_seeds
from aapo_ray.continuous_batching import continuous_engine
from aapo_ray.serve_continuous import ContinuousJobs
from aapo_ray.serve_options import ServeOptions, sha256_hex
from aapo_ray.serve_logprobs import LogprobRequest, choice, logprob_request, prompt_texts, score_rows

log = logging.getLogger(__name__)


class CancelledReadIsDisconnect:
    """ASGI middleware: a read that Serve's proxy cancelled (a client hung up; Ray 2.60 raises ``TaskCancelledError``
    from ``receive``) is ``http.disconnect`` from then on, not an internal error out of a streaming response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        gone = False

        async def guarded_receive():
            nonlocal gone
            try:
                if not gone:
                    return await receive()
            except ray.exceptions.TaskCancelledError:
                gone = True
            return {"type": "http.disconnect"}

        await self.app(scope, guarded_receive if scope["type"] == "http" else receive, send)


# ----------------------------------------------------------------------------- the deployment
@dataclasses.dataclass
class Job:
    """One HTTP request: ``n`` samples of each prompt; choice index = prompt_index * n + sample."""

    prompts: list[list[int]]
    n: int
    params: Any  # backends.SamplingParams
    stream: bool
    lp: LogprobRequest = LogprobRequest()  # logprobs / echo
    texts: list[str] | None = None  # the prompts' texts, with echo
    seeds: list[int] | None = None  # one per choice; default row_seeds(params.seed), or random if unseeded
    started: bool = False  # set when its batch starts; before that, dropping the job is free

    def __post_init__(self):
        if self.seeds is None:
            choices = len(self.prompts) * self.n
            self.seeds = (row_seeds(self.params.seed, choices) if self.params.seed is not None
                          else [secrets.randbits(63) for _ in range(choices)])


class _RowStreamer:
    """A transformers streamer for batched ``generate``: forwards each step's tokens, row offset included."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.offset, self.rows = loop, queue, 0, None

    def put(self, value) -> None:
        if self.rows is None:  # the first put of each generate call is the prompt
            self.rows = value.shape[0]
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.offset, value.reshape(-1).tolist()))

    def end(self) -> None:  # HFBackend calls generate once per batch_size rows
        self.offset += self.rows or 0
        self.rows = None


def _bind_replica_grpc_to_node_ip() -> None:
    """Ray Serve starts an inter-deployment gRPC server in every replica on ``[::]:0``: all interfaces,
    whatever the node's IP (127.0.0.1 on a local cluster). Called in the replica before Serve starts
    that server, this makes it bind the node's IP instead (reachable from the rest of the cluster all
    the same). A no-op if this Ray has no such hook (tests/test_secure_defaults.py checks the result).
    """
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "aapo_node_ip", False):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def add_port(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.aapo_node_ip = True
    replica_module.add_port_to_grpc_server = add_port


class OpenAIServer:
    """A Serve replica: the backend, request validation, the ``@serve.batch`` queue, the FastAPI app."""

    def __init__(self, model_path: str, name: str, options: dict):
        _bind_replica_grpc_to_node_ip()
        o = ServeOptions(**options)
        setup_actor_process(o.torch_threads)
        self.backend = make_backend(o.backend, model_path, trust_remote_code=o.trust_remote_code, dtype=o.dtype,
                                    device=o.device, allow_pickle=o.allow_pickle, batch_size=o.generation_batch_size)
        self.tokenizer = self.backend.tokenizer
        self.eos_ids = set(self.backend.eos_ids)
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=o.trust_remote_code)
        self.context = int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)
        self.vocab = min(int(getattr(config, "vocab_size", None) or len(self.tokenizer)), len(self.tokenizer))
        self.max_tokens = min(o.max_tokens_limit or self.context, self.context)
        self.name, self.created, self.o = name, int(time.time()), o
        key = o.api_key_sha256 or (sha256_hex(os.environ["AAPO_API_KEY"]) if os.environ.get("AAPO_API_KEY") else None)
        self.key_hash = key
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="generate")  # one generate at a time
        self.pumps = set()
        self.can_stream = isinstance(self.backend, HFBackend)  # grouped: token by token; sglang: one chunk at the end
        self.batched = serve.batch(max_batch_size=o.max_batch_size,
                                   batch_wait_timeout_s=o.batch_wait_timeout_s)(self._run_batch)
        self.continuous = None
        if o.batching == "continuous":  # hf: transformers' engine; sglang: its own scheduler, a row per call
            engine = (continuous_engine(self.backend, o.generation_batch_size, o.kv_cache_tokens)
                      if isinstance(self.backend, HFBackend) else self.backend.serve_rows())
            self.continuous = ContinuousJobs(self.backend, engine, self.pool, self.eos_ids)

    def __del__(self):  # Serve calls it when it stops the replica: stop the engine's thread
        if getattr(self, "continuous", None) is not None:
            self.continuous.engine.close()

    # -------------------------------------------------------------------- generation
    def _generate(self, prompts, params, streamer, specs, seeds):
        """(completions, per-row log-prob scores); ``max_tokens: 0`` (echo) generates nothing."""
        if params.max_new_tokens == 0:
            result = Completions([[] for _ in prompts], [""] * len(prompts), ["length"] * len(prompts))
        else:
            result = self.backend.generate(prompts, params, seeds=seeds, **({"streamer": streamer} if streamer else {}))
        return result, score_rows(self.backend, prompts, result, specs)

    async def _run_batch(self, jobs: list[Job]):
        """Batch handler: yields, per step, a list with each job's new events (or StopIteration once done)."""
        for job in jobs:  # before any await: a job cancelled after this point is generated anyway
            job.started = True
        loop = asyncio.get_running_loop()
        finished = [False] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(dataclasses.astuple(dataclasses.replace(job.params, seed=None)), []).append(i)
        for idxs in groups.values():
            rows = [(i, c) for i in idxs for c in range(len(jobs[i].prompts) * jobs[i].n)]
            prompts = [p for i in idxs for p in jobs[i].prompts for _ in range(jobs[i].n)]
            params = jobs[idxs[0]].params
            trackers = [StreamText(self.tokenizer, self.eos_ids, params.stop) if jobs[i].stream else None
                        for i, _ in rows]
            queue: asyncio.Queue = asyncio.Queue()
            streamer = _RowStreamer(loop, queue) if self.can_stream and any(trackers) else None
            specs = [jobs[i].lp for i, _ in rows]
            seeds = [jobs[i].seeds[c] for i, c in rows]
            future = loop.run_in_executor(self.pool, self._generate, prompts, params, streamer, specs, seeds)
            future.add_done_callback(lambda _, q=queue: q.put_nowait(None))
            while (item := await queue.get()) is not None:
                out: list = [StopIteration if f else [] for f in finished]
                for r, token in enumerate(item[1], item[0]):
                    if trackers[r] is not None and (delta := trackers[r].push(token)):
                        out[rows[r][0]].append(("delta", rows[r][1], delta))
                if any(isinstance(o, list) and o for o in out):
                    yield out
            out = [StopIteration if f else [] for f in finished]
            try:
                result, scores = future.result()
            except Exception as exc:  # a backend failure answers this group's requests, not the replica
                log.exception("generation failed")
                for i in idxs:
                    out[i] = [("error", f"generation failed: {type(exc).__name__}: {exc}")]
            else:
                for r, (i, c) in enumerate(rows):
                    text, sent = result.texts[r], trackers[r].sent if trackers[r] else ""
                    if trackers[r] is not None and len(text) > len(sent) and text.startswith(sent):
                        out[i].append(("delta", c, text[len(sent):]))
                    if scores[r] is not None:  # before "done": the choice's ids and log-probs
                        out[i].append(("logprobs", c, result.token_ids[r], scores[r]))
                    out[i].append(("done", c, text, result.finish_reasons[r], len(result.token_ids[r])))
            yield out
            for i in idxs:
                finished[i] = True

    # -------------------------------------------------------------------- requests
    def _auth(self, request) -> None:
        if self.key_hash is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sha256_hex(token.strip()), self.key_hash):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def _body(self, request, deadline: float) -> bytes:
        """The whole body, at most ``max_body_bytes`` (413), within ``body_timeout_s`` (408)."""
        limit = self.o.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        if length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()

        async def read():
            async for part in request.stream():
                body.extend(part)
                if len(body) > limit:
                    raise too_big

        wait = min(self.o.body_timeout_s, deadline - time.monotonic())
        try:
            await asyncio.wait_for(read(), max(wait, 0.0))
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body was not received within {wait:.3g}s "
                           f"({len(body)} bytes arrived)", code="body_timeout") from None
        return bytes(body)

    def _job(self, req, chat: bool) -> Job:
        if req.model is not None and req.model != self.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        if req.n > self.o.max_n:
            raise APIError(400, f"n: at most {self.o.max_n}", param="n")
        stops = stop_strings(req)
        prompts = prompt_token_ids(req, self.tokenizer, self.vocab, chat)
        if len(prompts) * req.n > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} choices (prompts x n) per request", param="n")
        lp = logprob_request(req, chat, self.o.max_logprobs, hasattr(self.backend, "score"))
        max_tokens = resolve_max_tokens(req, chat, max(len(p) for p in prompts), self.context, self.max_tokens,
                                        allow_zero=lp.echo)
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                                seed=req.seed, stop=stops)
        return Job(prompts, req.n, params, req.stream, lp, prompt_texts(req, prompts, self.tokenizer) if lp.echo else None)

    def _timeout(self) -> APIError:
        return APIError(504, f"the request did not finish within request_timeout_s={self.o.request_timeout_s:g}s; "
                        "ask for fewer tokens or retry later", type="server_error", code="request_timeout")

    async def _continuous_events(self, job: Job, deadline: float):
        """The job's events from the continuous-batching engine, until ``deadline`` (then a 504); leaving
        early (deadline, client gone) cancels the job's rows in the engine at once."""
        events, token = self.continuous.events(job), object()
        self.pumps.add(token)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise self._timeout() from None
                yield event
        finally:
            self.pumps.discard(token)
            await events.aclose()

    async def _events(self, job: Job, deadline: float):
        """The job's events, until ``deadline`` (then a 504 :class:`APIError`).

        A task reads serve.batch's stream. If the reader stops (deadline, client gone) before the
        job's batch started, the task is cancelled: serve.batch drops a cancelled request from its
        queue. Once started, the task reads the stream to its end (cancelling it then would leave
        serve.batch's later per-step futures never awaited), and the events are discarded.
        """
        if self.continuous is not None:
            async for event in self._continuous_events(job, deadline):
                yield event
            return
        results, queue = self.batched(job), asyncio.Queue()

        async def pump():
            try:
                async for events in results:
                    queue.put_nowait(events)
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                queue.put_nowait(exc)
            queue.put_nowait(None)

        task = asyncio.get_running_loop().create_task(pump())
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)
        try:
            while True:
                try:
                    events = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise self._timeout() from None
                if events is None:
                    break
                if isinstance(events, Exception):
                    raise events
                for event in events:
                    yield event
        finally:
            if not job.started:
                task.cancel()

    async def _complete(self, request, chat: bool):
        deadline = time.monotonic() + self.o.request_timeout_s
        self._auth(request)
        req = parse_request(await self._body(request, deadline), ChatRequest if chat else CompletionRequest)
        job = self._job(req, chat)
        if len(self.pumps) >= self.o.max_pending_requests:
            raise APIError(503, f"server overloaded: {len(self.pumps)} requests queued or generating in this "
                           "replica; retry later", type="server_error", code="server_overloaded",
                           headers={"Retry-After": "1"})
        rid, prompt_tokens = new_id("chatcmpl" if chat else "cmpl"), sum(len(p) for p in job.prompts)
        if job.stream:
            return StreamingResponse(self._stream(job, deadline, rid, chat, prompt_tokens, include_usage(req)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices: dict[int, tuple] = {}
        scored: dict[int, tuple] = {}
        completion_tokens = 0
        async for event in self._events(job, deadline):
            if event[0] == "error":
                raise APIError(500, event[1], type="server_error", code="generation_failed")
            if event[0] == "logprobs":
                scored[event[1]] = event[2:]
            if event[0] == "done":
                p = event[1] // job.n
                text, logprobs = choice(self.tokenizer, job.lp, chat, job.prompts[p], job.texts and job.texts[p],
                                        event[2], *scored.get(event[1], ((), None)))
                choices[event[1]] = (text, event[3], logprobs)
                completion_tokens += event[4]
        body = completion_body(rid, self.name, [choices[i] for i in sorted(choices)], prompt_tokens,
                               completion_tokens, chat)
        return JSONResponse(body)

    async def _stream(self, job: Job, deadline: float, rid: str, chat: bool, prompt_tokens: int, with_usage: bool):
        completion_tokens = 0
        if chat:
            for c in range(len(job.prompts) * job.n):
                yield sse(chunk_body(rid, self.name, c, chat, text="", role=True))
        for c in range(len(job.prompts) * job.n if job.texts else 0):  # echo: the prompt first
            yield sse(chunk_body(rid, self.name, c, chat, text=job.texts[c // job.n]))
        try:
            async for event in self._events(job, deadline):
                if event[0] == "delta":
                    yield sse(chunk_body(rid, self.name, event[1], chat, text=event[2]))
                elif event[0] == "done":
                    completion_tokens += event[4]
                    yield sse(chunk_body(rid, self.name, event[1], chat, finish_reason=event[3]))
                elif event[0] == "error":
                    yield sse(APIError(500, event[1], type="server_error", code="generation_failed").body())
        except APIError as exc:  # e.g. the request timeout: the response has started, report in-band
            yield sse(exc.body())
        except Exception as exc:  # the response has started: report in-band
            log.exception("streaming failed")
            yield sse(APIError(500, f"{type(exc).__name__}: {exc}", type="server_error").body())
        if with_usage:
            yield sse(usage_chunk(rid, self.name, chat, prompt_tokens, completion_tokens))
        yield sse("[DONE]")

    def __serve_build_asgi_app__(self):
        """The FastAPI app, built in the replica (routes close over this replica)."""
        app = FastAPI(title="aapo-ray OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(CancelledReadIsDisconnect)

        @app.exception_handler(APIError)
        async def api_error(_request, exc: APIError):
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(HTTPException)
        async def http_error(_request, exc: HTTPException):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(),
                                status_code=exc.status_code, headers=getattr(exc, "headers", None))

        @app.exception_handler(Exception)
        async def internal_error(_request, exc: Exception):  # a bug, not a bad request: still OpenAI-shaped
            log.exception("internal error")
            return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                                status_code=500)

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.name}

        @app.get("/v1/models")
        async def models(request: Request):
            self._auth(request)
            return models_body(self.name, self.created)

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request):
            self._auth(request)
            if model_id != self.name:
                raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
            return model_card(self.name, self.created)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._complete(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._complete(request, chat=True)

        return app
