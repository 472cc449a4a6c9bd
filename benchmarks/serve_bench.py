"""Throughput and latency of ``aapo serve`` against the same model's bare in-process ``generate``.

For each concurrency C: C client threads send non-streaming ``/v1/completions`` requests (greedy,
fixed ``max_tokens``) over HTTP to a one-replica Serve app on a local Ray cluster; requests/s and
p50/p95 latency are measured, plus the time to the first streamed token (p50) with C streaming
clients. The baseline is ``HFBackend.generate`` called in this process on batches of C of the same
prompts (what perfect batching with zero serving overhead would give); the ratio is Serve req/s
over bare req/s. Both use one torch thread (the replica's default).

Usage: python benchmarks/serve_bench.py [--quick] [--model DIR] [--concurrency 1 4 16]
Writes benchmarks/results/serve_bench.json.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import aapo_ray.launch  # noqa: E402,F401  (Ray's local-only env before ray is imported)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def bare(backend, prompts, concurrency, rounds, max_tokens):
    from aapo_ray.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_tokens)
    ids = [backend.tokenizer(p)["input_ids"] for p in prompts]
    backend.generate(ids[:concurrency], params)  # warm-up
    lat, start = [], time.perf_counter()
    for r in range(rounds):
        batch = [ids[(r * concurrency + i) % len(ids)] for i in range(concurrency)]
        t = time.perf_counter()
        backend.generate(batch, params)
        lat += [time.perf_counter() - t] * concurrency
    wall = time.perf_counter() - start
    return {"req_s": concurrency * rounds / wall, "p50_s": pct(lat, 50), "p95_s": pct(lat, 95)}


def served(url, prompts, concurrency, per_client, max_tokens, stream=False):
    import requests

    lat, errors = [], []

    def client(k):
        session = requests.Session()
        for j in range(per_client):
            body = {"model": "bench", "prompt": prompts[(k * per_client + j) % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": stream}
            t = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/completions", json=body, stream=stream, timeout=300)
                r.raise_for_status()
                if stream:  # time to the first chunk with text
                    for line in r.iter_lines():
                        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                            lat.append(time.perf_counter() - t)
                            break
                    for _ in r.iter_lines():
                        pass
                else:
                    r.json()
                    lat.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return {"req_s": concurrency * per_client / wall, "p50_s": pct(lat, 50), "p95_s": pct(lat, 95)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model dir or run dir (default: the built-in tiny model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (serve)")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="Serve's batch_wait_timeout_s")
    ap.add_argument("--quick", action="store_true", help="fewer requests (< ~2 min)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_bench.json"))
    args = ap.parse_args()
    total = 32 if args.quick else args.requests

    import torch
    from ray import serve

    from aapo_ray.backends import HFBackend
    from aapo_ray.launch import init_ray
    from aapo_ray.checkpoint import resolve_model_dir
    from aapo_ray.serve import build_app
    from aapo_ray.synthetic import SyntheticTask

    torch.set_num_threads(1)
    if args.model:
        model_dir = str(resolve_model_dir(args.model)[0])
    else:
        from aapo_ray.embedded import default_model_path

        model_dir = default_model_path(progress=False)
    prompts = SyntheticTask().prompts("test", 64)

    backend = HFBackend.load(model_dir, device="cpu")
    base = {c: bare(backend, prompts, c, max(2, total // c), args.max_tokens) for c in args.concurrency}
    del backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=2, namespace="serve-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(model_dir, name="bench", max_batch_size=max(args.concurrency), num_cpus=1,
                        batch_wait_timeout_s=args.batch_wait),
              name="serve-bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    served(url, prompts, 2, 2, args.max_tokens)  # warm-up
    rows = []
    try:
        for c in args.concurrency:
            per_client = max(1, total // c)
            res = served(url, prompts, c, per_client, args.max_tokens)
            ttft = served(url, prompts, c, max(1, per_client // 2), args.max_tokens, stream=True)
            rows.append({"concurrency": c, "serve": res, "serve_stream_ttft_p50_s": ttft["p50_s"],
                         "bare_generate": base[c], "ratio_req_s": res["req_s"] / base[c]["req_s"]})
    finally:
        serve.shutdown()

    print(f"\nmodel {model_dir}, max_tokens {args.max_tokens}, greedy, 1 torch thread, {os.cpu_count()} CPUs")
    print(f"{'conc':>4} | {'serve req/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'ttft p50':>8} | "
          f"{'bare req/s':>10} {'p50 ms':>8} {'p95 ms':>8} | {'ratio':>5}")
    for r in rows:
        s, b = r["serve"], r["bare_generate"]
        print(f"{r['concurrency']:>4} | {s['req_s']:>11.1f} {s['p50_s'] * 1e3:>8.0f} {s['p95_s'] * 1e3:>8.0f} "
              f"{r['serve_stream_ttft_p50_s'] * 1e3:>8.0f} | {b['req_s']:>10.1f} {b['p50_s'] * 1e3:>8.0f} "
              f"{b['p95_s'] * 1e3:>8.0f} | {r['ratio_req_s']:>5.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_dir, "max_tokens": args.max_tokens, "quick": args.quick,
                               "batch_wait_timeout_s": args.batch_wait, "cpus": os.cpu_count(),
                               "machine": platform.machine(), "results": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
