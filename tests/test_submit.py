"""`aapo submit`: its checks before anything is submitted, and a real `ray job submit` against a real local Ray
head (`ray start --head`): a short training run that SUCCEEDS and one that FAILS on the cluster. (The KubeRay
manifests it submits to on a real cluster: tests/test_cluster.py.)"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster" / "configs").glob("*.yaml"))


# ----------------------------------------------------------------------------- aapo submit (no cluster)
def test_submit_argv_and_entrypoint():
    from aapo_ray import submit
    from aapo_ray.cli import build_parser, command_runner

    assert submit.train_argv(["--", "train", "run.steps=2"]) == ["train", "run.steps=2"]
    assert submit.train_argv(["run.steps=2"]) == ["train", "run.steps=2"]
    with pytest.raises(submit.SubmitError, match="not `aapo serve`"):
        submit.train_argv(["serve", "x"])
    with pytest.raises(submit.SubmitError, match="nothing to submit"):
        submit.train_argv(["--"])
    args = build_parser().parse_args(["submit", "--address", "http://h:8265", "--", "train", "run.steps=2"])
    assert command_runner(args) is submit.run and args.train_args[-2:] == ["train", "run.steps=2"]
    targs, cfg = submit.check_train_command(["train", "run.steps=2", "run.name=a b"])
    entry = submit.build_entrypoint("aapo", ["train", "run.steps=2", "run.name=a b"], targs, cfg)
    assert shlex.split(entry) == ["aapo", "train", "run.steps=2", "run.name=a b", "--address", "auto", "--no-progress"]
    targs, cfg = submit.check_train_command(["train", "--config", str(CONFIGS[0])])
    assert "--address" not in submit.build_entrypoint("aapo", ["train"], targs, cfg)  # the config says auto


def test_submit_rejects_bad_commands_before_submitting(capsys):
    from aapo_ray.cli import main

    nowhere = "http://127.0.0.1:9"  # nothing listens: reaching it would be exit status 1, not 2
    assert main(["submit", "--address", nowhere, "--", "train", "algo.group_size=0"]) == 2
    assert "algo.group_size" in capsys.readouterr().err
    assert main(["submit", "--address", nowhere, "--", "train", "algo.groupsize=6"]) == 2
    assert "did you mean 'group_size'" in capsys.readouterr().err
    assert main(["submit", "--address", nowhere, "--", "train", "--config", "/nonexistent.yaml"]) == 2
    assert "--no-validate" in capsys.readouterr().err
    assert main(["submit", "--address", nowhere, "--", "train", "--bogus-flag"]) == 2
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
    assert main(["submit", "--address", nowhere, "--runtime-env", "/nonexistent.yaml", "--", "train"]) == 2
    assert main(["submit", "--address", nowhere, "--", "train", "run.steps=1"]) == 1  # valid, but no cluster
    assert "could not submit" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real `ray job submit`
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_with(marker: str) -> list[int]:
    """Ids of the processes whose environment carries ``marker`` (ours: the head and its children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 started with the venv's `ray start --head --block` (this test's only:
    own ports, temp dir and token; stopped by signalling its processes, never `ray stop`)."""
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    if not ray_bin.exists():
        pytest.skip("the `ray` CLI is not next to this Python")
    temp_dir = tempfile.mkdtemp(prefix="aapo-rj-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent = _free_ports(4)
    marker = f"AAPO_TEST_RAY_HEAD={uuid.uuid4().hex}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing from another cluster
    env = dict(base, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    key, _, value = marker.partition("=")
    env[key] = value
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{address}/api/jobs/",
                                             headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job server at {address} did not come up:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "env": env, "temp_dir": temp_dir}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        time.sleep(1)
        for pid in _processes_with(marker):  # anything left (workers, job drivers): ours only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)  # with its ray_current_cluster file


def _submit(ray_head, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "aapo_ray", "submit", "--address", ray_head["address"], *args]
    return subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.timeout(600)
def test_submit_runs_a_training_job(ray_head, tiny_model_path, tmp_path):
    """A config file shipped with --working-dir (checked here in that dir), plus overrides."""
    job_dir, out = tmp_path / "job", tmp_path / "runs"
    job_dir.mkdir()
    (job_dir / "small.yaml").write_text(yaml.safe_dump({
        "run": {"steps": 2, "eval_every": 0, "save_every": 0, "name": "submitted"},
        "rollout": {"prompts_per_step": 2, "max_new_tokens": 8}, "algo": {"group_size": 2},
        "data": {"eval": "synthetic:test:8"}}))
    result = _submit(ray_head, "--working-dir", str(job_dir), "--", "train", "--config", "small.yaml",
                     f"model.path={tiny_model_path}", f"run.output_dir={out}")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    assert re.search(r"job \S+ SUCCEEDED", result.stdout), text[-4000:]
    assert "config OK (aapo, 2 steps, 4 completions/step" in result.stdout
    assert f"run directory: {out / 'submitted'}" in result.stdout  # the job's own log, streamed here
    run_dir = out / "submitted"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    assert (run_dir / "checkpoints" / "step_000002" / "state.json").is_file()
    assert (run_dir / "checkpoints" / "step_000002" / "hf" / "config.json").is_file()


@pytest.mark.timeout(300)
def test_submit_reports_a_failed_job(ray_head, tmp_path):
    result = _submit(ray_head, "--", "train", "model.path=/nonexistent/model", "run.steps=1",
                     f"run.output_dir={tmp_path}", timeout=240)
    text = result.stdout + result.stderr
    assert result.returncode == 1, text[-4000:]
    assert "config OK" in result.stdout  # valid here: the path only fails on the cluster
    assert re.search(r"job \S+ FAILED", result.stderr), text[-4000:]
    assert "/nonexistent/model" in result.stdout  # the driver's error, streamed from the job's log
    summary = result.stderr[result.stderr.index("FAILED"):]
    assert "exit code 2" in summary and "error: aapo train: model.path=/nonexistent/model: no such directory" in summary
