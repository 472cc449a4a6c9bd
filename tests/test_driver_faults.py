"""A SIGKILLed or interrupted driver, then ``aapo train --resume``: each case runs ``aapo train`` twice as a
user would, in a session of its own (kept apart from tests/test_faults.py so that parallel test workers
can take the two files at once)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from aapo_ray.metrics import read_metrics
from test_faults import overrides, steps_of


def _default_sigint():
    """A test runner started in the background of a non-interactive shell (``cmd &``) inherits SIGINT
    ignored, and so would every process it starts: give the driver the Ctrl-C a terminal user has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _aapo(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "aapo_ray", "train", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_default_sigint, **popen)


def _wait_for_step(run_dir, proc, step, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and steps_of(run_dir) and max(steps_of(run_dir)) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    pytest.fail("run did not reach step %d" % step)


def session_processes(sid):
    alive = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                alive.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return alive


def test_a_swallowed_ctrl_c_is_still_seen():
    from aapo_ray.launch import interrupt_latch

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the runner inherited
    with interrupt_latch() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            pytest.fail("SIGINT did not raise KeyboardInterrupt")
        except KeyboardInterrupt:
            pass  # e.g. raised inside a finalizer, where Python drops it
        assert interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, before)


# Each factor is covered once, not every combination (each case is two cold runs, ~45 s alone): a SIGKILL
# resumes from the checkpoint before the kill and re-runs the steps after it, here with a step already
# started under the old weights (overlap 1); a Ctrl-C resumes from the checkpoint it saved on the way out.
@pytest.mark.parametrize("how, overlap", [("ctrl_c", 0), ("sigkill", 1)])
def test_driver_killed_or_interrupted_then_resumed(tiny_model_path, tmp_path, how, overlap):
    run_dir = tmp_path / "run"
    args = overrides(tiny_model_path, tmp_path, **{"run.save_every": 3, "rollout.overlap": overlap})
    proc = _aapo("--run-dir", str(run_dir), *args)
    _wait_for_step(run_dir, proc, 4)
    sid = os.getsid(proc.pid)
    if how == "sigkill":  # the whole session dies at once, as on a lost node
        os.killpg(sid, signal.SIGKILL)
        proc.wait(timeout=60)
    else:  # a terminal's Ctrl-C goes to the whole foreground process group
        os.killpg(sid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 130, out[-3000:]
        logged = max(steps_of(run_dir))
        done = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "state.json").exists())
        assert done[-1] == f"step_{logged:06d}" or "during a learner update" in out, (done, logged, out[-2000:])
        deadline = time.time() + 60
        while session_processes(sid) and time.time() < deadline:  # Ray's processes shut down with the driver
            time.sleep(0.5)
        assert not session_processes(sid)
    resumed = _aapo("--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert steps_of(run_dir) == list(range(7))
    staleness = [r["rollout/staleness_max"] for r in read_metrics(run_dir)[1:]]
    assert max(staleness) == overlap and staleness[3] == 0  # step 4, the first after the resume, is fresh
    for p in session_processes(sid):  # nothing of the killed run may linger
        p.kill()
