"""``aapo eval`` on a 2-node-shaped Ray cluster: two ``ray start`` processes on 127.0.0.1 with token
authentication (the token passed to both nodes and to the client, as on a real cluster)."""

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(temp_dir: Path, port: int) -> None:
    """Kill this cluster's processes only (``ray stop`` would kill every Ray on the machine)."""
    marks = (str(temp_dir), f":{port}")
    procs = [p for p in psutil.process_iter(["cmdline"])
             if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def _ray_start(args: list[str], env: dict) -> None:
    proc = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ray start {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_eval_distributes_over_two_nodes(tiny_model_path, tmp_path):
    """Each node offers 2 CPUs and each generator asks for 1.5, so two generators can only run one per
    node; the samples name the node that generated them."""
    port, temp_dir = _free_port(), Path("/tmp") / f"aapo-2n-{secrets.token_hex(3)}"  # short: socket path limit
    env = {k: v for k, v in os.environ.items()  # as in a user's shell: aapo_ray pins a local cluster to one node
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    try:
        _ray_start(["--head", "--port", str(port), "--include-dashboard", "false", *common], env)
        _ray_start(["--address", f"127.0.0.1:{port}", *common], env)
        out = tmp_path / "eval"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "aapo_ray.cli", "eval", str(tiny_model_path), "--address",
                               f"127.0.0.1:{port}", "--generators", "2", "--cpus-per-generator", "1.5",
                               "--benchmarks", "gsm8k", "--limit", "8", "--samples", "2", "--max-new-tokens", "8",
                               "--problems-per-batch", "1", "--quiet", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert time.perf_counter() - start < 600
    finally:
        _stop(temp_dir, port)
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(samples) == 8 * 2
    assert len({r["node"] for r in samples}) == 2  # both nodes generated
