"""Starting or joining a Ray cluster, and the per-actor process setup every role shares."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import threading
from contextlib import contextmanager, nullcontext

import ray
import torch
from ray._private import ray_constants

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

# A local cluster listens on 127.0.0.1 only. Ray turns the 127.0.0.1 it is given into this host's outward IP
# (services.resolve_ip_for_localhost) unless ray_constants.ENABLE_RAY_CLUSTER is off, and reads that from this
# variable once, when ray is first imported: a program that imported ray before aapo_ray had its "local" cluster
# listen on every interface (GCS, raylet, agents on :: and 0.0.0.0; the learners' rendezvous on the outward IP).
# init_ray sets both while it starts a cluster of its own or joins one at a loopback address, whatever the import
# order (tests/test_secure_defaults.py).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


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
        with environment(LOOPBACK_ENV if runtime_env else {**env, **LOOPBACK_ENV}), _ray_cluster_flag(False):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
        node_ip = ray.util.get_node_ip_address()
        if not _is_loopback(node_ip):  # a Ray that resolves 127.0.0.1 some other way
            shutdown_ray()
            raise RuntimeError(f"the local Ray cluster started on {node_ip}, not on 127.0.0.1, and was shut down: "
                               f"this Ray version ({ray.__version__}) no longer keeps a local cluster on loopback as "
                               "aapo_ray.launch expects; start one with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start "
                               "--head --node-ip-address 127.0.0.1` and pass its address (--address) instead")
    else:  # a driver joining 127.0.0.1 must see itself there too, or it waits for a raylet on its outward IP
        with _ray_cluster_flag(False) if _is_loopback(address) else nullcontext():
            ray.init(address=address, **kwargs)


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP, ``host:port``, ``ray://host:port``, ``auto``) names this machine's loopback."""
    host = address.split("://")[-1]
    for candidate in (host, host.rsplit(":", 1)[0].strip("[]")):
        try:
            return candidate == "localhost" or ipaddress.ip_address(candidate).is_loopback
        except ValueError:
            pass
    return False


@contextmanager
def _ray_cluster_flag(enabled: bool):
    """Ray's ``ENABLE_RAY_CLUSTER`` (read from LOOPBACK_ENV's variable at ray's import) set inside the block."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = enabled
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


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
