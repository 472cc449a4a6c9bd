"""Throughput against TRL's GRPOTrainer: same tiny model, data, group size, lengths, lr and steps.

Arms, interleaved round by round (A B C, A B C, ...), each in its own process or Ray run:
  ours_grpo                 aapo_ray.driver.train with algo.estimator=grpo (no reference model)
  trl_grpo_t<N>             trl.GRPOTrainer (fresh subprocess, N torch threads), reward = aapo_ray.reward.accuracy_reward
  ours_aapo                 the default estimator, online: the policy AND the frozen reference generate every step
  ours_aapo_precomputed     AAPO reading the reference's rewards from a cache (algo.reference=precomputed)
  ours_aapo_precomputed_overlap1   ... and generating step t+1 while the learner trains step t (rollout.overlap=1)
Every arm trains on the same ``steps x prompts`` training prompts (each visited once), so the cache is built
once, before the rounds, for exactly those prompts (K = G samples each); its cost is reported separately,
per prompt and amortised over N runs that share it (every seed and estimator of a study).
Matching (docs/field-notes.md, "TRL GRPOTrainer on this machine class"): use_cpu=True, bf16=False,
gradient_checkpointing=False; per_device_train_batch_size counts completions in TRL 1.x, so it is our
learner.micro_batch_size with gradient_accumulation_steps = completions / micro-batch (one generation
of prompts x G per optimizer step, as ours); beta=0 (no KL model), num_iterations=1, loss_type=dapo
(token sum / all completion tokens of the step = ours), scale_rewards=group, epsilon=0.2, top_k=0,
constant lr, AdamW (0.9, 0.999), no weight decay, grad clip 1.0, dropout off.
Reported per arm: median steady-state s/step (first 2 steps and our last eval+checkpoint step
dropped), completions/s (policy completions), generated tokens/s (policy + reference for AAPO),
end-to-end wall time incl. start-up, peak RSS (ours: driver + all Ray processes), and ours/TRL ratios.

Usage: python benchmarks/vs_trl.py [--quick] [--rounds N] [--steps N] [--trl-threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import _common as C


def trl_run(a: dict) -> dict:
    """One TRL GRPOTrainer run in this (fresh) process; per-step wall times from a callback."""
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from aapo_ray.data import load_prompt_dataset, render_prompts
    from aapo_ray.reward import accuracy_reward

    ds = load_prompt_dataset("synthetic:train")
    data = Dataset.from_dict({"prompt": render_prompts(ds.questions, template=ds.default_template), "gold": ds.golds})

    def accuracy(prompts, completions, gold, **_):
        return [accuracy_reward(c, g) for c, g in zip(completions, gold)]

    model = AutoModelForCausalLM.from_pretrained(a["model_path"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a["model_path"])
    completions = a["prompts"] * a["group_size"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=a["micro_batch"], gradient_accumulation_steps=completions // a["micro_batch"],
        num_generations=a["group_size"], max_completion_length=a["max_new_tokens"], temperature=a["temperature"],
        top_p=1.0, top_k=0, learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, beta=0.0, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group", max_steps=a["steps"], logging_steps=1, save_strategy="no",
        report_to="none", seed=a["seed"], disable_dropout=True, dataloader_num_workers=0, log_completions=False,
        mask_truncated_completions=False)
    times, logs = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t)

        def on_log(self, _a, _s, _c, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                history.append(dict(logs))

    history = logs
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[accuracy], args=args, train_dataset=data,
                          callbacks=[Timer()])
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    steps = [{"step": i + 1, "step_s": t, "completion_tokens": logs[i]["completions/mean_length"] * completions,
              "reward": logs[i].get("reward")} for i, t in enumerate(times)]
    return {"steps": steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def summarise(steps: list[dict], completions: int, wall: float, rss: float) -> dict:
    return {"step_s": C.median([s["step_s"] for s in steps]),
            "completions_per_s": completions / C.median([s["step_s"] for s in steps]),
            "tokens_per_s": C.median([s["completion_tokens"] / s["step_s"] for s in steps]),
            "completion_tokens": C.median([s["completion_tokens"] for s in steps]),
            "wall_s": wall, "peak_rss_mb": rss}


def ours(overrides: dict, completions: int) -> dict:
    run = C.run_pipeline(overrides)
    rows = C.steady(run["rows"])
    steps = [{"step_s": r["time/step_s"], "completion_tokens": r["completion_tokens"]} for r in rows]
    return {**summarise(steps, completions, run["wall_s"], run["peak_rss_mb"]),
            "ref_generate_s": C.median([r["time/ref_generate_s"] for r in rows]),
            "staleness_mean": C.median([r["rollout/staleness_mean"] for r in rows])}


def reference_build_cost(overrides: dict, prompts: int, samples: int) -> dict:
    """Builds the arms' shared reference cache (``aapo reference build``'s function) and times it."""
    # imported here, not at the top: the TRL arm's fresh process imports this file, and ray would load there
    from aapo_ray.preflight import check_reference_cache, load_prompts
    from aapo_ray.reference_build import build_reference_cache

    C.ensure_ray()
    cfg = C.config(overrides)
    model_path = C.model_dir(cfg.model.path)
    train_prompts, _ = load_prompts(cfg, model_path)
    start = time.perf_counter()
    build_reference_cache(cfg, model_path, train_prompts, check_reference_cache(cfg, model_path, train_prompts), progress=False)
    wall = time.perf_counter() - start
    return {"prompts": prompts, "samples": samples, "wall_s": wall, "s_per_prompt": wall / prompts,
            "completions_per_s": prompts * samples / wall}


def trl(payload: dict, completions: int) -> dict:
    t = time.perf_counter()
    out = C.run_subprocess(__file__, "--_trl", payload)
    return summarise([s for s in out["steps"] if s["step"] > 2], completions, time.perf_counter() - t, out["peak_rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 8 steps")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1 quick, 5 full)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 8 quick, 20 full)")
    ap.add_argument("--trl-threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of the TRL process; one TRL arm each, ratios against the fastest")
    ap.add_argument("--_trl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    C.SUFFIX = "_quick" if args.quick else ""
    if args._trl:
        print(json.dumps(trl_run(json.loads(args._trl))))
        return
    rounds, steps = args.rounds or (1 if args.quick else 5), args.steps or (8 if args.quick else 20)
    base = C.defaults()
    lr, P, G = base.learner.lr, base.rollout.prompts_per_step, base.algo.group_size
    cache = tempfile.mkdtemp(prefix="vs-trl-refcache-")
    shared = {"run.steps": steps, "learner.lr": lr, "data.train": f"synthetic:train:{steps * P}",
              "algo.reference_samples": G, "algo.reference_cache": cache, "rollout.prompts_per_step": P, "algo.group_size": G,
              "rollout.max_new_tokens": base.rollout.max_new_tokens, "rollout.temperature": base.rollout.temperature,
              "learner.micro_batch_size": base.learner.micro_batch_size, "run.seed": 0}
    payload = {"model_path": C.model_dir(base.model.path), "steps": steps, "prompts": P, "train_prompts": steps * P,
               "group_size": G, "max_new_tokens": base.rollout.max_new_tokens, "temperature": base.rollout.temperature,
               "lr": lr, "micro_batch": base.learner.micro_batch_size, "seed": 0}
    n = P * G
    print(f"{P} prompts x G={G} = {n} completions/step, max_new_tokens={payload['max_new_tokens']}, lr={lr}, "
          f"{steps} steps, {rounds} rounds; TRL torch threads {args.trl_threads}, ours 1 per actor")
    t0 = time.perf_counter()
    # TRL runs beta=0 and loss_type=dapo here: pin ours to the same (grpo's published defaults are a KL and seq mean)
    grpo_as_trl = {"algo.estimator": "grpo", "algo.kl_beta": 0.0, "algo.loss_agg": "token_mean"}
    arms_fn = {"ours_grpo": lambda r: ours({**shared, **grpo_as_trl}, n)}
    arms_fn.update({f"trl_grpo_t{t}": lambda r, t=t: trl({**payload, "threads": t}, n) for t in args.trl_threads})
    arms_fn["ours_aapo"] = lambda r: ours({**shared, "algo.estimator": "aapo"}, n)
    precomputed = {**shared, "algo.estimator": "aapo", "algo.reference": "precomputed"}
    arms_fn["ours_aapo_precomputed"] = lambda r: ours(precomputed, n)
    arms_fn["ours_aapo_precomputed_overlap1"] = lambda r: ours({**precomputed, "rollout.overlap": 1}, n)
    build = reference_build_cost(precomputed, steps * P, G)  # once, outside the rounds
    runs = C.interleave(arms_fn, rounds)
    shutil.rmtree(cache, ignore_errors=True)
    arms = {k: {m: C.median([r[m] for r in v]) for m in v[0]} for k, v in runs.items()}
    trl_best = max((k for k in arms if k.startswith("trl")), key=lambda k: arms[k]["completions_per_s"])
    ratio = lambda a, m: C.median([x[m] / y[m] for x, y in zip(runs[a], runs[trl_best])])  # noqa: E731
    ratios = {f"{a}/{trl_best}": {"completions_per_s": ratio(a, "completions_per_s"), "tokens_per_s": ratio(a, "tokens_per_s"),
                                  "wall_s": ratio(a, "wall_s"), "peak_rss_mb": ratio(a, "peak_rss_mb")}
              for a in arms if a != trl_best}
    online_ref_s = C.median([x["ref_generate_s"] for x in runs["ours_aapo"]]) * steps  # per run, inside the steps
    build["amortised_s_per_run"] = {str(k): build["wall_s"] / k for k in (1, 3, 10, 30)}
    build["online_reference_generate_s_per_run"] = online_ref_s
    print(f"reference cache build ({steps * P} prompts x {G}): {build['wall_s']:.1f} s = {build['s_per_prompt']*1e3:.1f} ms "
          f"per prompt; amortised per run over 1/3/10/30 runs: "
          + " / ".join(f"{v:.1f}" for v in build["amortised_s_per_run"].values())
          + f" s (the online reference generates {online_ref_s:.1f} s per run, beside the policy)")
    # issue 14's targets: AAPO's step time against GRPO mode's (same run, paired by round)
    vs_grpo = {a: C.median([x["step_s"] / y["step_s"] for x, y in zip(runs[a], runs["ours_grpo"])])
               for a in arms if a.startswith("ours_aapo")}
    print("step time / ours_grpo's (median of per-round ratios): "
          + ", ".join(f"{a} {v:.3f}" for a, v in vs_grpo.items()))
    result = {"machine": C.machine(), "quick": args.quick, "rounds": rounds, "steps": steps, "setup": payload,
              "reference_build": build, "step_time_vs_ours_grpo": vs_grpo,
              "arms": arms, "trl_best": trl_best, "per_round": runs, "ratios": ratios, "wall_s": time.perf_counter() - t0}
    print(C.table([{"arm": k, **v} for k, v in arms.items()],
                  ["arm", "step_s", "completions_per_s", "tokens_per_s", "completion_tokens", "wall_s", "peak_rss_mb"]))
    print(f"\nmedian of per-round ratios (against the faster TRL arm, {trl_best}):")
    print(C.table([{"ratio": k, **v} for k, v in ratios.items()]))
    print(f"wall time {result['wall_s']:.0f} s -> {C.save('vs_trl', result)}")
    plot(result)


def plot(result: dict) -> None:
    fig, axes = C.figure(1, 3, figsize=(13, 3.8))
    names = list(result["arms"])
    for ax, metric, label in zip(axes, ["completions_per_s", "tokens_per_s", "peak_rss_mb"],
                                 ["policy completions / s", "generated tokens / s", "peak RSS (MB)"]):
        for i, name in enumerate(names):
            vals = [r[metric] for r in result["per_round"][name]]
            ax.bar(i, result["arms"][name][metric], color="#dd8452" if name.startswith("trl") else "#4c72b0", alpha=0.8)
            ax.plot([i] * len(vals), vals, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(label)
    fig.suptitle(f"vs TRL GRPOTrainer, median of {result['rounds']} interleaved rounds (dots: rounds)")
    print("plot ->", C.savefig(fig, "vs_trl"))


if __name__ == "__main__":
    sys.exit(main())
