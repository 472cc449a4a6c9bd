"""``aapo`` command line: every subcommand module registers its parser here (``add_parser``, which
sets ``func(args) -> exit status``)."""

from __future__ import annotations

import argparse
import logging
import sys

from aapo_ray import compare, eval_cmd, reference_build, serve, submit, train_cli
from aapo_ray.config import ConfigError

SUBCOMMANDS = (train_cli, serve, submit, compare, eval_cmd, reference_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aapo", description="AAPO post-training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"aapo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aapo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
