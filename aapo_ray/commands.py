"""The ``aapo`` subcommands: name -> (the module that defines and runs it, one-line help).

Kept free of imports so that ``aapo --help`` and the choice of a subcommand cost nothing: the
command line (:mod:`aapo_ray.cli`) imports only the module of the subcommand it runs (``aapo serve``
never imports the trainer, ``aapo train`` never imports Ray Serve), and each module takes its help
line from here.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("aapo_ray.train_cli", "train a policy (the embedded tiny default with no arguments)"),
    "check-config": ("aapo_ray.train_cli", "validate a config and print it resolved"),
    "warmstart": ("aapo_ray.train_cli", "build the embedded tiny model and report its accuracy"),
    "serve": ("aapo_ray.serve", "serve a run's checkpoint (or HF model dir) with an OpenAI-compatible API"),
    "submit": ("aapo_ray.submit",
               "run `aapo train ...` on a Ray cluster as a Ray job (ray job submit), after checking it here"),
    "compare": ("aapo_ray.compare", "paired comparison of run directories across seeds"),
    "eval": ("aapo_ray.eval_cmd", "avg@k / pass@k / maj@k on math benchmarks (Ray Data batch inference)"),
    "reference": ("aapo_ray.reference_build", "the precomputed frozen-reference cache (algo.reference=precomputed)"),
}


def help_line(name: str) -> str:
    """The one-line help of subcommand ``name``."""
    return COMMANDS[name][1]
