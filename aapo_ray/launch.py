"""Starting or joining a Ray cluster, and the per-actor process setup every role shares."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager

import ray  # aapo_ray/__init__.py has already pinned a local cluster's ports to 127.0.0.1
import torch

# Environment every actor process gets: deterministic, quiet, bounded thread pools.
ACTOR_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no per-actor "Loading weights" bars
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
}

# True: a local cluster's workers get ACTOR_ENV from a job runtime_env as on a joined cluster (how every run did
# before; benchmarks/startup.py's cold_runtime_env arm sets it to compare)
WORKER_ENV_AS_RUNTIME_ENV = False


def init_ray(address: str | None = None, *, num_cpus: int | None = None, namespace: str = "aapo",
             torch_threads: int = 1) -> None:
    """Join ``address`` (``"auto"``, ``ray://host:10001``) or start a local cluster on 127.0.0.1.

    Idempotent: a process that is already connected keeps its connection.
    """
    if ray.is_initialized():
        return
    env = dict(ACTOR_ENV, OMP_NUM_THREADS=str(torch_threads), MKL_NUM_THREADS=str(torch_threads))
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    # RAY_ADDRESS is set inside `ray job submit` jobs; exported but empty, it is unset (as Ray reads it)
    address = address or os.environ.get("RAY_ADDRESS") or None
    # A cluster of our own inherits this process's environment, so its workers get ``env`` without a job
    # runtime_env: one would start each worker through Ray's setup_worker (a second `import ray` before the
    # worker's own: ~0.7 CPU-s and ~0.4 s more per actor, benchmarks/startup.py). A joined cluster needs it.
    runtime_env = None if address is None and not WORKER_ENV_AS_RUNTIME_ENV else {"env_vars": env}
    kwargs = dict(namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
    if address is None:  # "local": always a new cluster of our own, never one a `ray start` left running here
        with environment({} if runtime_env else env):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    else:
        ray.init(address=address, **kwargs)


def shutdown_ray() -> None:
    """``ray.shutdown()``, less the second a local cluster's autoscaler monitor costs it.

    Ray 2.60 stops the GCS before the monitor, whose SIGTERM handler then tries to report its own end to
    that GCS until Ray's one-second grace period is over and it is killed (``Node._kill_process_impl``). A
    cluster this process started has no other node to scale, so its monitor is killed first and Ray skips
    it. A joined cluster is only disconnected from, as by ``ray.shutdown()``."""
    node = getattr(ray._private.worker, "_global_node", None)  # the head node started here, if any
    for info in getattr(node, "all_processes", {}).get("monitor", []):
        if info.process.poll() is None:
            info.process.kill()
            try:
                info.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # not reaped yet (a process stuck in the kernel): Ray's shutdown waits on it as before
    ray.shutdown()


@contextmanager
def environment(env: dict[str, str]):
    """``os.environ`` updated with ``env`` inside the block (processes started there inherit it), restored after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def setup_actor_process(torch_threads: int, seed: int | None = None) -> None:
    """Called first in every actor: bound torch's threads (2 cores are shared by all roles) and seed."""
    torch.set_num_threads(torch_threads)
    if seed is not None:
        torch.manual_seed(seed)


@contextmanager
def interrupt_latch():
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered in the yielded Event, so that
    an interrupt swallowed on the way (raised inside a finalizer or a library's broad ``except``)
    still stops the loop at its next check. A no-op off the main thread or where SIGINT is ignored."""
    latch = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield latch
        return

    def on_sigint(signum, frame):
        latch.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield latch
    finally:
        signal.signal(signal.SIGINT, previous)
