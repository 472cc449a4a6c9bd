"""The ``aapo`` subcommands: name -> (the function that runs it, as ``module:function``; one-line help).

Kept free of imports so that ``aapo --help`` and the choice of a subcommand cost nothing. Every
command's arguments are parsed by :mod:`aapo_ray.cli_args` (light); :mod:`aapo_ray.cli` imports the
module of the function below only once they parsed, and only for the command it runs (``aapo serve``
never imports the trainer, ``aapo train`` never imports Ray Serve, ``aapo train --help`` neither).
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("aapo_ray.train_cli:run_train", "train a policy (the embedded tiny default with no arguments)"),
    "check-config": ("aapo_ray.train_cli:run_check_config", "validate a config and print it resolved"),
    "warmstart": ("aapo_ray.train_cli:run_warmstart", "build the embedded tiny model and report its accuracy"),
    "serve": ("aapo_ray.serve:run", "serve a run's checkpoint (or HF model dir) with an OpenAI-compatible API"),
    "submit": ("aapo_ray.submit:run",
               "run `aapo train ...` on a Ray cluster as a Ray job (ray job submit), after checking it here"),
    "compare": ("aapo_ray.compare:run", "paired comparison of run directories across seeds"),
    "eval": ("aapo_ray.eval_cmd:run", "avg@k / pass@k / maj@k on math benchmarks (Ray Data batch inference)"),
    "reference": ("aapo_ray.reference_build:run",
                  "the precomputed frozen-reference cache (algo.reference=precomputed)"),
}


def help_line(name: str) -> str:
    """The one-line help of subcommand ``name``."""
    return COMMANDS[name][1]
