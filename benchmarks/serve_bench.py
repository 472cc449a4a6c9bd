"""Throughput and latency of ``aapo serve`` against the same model's bare in-process ``generate``.

For each concurrency C: C client threads send non-streaming ``/v1/completions`` requests (greedy,
fixed ``max_tokens``) over HTTP to one-replica Serve apps on a local Ray cluster; requests/s and
p50/p95 latency are measured, plus the time to the first streamed token (p50) with C streaming
clients. Two Serve apps run side by side, one per batching mode: ``continuous`` (the default: every
row joins transformers' continuous-batching engine as it arrives) and ``grouped`` (``@serve.batch``,
one ``generate`` per identical sampling params). The baseline is ``HFBackend.generate`` called in
this process on batches of C of the same prompts (what perfect batching with zero serving overhead
would give); next to it, the same model's continuous-batching engine alone in this process, under Serve's
load shape (C closed-loop clients, no HTTP: ``engine`` in the table, its req/s over bare). Serve over bare is
then engine over bare (the engine's own cost) times Serve over engine (the serving overhead). Arms run interleaved, round by round (bare, continuous, grouped, rotated each round),
and each ratio (Serve req/s over bare req/s) is taken per round, then the median: absolute times on a
shared machine drift. Everything uses one torch thread (the replica's default).

Usage: python benchmarks/serve_bench.py [--quick] [--model DIR] [--concurrency 1 4 16] [--rounds 3]
Writes benchmarks/results/serve_bench.json (serve_bench_quick.json with --quick).
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


def bare_continuous(engine, tokenizer, prompts, concurrency, per_client, max_tokens):
    """The continuous-batching engine alone, in this process, under Serve's load shape: C closed-loop clients,
    each submitting its next request the moment its last one finished (no HTTP, no Serve)."""
    import asyncio

    from aapo_ray.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_tokens)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    lat = []

    async def client(k, n):
        loop = asyncio.get_running_loop()
        for j in range(n):
            done = loop.create_future()
            t = time.perf_counter()
            engine.submit(ids[(k * n + j) % len(ids)], params,
                          lambda out, f=done: out.is_finished() and not f.done() and f.set_result(out), stream=False)
            await done
            lat.append(time.perf_counter() - t)

    async def clients(n):
        await asyncio.gather(*(client(k, n) for k in range(concurrency)))

    asyncio.run(clients(1))  # warm-up
    lat.clear()
    start = time.perf_counter()
    asyncio.run(clients(per_client))
    wall = time.perf_counter() - start
    return {"req_s": concurrency * per_client / wall, "p50_s": pct(lat, 50), "p95_s": pct(lat, 95)}


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
                if stream:  # time to the first chunk with text, then the rest read (one line iterator: a
                    lines = r.iter_lines()  # second one would drop the first's buffer, and the connection)
                    for line in lines:
                        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                            lat.append(time.perf_counter() - t)
                            break
                    assert [line for line in lines if line][-1] == b"data: [DONE]"
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


MODES = ("continuous", "grouped")
TARGET = 0.8  # Serve's req/s over bare batched generate at 16 clients (issue 17)
# ~27M parameters (hidden 512, 8 layers), untrained: no EOS, so every request decodes all max_tokens
LARGER = ('{"model": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, '
          '"intermediate_size": 1536, "max_position_embeddings": 256}, "sft": {"steps": 0}, "eval": {"n": 8}}')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model dir or run dir (default: the built-in tiny model)")
    ap.add_argument("--recipe", type=json.loads, help="embedded-model recipe overrides as JSON, e.g. a larger "
                    "model (one where a decoding step costs more than a request's serving overhead): " + LARGER)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level, arm and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median over rounds)")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="grouped mode's batch_wait_timeout_s")
    ap.add_argument("--quick", action="store_true", help="fewer requests and rounds (a few minutes)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/serve_bench[_quick].json)")
    args = ap.parse_args()
    total, rounds = (32, 2) if args.quick else (args.requests, args.rounds)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"serve_bench{'_quick' if args.quick else ''}.json")

    import torch
    from ray import serve

    from aapo_ray.backends import HFBackend
    from aapo_ray.continuous_batching import continuous_engine
    from aapo_ray.launch import init_ray
    from aapo_ray.checkpoint import resolve_model_dir
    from aapo_ray.compare import mean_ci
    from aapo_ray.serve import build_app
    from aapo_ray.synthetic import SyntheticTask

    torch.set_num_threads(1)
    if args.model:
        model_dir = str(resolve_model_dir(args.model)[0])
    else:
        from aapo_ray.embedded import default_model_path

        model_dir = str(default_model_path(progress=False, recipe=args.recipe))
    prompts = SyntheticTask().prompts("test", 64)
    backend = HFBackend.load(model_dir, device="cpu")
    engine = continuous_engine(backend, max(args.concurrency))  # idle while `bare` generates

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=2, namespace="serve-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for mode in MODES:
        serve.run(build_app(model_dir, name="bench", batching=mode, max_batch_size=max(args.concurrency),
                            num_cpus=1, batch_wait_timeout_s=args.batch_wait),
                  name=f"serve-bench-{mode}", route_prefix=f"/{mode}")
    urls = {mode: f"http://127.0.0.1:{port}/{mode}" for mode in MODES}
    for url in urls.values():
        served(url, prompts, 2, 2, args.max_tokens)  # warm-up
    results = {c: {arm: [] for arm in ("bare", *MODES)} for c in args.concurrency}
    try:
        for r in range(rounds):
            for c in args.concurrency:
                per_client = max(1, total // c)
                arms = ["bare", *MODES]
                for arm in arms[r % 3:] + arms[:r % 3]:  # rotate the order each round
                    if arm == "bare":
                        res = bare(backend, prompts, c, max(2, total // c), args.max_tokens)
                        res["engine_alone_req_s"] = bare_continuous(engine, backend.tokenizer, prompts, c,
                                                                    per_client, args.max_tokens)["req_s"]
                    else:
                        res = served(urls[arm], prompts, c, per_client, args.max_tokens)
                        res["ttft_p50_s"] = served(urls[arm], prompts, c, max(1, per_client // 2), args.max_tokens,
                                                   stream=True)["p50_s"]
                    results[c][arm].append(res)
                    print(f"round {r + 1}/{rounds} c={c} {arm}: {res['req_s']:.1f} req/s", flush=True)
    finally:
        serve.shutdown()
        engine.close()

    rows = []
    for c, arms in results.items():
        row = {"concurrency": c}
        for arm, runs in arms.items():
            row[arm] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            row[arm]["per_round"] = runs
            if arm == "bare":
                row["ratio_engine_alone"] = statistics.median(run["engine_alone_req_s"] / run["req_s"] for run in runs)
            else:
                row[f"ratio_{arm}"] = statistics.median(run["req_s"] / b["req_s"] for run, b in zip(runs, arms["bare"]))
                row[f"ratio_{arm}_over_engine"] = statistics.median(run["req_s"] / b["engine_alone_req_s"]
                                                                    for run, b in zip(runs, arms["bare"]))
                row[f"ratio_{arm}_per_round"] = [run["req_s"] / b["req_s"] for run, b in zip(runs, arms["bare"])]
                row[f"ratio_{arm}_mean_ci95"] = mean_ci(row[f"ratio_{arm}_per_round"])
        rows.append(row)

    print(f"\nmodel {model_dir}, max_tokens {args.max_tokens}, greedy, 1 torch thread, {os.cpu_count()} CPUs, "
          f"{rounds} interleaved rounds x {total} requests per arm; medians, ratios per round")
    print("ratio: Serve / bare; /eng: Serve / the engine alone (the serving overhead)")
    print(f"{'conc':>4} | {'bare req/s':>10} {'engine':>7} | {'continuous':>10} {'ratio':>5} {'/eng':>5} {'p50 ms':>7} "
          f"{'ttft ms':>7} | {'grouped':>8} {'ratio':>5} {'/eng':>5} {'p50 ms':>7} {'ttft ms':>7}")
    for r in rows:
        cells = [f"{r['concurrency']:>4}", f"{r['bare']['req_s']:>10.1f} {r['ratio_engine_alone']:>7.2f}"]
        for mode, width in (("continuous", 10), ("grouped", 8)):
            m = r[mode]
            cells.append(f"{m['req_s']:>{width}.1f} {r['ratio_' + mode]:>5.2f} {r[f'ratio_{mode}_over_engine']:>5.2f} "
                         f"{m['p50_s'] * 1e3:>7.0f} "
                         f"{m['ttft_p50_s'] * 1e3:>7.0f}")
        print(" | ".join(cells))
    for r in rows:  # the 0.8x target against the noise between rounds
        for mode in MODES:
            mean, lo, hi = r[f"ratio_{mode}_mean_ci95"]
            verdict = ("met" if lo >= TARGET else "missed" if hi < TARGET else "inside the noise") if lo == lo else "n/a"
            print(f"c={r['concurrency']} {mode} / bare per round {' '.join(f'{x:.2f}' for x in r[f'ratio_{mode}_per_round'])}"
                  f": mean {mean:.2f}, 95% CI [{lo:.2f}, {hi:.2f}]; the {TARGET}x target: {verdict}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_dir, "recipe": args.recipe, "max_tokens": args.max_tokens,
                               "quick": args.quick, "rounds": rounds, "requests_per_arm": total,
                               "batch_wait_timeout_s": args.batch_wait, "cpus": os.cpu_count(),
                               "loadavg_at_end": os.getloadavg(), "machine": platform.machine(),
                               "results": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
