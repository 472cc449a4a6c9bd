"""``aapo serve``: a checkpoint behind an OpenAI-compatible HTTP API on Ray Serve.

One Ray Serve deployment, :class:`OpenAIServer`, is a FastAPI ingress that owns a generation
backend (:func:`aapo_ray.backends.make_backend`, ``hf`` tested; ``sglang`` passed through,
GPU-only and unverified here). Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with ``stream: true`` as server-sent events), ``GET /v1/models``, ``GET /health``.

Batching: every request goes through ``@serve.batch`` (an async-generator batch handler), so
concurrent requests share ``generate`` calls; inside a batch, requests are grouped by identical
sampling parameters and each group is one ``backend.generate`` call. Streaming is real and
incremental with the ``hf`` backend: ``model.generate`` gets a batched streamer (HFBackend has no
streamer argument, so the replica wraps its model's ``generate`` to pass one) and each request's
text is decoded as its tokens arrive, holding back a partial character or a possible stop-string
prefix. The final text of every choice is ``backend.generate``'s own (EOS and stop handling
included). With ``sglang`` a stream gets its text in one chunk when generation ends.
``batch_wait_timeout_s`` (0.01) favours latency; raise it (e.g. 0.05) for throughput under many
concurrent clients. The model directory must be readable on every node that runs a replica.

Hostile or broken clients (all limits per replica, OpenAI-style JSON errors, tested over raw sockets):

- body larger than ``max_body_bytes`` (1 MiB): 413, from ``Content-Length`` before reading, or as
  soon as a chunked body passes the limit;
- body not complete within ``body_timeout_s`` (10 s; a client that sends headers, then trickles
  or stops sending the body): 408 ``body_timeout``. Serve hands a request to a replica once its
  headers are in, so this bounds how long such a client holds one of ``max_ongoing_requests``;
- request not answered within ``request_timeout_s`` (300 s, ``--request-timeout-s``; body, queue
  and generation together): 504 ``request_timeout``, or in a stream an ``{"error": ...}`` event
  then ``[DONE]``. A request that times out (or whose client goes away) before its batch started
  is dropped from the queue; one already generating finishes its share of the batch (batched
  generation cannot drop a row) and its result is discarded;
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

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from aapo_ray.openai_api import (MAX_PROMPTS, APIError, ChatRequest, CompletionRequest, StreamText, chunk_body,
                                 completion_body, include_usage, model_card, models_body, new_id, parse_request,
                                 prompt_token_ids, resolve_max_tokens, sse, stop_strings, usage_chunk)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model resolution
def resolve_model_dir(path: str | os.PathLike, checkpoint: str | None = None) -> tuple[Path, str]:
    """(HF model directory, default served name) for a run directory or a plain HF model dir.

    A run directory serves ``checkpoints/step_N/hf`` of its latest complete checkpoint (one with
    ``state.json``) or of ``checkpoint`` (``step_N``, ``step_000N`` or ``N``). A checkpoint
    directory (``.../step_N``) serves its ``hf/``. The name is the run / model directory's name.
    """
    from aapo_ray.checkpoint import STATE, checkpoints_root, complete_checkpoints

    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (want a run directory or a HF model directory)")
    root = checkpoints_root(p)
    if checkpoint is None and (p / "config.json").is_file():
        return p, p.name
    if checkpoint is None and (p / "hf" / "config.json").is_file() and (p / STATE).is_file():
        return p / "hf", p.parent.parent.name if p.parent.name == "checkpoints" else p.name
    if not root.is_dir():
        raise ValueError(f"{path} is neither a run directory (no checkpoints/) nor a HF model "
                         "directory (no config.json)" + (" ; --checkpoint needs a run directory" if checkpoint else ""))
    done = complete_checkpoints(p)
    if checkpoint is not None:
        m = re.fullmatch(r"(?:step_)?(\d+)", str(checkpoint).strip())
        if not m:
            raise ValueError(f"--checkpoint {checkpoint!r}: want step_N (e.g. step_20) or N")
        chosen = [c for c in done if int(c.name[len("step_"):]) == int(m.group(1))]
        if not chosen:
            raise ValueError(f"--checkpoint {checkpoint}: no complete checkpoint with that step in {root}; "
                             f"complete ones: {[c.name for c in done] or 'none'}")
        ck = chosen[0]
    elif not done:
        raise ValueError(f"{path}: no complete checkpoint in {root} (a complete one has {STATE})")
    else:
        ck = done[-1]
    if not (ck / "hf" / "config.json").is_file():
        raise ValueError(f"checkpoint {ck} has no HF model in hf/ (config.json missing)")
    return ck / "hf", p.name


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- the deployment
@dataclasses.dataclass
class Job:
    """One HTTP request: ``n`` samples of each prompt; choice index = prompt_index * n + sample."""

    prompts: list[list[int]]
    n: int
    params: Any  # backends.SamplingParams
    stream: bool
    started: bool = False  # set when its batch starts; before that, dropping the job is free


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
    try:
        import ray
        from ray.serve._private import replica as replica_module
    except ImportError:
        return
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
        from concurrent.futures import ThreadPoolExecutor

        from ray import serve

        from aapo_ray.backends import make_backend
        from aapo_ray.launch import setup_actor_process

        _bind_replica_grpc_to_node_ip()
        o = ServeOptions(**options)
        setup_actor_process(o.torch_threads)
        self.backend = make_backend(o.backend, model_path, trust_remote_code=o.trust_remote_code, dtype=o.dtype,
                                    device=o.device, allow_pickle=o.allow_pickle, batch_size=o.generation_batch_size)
        self.tokenizer = self.backend.tokenizer
        self.eos_ids = set(self.backend.eos_ids)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=o.trust_remote_code)
        self.context = int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)
        self.vocab = min(int(getattr(config, "vocab_size", None) or len(self.tokenizer)), len(self.tokenizer))
        self.max_tokens = min(o.max_tokens_limit or self.context, self.context)
        self.name, self.created, self.o = name, int(time.time()), o
        key = o.api_key_sha256 or (_sha256(os.environ["AAPO_API_KEY"]) if os.environ.get("AAPO_API_KEY") else None)
        self.key_hash = key
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="generate")  # one generate at a time
        self.streamer, self.pumps = None, set()
        model = getattr(self.backend, "model", None)
        self.can_stream = model is not None and hasattr(model, "generate")
        if self.can_stream:
            original = model.generate

            def generate(*args, **kwargs):
                if self.streamer is not None:
                    kwargs["streamer"] = self.streamer
                return original(*args, **kwargs)

            model.generate = generate
        self.batched = serve.batch(max_batch_size=o.max_batch_size,
                                   batch_wait_timeout_s=o.batch_wait_timeout_s)(self._run_batch)

    # -------------------------------------------------------------------- generation
    def _generate(self, prompts, params, streamer):
        self.streamer = streamer
        try:
            return self.backend.generate(prompts, params)
        finally:
            self.streamer = None

    async def _run_batch(self, jobs: list[Job]):
        """Batch handler: yields, per step, a list with each job's new events (or StopIteration once done)."""
        for job in jobs:  # before any await: a job cancelled after this point is generated anyway
            job.started = True
        loop = asyncio.get_running_loop()
        finished = [False] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(dataclasses.astuple(job.params), []).append(i)
        for idxs in groups.values():
            rows = [(i, c) for i in idxs for c in range(len(jobs[i].prompts) * jobs[i].n)]
            prompts = [p for i in idxs for p in jobs[i].prompts for _ in range(jobs[i].n)]
            params = jobs[idxs[0]].params
            trackers = [StreamText(self.tokenizer, self.eos_ids, params.stop) if jobs[i].stream else None
                        for i, _ in rows]
            queue: asyncio.Queue = asyncio.Queue()
            streamer = _RowStreamer(loop, queue) if self.can_stream and any(trackers) else None
            future = loop.run_in_executor(self.pool, self._generate, prompts, params, streamer)
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
                result = future.result()
            except Exception as exc:  # a backend failure answers this group's requests, not the replica
                log.exception("generation failed")
                for i in idxs:
                    out[i] = [("error", f"generation failed: {type(exc).__name__}: {exc}")]
            else:
                for r, (i, c) in enumerate(rows):
                    text, sent = result.texts[r], trackers[r].sent if trackers[r] else ""
                    if trackers[r] is not None and len(text) > len(sent) and text.startswith(sent):
                        out[i].append(("delta", c, text[len(sent):]))
                    out[i].append(("done", c, text, result.finish_reasons[r], len(result.token_ids[r])))
            yield out
            for i in idxs:
                finished[i] = True

    # -------------------------------------------------------------------- requests
    def _auth(self, request) -> None:
        if self.key_hash is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_sha256(token.strip()), self.key_hash):
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
        from aapo_ray.backends import SamplingParams

        if req.model is not None and req.model != self.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        if req.n > self.o.max_n:
            raise APIError(400, f"n: at most {self.o.max_n}", param="n")
        stops = stop_strings(req)
        prompts = prompt_token_ids(req, self.tokenizer, self.vocab, chat)
        if len(prompts) * req.n > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} choices (prompts x n) per request", param="n")
        max_tokens = resolve_max_tokens(req, chat, max(len(p) for p in prompts), self.context, self.max_tokens)
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                                seed=req.seed, stop=stops)
        return Job(prompts, req.n, params, req.stream)

    def _timeout(self) -> APIError:
        return APIError(504, f"the request did not finish within request_timeout_s={self.o.request_timeout_s:g}s; "
                        "ask for fewer tokens or retry later", type="server_error", code="request_timeout")

    async def _events(self, job: Job, deadline: float):
        """The job's events, until ``deadline`` (then a 504 :class:`APIError`).

        A task reads serve.batch's stream. If the reader stops (deadline, client gone) before the
        job's batch started, the task is cancelled: serve.batch drops a cancelled request from its
        queue. Once started, the task reads the stream to its end (cancelling it then would leave
        serve.batch's later per-step futures never awaited), and the events are discarded.
        """
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
        from fastapi.responses import JSONResponse, StreamingResponse

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
        choices: dict[int, tuple[str, str]] = {}
        completion_tokens = 0
        async for event in self._events(job, deadline):
            if event[0] == "error":
                raise APIError(500, event[1], type="server_error", code="generation_failed")
            if event[0] == "done":
                choices[event[1]] = (event[2], event[3])
                completion_tokens += event[4]
        body = completion_body(rid, self.name, [choices[i] for i in sorted(choices)], prompt_tokens,
                               completion_tokens, chat)
        return JSONResponse(body)

    async def _stream(self, job: Job, deadline: float, rid: str, chat: bool, prompt_tokens: int, with_usage: bool):
        completion_tokens = 0
        if chat:
            for c in range(len(job.prompts) * job.n):
                yield sse(chunk_body(rid, self.name, c, chat, text="", role=True))
        try:
            async for event in self._events(job, deadline):
                if event[0] == "delta":
                    yield sse(chunk_body(rid, self.name, event[1], chat, text=event[2]))
                elif event[0] == "done":
                    completion_tokens += event[4]
                    yield sse(chunk_body(rid, self.name, event[1], chat, finish_reason=event[3]))
                else:
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
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException

        app = FastAPI(title="aapo-ray OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

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


# ----------------------------------------------------------------------------- building the app
class ServeOptions(BaseModel):
    """Replica options (strings coerced, for ``serve run ... key=value`` and RayService ``args``)."""

    model_config = ConfigDict(extra="forbid")
    backend: str = "hf"
    dtype: str = "float32"
    device: Optional[str] = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    torch_threads: int = 1
    generation_batch_size: int = 64
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_tokens_limit: Optional[int] = None  # default: the context length
    max_n: int = 16
    max_body_bytes: int = Field(1 << 20, ge=1)
    body_timeout_s: float = Field(10.0, gt=0)  # the whole body must arrive within this
    request_timeout_s: float = Field(300.0, gt=0)  # body + queue + generation, per request
    max_pending_requests: int = Field(256, ge=1)  # queued or generating (incl. abandoned) per replica
    api_key_sha256: Optional[str] = None


def build_app(model: str, *, checkpoint: str | None = None, name: str | None = None, api_key: str | None = None,
              num_replicas: int | str = 1, autoscaling_config: dict | str | None = None, num_cpus: float = 1.0,
              num_gpus: float = 0.0, max_ongoing_requests: int = 64, **options):
    """A Serve application for ``model`` (run dir or HF dir); ``options`` are :class:`ServeOptions` fields."""
    import aapo_ray.launch  # noqa: F401  (sets Ray's local-only env before ray is imported)
    from ray import serve

    model_dir, default_name = resolve_model_dir(model, checkpoint)
    if api_key:  # replicas only ever see its hash
        options["api_key_sha256"] = _sha256(api_key)
    options.setdefault("max_pending_requests", max(256, 4 * int(max_ongoing_requests)))
    opts = ServeOptions(**options)
    if isinstance(autoscaling_config, str):
        autoscaling_config = json.loads(autoscaling_config)
    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}
    deployment = serve.deployment(serve.ingress()(OpenAIServer), name="OpenAIServer").options(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max(max_ongoing_requests, opts.max_batch_size), **scale)
    return deployment.bind(str(model_dir), name or default_name, opts.model_dump())


class BuilderArgs(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    checkpoint: Optional[str] = None
    name: Optional[str] = None
    num_replicas: int | str = 1
    autoscaling_config: Optional[dict | str] = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64


def app_builder(args: dict):
    """``serve run aapo_ray.serve:app_builder model=RUN_DIR [checkpoint=step_N name=... num_replicas=2 ...]``.

    The API key comes from ``AAPO_API_KEY`` in the replicas' environment (``api_key`` in args also
    works but then sits in the Serve config in clear).
    """
    parsed = BuilderArgs(**args)
    extra = dict(parsed.model_extra or {})
    return build_app(**{k: v for k, v in parsed.model_dump().items() if k not in extra}, **extra)


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a run's checkpoint (or HF model dir) with an OpenAI-compatible API",
                              description="Serve RUN_DIR's latest complete checkpoint (or --checkpoint step_N, or a "
                                          "plain HF causal LM directory) on Ray Serve: /v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health.")
    p.add_argument("model", metavar="RUN_DIR_OR_MODEL", help="training run directory or local HF model directory")
    p.add_argument("--checkpoint", metavar="step_N", help="a named checkpoint of the run (default: latest complete)")
    p.add_argument("--name", help="served model id (default: the run / model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $AAPO_API_KEY, "
                   "preferred: a flag shows in ps)")
    p.add_argument("--address", help="join a Ray cluster ('auto', ray://host:10001) instead of starting one")
    p.add_argument("--backend", choices=("hf", "sglang"), default="hf", help="sglang: GPU only, unverified")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="torch device for hf (default: cuda if available)")
    p.add_argument("--num-replicas", default="1", help="replica count, or 'auto'")
    p.add_argument("--autoscaling-config", metavar="JSON", help='e.g. \'{"min_replicas":1,"max_replicas":4}\'')
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests per @serve.batch batch")
    p.add_argument("--batch-wait-timeout", type=float, default=0.01, help="seconds a batch waits to fill")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: context)")
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--body-timeout-s", type=float, default=10.0,
                   help="a request body must arrive within this (slow clients get 408)")
    p.add_argument("--request-timeout-s", type=float, default=300.0,
                   help="a request not answered within this gets a 504 OpenAI-style error (default 300)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin (pickle) weights")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy, block until Ctrl-C."""
    try:
        replicas = args.num_replicas if args.num_replicas == "auto" else int(args.num_replicas)
        app = build_app(args.model, checkpoint=args.checkpoint, name=args.name,
                        api_key=args.api_key or os.environ.get("AAPO_API_KEY") or None,
                        num_replicas=replicas, autoscaling_config=args.autoscaling_config, num_cpus=args.num_cpus,
                        num_gpus=args.num_gpus, backend=args.backend, dtype=args.dtype, device=args.device,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout,
                        max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, torch_threads=args.torch_threads,
                        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                        max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
                        request_timeout_s=args.request_timeout_s)
    except (OSError, ValueError) as exc:
        print(f"aapo serve: {exc}", file=sys.stderr)
        return 2
    from ray import serve

    from aapo_ray.launch import init_ray  # imported (env set) by build_app before ray

    init_ray(args.address, torch_threads=args.torch_threads)
    # the proxy's own timeout is a backstop (plain-text 408, a client can lift it); the replica's comes first
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s + 30})
    name = args.name or resolve_model_dir(args.model, args.checkpoint)[1]
    try:
        serve.run(app, name="aapo-serve", route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001 - e.g. the replica could not load the model
        print(f"aapo serve: deploying failed: {exc}", file=sys.stderr)
        if args.address:
            serve.delete("aapo-serve")
        else:
            serve.shutdown()
        return 1
    print(f"aapo serve: model {name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if args.address:  # a shared cluster keeps Serve; only our application goes
            serve.delete("aapo-serve")
        else:
            serve.shutdown()
    return 0
