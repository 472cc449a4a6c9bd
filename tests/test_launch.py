"""``aapo train``, ``eval``, ``serve`` and ``reference build`` start their local Ray cluster on a thread while they
import torch and check their inputs (:func:`aapo_ray.launch.start_ray_early`); their ``init_ray`` then waits for
that start.

Each case runs in a process of its own: the early start changes that process's environment and (but for the CLI
wiring test's, which only records its arguments) starts a cluster there. Where the time goes:
``benchmarks/startup.py`` (its ``cold_late_ray`` arm is the start as before).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from test_driver_faults import session_processes

EARLY_START = r"""
import json, os, sys, threading, time
import ray
from aapo_ray import launch
from aapo_ray.cli_args import train_ray_cluster
from aapo_ray.config import load_config

def early(overrides):  # as aapo_ray.cli.main does for `aapo train`
    init_args = train_ray_cluster(None, load_config(None, overrides))
    return init_args is not None and launch.start_ray_early(**init_args)

report = {"torch_before": "torch" in sys.modules}
# a run that joins a cluster, keeps its roles, or runs inside a Ray job starts nothing early
report["skipped"] = [early(o) for o in (["ray.address=auto"], ["ray.address=127.0.0.1:6379", "ray.keep_roles=true"])]
os.environ["RAY_ADDRESS"] = "127.0.0.1:1"
report["skipped"].append(early([]))
del os.environ["RAY_ADDRESS"]
cfg = load_config(None, ["run.torch_threads=1"])
report["started"] = early(["run.torch_threads=1"])
report["threads"] = [t.name for t in threading.enumerate()]
report["env_set"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TRANSFORMERS_VERBOSITY")}
import torch  # what the start overlaps
try:
    launch.init_ray(cfg.ray.address, num_cpus=3, namespace=cfg.ray.namespace, torch_threads=1)
except RuntimeError as exc:
    report["mismatch"] = str(exc)
launch.init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace, torch_threads=1)
node = ray._private.worker._global_node
report["daemons"] = [p.process.pid for kind in ("gcs_server", "raylet") for p in node.all_processes.get(kind, [])]
time.sleep(3)  # the start thread's init returned long ago: the cluster must still be there

@ray.remote
def probe():
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TRANSFORMERS_VERBOSITY")}, ray.util.get_node_ip_address()

report["actor_env"], report["node_ip"] = ray.get(probe.remote(), timeout=60)
launch.shutdown_ray()
print(json.dumps(report))
"""


def test_the_early_start_is_the_clusters_start_and_outlives_its_thread():
    proc = subprocess.run([sys.executable, "-c", EARLY_START], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["skipped"] == [False, False, False] and report["started"] is True
    assert not report["torch_before"] and "aapo-ray-start" in report["threads"]
    # set on the whole process before the thread starts, so its imports never see os.environ change
    assert report["env_set"] == {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    assert "after start_ray_early started a cluster with" in report["mismatch"]
    # Ray's daemons were started from the thread (they die with it: PR_SET_PDEATHSIG); still serving tasks
    assert report["actor_env"] == {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    assert report["node_ip"] == "127.0.0.1"
    assert "SIGTERM handler is not set" not in proc.stderr  # Ray's off-main-thread warning: handled here
    time.sleep(1)
    assert not [pid for pid in report["daemons"] if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


CLI_WIRING = r"""
import json, sys, tempfile
import aapo_ray.cli as cli
import aapo_ray.launch as launch

# what each command starts early, and when, is what this checks: the start thread records its arguments and starts
# no cluster (a real one per case cost ~20 CPU-s; the thread's real start is checked by the tests above and below)
launch._start_in_thread = lambda early: early.done.set()

seen = []
def runner(args):  # stands in for the command's runner, which imports torch and the driver
    early = launch._early  # the local cluster started early, with its init_ray arguments
    seen.append([args.command, early.args if early else None, "torch" in sys.modules])
    return 0

cli.command_runner = lambda args, **kwargs: runner
model = tempfile.mkdtemp()  # serve's light check wants a directory (what it holds is checked by its runner)
cases = ((["check-config"], True), (["train", "run.steps=1"], False), (["eval", "m", "--address", "auto"], True),
         (["eval", "m", "--benchmarks", "nosuch"], True), (["train", "run.steps=1"], True), (["eval", "m"], True),
         (["reference", "build", "run.torch_threads=2"], True), (["serve", model, "--torch-threads", "3"], True),
         (["serve", model, "--address", "auto"], True), (["serve", model + "-mistyped"], True),
         (["train", f"model.path={model}-mistyped"], True), (["reference", "build", f"model.path={model}-mistyped"], True))
for argv, early in cases:
    if cli.main(argv, start_ray_early=early) == 2:  # a mistyped flag: refused before any cluster starts
        seen.append([argv[0], "exit 2", launch._early and launch._early.args])
    launch._early = None  # the next case may start afresh (no cluster to stop: see _start_in_thread above)
print(json.dumps(seen))
"""


def test_the_console_scripts_commands_that_start_a_local_cluster_start_it_before_their_runners_import():
    proc = subprocess.run([sys.executable, "-c", CLI_WIRING], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        ["check-config", None, False], ["train", None, False], ["eval", None, False], ["eval", "exit 2", None],
        ["train", [None, None, "aapo", 1], False], ["eval", [None, None, "aapo-eval", 1], False],
        ["reference", [None, None, "aapo", 2], False], ["serve", [None, None, "aapo", 3], False], ["serve", None, False],
        ["serve", "exit 2", None], ["train", "exit 2", None], ["reference", "exit 2", None]]


def test_an_input_error_found_after_the_early_start_is_the_last_line_and_no_ray_process_outlives_it(tiny_model_path,
                                                                                                    tmp_path):
    """The script started its cluster while the driver imported, then the driver found a missing prompts file: the
    error stays the last line (the early start's ray.init logs nothing when it finishes), and nothing lingers."""
    missing = tmp_path / "missing.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "aapo_ray", "train", f"model.path={tiny_model_path}",
                             f"data.train={missing}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    started = set()  # the early start did start a cluster
    while proc.poll() is None:
        try:
            started.update(c.name() for c in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert {"gcs_server", "raylet"} <= started, started
    assert err.strip().splitlines()[-1] == f"FileNotFoundError: prompt data source '{missing}' does not exist"
    assert "Started a local Ray instance" not in err  # the early start's ray.init says nothing after the error
    deadline = time.time() + 30
    while (left := session_processes(proc.pid)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [p.pid for p in left]
