"""The package's shape, checked from its source: no import cycles (function-level imports included), no
module past 500 lines, and function-level imports only of heavy third-party libraries, each with a reason."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from aapo_ray.commands import COMMANDS
from conftest import FILE_SECONDS

PACKAGE = Path(__file__).resolve().parents[1] / "aapo_ray"
MAX_LINES = 500


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imported_modules(node: ast.AST) -> list[tuple[str, ast.stmt]]:
    """``aapo_ray.X`` (and third-party) module names each import statement in ``node`` names."""
    out = []
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.Import):
            out += [(a.name, stmt) for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            if stmt.module == "aapo_ray":  # from aapo_ray import a, b
                out += [(f"aapo_ray.{a.name}", stmt) for a in stmt.names]
            else:
                out.append((stmt.module, stmt))
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in modules().items():
        graph[name] = {m.split(".")[1] for m, _ in imported_modules(tree)
                       if m.startswith("aapo_ray.") and m.split(".")[1] != name}
    graph["cli"] |= {runner.split(":")[0].split(".")[1] for runner, _ in COMMANDS.values()}  # imported by name
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_too_long():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_function_level_imports_are_third_party_and_say_why():
    """Never an aapo_ray module (that would hide a cycle); a heavy or optional library, with a comment."""
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text().splitlines()
        tree = ast.parse("\n".join(source))
        top = {id(s) for s in tree.body}
        for name, stmt in imported_modules(tree):
            if id(stmt) in top or _in_type_checking(tree, stmt):
                continue
            line = source[stmt.lineno - 1]
            reason = "#" in line or source[stmt.lineno - 2].strip().startswith("#")
            if name.startswith("aapo_ray") or name == "aapo_ray":
                problems.append(f"{path.name}:{stmt.lineno}: function-level import of {name}")
            elif not reason:
                problems.append(f"{path.name}:{stmt.lineno}: function-level import of {name} without a reason comment")
    assert not problems, "\n".join(problems)


def _in_type_checking(tree: ast.Module, stmt: ast.stmt) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            if any(s is stmt for s in ast.walk(node)):
                return True
    return False


def test_every_command_has_a_parser_with_its_help_line_and_a_runner():
    import argparse
    import importlib

    from aapo_ray.cli_args import add_parsers

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    assert list(sub.choices) == list(COMMANDS)
    assert {n: sub._choices_actions[i].help for i, n in enumerate(sub.choices)} == {n: h for n, (_, h) in COMMANDS.items()}
    for name, (runner, _) in COMMANDS.items():
        assert parser.parse_args(_argv(name)).command == name  # no flag of its own overwrites `command`
        module, _, function = runner.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def _argv(name: str) -> list[str]:
    """The shortest valid command line of command ``name``."""
    return {"serve": ["serve", "some/run"], "compare": ["compare", "a", "b"], "eval": ["eval", "m"],
            "reference": ["reference", "build"]}.get(name, [name])


def _modules_after(argv: list[str], *, run: bool = True) -> set[str]:
    """The modules imported once ``aapo ARGV`` parsed and (``run``) its runner was looked up."""
    code = ("import sys; from aapo_ray.cli import build_parser, command_runner; "
            f"args = build_parser().parse_args(sys.argv[1:]); {'command_runner(args); ' if run else ''}"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_cli_imports_only_the_command_it_runs():
    heavy = {"torch", "transformers", "ray", "math_verify", "aapo_ray.train_cli", "aapo_ray.serve", "aapo_ray.eval_cmd"}
    for name in COMMANDS:  # every command's arguments parse without anything heavy (`aapo CMD --help` is instant)
        assert not heavy & _modules_after(_argv(name), run=False), name
    help_run = subprocess.run([sys.executable, "-m", "aapo_ray", "--help"], capture_output=True, text=True, check=True)
    assert all(name in help_run.stdout for name in COMMANDS)
    train = _modules_after(["train", "run.steps=1"])
    assert "aapo_ray.driver" in train and not {"ray.serve", "aapo_ray.eval_cmd", "aapo_ray.serve"} & train
    # nor what only Serve or a warm-start build needs: transformers' continuous-batching engine pulls in
    # torch._dynamo, the Llama modeling code transformers' masking utilities (~2.5 s together on 2 cores)
    assert not {"aapo_ray.continuous_batching", "torch._dynamo", "transformers.models.llama.modeling_llama"} & train
    serve = _modules_after(["serve", "some/run"])
    assert "aapo_ray.serve" in serve and "aapo_ray.driver" not in serve


def test_scorer_actors_import_neither_torch_nor_math_verify():
    """Ray starts an actor by importing the module of its class: the CPU scorers of training, of ``aapo eval``
    and of the reference build must not sit in a module that imports torch (~3 CPU-s and ~0.2 GB each), nor
    math-verify, which only their worker subprocesses run (~0.5 CPU-s and ~40 MB each: benchmarks/README)."""
    from aapo_ray.eval_pipeline import Score
    from aapo_ray.reference_build import ScoreShard
    from aapo_ray.scorer import RewardScorer

    for cls in (RewardScorer, Score, ScoreShard):
        code = f"import sys, {cls.__module__}; print(' '.join(sorted(sys.modules)))"
        loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
        assert not {"torch", "transformers", "math_verify", "sympy"} & loaded, cls.__qualname__


_RUN_WITH = """
import aapo_ray.cli as cli

def fake_main(**kwargs):  # the flags run() passes
    print("status", 7, sorted(k for k, v in kwargs.items() if v), end="")  # no newline: still in a piped stdout's buffer
    return 7

cli.main = fake_main
cli.run()
print("after run")  # never reached: run() ends the process
"""


def test_the_console_script_exits_with_mains_status_and_its_output_flushed():
    """``run`` (the ``aapo`` script) ends the process without the interpreter's teardown: the exit status and
    the output still buffered must survive that. (Ray's shutdown there is covered by the Ctrl-C case of
    tests/test_driver_faults.py, which checks that no process of the run is left.)"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a buffered stdout, as in a pipe
    proc = subprocess.run([sys.executable, "-c", _RUN_WITH], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert proc.stdout == "status 7 ['imports_without_gc', 'start_ray_early']"


_RUNNER_IMPORT = """
import argparse, gc, json, sys
import aapo_ray.cli as cli

cli.COMMANDS["probe"] = ("tests.remote_helpers:text_hash_reward",)  # a light module that records the collector
runner = cli.command_runner(argparse.Namespace(command="probe"), without_gc=sys.argv[1] == "1")
import tests.remote_helpers as helpers
print(json.dumps([helpers.IMPORTED_WITH_GC, gc.isenabled(), gc.get_freeze_count() > 0, runner.__name__]))
"""


def test_the_console_script_imports_its_runner_without_the_garbage_collector():
    """``run`` imports the command's runner with the collector off, then freezes what it loaded and turns the
    collector back on (aapo_ray.import_gc); an in-process ``main`` (a library caller's process) leaves it alone."""
    def state(without_gc: bool) -> list:
        proc = subprocess.run([sys.executable, "-c", _RUNNER_IMPORT, str(int(without_gc))], capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).parent.parent)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    assert state(True) == [False, True, True, "text_hash_reward"]
    assert state(False) == [True, True, False, "text_hash_reward"]


def test_every_test_file_has_a_scheduling_weight():
    """conftest's FILE_SECONDS orders the files for the workers: a file missing there would run last."""
    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    assert files - set(FILE_SECONDS) == set(), "add these to FILE_SECONDS in tests/conftest.py"
    assert set(FILE_SECONDS) - files == set(), "FILE_SECONDS names files that are gone"
