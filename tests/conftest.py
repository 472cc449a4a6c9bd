"""Shared fixtures: one real local Ray cluster per test session, and a tiny model directory."""

import os
import socket
from contextlib import contextmanager

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/aapo_ray/torch_extensions"))
# Serve's controller kills a proxy that misses 3 health checks of 10 s; a 2-core machine running the
# suite on both cores has missed them (the proxy killed mid-test). Ray's workers inherit this from
# the process that starts the cluster, so it is set before any test starts one.
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (not a mock) on 127.0.0.1, shared by the whole session."""
    import ray

    from aapo_ray.launch import init_ray

    init_ray(num_cpus=8, namespace="aapo-tests")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The embedded model's recipe with a 40-step warm start: a real tokenizer + Llama, built in seconds."""
    from aapo_ray.embedded import default_model_path

    # built once for the whole run: under pytest-xdist every worker's basetemp sits in one shared directory,
    # and default_model_path builds under a file lock, so the second worker waits and reuses the first's build
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return default_model_path(shared / "models", progress=False, recipe={"sft": {"steps": 40}, "eval": {"n": 8}})


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
