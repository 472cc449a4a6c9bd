"""``aapo`` command line. Each subcommand's module (listed in :data:`aapo_ray.commands.COMMANDS`)
registers its parser (``add_parser``, which sets ``func(args) -> exit status``); a run imports only
the module of the subcommand it runs, so ``aapo --help`` starts in well under a second and ``aapo
train`` does not pay for Ray Serve or the evaluation pipeline."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from aapo_ray.commands import COMMANDS
from aapo_ray.config import ConfigError


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``aapo`` parser. With ``argv``, only the subcommand it names is fully built (the others are
    listed with their help line); without, every subcommand is."""
    parser = argparse.ArgumentParser(prog="aapo", description="AAPO post-training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = list(COMMANDS) if argv is None else [a for a in argv if a in COMMANDS][:1]
    modules = dict.fromkeys(COMMANDS[name][0] for name in chosen)  # in order, once each
    for module in modules:
        importlib.import_module(module).add_parser(sub)
    for name, (module, help_text) in COMMANDS.items():
        if module not in modules:  # named in `aapo --help`; its arguments are built when it runs
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"aapo: {exc}", file=sys.stderr)
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
    code = main()
    launch = sys.modules.get("aapo_ray.launch")  # imported only by the commands that start or join Ray
    if launch is not None and launch.ray.is_initialized():
        launch.shutdown_ray()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
