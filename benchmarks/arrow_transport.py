"""Rollout transport through the Ray object store: Arrow record batches vs pickled lists vs tensors.

A generator actor builds a rollout batch (N completions, 256-token prompts, completion lengths
uniform in [L/4, L]) in one of three formats and ``ray.put`` s it; the driver ``ray.get`` s it, adds
an advantage column and ``ray.put`` s it again (what ``aapo_ray.driver`` does); a learner actor
``ray.get`` s it and makes padded ``input_ids`` / ``attention_mask`` / ``completion_mask`` tensors.
  arrow   RecordBatch from aapo_ray.rollout.make_rollout_batch (list<int32> tokens); learner: padded_tensors
  pickle  dict of Python lists (list[list[int]] tokens); learner: per-row torch.tensor into a padded tensor
  tensor  dict of torch tensors, padded on the generator (int64 ids + masks, as peers ship them)
Text columns are left empty in every format, so only token transport is compared. Reported
(median over rounds, formats interleaved, first round dropped): payload MB, generator put, driver
get+put wall and CPU (process_time), learner get and pad, end-to-end latency (put -> learner
tensors ready) and MB/s (payload / latency), and each format's latency relative to Arrow.

Usage: python benchmarks/arrow_transport.py [--quick] [--rounds N] [--rows 512] [--lengths 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time

import numpy as np

import _common as C

PROMPT_LEN = 256
VOCAB = 151_665  # Qwen2.5's vocabulary: ids above 65535 pickle as 5 bytes, not 3
FORMATS = ["arrow", "pickle", "tensor"]


def _tokens(rows: int, length: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, PROMPT_LEN, dtype=np.int32) for _ in range(rows)]
    lengths = rng.integers(length // 4, length + 1, rows)
    completions = [rng.integers(3, VOCAB, n, dtype=np.int32) for n in lengths]
    return prompts, completions


def _pad(prompts, completions):
    import torch

    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attn, mask = torch.zeros_like(ids), torch.zeros(len(prompts), width)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(list(p) + list(c)) if isinstance(p, list) else torch.from_numpy(np.concatenate([p, c]))
        attn[i, :n] = 1
        mask[i, len(p):n] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": mask}


class Generator:
    def produce(self, fmt: str, rows: int, length: int, seed: int):
        import ray

        from aapo_ray.rollout import make_rollout_batch

        t0 = time.perf_counter()
        prompts, completions = _tokens(rows, length, seed)
        groups = np.arange(rows) // 8
        if fmt == "arrow":
            obj = make_rollout_batch(prompt_ids=prompts, completion_ids=completions, prompt_id=groups, group_index=groups,
                                     sample_index=np.arange(rows) % 8, prompt=[""] * rows, completion=[""] * rows,
                                     gold=[""] * rows, finish_reason=["stop"] * rows, weight_version=0)
            nbytes = obj.get_total_buffer_size()
        elif fmt == "pickle":
            obj = {"prompt_ids": [p.tolist() for p in prompts], "completion_ids": [c.tolist() for c in completions],
                   "group_index": groups.tolist(), "sample_index": (np.arange(rows) % 8).tolist(),
                   "reward": [0.0] * rows}
            nbytes = len(pickle.dumps(obj, protocol=5))
        else:
            obj = {**_pad(prompts, completions), "group_index": __import__("torch").from_numpy(groups),
                   "reward": __import__("torch").zeros(rows)}
            nbytes = sum(t.numel() * t.element_size() for t in obj.values())
        t1 = time.perf_counter()
        ref = ray.put(obj)
        tokens = rows * PROMPT_LEN + sum(len(c) for c in completions)
        return [ref], {"build_s": t1 - t0, "put_s": time.perf_counter() - t1, "mb": nbytes / 2**20, "tokens": tokens}


class Learner:
    def consume(self, holder: list, fmt: str):
        import ray

        from aapo_ray.rollout import padded_tensors

        t0 = time.perf_counter()
        obj = ray.get(holder[0])
        t1 = time.perf_counter()
        if fmt == "arrow":
            tensors = padded_tensors(obj, pad_id=0)
        elif fmt == "pickle":
            tensors = _pad(obj["prompt_ids"], obj["completion_ids"])
        else:
            tensors = obj
        assert tensors["input_ids"].shape[0] == (obj.num_rows if fmt == "arrow" else len(obj["reward"]))
        return {"get_s": t1 - t0, "pad_s": time.perf_counter() - t1, "done": time.perf_counter()}


def one_transfer(gen, learner, fmt: str, rows: int, length: int, seed: int) -> dict:
    import ray
    import torch

    from aapo_ray.rollout import with_columns

    (inner,), g = ray.get(gen.produce.remote(fmt, rows, length, seed))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    obj = ray.get(inner)
    adv = np.random.default_rng(seed).standard_normal(rows).astype(np.float32)
    if fmt == "arrow":
        obj = with_columns(obj, advantage=adv)
    elif fmt == "pickle":
        obj["advantage"] = adv.tolist()
    else:
        obj["advantage"] = torch.from_numpy(adv)
    ref = ray.put(obj)
    driver_s, driver_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    del obj
    out = ray.get(learner.consume.remote([ref], fmt))
    latency = g["put_s"] + (time.perf_counter() - wall0)
    return {**g, "driver_s": driver_s, "driver_cpu_s": driver_cpu, "learner_get_s": out["get_s"],
            "learner_pad_s": out["pad_s"], "latency_s": latency, "mb_per_s": g["mb"] / latency,
            "mtokens_per_s": g["tokens"] / latency / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 sizes, 6 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per size (default 6 quick, 11 full; first dropped)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="max completion tokens (default 1024 2048 4096)")
    args = ap.parse_args()
    C.SUFFIX = "_quick" if args.quick else ""
    rounds = args.rounds or (6 if args.quick else 11)
    lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    import ray

    C.ensure_ray()
    gen = ray.remote(Generator).options(num_cpus=0).remote()
    learner = ray.remote(Learner).options(num_cpus=0).remote()
    t0 = time.perf_counter()
    result = {"machine": C.machine(), "quick": args.quick, "rows": args.rows, "prompt_len": PROMPT_LEN, "rounds": rounds,
              "sizes": {}}
    rows = []
    for length in lengths:
        per = {f: [] for f in FORMATS}
        for r in range(rounds):
            for f in (FORMATS if r % 2 == 0 else FORMATS[::-1]):
                res = one_transfer(gen, learner, f, args.rows, length, seed=1000 * r + length)
                if r > 0:
                    per[f].append(res)
        med = {f: {k: C.median([x[k] for x in v]) for k in v[0]} for f, v in per.items()}
        for f in FORMATS:
            med[f]["latency_vs_arrow"] = med[f]["latency_s"] / med["arrow"]["latency_s"]
            med[f]["driver_cpu_vs_arrow"] = med[f]["driver_cpu_s"] / med["arrow"]["driver_cpu_s"]
            rows.append({"max_len": length, "format": f, **{k: med[f][k] for k in
                         ["mb", "put_s", "driver_s", "driver_cpu_s", "learner_get_s", "learner_pad_s", "latency_s",
                          "mb_per_s", "mtokens_per_s", "latency_vs_arrow", "driver_cpu_vs_arrow"]}})
        result["sizes"][str(length)] = {"median": med, "rounds": per}
        print(f"  {args.rows} x {length}: " + ", ".join(f"{f} {med[f]['latency_s'] * 1e3:.0f} ms" for f in FORMATS))
    result["table"], result["wall_s"] = rows, time.perf_counter() - t0
    print(f"\n{args.rows} completions, prompt {PROMPT_LEN} tokens, completion lengths uniform in [L/4, L]; medians of "
          f"{rounds - 1} rounds (seconds, MB; mtokens_per_s = real tokens moved / latency)")
    print(C.table(rows))
    print(f"wall time {result['wall_s']:.0f} s -> {C.save('arrow_transport', result)}")
    plot(result, lengths)


def plot(result: dict, lengths: list[int]) -> None:
    fig, (a1, a2) = C.figure(1, 2, figsize=(11, 4))
    for f, color in zip(FORMATS, ["#55a868", "#c44e52", "#4c72b0"]):
        meds = [result["sizes"][str(n)]["median"][f] for n in lengths]
        a1.plot(lengths, [m["latency_s"] * 1e3 for m in meds], "o-", color=color, label=f)
        a2.plot(lengths, [m["driver_cpu_s"] * 1e3 for m in meds], "o-", color=color, label=f)
    a1.set(xlabel="max completion tokens", ylabel="ms", title=f"latency put -> learner tensors ({result['rows']} rows)")
    a2.set(xlabel="max completion tokens", ylabel="ms", title="driver CPU time (get + add column + put)")
    for a in (a1, a2):
        a.set_yscale("log")
        a.legend()
    print("plot ->", C.savefig(fig, "arrow_transport"))


if __name__ == "__main__":
    sys.exit(main())
