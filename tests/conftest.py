"""Shared fixtures: one real local Ray cluster per test session, and a tiny model directory."""

import os
import socket
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/aapo_ray/torch_extensions"))
# Serve's controller kills a proxy that misses 3 health checks of 10 s; a 2-core machine running the
# suite on both cores has missed them (the proxy killed mid-test). Ray's workers inherit this from
# the process that starts the cluster, so it is set before any test starts one.
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
# Idle OpenMP threads sleep instead of spinning (set before torch loads; every process the tests start inherits
# it). The suite keeps both cores busy, and torch's 2 threads in a test process spin while others wait: a 60-step
# warm-start build beside a busy core took 24-25 s passive against 37-43 s spinning (idle: 14.9 vs 13.0 s).
# Whole suite, passive/default wall time in 3 back-to-back pairs (2026-12-03): 0.86, 0.97, 0.87 (mean 0.90,
# 95% CI [0.75, 1.06]: not shown to be faster as a whole).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ENVIRON_AT_START = dict(os.environ)  # before any test started a cluster (tests/test_roles.py)

# Seconds each test file takes on one of 2 workers (2-core VM, 2026-12-04, one full run at 19:54, setup and
# teardown included). `--dist loadfile` hands whole files to the workers in collection order (pyproject
# turns off xdist's own order, most tests first), so the longest go first and the run does not end on
# one worker while the other idles (xdist's order put the three driver and fault files last: on these
# figures ~40 s on one worker alone, and 131 s of 787 in one run). A file missing here would be handed
# out last: tests/test_architecture.py checks none is.
# `--file-seconds` prints a run's own figures in this form.
FILE_SECONDS = {
    "test_eval.py": 123, "test_driver_faults.py": 113, "test_faults.py": 108, "test_learner.py": 81,
    "test_models.py": 78, "test_colocation.py": 55, "test_submit.py": 52, "test_secure_defaults.py": 47,
    "test_eval_cluster.py": 45, "test_roles.py": 44, "test_kept_roles.py": 44, "test_serve.py": 40,
    "test_serve_logprobs.py": 37, "test_reference_cache.py": 36, "test_driver.py": 35, "test_launch.py": 29,
    "test_architecture.py": 20, "test_reward.py": 19, "test_logprobs.py": 16, "test_memory_plan.py": 16,
    "test_sglang_backend.py": 15, "test_bad_input.py": 9, "test_cluster.py": 5, "test_sglang_contract.py": 5,
    "test_serve_offline.py": 3, "test_serve_continuous.py": 3, "test_config.py": 2, "test_algo.py": 1,
    "test_benchmarks.py": 1, "test_data.py": 1, "test_compare.py": 0, "test_rollout.py": 0,
}


def pytest_collection_modifyitems(items):
    """The longest test files first (a stable sort: each file keeps its own order of tests)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


def pytest_addoption(parser):
    parser.addoption("--file-seconds", action="store_true",
                     help="print each test file's seconds (setup, call and teardown) in FILE_SECONDS' form")


_file_seconds = Counter()


def pytest_runtest_logreport(report):
    _file_seconds[Path(report.fspath).name] += report.duration


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("--file-seconds"):
        terminalreporter.write_line("FILE_SECONDS = {" + ", ".join(
            f'"{name}": {round(seconds)}' for name, seconds in _file_seconds.most_common()) + "}")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (not a mock) on 127.0.0.1, shared by the whole session."""
    import ray

    from aapo_ray.launch import init_ray, shutdown_ray

    init_ray(num_cpus=8, namespace="aapo-tests")
    yield ray
    shutdown_ray()


@pytest.fixture(scope="module")
def kept_roles_cleared(ray_cluster):
    """For a module whose runs keep their roles (``ray.keep_roles``): no kept actor before it, none left after it."""
    from test_kept_roles import kill_kept

    kill_kept()
    yield
    kill_kept()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The embedded model's recipe with a 40-step warm start: a real tokenizer + Llama, built in seconds."""
    from aapo_ray.embedded import default_model_path

    # built once for the whole run: under pytest-xdist every worker's basetemp sits in one shared directory,
    # and default_model_path builds under a file lock, so the second worker waits and reuses the first's build
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return default_model_path(shared / "models", progress=False, recipe={"sft": {"steps": 40}, "eval": {"n": 8}})


@pytest.fixture
def quiet_batch_queue(monkeypatch):
    """For a Serve replica built outside Serve: serve.batch asks the replica context for max_ongoing_requests
    only to print a warning."""
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)


@pytest.fixture(scope="session")
def serve_app(ray_cluster):
    """``with serve_app(model, app_name, **build_app_options) as url``: the real Serve application on a fresh
    HTTP port of 127.0.0.1 (Serve restarted so its HTTP options are ours), shut down afterwards."""
    from ray import serve

    from aapo_ray.serve import build_app

    @contextmanager
    def deploy(model_path, app_name, **options):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.shutdown()  # a Serve left by another module would keep its own HTTP options
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model_path, **options), name=app_name, route_prefix="/")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()

    return deploy
