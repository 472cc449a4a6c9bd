"""``aapo serve``: a checkpoint behind an OpenAI-compatible HTTP API on Ray Serve.

The replica is :class:`aapo_ray.serve_replica.OpenAIServer`; this module builds the Serve application
(:func:`build_app`, and :func:`app_builder` for ``serve run`` / a KubeRay RayService
``import_path: aapo_ray.serve:app_builder``) and the ``aapo serve`` command, whose flags are derived
from :class:`DeploymentOptions` and :class:`~aapo_ray.serve_replica.ServeOptions`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import typing
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from aapo_ray.checkpoint import resolve_model_dir
from aapo_ray.commands import help_line
from aapo_ray.launch import init_ray
from aapo_ray.serve_replica import OpenAIServer, ServeOptions, sha256_hex

APP_NAME = "aapo-serve"


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


def build_app(model: str, *, api_key: str | None = None, **options):
    """A Serve application for ``model`` (run dir or HF dir); ``options`` are :class:`DeploymentOptions`
    and :class:`ServeOptions` fields."""
    deploy = DeploymentOptions(model=model, **{k: options.pop(k) for k in list(options) if k in DeploymentOptions.model_fields})
    model_dir, default_name = resolve_model_dir(deploy.model, deploy.checkpoint)
    if api_key:  # replicas only ever see its hash
        options["api_key_sha256"] = sha256_hex(api_key)
    options.setdefault("max_pending_requests", max(256, 4 * deploy.max_ongoing_requests))
    opts = ServeOptions(**options)
    scaling = deploy.autoscaling_config
    if isinstance(scaling, str):
        scaling = json.loads(scaling)
    scale = {"autoscaling_config": scaling} if scaling else {"num_replicas": deploy.num_replicas}
    deployment = serve.deployment(serve.ingress()(OpenAIServer), name="OpenAIServer").options(
        ray_actor_options={"num_cpus": deploy.num_cpus, "num_gpus": deploy.num_gpus},
        max_ongoing_requests=max(deploy.max_ongoing_requests, opts.max_batch_size), **scale)
    return deployment.bind(str(model_dir), deploy.name or default_name, opts.model_dump())


def app_builder(args: dict):
    """``serve run aapo_ray.serve:app_builder model=RUN_DIR [checkpoint=step_N name=... num_replicas=2 ...]``.

    The API key comes from ``AAPO_API_KEY`` in the replicas' environment (``api_key`` in args also
    works but then sits in the Serve config in clear).
    """
    return build_app(**dict(args))


# ----------------------------------------------------------------------------- CLI
def _add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One ``--flag-name`` per field of ``model``: type, default, choices and help from the field."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag, kind = "--" + name.replace("_", "-"), field.annotation
        options = [a for a in typing.get_args(kind) if a is not type(None)] if isinstance(
            kind, types.UnionType) or typing.get_origin(kind) is typing.Union else [kind]
        help_text = f"{field.description} (default: {field.default})"
        if options == [bool]:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(options[0]) is Literal:
            parser.add_argument(flag, choices=typing.get_args(options[0]), default=field.default, help=help_text)
        else:
            parse = options[0] if options[0] in (int, float) and len(options) == 1 else str
            parser.add_argument(flag, type=parse, default=field.default, help=help_text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help=help_line("serve"),
                              description="Serve RUN_DIR's latest complete checkpoint (or --checkpoint step_N, or a "
                                          "plain HF causal LM directory) on Ray Serve: /v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health.")
    p.add_argument("model", metavar="RUN_DIR_OR_MODEL", help=DeploymentOptions.model_fields["model"].description)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $AAPO_API_KEY, "
                   "preferred: a flag shows in ps)")
    p.add_argument("--address", help="join a Ray cluster ('auto', ray://host:10001) instead of starting one")
    _add_fields(p, DeploymentOptions, skip=("model",))
    _add_fields(p, ServeOptions, skip=("api_key_sha256",))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy, block until Ctrl-C."""
    fields = {k: v for k, v in vars(args).items()
              if k in DeploymentOptions.model_fields or k in ServeOptions.model_fields}
    if fields.get("num_replicas") != "auto":
        fields["num_replicas"] = int(fields["num_replicas"])
    try:
        app = build_app(api_key=args.api_key or os.environ.get("AAPO_API_KEY") or None, **fields)
    except (OSError, ValueError) as exc:
        print(f"aapo serve: {exc}", file=sys.stderr)
        return 2
    init_ray(args.address, torch_threads=args.torch_threads)
    # the proxy's own timeout is a backstop (plain-text 408, a client can lift it); the replica's comes first
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s + 30})
    name = args.name or resolve_model_dir(args.model, args.checkpoint)[1]
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001 - e.g. the replica could not load the model
        print(f"aapo serve: deploying failed: {exc}", file=sys.stderr)
        _stop(args.address)
        return 1
    print(f"aapo serve: model {name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(args.address)
    return 0


def _stop(address: str | None) -> None:
    if address:  # a shared cluster keeps Serve; only our application goes
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
