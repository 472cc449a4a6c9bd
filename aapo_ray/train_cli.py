"""``aapo train``, ``aapo check-config`` and ``aapo warmstart``: parsing and running them."""

from __future__ import annotations

import argparse
from pathlib import Path

from aapo_ray.commands import help_line
from aapo_ray.config import ConfigError, dump_config
from aapo_ray.driver import train
from aapo_ray.embedded import warmstart_report
from aapo_ray.preflight import load_checked_config


def add_train_parser(sub) -> argparse.ArgumentParser:
    """``train``: also what ``aapo submit`` parses locally before sending a job."""
    train_p = sub.add_parser("train", help=help_line("train"))
    train_p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted config overrides, e.g. algo.group_size=8 learner.zero_stage=2")
    train_p.add_argument("--config", help="YAML config file")
    train_p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    train_p.add_argument("--address", help="join an existing Ray cluster ('auto', ray://host:10001)")
    train_p.add_argument("--keep-roles", action="store_true",
                         help="leave the role actors loaded in the (--address) cluster for the next run, and take "
                              "those an earlier run left (ray.keep_roles=true)")
    train_p.add_argument("--run-dir", help="run directory (default: run.output_dir/run.name or a time stamp)")
    train_p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    train_p.set_defaults(func=run_train)
    return train_p


def add_parser(sub) -> None:
    """``train``, ``check-config`` and ``warmstart``."""
    add_train_parser(sub)
    check = sub.add_parser("check-config", help=help_line("check-config"))
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    check.add_argument("--config")
    check.set_defaults(func=run_check_config)
    warm = sub.add_parser("warmstart", help=help_line("warmstart"))
    warm.add_argument("--eval-n", type=int, default=500)
    warm.set_defaults(func=run_warmstart)


def resolve_train_config(args: argparse.Namespace):
    """The config a ``train`` invocation will run with (validated and checked; raises ConfigError)."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.keep_roles:
        overrides.append("ray.keep_roles=true")
    config_path = args.config
    if args.resume and not config_path:
        config_path = Path(args.resume) / "config.yaml"
        if not config_path.exists():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
    return load_checked_config(config_path, overrides)


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_train_config(args)
    train(cfg, run_dir=args.resume or args.run_dir, resume=bool(args.resume), progress=not args.no_progress)
    return 0


def run_check_config(args: argparse.Namespace) -> int:
    print(dump_config(load_checked_config(args.config, args.overrides)), end="")
    return 0


def run_warmstart(args: argparse.Namespace) -> int:
    warmstart_report(eval_n=args.eval_n)
    return 0
