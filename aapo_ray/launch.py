"""Starting or joining a Ray cluster, and the per-actor process setup every role shares."""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import ray
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
    _await_early_start((address, num_cpus, namespace, torch_threads))
    if ray.is_initialized():
        return
    env = worker_env(torch_threads)
    address = cluster_address(address)
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


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS`` (set inside `ray job submit` jobs; exported but
    empty, it is unset, as Ray reads it); None: a local cluster of this run's own."""
    return address or os.environ.get("RAY_ADDRESS") or None


def worker_env(torch_threads: int) -> dict[str, str]:
    """The environment of a run's actor processes: :data:`ACTOR_ENV` and bounded math-library threads."""
    env = dict(ACTOR_ENV, OMP_NUM_THREADS=str(torch_threads), MKL_NUM_THREADS=str(torch_threads))
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


@dataclass
class _EarlyStart:
    """A local cluster being started by :func:`start_ray_early` on ``thread``; ``args`` those of its init_ray."""

    args: tuple
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


_early: _EarlyStart | None = None


class _EarlyStartLogFilter(logging.Filter):
    """Drops two of Ray's log lines from the early start's ray.init: its warning that a ray.init off the main
    thread sets no SIGTERM handler (start_ray_early sets it), and its "Started a local Ray instance", which would
    come whenever the start finishes, after an error the command printed meanwhile."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("SIGTERM handler is not set", "Started a local Ray instance"))


def start_ray_early(address: str | None = None, *, num_cpus: int | None = None, namespace: str = "aapo",
                    torch_threads: int = 1) -> bool:
    """For the ``aapo`` script (:func:`aapo_ray.cli.run`), once a command's arguments parsed: start the local
    cluster that the command's :func:`init_ray` (same arguments) will ask for, on a thread, so that Ray's daemons
    come up while this process imports torch and transformers and checks its inputs (~4 s on 2 cores, which
    Ray's start left on one core). That ``init_ray`` then waits for it (and raises if its arguments differ); so
    does :func:`shutdown_ray`, and, on any other exit, this process's last ``atexit`` hook. Does nothing
    (returns False) where that ``init_ray`` joins a cluster (``address``, ``RAY_ADDRESS``) or in a process already
    connected. Which commands, with which arguments: :mod:`aapo_ray.cli_args` (``ray_cluster``).

    For a process of its own: the actors' environment (:func:`worker_env`) is set on the whole process first,
    as an ``init_ray`` on another thread would otherwise change ``os.environ`` under this one's imports."""
    global _early
    if cluster_address(address) or ray.is_initialized() or _early is not None:
        return False
    os.environ.update({**worker_env(torch_threads), **LOOPBACK_ENV})
    if threading.current_thread() is threading.main_thread():  # what ray.init does on the main thread only
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    _early = _EarlyStart((address, num_cpus, namespace, torch_threads))
    _early.thread = threading.Thread(target=_start_in_thread, args=(_early,), name="aapo-ray-start", daemon=True)
    atexit.register(shutdown_ray)  # runs before Ray's own hook (registered at ray's import), after init finished
    _early.thread.start()
    return True


def _start_in_thread(early: _EarlyStart) -> None:
    address, num_cpus, namespace, torch_threads = early.args
    ray_worker_log = logging.getLogger(ray._private.worker.__name__)
    quiet = _EarlyStartLogFilter()
    ray_worker_log.addFilter(quiet)
    try:
        init_ray(address, num_cpus=num_cpus, namespace=namespace, torch_threads=torch_threads)
    except BaseException as exc:  # noqa: BLE001 - raised again by the init_ray that waits for it
        early.error = exc
    finally:
        ray_worker_log.removeFilter(quiet)
        early.done.set()
    # Ray's daemons die with the thread that started them (PR_SET_PDEATHSIG, Ray's services on Linux), so this
    # one stays until the process ends
    threading.Event().wait()


def _await_early_start(args: tuple | None) -> None:
    """Wait for a :func:`start_ray_early` in progress (not from its own thread); raise what it raised. ``args``:
    the waiting init_ray's, which must be those the early start used (None: any, for a shutdown)."""
    if _early is None or threading.current_thread() is _early.thread:
        return
    _early.done.wait()
    if args is not None and args != _early.args:
        raise RuntimeError(f"init_ray{args} after start_ray_early started a cluster with {_early.args}")
    if args is not None and _early.error is not None:
        raise _early.error


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
    it. A joined cluster is only disconnected from, as by ``ray.shutdown()``. Waits for a
    :func:`start_ray_early` in progress first; a no-op where Ray is not initialized."""
    _await_early_start(None)
    if not ray.is_initialized():
        return
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
