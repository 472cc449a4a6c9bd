"""The precomputed reference (issue 14): build throughput and step time.

1. Build throughput: ``aapo reference build`` (Ray Data, one generator actor + one scorer, end to end:
   actor start-up, sampling K completions per prompt, scoring, Parquet) vs one process that loads the
   same model and samples the same prompts K times in batched ``HFBackend.generate`` calls (no scoring),
   both with 1 torch thread; completions/s, interleaved, ratio per round.
2. Step time: AAPO with the online reference, AAPO with the precomputed reference (cache built once,
   before the rounds) and GRPO (``kl_beta=0``: the same loss inputs, no reference), interleaved; median
   ``time/step_s`` over steady steps, ratios per round.

Usage: python benchmarks/reference_cache.py [--quick] [--rounds N] [--parts build steps]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common as C


def build_arm(model_path: str, overrides: dict):
    def run(r: int) -> dict:
        from aapo_ray.preflight import check_reference_cache, load_prompts
        from aapo_ray.reference_build import build_reference_cache

        tmp = Path(tempfile.mkdtemp(prefix="aapo-refbench-"))
        cfg = C.config({**overrides, "model.path": model_path, "algo.reference_cache": str(tmp / "cache")})
        prompts, _ = load_prompts(cfg, model_path)
        written = []
        start = time.perf_counter()
        build_reference_cache(cfg, model_path, prompts, check_reference_cache(cfg, model_path, prompts), progress=False,
                              on_shard=lambda s: written.append(time.perf_counter() - start))
        wall = time.perf_counter() - start
        shutil.rmtree(tmp, ignore_errors=True)
        n, k = prompts.num_rows * cfg.algo.reference_samples, cfg.algo.reference_samples
        per_shard = cfg.algo.reference_shard_prompts * k
        # where the time goes: until the first shard is written (Ray Data start, actor start, model load,
        # the first shard's sampling and scoring), then the steady rate of the remaining shards
        steady = (n - per_shard) / (wall - written[0]) if len(written) > 1 else float("nan")
        return {"completions": n, "wall_s": wall, "completions_per_s": n / wall, "first_shard_s": written[0],
                "steady_completions_per_s": steady, "shard_times_s": written}
    return run


def single_process_arm(model_path: str, overrides: dict):
    def run(r: int) -> dict:
        import torch

        from aapo_ray.backends import make_backend
        from aapo_ray.preflight import load_prompts
        from aapo_ray.sampling import SamplingParams

        cfg = C.config({**overrides, "model.path": model_path})
        prompts, _ = load_prompts(cfg, model_path)
        torch.set_num_threads(1)
        start = time.perf_counter()
        backend = make_backend("hf", model_path, device="cpu", batch_size=cfg.rollout.generation_batch_size)
        loaded = time.perf_counter()
        rows = [p for p in prompts.column("prompt_ids").to_pylist() for _ in range(cfg.algo.reference_samples)]
        backend.generate(rows, SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                              max_new_tokens=cfg.rollout.max_new_tokens, seed=r))
        end = time.perf_counter()
        return {"completions": len(rows), "wall_s": end - start, "generate_s": end - loaded,
                "completions_per_s": len(rows) / (end - start), "generate_completions_per_s": len(rows) / (end - loaded)}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=512, help="training prompts of the build (x 16 samples)")
    parser.add_argument("--parts", nargs="+", choices=["build", "steps"], default=["build", "steps"])
    args = parser.parse_args()
    if args.quick:
        C.SUFFIX = "_quick"
    rounds = args.rounds or (1 if args.quick else 2)
    prompts = 16 if args.quick else args.prompts
    model_path = C.model_dir("embedded")
    C.ensure_ray()
    out = {"machine": C.machine()}
    if "build" in args.parts:
        build = {"data.train": f"synthetic:train:{prompts}", "algo.reference_samples": 16, "rollout.max_new_tokens": 32,
                 "rollout.reference_replicas": 1, "algo.reference_shard_prompts": 16 if args.quick else 64}
        print(f"1. build throughput ({prompts} prompts x 16 samples)")
        thr = C.interleave({"ray_build": build_arm(model_path, build), "single_process": single_process_arm(model_path, build)},
                           rounds)
        ratios = [a["completions_per_s"] / b["completions_per_s"] for a, b in zip(thr["ray_build"], thr["single_process"])]
        ratios_gen = [a["completions_per_s"] / b["generate_completions_per_s"]
                      for a, b in zip(thr["ray_build"], thr["single_process"])]
        print(C.table([{"arm": k, "completions/s (median)": C.median([x["completions_per_s"] for x in v])}
                       for k, v in thr.items()]))
        print(f"build / single process (both end to end, incl. model load): {C.median(ratios):.3f} per round {ratios}")
        print(f"build / single-process generate only: {C.median(ratios_gen):.3f} per round {ratios_gen}")
        ratios_steady = [a["steady_completions_per_s"] / b["generate_completions_per_s"]
                         for a, b in zip(thr["ray_build"], thr["single_process"])]
        first = C.median([a["first_shard_s"] for a in thr["ray_build"]])
        gen_shard = C.median([b["generate_s"] for b in thr["single_process"]]) * build["algo.reference_shard_prompts"] / prompts
        print(f"where the build's time goes: {first:.1f} s until the first shard is written (its sampling alone takes "
              f"~{gen_shard:.1f} s in one process: the rest is Ray Data, actor start-up, model load, scoring), then the "
              f"steady state runs at {C.median(ratios_steady):.3f}x the single-process generate (per round {ratios_steady})")
        out["build"] = {"overrides": build, "rounds": thr, "ratio": ratios, "ratio_generate_only": ratios_gen,
                        "ratio_steady_vs_generate": ratios_steady, "first_shard_s": first}
    if "steps" in args.parts:
        steps = 5 if args.quick else 10
        keep = Path(tempfile.mkdtemp(prefix="aapo-refbench-steps-"))
        train = {"data.train": f"synthetic:train:{prompts}", "run.steps": steps, "data.eval": None,
                 "algo.reference_samples": 12, "algo.reference_cache": str(keep / "cache")}
        arms = {"aapo_online": {**train}, "aapo_precomputed": {**train, "algo.reference": "precomputed"},
                "grpo": {**train, "algo.estimator": "grpo", "algo.kl_beta": 0.0}}
        C.run_pipeline(arms["aapo_precomputed"] | {"run.steps": 1})  # builds the cache once, outside the rounds
        print(f"2. step time ({steps} steps, median of steady steps)")
        runs = C.interleave({k: (lambda r, o=o: C.run_pipeline(o)) for k, o in arms.items()}, rounds)
        step_s = {k: [C.median([row["time/step_s"] for row in C.steady(run["rows"])]) for run in v] for k, v in runs.items()}
        rel = {k: [a / b for a, b in zip(step_s[k], step_s["grpo"])] for k in step_s}
        print(C.table([{"arm": k, "step_s (median over rounds)": C.median(v), "/ grpo": C.median(rel[k])}
                       for k, v in step_s.items()]))
        shutil.rmtree(keep, ignore_errors=True)
        out["steps"] = {"overrides": arms, "step_s": step_s, "relative_to_grpo": rel}
    path = C.save("reference_cache" + ("" if len(args.parts) == 2 else "_" + args.parts[0]), out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
