"""``aapo submit``: check an ``aapo train`` command here, then run it on a Ray cluster as a Ray job.

The Python API behind ``ray job submit`` (:class:`ray.job_submission.JobSubmissionClient`):

    aapo submit --address http://127.0.0.1:8265 [--working-dir DIR | --runtime-env FILE] [--no-wait] \\
        -- train --config cluster/configs/r1-distill-qwen-1.5b-aapo.yaml run.steps=100

The train arguments are parsed with the project's own CLI parser and the config is resolved and
validated *before* anything is sent, so a typo fails in a second instead of after the cluster has
started a driver. Paths (``model.path``, ``data.train``, ``run.output_dir``) are only checked on the
cluster: they name the cluster's files. Then the job's logs stream here until it ends.

Exit status: 0 the job SUCCEEDED; 1 it FAILED or was STOPPED (its error is printed), or the cluster
could not be reached; 2 nothing was submitted because the command or config is invalid; 130
interrupted here (the job keeps running: ``ray job stop --address ADDRESS JOB_ID`` stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import yaml
from ray.job_submission import JobSubmissionClient

from aapo_ray.cli_args import add_train_parser
from aapo_ray.config import ConfigError, config_source
from aapo_ray.preflight import load_checked_config

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(Exception):
    """Nothing was submitted: the message says why (exit status 2)."""


# ----------------------------------------------------------------------------- local checks
def train_argv(raw: list[str]) -> list[str]:
    """``[--] [train] ARGS`` -> ``["train", *ARGS]``."""
    argv = list(raw)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SubmitError("nothing to submit: put the train command after --, e.g. "
                          "aapo submit --address http://127.0.0.1:8265 -- train --config my.yaml")
    if argv[0] != "train":
        if argv[0] in ("submit", "serve", "warmstart", "check-config"):
            raise SubmitError(f"aapo submit runs `aapo train`, not `aapo {argv[0]}`")
        argv = ["train", *argv]
    return argv


def check_train_command(argv: list[str], *, working_dir: str | None = None, validate: bool = True):
    """Parse ``argv`` with the project's CLI and resolve its config as ``aapo train`` would.

    Returns ``(train_namespace, config or None)``; raises :class:`SubmitError`.
    """
    parser = argparse.ArgumentParser(prog="aapo")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    try:
        targs = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (or the help: exit 0)
        if not exc.code:
            raise
        raise SubmitError(f"invalid train command: {shlex.join(argv)}") from None
    if not validate:
        return targs, None
    local = copy.copy(targs)
    if working_dir:  # the job runs in the uploaded copy of DIR: resolve relative paths there
        for attr in ("config", "resume"):
            value = getattr(local, attr)
            if value and not Path(value).is_absolute():
                setattr(local, attr, str(Path(working_dir) / value))
    try:
        cfg = load_checked_config(*config_source(local))
    except ConfigError as exc:
        hint = ("\n  (a --config/--resume path that exists only on the cluster: add --no-validate)"
                if "does not exist" in str(exc) or "no config.yaml" in str(exc) else "")
        raise SubmitError(f"not submitted: {exc}{hint}") from None
    return targs, cfg


def build_entrypoint(command: str, argv: list[str], targs: argparse.Namespace, cfg) -> str:
    """The shell command the job runs. A job's driver must join the cluster it runs on: unless the
    command or config names an address, ``--address auto`` is added (Ray sets RAY_ADDRESS for jobs)."""
    argv = list(argv)
    if not targs.address and (cfg is None or cfg.ray.address is None):
        argv += ["--address", "auto"]
    if "--no-progress" not in argv:
        argv.append("--no-progress")  # a progress bar is noise in job logs
    return f"{command} {shlex.join(argv)}"


def build_runtime_env(args: argparse.Namespace) -> dict:
    env: dict = {}
    if args.runtime_env:
        path = Path(args.runtime_env)
        try:
            env = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise SubmitError(f"--runtime-env {path}: no such file") from None
        except yaml.YAMLError as exc:
            raise SubmitError(f"--runtime-env {path}: not valid YAML/JSON: {exc}") from None
        if not isinstance(env, dict):
            raise SubmitError(f"--runtime-env {path}: want a mapping (env_vars, working_dir, ...), "
                              f"got {type(env).__name__}")
    if args.working_dir:
        if not Path(args.working_dir).is_dir():
            raise SubmitError(f"--working-dir {args.working_dir}: no such directory")
        env["working_dir"] = args.working_dir
    env_vars = dict(env.get("env_vars") or {})
    env_vars.setdefault("PYTHONUNBUFFERED", "1")  # logs arrive as they are written
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: want KEY=VALUE")
        env_vars[key] = value
    env["env_vars"] = env_vars
    return env


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    try:
        argv = train_argv(args.train_args)
        targs, cfg = check_train_command(argv, working_dir=args.working_dir, validate=not args.no_validate)
        runtime_env = build_runtime_env(args)
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
    except SubmitError as exc:
        print(f"aapo submit: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"aapo submit: --entrypoint-resources is not JSON: {exc}", file=sys.stderr)
        return 2
    entrypoint = build_entrypoint(args.cluster_command, argv, targs, cfg)
    if cfg is not None:
        print(f"aapo submit: config OK ({cfg.algo.estimator}, {cfg.run.steps} steps, "
              f"{cfg.completions_per_step} completions/step, model {cfg.model.path})", flush=True)

    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
            entrypoint_resources=resources, metadata={"aapo.command": "train"})
    except Exception as exc:  # noqa: BLE001 - connection, auth and server-side rejections alike
        print(f"aapo submit: could not submit to {args.address or 'the default address'}: {exc}", file=sys.stderr)
        return 1
    address = client.get_address()
    print(f"aapo submit: job {job_id} submitted to {address}\n  entrypoint: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"  logs:   ray job logs --address {address} --follow {job_id}\n"
              f"  status: ray job status --address {address} {job_id}\n"
              f"  stop:   ray job stop --address {address} {job_id}")
        return 0
    try:
        return wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\naapo submit: stopped following; job {job_id} keeps running "
              f"(ray job stop --address {address} {job_id} stops it)", file=sys.stderr)
        return 130


def wait(client, job_id: str, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, else print its error and return 1."""
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."
    try:
        asyncio.run(_tail(client, job_id))
    except Exception as exc:  # noqa: BLE001 - a dropped log stream is not the job's failure
        print(f"aapo submit: log stream ended early ({exc}); waiting for the job's status", file=sys.stderr)
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    if status == "SUCCEEDED":
        print(f"aapo submit: job {job_id} SUCCEEDED", flush=True)
        return 0
    print(f"aapo submit: job {job_id} {status}: {failure_summary(client.get_job_info(job_id))}", file=sys.stderr)
    return 1


def failure_summary(info) -> str:
    """Ray's message without the log tail it repeats (already streamed), plus the error's last line."""
    message = (info.message or "no message from the job server").strip()
    head, sep, logs = message.partition(", last available logs")
    lines = [line.strip() for line in logs.splitlines()[1:] if line.strip()] if sep else []
    return head + (f"\n  error: {lines[-1]}" if lines else "")


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
