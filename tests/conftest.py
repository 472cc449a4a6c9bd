"""Shared fixtures: one real local Ray cluster per test session, and a tiny model directory."""

import os

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/aapo_ray/torch_extensions"))


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

    return default_model_path(tmp_path_factory.mktemp("models"), progress=False,
                              recipe={"sft": {"steps": 40}, "eval": {"n": 8}})
