"""Bounded load on ``aapo serve``: many concurrent clients for a fixed time, on loopback.

Starts ``aapo serve MODEL`` (the embedded tiny model by default) as a subprocess on 127.0.0.1,
waits for ``/health``, then runs C client threads for D seconds. Each client loops: a
``/v1/completions`` or ``/v1/chat/completions`` request (a quarter of them streamed), greedy,
``max_tokens`` tokens, 60 s client timeout. Every loop is bounded in count and time. Reports
the error rate (any non-200, in-band stream error, missing ``[DONE]`` or exception counts; the
target is 0), p50/p95/p99 latency, requests/s and completion tokens/s, and whether the server
still answers afterwards. The server is stopped with SIGINT (its process group), then killed
if it does not exit in 60 s.

Usage: python benchmarks/serve_load.py [--quick] [--clients 64] [--duration 60] [--model DIR]
       [--url http://127.0.0.1:8000  (an already running server; nothing is started)]
Writes benchmarks/results/serve_load.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, within: float) -> None:
    import requests

    end = time.monotonic() + within
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"aapo serve exited with {proc.returncode} before it was healthy")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health not ready within {within}s")


def start_server(model: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aapo_ray", "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)  # its own process group: stopped as one below


def stop_server(proc: subprocess.Popen) -> int:
    try:
        os.killpg(proc.pid, signal.SIGINT)  # aapo serve shuts Serve and its Ray cluster down on Ctrl-C
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)
    except ProcessLookupError:
        return proc.wait(timeout=30)


def prompts(n: int) -> list[str]:
    from aapo_ray.synthetic import SyntheticTask

    return [q.rstrip("\n") for q in SyntheticTask().prompts("test", n)]


class Client(threading.Thread):
    """One client: requests back to back until ``deadline`` (at most ``max_requests``)."""

    def __init__(self, k: int, url: str, model: str | None, questions: list[str], deadline: float, args):
        super().__init__(daemon=True)
        self.k, self.url, self.model, self.questions, self.deadline, self.args = k, url, model, questions, deadline, args
        self.latencies: list[float] = []
        self.first_token: list[float] = []
        self.tokens = 0
        self.errors: list[str] = []
        self.ok = 0

    def one(self, session, j: int) -> None:
        q = self.questions[(self.k * 7919 + j) % len(self.questions)]
        chat = (self.k + j) % 2 == 1
        stream = (self.k + j) % 4 == 0
        body: dict = {"max_tokens": self.args.max_tokens, "temperature": 0, "stream": stream}
        if self.model:
            body["model"] = self.model
        if chat:
            body["messages"] = [{"role": "user", "content": q}]
        else:
            body["prompt"] = q + "\n"
        if stream:
            body["stream_options"] = {"include_usage": True}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        t = time.perf_counter()
        r = session.post(self.url + path, json=body, stream=stream, timeout=self.args.request_timeout)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        if stream:
            done, first = False, None
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"in-band error: {event['error']}")
                if event.get("usage"):
                    self.tokens += event["usage"]["completion_tokens"]
                if first is None and event.get("choices"):
                    first = time.perf_counter() - t
            if not done:
                raise RuntimeError("stream ended without [DONE]")
            if first is not None:
                self.first_token.append(first)
        else:
            self.tokens += r.json()["usage"]["completion_tokens"]
        self.latencies.append(time.perf_counter() - t)
        self.ok += 1

    def run(self) -> None:
        import requests

        session = requests.Session()
        for j in range(self.args.max_requests_per_client):
            if time.monotonic() >= self.deadline:
                break
            try:
                self.one(session, j)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                session = requests.Session()


def run_load(url: str, model: str | None, args) -> dict:
    questions = prompts(200)
    import requests

    for q in questions[:4]:  # warm-up, not measured
        requests.post(f"{url}/v1/completions", json={"prompt": q + "\n", "max_tokens": args.max_tokens,
                                                     "temperature": 0}, timeout=120).raise_for_status()
    start = time.monotonic()
    deadline = start + args.duration
    clients = [Client(k, url, model, questions, deadline, args) for k in range(args.clients)]
    load0 = os.getloadavg()
    for c in clients:
        c.start()
    for c in clients:  # bounded: a client stops starting requests at the deadline, each request has a timeout
        c.join(timeout=max(1.0, deadline - time.monotonic()) + args.request_timeout + 30)
    wall = time.monotonic() - start
    hung = sum(c.is_alive() for c in clients)
    lat = [x for c in clients for x in c.latencies]
    ttft = [x for c in clients for x in c.first_token]
    errors = [e for c in clients for e in c.errors]
    total = len(lat) + len(errors) + hung
    health = None
    try:
        health = requests.get(f"{url}/health", timeout=30).status_code
    except requests.RequestException as exc:
        health = repr(exc)
    return {
        "requests": total, "ok": len(lat), "errors": len(errors) + hung, "hung_clients": hung,
        "error_rate": (len(errors) + hung) / total if total else None,
        "first_errors": errors[:10],
        "wall_s": round(wall, 2), "req_s": round(len(lat) / wall, 2),
        "completion_tokens_per_s": round(sum(c.tokens for c in clients) / wall, 1),
        "latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": max(lat, default=None),
                      "mean": sum(lat) / len(lat) if lat else None},
        "stream_first_chunk_s": {"n": len(ttft), "p50": pct(ttft, 50), "p95": pct(ttft, 95)},
        "health_after": health, "loadavg_1m_before": load0[0], "loadavg_1m_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 clients x 15 s")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 64; quick 16)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (default 60; quick 15)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=60.0, help="client-side timeout per request")
    ap.add_argument("--max-requests-per-client", type=int, default=100_000)
    ap.add_argument("--model", help="run dir or HF model dir (default: the embedded tiny model, built once)")
    ap.add_argument("--url", help="use a running server (e.g. http://127.0.0.1:8000): nothing is started")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `aapo serve` argument (repeatable)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)
    args.clients = args.clients or (16 if args.quick else 64)
    args.duration = args.duration or (15.0 if args.quick else 60.0)
    if not args.url.startswith(("http://127.0.0.1", "http://localhost")) if args.url else False:
        ap.error("--url must be a loopback address (http://127.0.0.1:PORT)")

    proc, model_name = None, None
    url = args.url
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.gettempdir()) / f"serve_load-{os.getpid()}.server.log"
    if url is None:
        if args.model is None:
            from aapo_ray.embedded import default_model_path

            args.model = default_model_path(progress=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args.model, port, log, args.serve_arg)
        print(f"serve_load: starting aapo serve {args.model} on {url} (log {log})", flush=True)
    try:
        t0 = time.monotonic()
        wait_healthy(url, proc, within=600)
        startup = time.monotonic() - t0
        import requests

        model_name = requests.get(f"{url}/health", timeout=10).json().get("model")
        print(f"serve_load: healthy after {startup:.1f}s; {args.clients} clients x {args.duration:g}s", flush=True)
        result = run_load(url, model_name, args)
    finally:
        exit_code = stop_server(proc) if proc is not None else None
    out = {
        "benchmark": "serve_load", "quick": args.quick, "clients": args.clients, "duration_s": args.duration,
        "max_tokens": args.max_tokens, "mix": "1/2 chat, 1/2 completions; 1/4 streamed; greedy",
        "model": args.model or model_name, "url": url, "server_log": str(log) if proc else None, "server_startup_s": round(startup, 1),
        "server_exit_code": exit_code, **result,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "note": "2 shared cores: client threads, the Serve proxy and the replica compete for them"},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    lat = out["latency_s"]
    print(f"serve_load: {out['requests']} requests, error rate {out['error_rate']:.4f}, {out['req_s']} req/s, "
          f"p50 {lat['p50']:.3f}s p95 {lat['p95']:.3f}s p99 {lat['p99']:.3f}s -> {args.out}")
    return 0 if out["errors"] == 0 and out["health_after"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
