"""Running ``aapo train``, ``aapo check-config`` and ``aapo warmstart`` (their arguments: :mod:`aapo_ray.cli_args`)."""

from __future__ import annotations

import argparse

from aapo_ray.config import config_source, dump_config
from aapo_ray.driver import train
from aapo_ray.embedded import warmstart_report
from aapo_ray.preflight import load_checked_config


def run_train(args: argparse.Namespace) -> int:
    cfg = load_checked_config(*config_source(args))
    train(cfg, run_dir=args.resume or args.run_dir, resume=bool(args.resume), progress=not args.no_progress)
    return 0


def run_check_config(args: argparse.Namespace) -> int:
    print(dump_config(load_checked_config(*config_source(args))), end="")
    return 0


def run_warmstart(args: argparse.Namespace) -> int:
    warmstart_report(eval_n=args.eval_n)
    return 0
