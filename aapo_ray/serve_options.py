"""What ``aapo serve`` deploys and how its replicas behave: :class:`DeploymentOptions` (the Serve
deployment) and :class:`ServeOptions` (each replica). Both are ``serve run`` / RayService ``args`` and
``aapo serve`` flags; this module imports only pydantic, so ``aapo serve --help`` stays instant."""

from __future__ import annotations

import hashlib
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class DeploymentOptions(BaseModel):
    """What is served and how many replicas (``args`` of ``app_builder``; ``aapo serve`` flags)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="training run directory or local HF model directory")
    checkpoint: Optional[str] = Field(None, description="a named checkpoint of the run, step_N (default: latest complete)")
    name: Optional[str] = Field(None, description="served model id (default: the run / model directory's name)")
    num_replicas: int | Literal["auto"] = Field(1, description="replica count, or 'auto'")
    autoscaling_config: Optional[dict | str] = Field(None, description='JSON, e.g. {"min_replicas":1,"max_replicas":4}')
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica takes at once")


class ServeOptions(BaseModel):
    """Replica options (strings coerced, for ``serve run ... key=value`` and RayService ``args``); each is
    also an ``aapo serve`` flag (``--max-batch-size``, ...), described by its ``description``."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["hf", "sglang"] = Field("hf", description="generation backend (sglang: GPU only)")
    dtype: str = Field("float32", description="weights dtype")
    device: Optional[str] = Field(None, description="torch device for hf (default: cuda if available)")
    trust_remote_code: bool = Field(False, description="run the checkpoint's own Python code")
    allow_pickle: bool = Field(False, description="load .bin (pickle) weights")
    torch_threads: int = Field(1, ge=1, description="torch threads per replica")
    batching: Literal["continuous", "grouped"] = Field(
        "continuous", description="continuous: every row joins and leaves one running batch at each decoding "
        "step (sglang: a row per async_generate, batched by its scheduler); grouped: @serve.batch batches, one "
        "generate call per distinct sampling params")
    generation_batch_size: int = Field(64, ge=1, description="rows per hf generate call or continuous-batching step")
    kv_cache_tokens: Optional[int] = Field(None, ge=1, description="continuous batching's KV cache, in tokens "
                                           "(default: generation_batch_size x the context, at most 262144)")
    max_batch_size: int = Field(16, ge=1, description="requests per @serve.batch batch (grouped)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="seconds a batch waits to fill (grouped)")
    max_tokens_limit: Optional[int] = Field(None, ge=1, description="largest max_tokens (default: the context)")
    max_n: int = Field(16, ge=1, description="largest n per request")
    max_logprobs: int = Field(20, ge=0, description="largest logprobs / top_logprobs per request")
    max_body_bytes: int = Field(1 << 20, ge=1, description="larger request bodies get 413")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body must arrive within this (else 408)")
    request_timeout_s: float = Field(300.0, gt=0, description="body + queue + generation per request (else 504)")
    max_pending_requests: int = Field(256, ge=1, description="requests queued or generating per replica "
                                                             "(else 503); default max(256, 4 x max ongoing)")
    api_key_sha256: Optional[str] = Field(None, description="sha256 of the API key (set by --api-key)")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
