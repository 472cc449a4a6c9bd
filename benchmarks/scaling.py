"""Scaling on this machine (learners 1 vs 2, generator replicas 1 vs 2), and an estimate for 1.5B on GPUs.

Part 1 (measured): the embedded default (AAPO) with learner.num_learners in {1, 2} and
rollout.policy_replicas = rollout.reference_replicas in {1, 2}, interleaved rounds; Ray is given
8 logical CPUs so every layout schedules, and the 2 physical cores are shared by all actors (the
contention is the result). Also measured: object-store throughput for one large weight bucket
(actor -> actor), the path weight sync takes today (learner export_weights -> ray.put -> replica).

Part 2 (estimate, NOT measured): step time for the paper's 1.5B setting (R1-Distill-Qwen-1.5B, 4
prompts x G=6, <= 3584 new tokens, policy + reference generation, ZeRO-2 with CPU optimizer offload)
on 4 and 8 H100s, from the assumptions in ASSUME (each stated and printed) plus the measured
per-step pipeline overhead and object-store throughput.

Usage: python benchmarks/scaling.py [--quick] [--rounds N] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import _common as C

LAYOUTS = {"1L/1+1R": (1, 1), "2L/1+1R": (2, 1), "1L/2+2R": (1, 2), "2L/2+2R": (2, 2)}

# Assumptions for the 1.5B estimate (approximate public figures; change them here).
ASSUME = {
    "params": 1.54e9,                # Qwen2.5-1.5B / R1-Distill-Qwen-1.5B parameter count
    "layers": 28, "hidden": 1536, "kv_heads": 2, "head_dim": 128,
    "h100_bf16_dense_tflops": 989,   # NVIDIA H100 SXM datasheet, dense bf16
    "train_mfu": 0.35,               # assumed model-FLOPs utilisation of a ZeRO-2 learner at ~4k context
    "decode_step_ms": (4.0, 8.0),    # assumed per-token decode latency, SGLang/vLLM with CUDA graphs, batch <= 24,
                                     # 1.5B bf16 on one H100 (HBM floor: 3.1 GB weights / 3.35 TB/s = 0.9 ms)
    "prompt_tokens": 300, "completion_tokens_mean": 3000, "completion_tokens_max": 3584,  # paper: ~3000 early
    "cpu_adam_params_per_s": 1e9,    # assumed DeepSpeed CPUAdam rate per rank on a many-core host (ZeRO-Offload)
    "pcie_gb_s": 20.0,               # assumed effective host<->device bandwidth per GPU (PCIe 4/5, pinned)
    "nccl_bcast_gb_s": 100.0,        # assumed effective NCCL broadcast bandwidth for weight sync (NVLink)
    "server_object_store_gb_s": 5.0, # assumed Ray object-store put+get rate on a GPU server (this VM's is measured)
}


class Holder:
    """Object-store throughput: one actor puts a bucket, another gets it (the weight-sync path)."""

    def make(self, mb: int):
        import ray
        import torch

        t = time.perf_counter()
        ref = ray.put(torch.ones(int(mb * 2**20 / 4)))
        return [ref], time.perf_counter() - t

    def take(self, holder: list):
        import ray

        t = time.perf_counter()
        x = ray.get(holder[0])
        y = x.clone()  # what load_weight_buckets does: copy into the model's parameters
        return time.perf_counter() - t, float(y[0])


def object_store_gb_s(mb: int = 256, rounds: int = 3) -> dict:
    import ray

    C.ensure_ray()
    a, b = (ray.remote(Holder).options(num_cpus=0).remote() for _ in range(2))
    out = []
    for _ in range(rounds + 1):
        (ref,), put_s = ray.get(a.make.remote(mb))
        get_s, _ = ray.get(b.take.remote([ref]))
        out.append((put_s, get_s, mb / 1024 / (put_s + get_s)))
    out = out[1:]
    ray.kill(a), ray.kill(b)
    return {"mb": mb, "put_s": C.median([o[0] for o in out]), "get_copy_s": C.median([o[1] for o in out]),
            "gb_s": C.median([o[2] for o in out])}


def long_score_s(chars: int = 12_000, rounds: int = 7) -> float:
    """Measured: accuracy_reward on one ~3000-token completion (boxed answer last), in-process, this CPU."""
    import random

    from aapo_ray.reward import accuracy_reward

    rng = random.Random(0)
    words = "so we add the next term then simplify the fraction and check the result carefully".split()
    text = " ".join(rng.choice(words) for _ in range(chars // 6)) + " so the answer is $\\boxed{\\frac{3}{4}}$."
    times = []
    for i in range(rounds):
        t = time.perf_counter()
        accuracy_reward(text + " " * i, "0.75")  # a different string each time (the reward memoises the last call)
        times.append(time.perf_counter() - t)
    return C.median(times)


def estimate(overhead_s: float, store_gb_s: float, score_one_s: float = 0.002) -> list[dict]:
    """Step time of the paper's 1.5B AAPO setting on 4 and 8 H100s (an estimate; see ASSUME)."""
    A = ASSUME
    seqs = 4 * 6
    train_tokens = seqs * (A["prompt_tokens"] + A["completion_tokens_mean"])
    attn_flops = 12 * A["layers"] * A["hidden"] * (A["prompt_tokens"] + A["completion_tokens_mean"]) / 2  # per token, fwd+bwd
    flops = (6 * A["params"] + attn_flops) * train_tokens
    weights_gb = A["params"] * 2 / 1e9
    rows = []
    for gpus, layout in [(4, "1 policy + 1 reference engine, 2 learners"), (8, "2 policy + 2 reference engines, 4 learners")]:
        learners = gpus // 2
        # Generation is latency-bound: 24 sequences (12 per engine with 2 replicas) decode for as many steps as
        # the longest completion; policy and reference engines run concurrently on their own GPUs.
        gen = [A["completion_tokens_max"] * ms / 1000 for ms in A["decode_step_ms"]]
        train = flops / learners / (A["h100_bf16_dense_tflops"] * 1e12 * A["train_mfu"])
        # ZeRO-2 + CPU offload: each rank's 1/learners of the parameters get their Adam update on the CPU;
        # its bf16 gradient shard goes down and the bf16 parameter shard comes back over PCIe (4 B/param).
        offload = A["params"] / learners / A["cpu_adam_params_per_s"] + A["params"] * 4 / learners / 1e9 / A["pcie_gb_s"]
        sync_nccl = (weights_gb / A["nccl_bcast_gb_s"],) * 2
        # today's path: GPU->CPU copy, then the object store at a server's rate .. at the rate measured here
        sync_store = tuple(weights_gb / A["pcie_gb_s"] + weights_gb / gb_s for gb_s in (A["server_object_store_gb_s"], store_gb_s))
        rng = lambda a, b, d=0: f"{a:.{d}f}-{b:.{d}f}"  # noqa: E731
        for label, sync in (("NCCL broadcast", sync_nccl), ("object store (today)", sync_store)):
            fixed = [2 * seqs * score_one_s + train + offload + s + overhead_s for s in sync]  # one scorer worker, serial
            step = [gen[0] + fixed[0], gen[1] + fixed[1]]
            rows.append({"gpus": gpus, "layout": layout, "weight sync": label, "generate_s": rng(*gen),
                         "train_s": round(train, 2), "offload_s": round(offload, 2), "sync_s": rng(*sync, d=2),
                         "step_s": rng(*step), "100 steps (min)": rng(step[0] * 100 / 60, step[1] * 100 / 60)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 8 steps")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1 quick, 3 full)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 8 quick, 15 full)")
    args = ap.parse_args()
    C.SUFFIX = "_quick" if args.quick else ""
    rounds, steps = args.rounds or (1 if args.quick else 3), args.steps or (8 if args.quick else 15)
    t0 = time.perf_counter()
    base = C.defaults()
    arms = {name: (lambda r, L=L, R=R: C.run_pipeline({"run.steps": steps, "learner.num_learners": L, "learner.lr": base.learner.lr,
                                                        "rollout.policy_replicas": R, "rollout.reference_replicas": R}))
            for name, (L, R) in LAYOUTS.items()}
    C.run_pipeline({"run.steps": 3})  # warm-up: the first run on a fresh cluster is slower
    runs = C.interleave(arms, rounds)
    layouts = {}
    for name, rs in runs.items():
        st = [r for run in rs for r in C.steady(run["rows"])]
        # median over rounds of each run's median (one disturbed round does not move it)
        m = lambda k: C.median([C.median([r[k] for r in C.steady(run["rows"])]) for run in rs])  # noqa: E731
        layouts[name] = {"step_s": m("time/step_s"), "gen_s": m("time/generate_s"), "ref_gen_s": m("time/ref_generate_s"),
                         "rollout_s": m("time/rollout_s"), "learner_s": m("learner/step_s"), "train_s": m("time/train_s"),
                         "sync_s": m("time/sync_s"), "tokens_per_s": m("tokens_per_s"),
                         "peak_rss_mb": C.median([run["peak_rss_mb"] for run in rs]),
                         "gen_s_per_ktoken": 1000 * C.median([r["time/generate_s"] / r["learner/tokens"] for r in st]),
                         "learner_s_per_ktoken": 1000 * C.median([r["learner/step_s"] / r["learner/tokens"] for r in st]),
                         "other_s": C.median([r["time/step_s"] - r["time/rollout_s"] - r["time/advantage_s"] - r["learner/step_s"]
                                              - r["time/sync_s"] for r in st])}
        layouts[name]["speedup_vs_1L/1+1R"] = None
    for name in layouts:
        layouts[name]["speedup_vs_1L/1+1R"] = layouts["1L/1+1R"]["step_s"] / layouts[name]["step_s"]
    store = object_store_gb_s(64 if args.quick else 256)
    one = layouts["1L/1+1R"]  # per-step cost that is neither generation, learner compute nor sync (tiny-model scoring incl.)
    overhead = one["other_s"] + max(0.0, one["rollout_s"] - max(one["gen_s"], one["ref_gen_s"]))
    score_one = long_score_s()
    est = estimate(overhead, store["gb_s"], score_one)
    result = {"machine": C.machine(), "quick": args.quick, "rounds": rounds, "steps": steps, "layouts": layouts,
              "object_store": store, "pipeline_overhead_s": overhead, "score_one_long_completion_s": score_one, "assumptions": ASSUME, "estimate_1p5b": est,
              "wall_s": time.perf_counter() - t0}
    print(f"\nmeasured on this machine ({result['machine']['cores']} cores), median s/step, AAPO, embedded default")
    print(C.table([{"layout": k, **v} for k, v in layouts.items()],
                  ["layout", "step_s", "speedup_vs_1L/1+1R", "gen_s", "ref_gen_s", "rollout_s", "learner_s", "sync_s",
                   "other_s", "tokens_per_s", "peak_rss_mb"]))
    print(f"object store, one {store['mb']} MB bucket actor->actor: {store['gb_s']:.2f} GB/s "
          f"(put {store['put_s']:.3f} s, get+copy {store['get_copy_s']:.3f} s)")
    print(f"measured: accuracy_reward on one ~3000-token completion {score_one * 1e3:.1f} ms; pipeline overhead "
          f"(not generation, learner compute or sync) {overhead * 1e3:.0f} ms/step")
    print("\nESTIMATE (not measured) for R1-Distill-Qwen-1.5B, 4 prompts x G=6, <=3584 new tokens, AAPO, ZeRO-2 + CPU offload;")
    print("assumptions: " + ", ".join(f"{k}={v}" for k, v in ASSUME.items()))
    print(C.table(est))
    print(f"wall time {result['wall_s']:.0f} s -> {C.save('scaling', result)}")
    plot(result)


def plot(result: dict) -> None:
    fig, ax = C.figure(1, 1, figsize=(7.5, 4))
    names = list(result["layouts"])
    parts = [("rollout_s", "rollout (gen || ref + score)"), ("learner_s", "learner"), ("sync_s", "sync"), ("other_s", "other")]
    bottom = np.zeros(len(names))
    for key, label in parts:
        vals = np.array([max(0.0, result["layouts"][n][key]) for n in names])
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom += vals
    for i, n in enumerate(names):
        ax.text(i, bottom[i], f"{result['layouts'][n]['step_s']:.2f}s", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="median s / step", title="learners (L) x policy+reference replicas (R) on 2 cores")
    ax.legend(fontsize=8)
    print("plot ->", C.savefig(fig, "scaling"))


if __name__ == "__main__":
    sys.exit(main())
