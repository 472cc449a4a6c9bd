"""``aapo serve``: a checkpoint behind an OpenAI-compatible HTTP API on Ray Serve.

The replica is :class:`aapo_ray.serve_replica.OpenAIServer`; this module builds the Serve application
(:func:`build_app`, and :func:`app_builder` for ``serve run`` / a KubeRay RayService
``import_path: aapo_ray.serve:app_builder``) and runs the ``aapo serve`` command, whose flags
(:mod:`aapo_ray.cli_args`) are derived from :mod:`aapo_ray.serve_options`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ray import serve

from aapo_ray.checkpoint import resolve_model_dir
from aapo_ray.cli_args import serve_ray_cluster
from aapo_ray.launch import init_ray
from aapo_ray.serve_options import DeploymentOptions, ServeOptions, sha256_hex
from aapo_ray.serve_replica import OpenAIServer

APP_NAME = "aapo-serve"


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


# ----------------------------------------------------------------------------- aapo serve
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
    init_ray(**serve_ray_cluster(args))  # started early by the `aapo` script: aapo_ray.launch.start_ray_early
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
