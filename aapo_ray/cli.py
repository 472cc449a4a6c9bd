"""``aapo`` command line: train, warmstart (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aapo_ray.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aapo", description="AAPO post-training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy (the embedded tiny default with no arguments)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. algo.group_size=8 learner.zero_stage=2")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    train.add_argument("--address", help="join an existing Ray cluster ('auto', ray://host:10001)")
    train.add_argument("--run-dir", help="run directory (default: run.output_dir/run.name or a time stamp)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    warm = sub.add_parser("warmstart", help="build the embedded tiny model and report its accuracy")
    warm.add_argument("--eval-n", type=int, default=500)

    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    check.add_argument("--config")

    # Subcommands owned by other modules: each has add_parser(subparsers) that sets func=run(args) -> int.
    import importlib

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


SUBCOMMAND_MODULES = ("aapo_ray.serve", "aapo_ray.submit")


def resolve_train_config(args: argparse.Namespace):
    """The config a ``train`` invocation will run with (validated; raises ConfigError)."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    config_path = args.config
    if args.resume and not config_path:
        config_path = Path(args.resume) / "config.yaml"
        if not config_path.exists():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
    return load_config(config_path, overrides)


def reward_throughput(n: int = 2000) -> float:
    """Completions per second through the bounded-time scorer on the synthetic task's solutions."""
    import time

    from aapo_ray.reward import BatchScorer
    from aapo_ray.synthetic import SyntheticTask

    problems = SyntheticTask().problems("test", n)
    completions, golds = [p[2] for p in problems], [p[1] for p in problems]
    with BatchScorer({"accuracy": 1.0}) as scorer:
        scorer.score(completions[:20], golds[:20])  # start the worker outside the timing
        start = time.perf_counter()
        result = scorer.score(completions, golds)
        elapsed = time.perf_counter() - start
    if result.total.mean() < 0.99:
        raise RuntimeError(f"worked solutions scored {result.total.mean():.3f}, expected 1.0")
    return len(completions) / elapsed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "func"):
            return args.func(args)
        if args.command == "train":
            cfg = resolve_train_config(args)
            from aapo_ray.driver import train

            train(cfg, run_dir=args.resume or args.run_dir, resume=bool(args.resume), progress=not args.no_progress)
        elif args.command == "check-config":
            from aapo_ray.config import dump_config

            print(dump_config(load_config(args.config, args.overrides)), end="")
        elif args.command == "warmstart":
            from aapo_ray.models import warmstart_report

            warmstart_report(eval_n=args.eval_n)
            print(f"reward throughput: {reward_throughput():.0f} completions/s "
                  "(math-verify accuracy on worked solutions, 1 scoring worker process)")
    except ConfigError as exc:
        print(f"aapo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aapo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
