"""``aapo eval``'s throughput against the training generators' own, on the same prompts and hardware.

Arm ``training``: a :class:`aapo_ray.generator.GeneratorPool` (one replica, the training actor), sampling
``k`` completions per prompt in chunks of ``rollout.prompts_per_step`` prompts, one chunk after another
as training steps do. Arm ``eval``: the Ray Data pipeline of ``aapo eval``
(:func:`aapo_ray.eval_pipeline.build_dataset`: one generator actor, one scorer actor, math-verify
scoring included). Both on the embedded model, same prompts (synthetic test problems), same sampling
(T=1, top_p=1, the training max_new_tokens), one torch thread per actor, and the same rows per engine call
(a Ray Data batch holds ``rollout.prompts_per_step`` problems unless ``--problems-per-batch`` says
otherwise). Generated tokens per second of wall time; the eval arm is timed from its first output batch to
its last (steady state: its actors loaded, the first batch's tokens not counted) and also end to end
(actor start-up included). A third arm runs the eval pipeline without its scoring stage (generation
alone, like the training arm: on 2 cores the math-verify scorer competes with generation). Arms are
interleaved (training, eval, eval without scoring, training, ...); ratios per round.

Usage: python benchmarks/eval_throughput.py [--problems 512] [--samples 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C


def problems(n: int, model_path: str) -> list[dict]:
    from transformers import AutoTokenizer

    from aapo_ray.embedded import read_recipe
    from aapo_ray.sampling import problem_seed
    from aapo_ray.synthetic import PROMPT_TEMPLATE, SyntheticTask

    task = SyntheticTask(**read_recipe(model_path)["recipe"]["task"])
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = task.problems("test", n)
    texts = [PROMPT_TEMPLATE.format(question=q) for q, *_ in rows]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    budget = C.defaults().rollout.max_new_tokens
    return [{"benchmark": "synthetic", "problem_id": i, "prompt": t, "prompt_ids": p, "gold": r[1],
             "max_new_tokens": budget, "seed": problem_seed(0, "synthetic", i)}
            for i, (t, p, r) in enumerate(zip(texts, ids, rows))]


def training_arm(pool, probs: list[dict], k: int, per_step: int) -> dict:
    from aapo_ray.rollout import make_prompt_batch

    import ray

    tokens, start = 0, time.perf_counter()
    for s in range(0, len(probs), per_step):
        chunk = probs[s:s + per_step]
        batch = make_prompt_batch([p["problem_id"] for p in chunk], [p["prompt_ids"] for p in chunk],
                                  [p["prompt"] for p in chunk], [p["gold"] for p in chunk])
        out = ray.get(pool.async_generate(batch, k, pool.sampling(s)))
        tokens += sum(len(x) for b in out for x in b.column("completion_ids").to_pylist())
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def eval_arm(model_path: str, probs: list[dict], k: int, per_batch: int, scorers: int = 1) -> dict:
    from aapo_ray.eval_pipeline import build_dataset

    cfg = C.defaults()
    gen = dict(backend="hf", model_path=model_path, samples=k, temperature=cfg.rollout.temperature,
               top_p=cfg.rollout.top_p, torch_threads=1, batch_size=cfg.rollout.generation_batch_size)
    ds = build_dataset(probs, generate_kwargs=gen, endpoint=None, generators=1, cpus_per_generator=1.0,
                       gpus_per_generator=0.0, scorers=scorers, score_timeout_s=5.0, problems_per_batch=per_batch)
    start = time.perf_counter()
    first, tokens, after_first = None, 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        n = sum(batch.column("length").to_pylist())
        tokens += n
        last = time.perf_counter()
        if first is None:
            first = last
        else:
            after_first += n
    end = last
    return {"tokens": tokens, "wall_s": end - start, "tokens_per_s": tokens / (end - start),
            "steady_tokens_per_s": after_first / max(end - first, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--problems-per-batch", type=int, help="default: rollout.prompts_per_step")
    a = ap.parse_args()
    import ray

    from aapo_ray.generator import GeneratorPool

    C.ensure_ray(num_cpus=4)
    ray.data.DataContext.get_current().enable_progress_bars = False
    model_path = C.model_dir("embedded")
    probs = problems(a.problems, model_path)
    cfg = C.config({"run.torch_threads": 1})
    a.problems_per_batch = a.problems_per_batch or cfg.rollout.prompts_per_step
    pool = GeneratorPool(cfg, model_path, replicas=1)
    res = C.interleave({"training": lambda r: training_arm(pool, probs, a.samples, cfg.rollout.prompts_per_step),
                        "eval": lambda r: eval_arm(model_path, probs, a.samples, a.problems_per_batch),
                        "eval_generation_only": lambda r: eval_arm(model_path, probs, a.samples, a.problems_per_batch,
                                                                   scorers=0)}, a.rounds)
    pool.shutdown()
    rows, ratios = [{"arm": "training generator", "tokens/s": statistics.median(r["tokens_per_s"] for r in res["training"])}], {}
    for arm in ("eval", "eval_generation_only"):
        for kind, key in (("steady", "steady_tokens_per_s"), ("end to end", "tokens_per_s")):
            ratios[f"{arm} {kind}"] = [e[key] / t["tokens_per_s"] for t, e in zip(res["training"], res[arm])]
            rows.append({"arm": f"aapo {arm.replace('_', ' ')} ({kind})",
                         "tokens/s": statistics.median(r[key] for r in res[arm]),
                         "/ training (median of rounds)": statistics.median(ratios[f"{arm} {kind}"])})
    print(C.table(rows, ["arm", "tokens/s", "/ training (median of rounds)"]))
    print("per round: " + "; ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in ratios.items()))
    path = C.save("eval_throughput", {"machine": C.machine(), "args": vars(a), "rounds": res, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
