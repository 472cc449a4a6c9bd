"""The ``aapo`` subcommands' arguments: one parser per command, built from light modules only (argparse,
pydantic for ``serve``'s options, the benchmark table for ``eval``), so that ``aapo CMD --help`` and a
mistyped flag answer at once. What runs a command is named in :data:`aapo_ray.commands.COMMANDS` and
imported by :mod:`aapo_ray.cli` only after its arguments parsed, and (``config_source``) after the config
they name validated (:func:`aapo_ray.config.config_source`), so a mistyped config key fails as fast. A command
whose parser sets ``ray_cluster`` (``train``, ``eval``, ``reference build``, ``serve``) has the ``aapo`` script start
the local Ray cluster it will ask for while its runner imports (:func:`aapo_ray.launch.start_ray_early`);
``light_checks`` (a mistyped model directory; ``eval``'s flags) run before that, so those fail as fast."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Literal

from pydantic import BaseModel

from aapo_ray.commands import help_line
from aapo_ray.config import InputError, config_source, missing_model_dir, missing_run_or_model_dir, ray_init_args
from aapo_ray.eval_sets import BENCHMARKS, EVAL_DEFAULTS, MAX_SAMPLES, PAPER_PROTOCOL, parse_benchmarks, settings_from
from aapo_ray.serve_options import DeploymentOptions, ServeOptions

SUBMIT_EXAMPLES = """\
examples:
  aapo submit --address http://127.0.0.1:8265 -- train run.steps=2
  aapo submit --address http://127.0.0.1:8265 --working-dir . -- \\
      train --config cluster/configs/r1-distill-qwen-1.5b-aapo.yaml
  aapo submit --no-wait -- train --config /home/ray/aapo-ray/cluster/configs/qwen2.5-math-7b-aapo.yaml

On a token-authenticated cluster (KubeRay authOptions.mode=token) export RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN=<the cluster's token> first; see cluster/README.md."""


def add_parsers(sub) -> None:
    """Every ``aapo`` subcommand, in :data:`~aapo_ray.commands.COMMANDS`' order."""
    add_train_parsers(sub)
    add_serve_parser(sub)
    add_submit_parser(sub)
    add_compare_parser(sub)
    add_eval_parser(sub)
    add_reference_parser(sub)


# ----------------------------------------------------------------------------- train, check-config, warmstart
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
    train_p.set_defaults(config_source=config_source, light_checks=check_model_path, ray_cluster=train_ray_cluster)
    return train_p


def train_ray_cluster(args: argparse.Namespace, cfg) -> dict | None:
    """:func:`run_ray_cluster` for ``aapo train``; None for a run that keeps its roles (on a cluster it joins)."""
    return None if cfg.ray.keep_roles else run_ray_cluster(args, cfg)


def run_ray_cluster(args: argparse.Namespace, cfg) -> dict:  # noqa: ARG001 - every parser's ray_cluster takes both
    """:func:`aapo_ray.config.ray_init_args`, which the driver and ``aapo reference build`` pass to ``init_ray``."""
    return ray_init_args(cfg)


def eval_ray_cluster(args: argparse.Namespace, cfg=None) -> dict:
    """:func:`~aapo_ray.launch.init_ray`'s arguments for ``aapo eval`` (:func:`aapo_ray.eval_cmd.run` passes
    these; the ``aapo`` script starts that cluster early)."""
    return dict(address=args.address, num_cpus=args.num_cpus, namespace="aapo-eval", torch_threads=1)


def serve_ray_cluster(args: argparse.Namespace, cfg=None) -> dict:
    """:func:`~aapo_ray.launch.init_ray`'s arguments for ``aapo serve`` (:func:`aapo_ray.serve.run` passes these;
    the ``aapo`` script starts that cluster early)."""
    return dict(address=args.address, num_cpus=None, namespace="aapo", torch_threads=args.torch_threads)


def check_model_path(args: argparse.Namespace, cfg) -> None:  # noqa: ARG001 - every parser's light_checks take both
    """``aapo train``'s and ``aapo reference build``'s light check, run by :func:`aapo_ray.cli.main` once the config
    parsed, before a cluster starts or the runner imports: a local ``model.path`` is a directory
    (:func:`aapo_ray.config.missing_model_dir`; what it holds is checked after the imports)."""
    if why := missing_model_dir(cfg.model.path):
        raise InputError(why)


def check_serve_args(args: argparse.Namespace, cfg=None) -> None:  # noqa: ARG001
    """``aapo serve``'s light check, run by :func:`aapo_ray.cli.main` before a cluster starts or the runner imports:
    its model is a directory (:class:`~aapo_ray.config.InputError`; what the directory holds is checked after the
    imports, by :func:`aapo_ray.checkpoint.resolve_model_dir`)."""
    if why := missing_run_or_model_dir(args.model):
        raise InputError(why)


def check_eval_args(args: argparse.Namespace, cfg=None) -> None:  # noqa: ARG001
    """``aapo eval``'s light checks, run by :func:`aapo_ray.cli.main` before a cluster starts or the runner
    imports: the sampling settings and the ``--benchmarks`` list (:class:`~aapo_ray.eval_sets.EvalInputError`).
    :func:`aapo_ray.eval_cmd.run` makes them again for its own callers, and warns of paper-protocol overrides."""
    parse_benchmarks(settings_from(args, warn=False)["benchmarks"])


def add_train_parsers(sub) -> None:
    """``train``, ``check-config`` and ``warmstart``."""
    add_train_parser(sub)
    check = sub.add_parser("check-config", help=help_line("check-config"))
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    check.add_argument("--config")
    check.set_defaults(config_source=config_source)
    warm = sub.add_parser("warmstart", help=help_line("warmstart"))
    warm.add_argument("--eval-n", type=int, default=500)


# ----------------------------------------------------------------------------- serve
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


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
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
    p.set_defaults(light_checks=check_serve_args, ray_cluster=serve_ray_cluster)
    return p


# ----------------------------------------------------------------------------- submit
def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "submit", help=help_line("submit"),
        description="Validate an `aapo train` command locally (CLI parser + config), submit it to a Ray cluster's "
                    "job server, stream its logs and exit with its status (0 SUCCEEDED, 1 FAILED/STOPPED, "
                    "2 not submitted: invalid command or config).",
        epilog=SUBMIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="the cluster's dashboard / job server, e.g. http://127.0.0.1:8265 "
                                     "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, as `ray job submit`)")
    p.add_argument("--runtime-env", metavar="FILE", help="runtime_env as a YAML or JSON file (env_vars, "
                                                         "working_dir, py_modules, ...)")
    p.add_argument("--working-dir", metavar="DIR", help="upload DIR as the job's working directory (overrides "
                                                        "the runtime env's); a relative --config is checked in DIR")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job's driver (repeatable)")
    p.add_argument("--submission-id", help="the job's id (default: Ray's raysubmit_...)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver process")
    p.add_argument("--entrypoint-resources", metavar="JSON", help='custom resources for the driver, e.g. \'{"head": 1}\'')
    p.add_argument("--command", dest="cluster_command", default="aapo",
                   help="how the cluster runs the CLI (default 'aapo'; e.g. 'python -m aapo_ray')")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the local config check (e.g. a --config or --resume that exists only on the cluster)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- train ARGS",
                   help="the `aapo train` command to run (its overrides and flags)")
    return p


# ----------------------------------------------------------------------------- compare
COMPARE_DESCRIPTION = ("Paired comparison of runs seed by seed: runs are grouped by a config key (--by) and "
                       "paired across groups by run.seed; a run's score is the mean of the last --last values of "
                       "--metric. Prints each pair's mean difference with its 95% Student-t interval and whether "
                       "it contains 0; writes compare.json and compare.png (method: aapo_ray.compare).")


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help=help_line("compare"),
                              description=COMPARE_DESCRIPTION)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--by", default="algo.estimator", help="config key that names the groups (default algo.estimator)")
    p.add_argument("--metric", default="eval/accuracy", help="metrics.jsonl key (default eval/accuracy)")
    p.add_argument("--last", type=int, default=3, help="score = mean of the last N values of the metric (default 3)")
    p.add_argument("--out", default=".", help="directory for compare.png and compare.json (default: .)")
    return p


# ----------------------------------------------------------------------------- eval
EVAL_DESCRIPTION = """\
``aapo eval MODEL_OR_RUN``: avg@k, pass@k and maj@k on MATH-500, AIME24, AMC23, Minerva, OlympiadBench,
GSM8K or a user's JSONL, as batch inference on Ray Data (:mod:`aapo_ray.eval_pipeline`).

MODEL_OR_RUN is a HF model directory or a run directory of ``aapo train`` (its latest complete checkpoint,
``--checkpoint step_N``, or every checkpoint with ``--all-checkpoints``). A run directory's
``config.yaml`` gives the prompt rendering training used (``data.template`` / ``chat_template`` /
``system_prompt``); a plain HF directory uses its chat template, else ``"{question}\\n"``. Prompts longer
than the model's context are cut from the left (counted) and every problem's completion budget is capped
at the context left after its prompt (with a warning). ``--protocol paper``: see
:mod:`aapo_ray.eval_sets`; flags given explicitly override it."""


def _settings(protocol: dict) -> str:
    """``T=0.6, top_p=0.95, 1024 new tokens, 4 samples``: the sampling settings of ``protocol``."""
    samples = protocol["samples"]
    return (f"T={protocol['temperature']}, top_p={protocol['top_p']}, {protocol['max_new_tokens']} new tokens, "
            f"{samples} sample{'s' if samples != 1 else ''}")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help=help_line("eval"),
                              description=EVAL_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_RUN", help="HF model directory or run directory")
    which = p.add_argument_group("what to evaluate")
    which.add_argument("--checkpoint", help="step_N of a run directory (default: latest complete)")
    which.add_argument("--all-checkpoints", action="store_true",
                       help="every complete checkpoint of the run, and the model it started from (step_0)")
    which.add_argument("--benchmarks", help=f"comma-separated: {', '.join(BENCHMARKS)}, synthetic:<split>[:<n>] "
                                            f"(the embedded task) or a .jsonl path with problem/answer fields "
                                            f"(default: all six; paper protocol: the paper's five)")
    which.add_argument("--limit", type=int, help="first N problems of each set")
    which.add_argument("--protocol", choices=("paper", "custom"), default="custom",
                       help=f"paper: {_settings(PAPER_PROTOCOL)}, the paper's five sets")
    samp = p.add_argument_group(f"sampling (defaults: {_settings(EVAL_DEFAULTS)})")
    samp.add_argument("--samples", "-k", type=int, help=f"samples per problem k (1..{MAX_SAMPLES})")
    samp.add_argument("--temperature", type=float)
    samp.add_argument("--top-p", dest="top_p", type=float)
    samp.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    samp.add_argument("--seed", type=int, default=0, help="base seed; each problem's seed derives from it")
    eng = p.add_argument_group("engine and cluster")
    eng.add_argument("--backend", choices=("hf", "sglang"), default="hf")
    eng.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    eng.add_argument("--deterministic", action="store_true", help="sglang: per-row seeds (deterministic mode)")
    eng.add_argument("--endpoint", help="OpenAI-compatible server URL (e.g. of aapo serve) instead of local engines")
    eng.add_argument("--model-name", help="--endpoint: the served model id to request")
    eng.add_argument("--api-key", help="--endpoint: bearer token")
    eng.add_argument("--max-in-flight", type=int, default=4, help="--endpoint: requests in flight per generator")
    eng.add_argument("--generators", type=int, default=1, help="generation actors (Ray Data concurrency)")
    eng.add_argument("--cpus-per-generator", type=float, default=1.0)
    eng.add_argument("--gpus-per-generator", type=float, help="default: 1 for sglang, 0 for hf")
    eng.add_argument("--generation-batch-size", type=int, default=64, help="hf: rows per generate call")
    eng.add_argument("--torch-threads", type=int, default=1)
    eng.add_argument("--problems-per-batch", type=int,
                     help="problems per Ray Data batch, sampled in one engine call (default: "
                          "--generation-batch-size / k, at least 1)")
    eng.add_argument("--scorers", type=int, default=1, help="scoring actors")
    eng.add_argument("--score-timeout", type=float, default=5.0, help="math-verify seconds per sample")
    eng.add_argument("--trust-remote-code", action="store_true")
    eng.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    eng.add_argument("--num-cpus", type=int, help="CPUs of a local cluster")
    p.add_argument("--out", help="output directory (default MODEL_OR_RUN/eval/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(light_checks=check_eval_args, ray_cluster=eval_ray_cluster)
    return p


# ----------------------------------------------------------------------------- reference
def add_reference_parser(sub) -> None:
    """``reference build``."""
    ref = sub.add_parser("reference", help=help_line("reference"))
    build = ref.add_subparsers(dest="reference_command", required=True).add_parser(
        "build", help="sample and score algo.reference_samples reference completions per training prompt")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    build.add_argument("--config", help="YAML config file (the training run's)")
    build.add_argument("--address", help="join an existing Ray cluster ('auto', ray://host:10001)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(config_source=config_source, light_checks=check_model_path, ray_cluster=run_ray_cluster)
