"""``aapo eval MODEL_OR_RUN``: avg@k, pass@k and maj@k on MATH-500, AIME24, AMC23, Minerva, OlympiadBench,
GSM8K or a user's JSONL, as batch inference on Ray Data (:mod:`aapo_ray.eval_pipeline`).

What MODEL_OR_RUN may be, and how prompts and completion budgets are set: ``aapo eval --help``
(:data:`aapo_ray.cli_args.EVAL_DESCRIPTION`).

Writes to ``--out`` (default ``MODEL_OR_RUN/eval/<timestamp>/``): ``samples.parquet`` (one row per sample:
model, benchmark, problem_id, sample, prompt, completion, answer, gold, correct, length, finish_reason,
seed), ``results.json`` (settings and per model and benchmark: n, k, avg@k, pass@k for every k' <= k,
maj@k, mean_length, truncation_rate; definitions in :mod:`aapo_ray.eval_metrics`), ``pass_at_k.png``, with
``--all-checkpoints`` also ``accuracy_vs_step.png``; and prints the paper's table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from aapo_ray.checkpoint import STATE, complete_checkpoints, resolve_model_dir
from aapo_ray.cli_args import eval_ray_cluster
from aapo_ray.config import DataConfig, load_config
from aapo_ray.data import render_prompts
from aapo_ray.eval_metrics import benchmark_metrics, paper_table
from aapo_ray.eval_pipeline import build_dataset
from aapo_ray.eval_stages import SCORED_SCHEMA
from aapo_ray.eval_sets import (BENCHMARKS, PAPER_SETS, EvalInputError, load_eval_set, parse_benchmarks,
                                settings_from)
from aapo_ray.launch import init_ray
from aapo_ray.metrics import pyplot, save_figure
from aapo_ray.preflight import resolve_model_path
from aapo_ray.sampling import problem_seed
from aapo_ray.synthetic import PROMPT_TEMPLATE

log = logging.getLogger(__name__)
OUT_SCHEMA = pa.schema([pa.field("model", pa.string())] + list(SCORED_SCHEMA))
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


# ----------------------------------------------------------------------------- what to evaluate
def _has_weights(model_dir: Path) -> bool:
    return any(next(model_dir.glob(g), None) for g in WEIGHT_FILES)


def models_to_evaluate(args: argparse.Namespace) -> list[dict]:
    """``[{label, dir, step}]``: the model, the chosen checkpoint, or every complete checkpoint."""
    if args.all_checkpoints and args.checkpoint:
        raise EvalInputError("--checkpoint and --all-checkpoints exclude each other")
    try:
        if args.all_checkpoints:
            run_dir = Path(args.model).expanduser().resolve()
            done = complete_checkpoints(run_dir)
            if not done:
                raise EvalInputError(f"--all-checkpoints: {args.model} has no complete checkpoint "
                                     f"(checkpoints/step_N with {STATE})")
            models = [{"label": ck.name, "dir": ck / "hf", "step": int(ck.name[len("step_"):])} for ck in done]
            if models[0]["step"] > 0 and (initial := initial_model(run_dir)) is not None:
                models.insert(0, {"label": "step_0", "dir": initial, "step": 0})
        else:
            model_dir, name = resolve_model_dir(args.model, args.checkpoint)
            step = model_dir.parent.name[len("step_"):] if model_dir.name == "hf" else None
            label = f"{name}/{model_dir.parent.name}" if step else name
            models = [{"label": label, "dir": model_dir, "step": int(step) if step else None}]
    except (FileNotFoundError, ValueError) as exc:
        raise EvalInputError(str(exc)) from None
    for m in models:
        if not (m["dir"] / "config.json").is_file():
            raise EvalInputError(f"{m['dir']}: no config.json (not a HF model directory)")
        if not args.endpoint and not _has_weights(m["dir"]):
            raise EvalInputError(f"{m['dir']}: no model weights ({' / '.join(WEIGHT_FILES)}); "
                                 "is the checkpoint complete?")
    return models


def initial_model(run_dir: Path) -> Path | None:
    """The model a run started from (its ``model.path``; the embedded default resolved), if it is a local
    directory: the warm start its checkpoints are compared against."""
    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        path = Path(resolve_model_path(load_config(run_dir / "config.yaml")))
    except (ValueError, FileNotFoundError) as exc:
        raise EvalInputError(f"{run_dir / 'config.yaml'}: {exc}") from None
    return path if path.is_dir() else None


def run_config(model_arg: str) -> DataConfig | None:
    """The ``data`` section of the run directory's ``config.yaml`` (MODEL_OR_RUN or above a checkpoint)."""
    p = Path(model_arg).expanduser().resolve()
    runs = [p]
    if p.parent.name == "checkpoints":  # RUN/checkpoints/step_N
        runs.append(p.parent.parent)
    if p.name == "hf" and p.parent.parent.name == "checkpoints":  # RUN/checkpoints/step_N/hf
        runs.append(p.parent.parent.parent)
    for cand in runs:
        if (cand / "config.yaml").is_file():
            raw = yaml.safe_load((cand / "config.yaml").read_text()) or {}
            try:
                return DataConfig(**(raw.get("data") or {}))
            except ValueError as exc:
                raise EvalInputError(f"{cand / 'config.yaml'}: bad data section: {exc}") from None
    return None


def render_for(data_cfg: DataConfig | None, tokenizer, questions: list[str]) -> list[str]:
    """Prompts rendered as training rendered them (:func:`aapo_ray.preflight.load_prompts`)."""
    if data_cfg is not None:
        default = PROMPT_TEMPLATE if data_cfg.train.startswith("synthetic") else "{question}"
        template = None if data_cfg.chat_template else (data_cfg.template or default)
        return render_prompts(questions, template=template, tokenizer=tokenizer, system_prompt=data_cfg.system_prompt)
    if getattr(tokenizer, "chat_template", None):
        return render_prompts(questions, template=None, tokenizer=tokenizer)
    return render_prompts(questions, template="{question}\n")


def context_length(model_dir: Path) -> int | None:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")


def build_problems(sets: dict, model_dir: Path, data_cfg, s: dict, seed: int, trust_remote_code: bool) -> tuple[list[dict], dict]:
    """The rows of the Ray Dataset (one per problem) and per set how many prompts were cut / budgets capped."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    context = context_length(model_dir)
    problems, notes = [], {}
    for name, ds in sets.items():
        texts = render_for(data_cfg, tokenizer, ds.questions)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        cut = capped = 0
        for i, (pid, text, prompt_ids, gold) in enumerate(zip(ds.ids, texts, ids, ds.golds)):
            budget = s["max_new_tokens"]
            if context:
                reserve = min(budget, max(1, context // 4))
                if len(prompt_ids) > context - reserve:
                    prompt_ids, cut = prompt_ids[len(prompt_ids) - (context - reserve):], cut + 1
                if budget > context - len(prompt_ids):
                    budget, capped = context - len(prompt_ids), capped + 1
            problems.append({"benchmark": name, "problem_id": int(pid), "prompt": text, "prompt_ids": list(prompt_ids),
                             "gold": gold, "max_new_tokens": int(budget), "seed": problem_seed(seed, name, i)})
        notes[name] = {"prompts_cut": cut, "budget_capped": capped}
        if cut:
            log.warning("%s: %d of %d prompts are longer than the context (%d tokens) allows; kept their last "
                        "tokens", name, cut, len(ds), context)
        if capped:
            log.warning("%s: max_new_tokens=%d capped for %d of %d problems at the context left after the prompt "
                        "(max_position_embeddings=%d)", name, s["max_new_tokens"], capped, len(ds), context)
    return problems, notes


# ----------------------------------------------------------------------------- outputs
def compute_results(parquet: Path, models: list[dict], sets: list[str]) -> dict:
    """Per model and benchmark metrics, from ``samples.parquet`` (without reading the texts)."""
    cols = ["model", "benchmark", "problem_id", "sample", "correct", "answer", "length", "finish_reason"]
    table = pq.read_table(parquet, columns=cols).to_pydict()
    groups: dict[tuple, dict] = {}
    for i, key in enumerate(zip(table["model"], table["benchmark"])):
        g = groups.setdefault(key, {c: [] for c in cols[2:]})
        for c in cols[2:]:
            g[c].append(table[c][i])
    return {m["label"]: {b: benchmark_metrics(groups[(m["label"], b)]) for b in sets if (m["label"], b) in groups}
            for m in models}


def plot(results: dict, models: list[dict], titles: dict, out: Path) -> list[Path]:
    plt = pyplot()
    written = []
    last = models[-1]["label"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results[last].items():
        ks = [int(k) for k in res["pass@k"]]
        ax.plot(ks, [res["pass@k"][str(k)] for k in ks], marker="o", ms=3, label=titles[name])
    ax.set(xlabel="k", ylabel="pass@k", title=f"pass@k: {last}", ylim=(0, 1.02))
    ax.set_xscale("log", base=2)
    written.append(save_figure(fig, [ax], out / "pass_at_k.png"))
    steps = [m for m in models if m["step"] is not None]
    if len(models) > 1 and len(steps) == len(models):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in results[last]:
            ax.plot([m["step"] for m in steps], [results[m["label"]][name]["avg@k"] for m in steps], marker="o",
                    ms=3, label=titles[name])
        ax.set(xlabel="step", ylabel="avg@k", title="accuracy by checkpoint", ylim=(0, 1.02))
        written.append(save_figure(fig, [ax], out / "accuracy_vs_step.png"))
    return written


# ----------------------------------------------------------------------------- running
def evaluate_model(model: dict, problems: list[dict], args, s: dict, writer: pq.ParquetWriter, totals: dict) -> None:
    """Run one model's problems through the pipeline, appending its scored samples to ``writer``."""
    backend = args.backend
    if args.endpoint:
        gen = dict(model_path=str(model["dir"]), samples=s["samples"], temperature=s["temperature"], top_p=s["top_p"],
                   model_name=args.model_name, max_in_flight=args.max_in_flight, api_key=args.api_key,
                   trust_remote_code=args.trust_remote_code)
    else:
        gen = dict(backend=backend, model_path=str(model["dir"]), samples=s["samples"], temperature=s["temperature"],
                   top_p=s["top_p"], dtype=args.dtype or ("bfloat16" if backend == "sglang" else "float32"),
                   trust_remote_code=args.trust_remote_code, torch_threads=args.torch_threads,
                   batch_size=args.generation_batch_size, deterministic=args.deterministic)
    gpus = args.gpus_per_generator if args.gpus_per_generator is not None else (1.0 if backend == "sglang" else 0.0)
    ds = build_dataset(problems, generate_kwargs=gen, endpoint=args.endpoint, generators=args.generators,
                       cpus_per_generator=args.cpus_per_generator, gpus_per_generator=0.0 if args.endpoint else gpus,
                       scorers=args.scorers, score_timeout_s=args.score_timeout,
                       problems_per_batch=args.problems_per_batch or max(1, args.generation_batch_size // s["samples"]))
    bars = {name: tqdm(total=n * s["samples"], desc=f"{model['label']} {name}", unit="sample", leave=True,
                       disable=args.quiet) for name, n in totals.items()}
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            batch = batch.select([f.name for f in SCORED_SCHEMA]).cast(SCORED_SCHEMA)
            batch = batch.add_column(0, "model", pa.array([model["label"]] * batch.num_rows, pa.string()))
            writer.write_table(batch)
            for name, count in zip(*_value_counts(batch.column("benchmark"))):
                bars[name].update(count)
    finally:
        for bar in bars.values():
            bar.close()


def _value_counts(column) -> tuple[list, list]:
    vc = column.combine_chunks().value_counts()
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def default_out(model_arg: str) -> Path:
    return Path(model_arg).expanduser().resolve() / "eval" / time.strftime("%Y%m%d-%H%M%S")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        s = settings_from(args)
        chosen = parse_benchmarks(s["benchmarks"])
        sets = {item.name: load_eval_set(item, args.limit) for item in chosen}
        models = models_to_evaluate(args)
        data_cfg = run_config(args.model)
    except EvalInputError as exc:
        print(f"aapo eval: {exc}", file=sys.stderr)
        return 2
    titles = {b.name: b.title for b in BENCHMARKS.values()} | {i.name: i.title for i in chosen if not i.builtin}
    out = Path(args.out) if args.out else default_out(args.model)
    out.mkdir(parents=True, exist_ok=True)
    if args.quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    started = time.perf_counter()
    init_ray(**eval_ray_cluster(args))  # started early by the `aapo` script: aapo_ray.launch.start_ray_early
    ray_init_s = time.perf_counter() - started  # the wait for it
    ray.data.DataContext.get_current().enable_progress_bars = False  # one tqdm bar per benchmark instead
    totals = {name: len(ds) for name, ds in sets.items()}
    notes = {}
    with pq.ParquetWriter(out / "samples.parquet", OUT_SCHEMA) as writer:
        for model in models:
            problems, notes[model["label"]] = build_problems(sets, model["dir"], data_cfg, s, args.seed,
                                                             args.trust_remote_code)
            evaluate_model(model, problems, args, s, writer, totals)
    results = compute_results(out / "samples.parquet", models, list(sets))
    for label in results:
        for name, res in results[label].items():
            res.update(notes[label][name])
    wall = time.perf_counter() - t0
    summary = {"model": str(args.model), "endpoint": args.endpoint, "protocol": args.protocol, "seed": args.seed,
               "settings": s, "limit": args.limit, "backend": None if args.endpoint else args.backend,
               "models": [{"label": m["label"], "dir": str(m["dir"]), "step": m["step"]} for m in models],
               "results": results, "wall_s": wall, "ray_init_s": ray_init_s}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plots = plot(results, models, titles, out)
    k = s["samples"]
    print(f"\navg@{k} (%), T={s['temperature']} top_p={s['top_p']} max_new_tokens={s['max_new_tokens']}"
          + (f", first {args.limit} problems per set" if args.limit else ""))
    print(paper_table(list(results.items()), titles, PAPER_SETS))
    for label, res in results.items():
        for name, r in res.items():
            print(f"  {label} {name}: n={r['n']} avg@{k}={r['avg@k']:.3f} pass@{k}={r['pass@k'][str(k)]:.3f} "
                  f"maj@{k}={r['maj@k']:.3f} mean_len={r['mean_length']:.1f} truncated={r['truncation_rate']:.2f}")
    print(f"wrote {out / 'results.json'}, {out / 'samples.parquet'}, " + ", ".join(map(str, plots))
          + f" ({wall:.1f} s)")
    return 0
