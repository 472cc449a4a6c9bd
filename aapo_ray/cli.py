"""``aapo`` command line. Every subcommand's arguments are parsed first (:mod:`aapo_ray.cli_args`, light),
then the function that runs it is imported (:data:`aapo_ray.commands.COMMANDS`), so ``aapo --help``,
``aapo train --help`` and a mistyped flag answer in well under a second, and ``aapo train`` does not pay
for Ray Serve or the evaluation pipeline."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from contextlib import nullcontext
from typing import Callable, NoReturn

from aapo_ray import import_gc
from aapo_ray.cli_args import add_parsers
from aapo_ray.commands import COMMANDS
from aapo_ray.config import ConfigError, InputError, load_config


def build_parser() -> argparse.ArgumentParser:
    """The ``aapo`` parser, every subcommand with its arguments."""
    parser = argparse.ArgumentParser(prog="aapo", description="AAPO post-training on Ray")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def command_runner(args: argparse.Namespace, *, without_gc: bool = False) -> Callable[[argparse.Namespace], int]:
    """The function that runs the parsed command, ``args -> exit status`` (its module is imported here;
    ``without_gc``: with the garbage collector off, then frozen, :func:`aapo_ray.import_gc.imports_without_gc`)."""
    module, _, name = COMMANDS[args.command][0].partition(":")
    with import_gc.imports_without_gc() if without_gc else nullcontext():
        return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None, *, start_ray_early: bool = False, imports_without_gc: bool = False) -> int:
    """Run ``aapo ARGV``; returns its exit status. The console script passes both flags. ``start_ray_early``:
    a command whose parser names its cluster (``ray_cluster``: :mod:`aapo_ray.cli_args`) starts that local Ray
    cluster while its runner imports (:func:`aapo_ray.launch.start_ray_early`, which sets this process's
    environment for the actors).
    ``imports_without_gc``: the runner's module is imported with the garbage collector off (:func:`command_runner`)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        source = getattr(args, "config_source", None)
        cfg = load_config(*source(args)) if source else None  # the config's own errors, before any heavy import
        if checks := getattr(args, "light_checks", None):  # bad arguments, before any heavy import or cluster
            checks(args, cfg)
        cluster = getattr(args, "ray_cluster", None)
        if start_ray_early and cluster and (init_args := cluster(args, cfg)) is not None:
            importlib.import_module("aapo_ray.launch").start_ray_early(**init_args)  # light: ray, not torch
        return command_runner(args, without_gc=imports_without_gc)(args)
    except ConfigError as exc:
        print(f"aapo: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:  # from a command's light checks (cli_args)
        print(f"aapo {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aapo: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The ``aapo`` console script (and ``python -m aapo_ray``): :func:`main`, then an exit that skips the
    interpreter's teardown. A finished run has closed its logs, checkpoints and actors; what is left is
    Ray's local cluster, shut down here as its exit hook would, and the finalisation of torch and the other
    modules, which takes 1-2 s on 2 cores and saves nothing. An exception propagates as usual (traceback,
    normal exit)."""
    code = main(start_ray_early=True, imports_without_gc=True)
    launch = sys.modules.get("aapo_ray.launch")  # imported only by the commands that start or join Ray
    if launch is not None:
        launch.shutdown_ray()  # also one still starting (an interrupt while the runner imported)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
