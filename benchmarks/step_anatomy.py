"""Where a training step's time goes, and what Ray costs over a plain single-process loop.

For the embedded default and a larger tiny config, trains through ``aapo_ray.driver.train`` (AAPO)
and splits each step into policy generation, reference generation (both busy times; they run
concurrently, so the wall rollout phase is reported too), scoring (scorer busy time), advantages,
learner update (learner busy time), weight sync and everything else (= step - max(gen, ref) -
score - advantage - learner - sync: scheduling, serialisation, object store, waiting, logging). Interleaved with a plain loop in a fresh process
(no Ray, no Arrow): same model, batch, sampling and seeds; HF generate for policy and reference,
``accuracy_reward`` in-process, AAPO advantages, one AdamW update on the same loss. Reports
ray/single-process step-time ratios and peak memory (RSS of the driver plus every Ray process
vs the single process's peak RSS). Warm-up steps (first 2) and the last step (eval + checkpoint)
are left out of the medians.

Ray arms are named ``t<run.torch_threads>L<learner.torch_threads>`` (``Lauto``: the config default,
the node's cores shared by the learner ranks), with ``_pre`` (reference rewards from a precomputed cache,
built once before the rounds) or ``_pre_ov1`` (and one-step overlap: generation of step t+1 runs while
the learner trains step t, so the parts add up to more than the step) for each ``--reference`` variant.

Usage: python benchmarks/step_anatomy.py [--quick] [--rounds N] [--ray-threads 1 2] [--learner-threads auto 1]
       [--configs default larger] [--reference online precomputed precomputed_overlap1] [--tag _suffix]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import _common as C

REFERENCE_VARIANTS = {"online": ("", {}), "precomputed": ("_pre", {"algo.reference": "precomputed"}),
                      "precomputed_overlap1": ("_pre_ov1", {"algo.reference": "precomputed", "rollout.overlap": 1})}
PARTS = ["gen", "ref_gen", "score", "advantage", "learner", "sync", "other"]


def configs(quick: bool) -> dict[str, dict]:
    return {
        "default": {"run.steps": 8 if quick else 20},
        "larger": {"model.path": C.larger_model_path(), "run.steps": 6 if quick else 12,
                   "rollout.prompts_per_step": 16, "algo.group_size": 8, "rollout.max_new_tokens": 64,
                   "learner.micro_batch_size": 32},
    }


# ----------------------------------------------------------------------------- the plain loop
def single_process(a: dict) -> dict:
    """The whole step in one process, one thread count, no Ray; returns per-step times + peak RSS."""
    import resource

    import torch

    torch.set_num_threads(a["threads"])
    from aapo_ray.algo import get_estimator, token_logprobs
    from aapo_ray.backends import HFBackend
    from aapo_ray.sampling import SamplingParams, step_seed
    from aapo_ray.data import PromptSampler, load_prompt_dataset, render_prompts
    from aapo_ray.reward import accuracy_reward

    est = get_estimator(a["estimator"])
    policy = HFBackend.load(a["model_path"], batch_size=a["gen_batch"], device="cpu")
    reference = HFBackend.load(a["model_path"], batch_size=a["gen_batch"], device="cpu") if est.needs_reference else None
    model, tok = policy.model, policy.tokenizer
    torch.manual_seed(a["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    ds = load_prompt_dataset("synthetic:train")
    ids = tok(render_prompts(ds.questions, template=ds.default_template), add_special_tokens=False)["input_ids"]
    sampler = PromptSampler(len(ids), a["prompts"], seed=a["seed"])
    G, T, steps = a["group_size"], a["temperature"], []
    for step in range(1, a["steps"] + 1):
        t0 = time.perf_counter()
        idx = sampler.next_batch()
        prompts = [ids[i] for i in idx for _ in range(G)]
        golds = [ds.golds[i] for i in idx for _ in range(G)]
        params = lambda s: SamplingParams(temperature=T, top_p=1.0, max_new_tokens=a["max_new_tokens"], seed=s)  # noqa: E731
        out = policy.generate(prompts, params(step_seed(a["seed"], step, "policy")))
        t1 = time.perf_counter()
        ref = reference.generate(prompts, params(step_seed(a["seed"], step, "reference"))) if reference else None
        t2 = time.perf_counter()
        rewards = torch.tensor([accuracy_reward(c, g) for c, g in zip(out.texts, golds)])
        ref_rewards = torch.tensor([accuracy_reward(c, g) for c, g in zip(ref.texts, golds)]) if ref else None
        t3 = time.perf_counter()
        adv = est.advantages(rewards, ref_rewards, G, scale_rewards=True, margin_clip=(0.2, 0.28))
        t4 = time.perf_counter()
        tokens = sum(len(c) for c in out.token_ids)
        denom = est.loss_denominator(tokens, len(prompts), a["max_new_tokens"])
        model.train(False)
        for s in range(0, len(prompts), a["micro_batch"]):
            rows = [list(p) + list(c) for p, c in zip(prompts[s:s + a["micro_batch"]], out.token_ids[s:s + a["micro_batch"]])]
            width = max(map(len, rows))
            x = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            attn, mask = torch.zeros_like(x), torch.zeros(len(rows), width)
            for i, (r, p) in enumerate(zip(rows, prompts[s:s + a["micro_batch"]])):
                x[i, :len(r)] = torch.tensor(r)
                attn[i, :len(r)] = 1
                mask[i, len(p):len(r)] = 1
            logits = model(input_ids=x, attention_mask=attn).logits
            lp = token_logprobs(logits[:, :-1], x[:, 1:], T)
            est.loss(lp, mask[:, 1:], adv[s:s + a["micro_batch"]], num_tokens=denom).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        steps.append({"step": step, "gen": t1 - t0, "ref_gen": t2 - t1, "score": t3 - t2, "advantage": t4 - t3,
                      "train": t5 - t4, "step_s": t5 - t0, "reward": float(rewards.mean()),
                      "completion_tokens": tokens + (sum(len(c) for c in ref.token_ids) if ref else 0)})
    return {"steps": steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": a["threads"]}


def sp_args(cfg, threads: int) -> dict:
    return {"model_path": C.model_dir(cfg["model"]["path"]), "estimator": cfg["algo"]["estimator"], "threads": threads,
            "steps": cfg["run"]["steps"], "prompts": cfg["rollout"]["prompts_per_step"],
            "group_size": cfg["algo"]["group_size"], "max_new_tokens": cfg["rollout"]["max_new_tokens"],
            "temperature": cfg["rollout"]["temperature"], "lr": cfg["learner"]["lr"], "seed": cfg["run"]["seed"],
            "micro_batch": cfg["learner"]["micro_batch_size"], "gen_batch": cfg["rollout"]["generation_batch_size"]}


# ----------------------------------------------------------------------------- analysis
def ray_parts(rows: list[dict]) -> list[dict]:
    out = []
    for r in C.steady(rows):
        p = {"gen": r["time/generate_s"], "ref_gen": r["time/ref_generate_s"], "score": r.get("time/score_s", 0.0),
             "advantage": r["time/advantage_s"], "learner": r["learner/step_s"], "sync": r["time/sync_s"],
             "rollout_wall": r["time/rollout_s"], "train_wall": r["time/train_s"], "step_s": r["time/step_s"],
             "completion_tokens": r["completion_tokens"]}
        p["other"] = p["step_s"] - max(p["gen"], p["ref_gen"]) - p["score"] - p["advantage"] - p["learner"] - p["sync"]
        out.append(p)
    return out


def medians(parts: list[dict]) -> dict:
    return {k: C.median([p[k] for p in parts]) for k in parts[0]} if parts else {}


def sp_steady(run: dict) -> list[dict]:
    return [s for s in run["steps"] if 2 < s["step"] < len(run["steps"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, fewer steps (< ~5 min)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1 quick, 3 full)")
    ap.add_argument("--ray-threads", type=int, nargs="+", default=[1], help="run.torch_threads (generators) of the "
                    "Ray runs (1 = the config default)")
    ap.add_argument("--learner-threads", nargs="+", default=["auto"], help="learner.torch_threads of the Ray runs: "
                    "'auto' (the config default) or N; the Ray arms are every --ray-threads x --learner-threads pair")
    ap.add_argument("--sp-threads", type=int, nargs="+", default=[1, 2], help="torch threads of the plain loop")
    ap.add_argument("--configs", nargs="+", default=["default", "larger"], help="which configs to run")
    ap.add_argument("--reference", nargs="+", default=["online"], choices=list(REFERENCE_VARIANTS),
                    help="AAPO's reference: sampled online, or read from a precomputed cache (with overlap 0 or 1)")
    ap.add_argument("--tag", default="", help="suffix of the output files (step_anatomy<tag>.json/.png)")
    ap.add_argument("--_sp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    C.SUFFIX = "_quick" if args.quick else ""
    if args._sp:
        print(json.dumps(single_process(json.loads(args._sp))))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    t_start = time.perf_counter()
    d = C.defaults()
    default_arm = f"t{d.run.torch_threads}L{d.learner.torch_threads or 'auto'}"  # the headline ratio
    ray_arms = {f"t{t}L{lt}{REFERENCE_VARIANTS[v][0]}": {"run.torch_threads": t, **REFERENCE_VARIANTS[v][1],
                                                       "learner.torch_threads": None if lt == "auto" else int(lt)}
                for t in args.ray_threads for lt in args.learner_threads for v in args.reference}
    cache = tempfile.mkdtemp(prefix="step-anatomy-refcache-")
    result = {"machine": C.machine(), "quick": args.quick, "rounds": rounds, "configs": {}}
    for name, overrides in ((n, o) for n, o in configs(args.quick).items() if n in args.configs):
        cfg = C.config({"run.output_dir": "/tmp", **overrides}).model_dump(mode="json")
        if args.reference != ["online"]:  # every visit of a prompt is its first: the cache holds the run's prompts, K = G
            overrides = {**overrides, "data.train": f"synthetic:train:{cfg['run']['steps'] * cfg['rollout']['prompts_per_step']}",
                         "algo.reference_samples": cfg["algo"]["group_size"], "algo.reference_cache": f"{cache}/{name}"}
            C.run_pipeline({**overrides, **REFERENCE_VARIANTS["precomputed"][1], "run.steps": 1})  # builds it, unmeasured
        print(f"[{name}] {cfg['rollout']['prompts_per_step']} prompts x G={cfg['algo']['group_size']}, "
              f"max_new_tokens={cfg['rollout']['max_new_tokens']}, {cfg['run']['steps']} steps, model {cfg['model']['path']}")
        arms = {f"ray_{a}": lambda r, o=o: C.run_pipeline({**overrides, **o}) for a, o in ray_arms.items()}
        arms.update({f"single_t{t}": lambda r, t=t: C.run_subprocess(__file__, "--_sp", sp_args(cfg, t))
                     for t in args.sp_threads})
        runs = C.interleave(arms, rounds)
        res = {"config": overrides, "ray": {}, "single": {}}
        for t in args.sp_threads:
            sp_runs = runs[f"single_t{t}"]
            res["single"][f"t{t}"] = {**medians([s for run in sp_runs for s in sp_steady(run)]),
                                      "peak_rss_mb": C.median([s["peak_rss_mb"] for s in sp_runs])}
        best = min(res["single"], key=lambda k: res["single"][k]["step_s"])
        for t in ray_arms:
            ray_runs = runs[f"ray_{t}"]
            steps = [ray_parts(run["rows"]) for run in ray_runs]
            med = medians([p for st in steps for p in st])
            ratio = lambda sp: C.median([C.median([p["step_s"] for p in st]) / C.median([x["step_s"] for x in sp_steady(s)])  # noqa: E731
                                         for st, s in zip(steps, runs[f"single_{sp}"])])
            res["ray"][t] = {**med, "overhead_frac": med["other"] / med["step_s"],
                             "learner_threads": ray_runs[0]["rows"][-1]["learner/torch_threads"],
                             "peak_rss_mb": C.median([r["peak_rss_mb"] for r in ray_runs]),
                             "peak_rss_parts": ray_runs[0]["peak_rss_parts"],
                             "startup_s": C.median([r["wall_s"] - sum(x["time/step_s"] for x in r["rows"] if x["step"] > 0)
                                                    for r in ray_runs]),
                             "ratio_vs_single": {f"t{sp}": ratio(f"t{sp}") for sp in args.sp_threads}}
        head = res["ray"].get(default_arm) or next(iter(res["ray"].values()))
        res.update(best_single=best, ratio_ray_over_single=head["ratio_vs_single"][best],
                   overhead_frac=head["overhead_frac"])
        result["configs"][name] = res
    shutil.rmtree(cache, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_start
    report(result, args.tag)


def _single_parts(s: dict) -> dict:
    parts = {"gen": s["gen"], "ref_gen": s["ref_gen"], "score": s["score"], "advantage": s["advantage"],
             "learner": s["train"], "sync": 0.0}
    return {**parts, "other": s["step_s"] - sum(parts.values())}


def report(result: dict, tag: str = "") -> None:
    rows, summary = [], []
    for name, res in result["configs"].items():
        for t, r in res["ray"].items():
            rows.append({"config": name, "run": f"ray {t}", **{k: r[k] for k in PARTS}, "rollout wall": r["rollout_wall"],
                         "step": r["step_s"], "peak RSS MB": r["peak_rss_mb"]})
        for t, s in res["single"].items():
            rows.append({"config": name, "run": f"single {t}", **_single_parts(s),
                         "rollout wall": s["gen"] + s["ref_gen"] + s["score"], "step": s["step_s"],
                         "peak RSS MB": s["peak_rss_mb"]})
        for t, r in res["ray"].items():
            summary.append({"config": name, "ray": t, **{f"ray/single {k}": v for k, v in r["ratio_vs_single"].items()},
                            "other/step": r["overhead_frac"], "ray RSS MB": r["peak_rss_mb"],
                            "single RSS MB": res["single"][res["best_single"]]["peak_rss_mb"], "ray startup s": r["startup_s"]})
    print("\nmedian seconds per step (steady state; ray rows are busy times, gen || ref_gen run concurrently)")
    print(C.table(rows))
    print("\nratios (median over rounds of ray step / single step, paired by round)")
    print(C.table(summary))
    print(f"wall time {result['wall_s']:.0f} s -> {C.save('step_anatomy' + tag, result)}")
    plot(result, tag)


def plot(result: dict, tag: str = "") -> None:
    fig, axes = C.figure(1, len(result["configs"]), figsize=(6 * len(result["configs"]), 4.4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    colors = dict(zip(PARTS, ["#4c72b0", "#8172b2", "#55a868", "#c44e52", "#dd8452", "#937860", "#999999"]))
    labels = {"gen": "policy gen (ray: max of gen, ref_gen)", "ref_gen": "reference gen (single only)"}
    for ax, (name, res) in zip(axes, result["configs"].items()):
        bars = {f"ray {t}": {"gen": max(r["gen"], r["ref_gen"]), "ref_gen": 0.0, **{k: r[k] for k in PARTS[2:]}}
                for t, r in res["ray"].items()}
        bars.update({f"single {t}": _single_parts(s) for t, s in res["single"].items()})
        for i, parts in enumerate(bars.values()):
            bottom = 0.0
            for k in PARTS:
                v = max(parts[k], 0.0)
                ax.bar(i, v, bottom=bottom, color=colors[k], label=labels.get(k, k) if i == 0 else None)
                bottom += v
        ax.set_xticks(range(len(bars)), list(bars))
        ax.set_ylabel("median s / step")
        ax.set_title(f"{name}: ray/best single = {res['ratio_ray_over_single']:.2f}")
        ax.legend(fontsize=7)
    print("plot ->", C.savefig(fig, "step_anatomy" + tag))


if __name__ == "__main__":
    sys.exit(main())
