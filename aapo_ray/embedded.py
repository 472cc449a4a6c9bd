"""The embedded default policy: a ~1M-parameter Llama with a tokenizer trained locally on the synthetic
arithmetic task (:mod:`aapo_ray.synthetic`), warm-started by a short supervised fine-tune so that RL
starts with signal but not saturation. Built once and cached as an ordinary HF directory
(:func:`default_model_path`); nothing is downloaded. Its evaluation samples through the same
:class:`~aapo_ray.backends.HFBackend` as training and serving.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from filelock import FileLock
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast

from aapo_ray.backends import HFBackend
from aapo_ray.data import render_prompts
from aapo_ray.models import load_model_and_tokenizer
from aapo_ray.reward import accuracy_reward
from aapo_ray.sampling import SamplingParams
from aapo_ray.synthetic import PROMPT_TEMPLATE, SyntheticTask

__all__ = ["MODEL_CODE_VERSION", "DEFAULT_RECIPE", "build_tokenizer", "build_default_model", "default_model_path",
           "default_cache_root", "resolve_recipe", "recipe_hash", "read_recipe", "evaluate_accuracy",
           "warmstart_report", "weights_sha256", "model_identity"]

log = logging.getLogger(__name__)

#: Bump when the build code changes in a way that changes the produced model.
MODEL_CODE_VERSION = "1"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# user (and optional system) turns each followed by "\n": identical to PROMPT_TEMPLATE.
_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
    "{%- else -%}{{ m['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

DEFAULT_RECIPE: dict = {
    "task": {"num_operands": 4, "max_operand": 9, "seed": 0},
    "tokenizer": {"vocab_size": 320, "corpus_size": 2000},
    "model": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 384, "max_position_embeddings": 128},
    # SFT trains exactly "steps" steps: a fixed budget, so the warm start is the same recipe on
    # every machine (an early stop on one sampled accuracy check landed at different strengths on
    # different CPUs). "steps": None instead stops at the first check (every eval_every steps from
    # eval_from on) where sampled T=1 accuracy on val_n unseen train-split problems reaches
    # target_accuracy, or at max_steps. 255 is where that rule stopped on the README's machine.
    "sft": {"steps": 255, "max_steps": 400, "batch_size": 64, "lr": 3e-3, "warmup_steps": 30,
            "weight_decay": 0.0, "num_examples": 4000, "val_n": 128, "target_accuracy": 0.3,
            "eval_from": 100, "eval_every": 5, "seed": 0, "threads": 2},
    "eval": {"n": 200, "max_new_tokens": 40, "seed": 0},
}


# ----------------------------------------------------------------------------- recipe/cache
def resolve_recipe(overrides: dict | None = None) -> dict:
    """DEFAULT_RECIPE with ``overrides`` (``{"sft": {"steps": 10}}``) merged in."""
    rec = copy.deepcopy(DEFAULT_RECIPE)
    for sec, vals in (overrides or {}).items():
        if sec not in rec or not isinstance(vals, dict):
            raise ValueError(f"unknown recipe section {sec!r}; sections: {list(rec)}")
        for k, v in vals.items():
            if k not in rec[sec]:
                raise ValueError(f"unknown recipe key {sec}.{k}; keys: {list(rec[sec])}")
            rec[sec][k] = v
    return rec


def recipe_hash(recipe: dict) -> str:
    blob = json.dumps({"recipe": recipe, "code_version": MODEL_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    """``$AAPO_RAY_CACHE/models`` or ``~/.cache/aapo_ray/models``."""
    root = os.environ.get("AAPO_RAY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "aapo_ray").expanduser() / "models"


def read_recipe(path) -> dict:
    """The ``recipe.json`` of a built default model (recipe, hash, build metrics)."""
    return json.loads((Path(path) / "recipe.json").read_text())


def default_model_path(cache_dir=None, *, recipe: dict | None = None,
                       progress: bool = True) -> str:
    """Path of the built-in tiny policy, building it on first use.

    The directory ``<cache_dir or default_cache_root()>/tiny-<hash>`` is keyed by the recipe
    (DEFAULT_RECIPE + ``recipe`` overrides) and MODEL_CODE_VERSION. The build runs in a temp
    dir renamed into place under a file lock, so concurrent callers build once and never see
    a half-written directory.
    """
    rec = resolve_recipe(recipe)
    h = recipe_hash(rec)
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    final = base / f"tiny-{h}"
    if (final / "recipe.json").is_file():
        return str(final)
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / f".tiny-{h}.lock")):
        if (final / "recipe.json").is_file():
            return str(final)
        # leftovers of killed builds (we hold the lock, so nobody is building this hash)
        for stale in [final, *base.glob(f".tmp-tiny-{h}-*")]:
            if stale.exists():
                shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tiny-{h}-", dir=base))
        try:
            metrics = build_default_model(tmp, rec, progress=progress)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built the default model in %s: %s", final, metrics)
    return str(final)


# ----------------------------------------------------------------------------- building
def build_tokenizer(task: SyntheticTask, vocab_size: int = 320, corpus_size: int = 2000,
                    model_max_length: int = 128):
    """Byte-level BPE (digits split individually, ``\\boxed{`` one token) trained on the
    task's text, as a PreTrainedTokenizerFast with <s>, </s>, <pad>, <unk>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\\boxed\{"), "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(task.corpus(corpus_size), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=_CHAT_TEMPLATE, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False)


def _sft_tensors(tokenizer, task: SyntheticTask, n: int):
    """(input_ids, attention_mask, labels) right-padded; labels only on completion + eos."""
    probs = task.problems("train", n)
    rows = []
    for q, _, sol in probs:
        p = tokenizer(PROMPT_TEMPLATE.format(question=q), add_special_tokens=False)["input_ids"]
        c = tokenizer(sol, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p, c))
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((n, L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return ids, mask, labels


def build_default_model(out_dir, recipe: dict | None = None, *, progress: bool = True) -> dict:
    """Build tokenizer + model, warm-start it, evaluate, and save everything to ``out_dir``
    (``recipe.json`` last). Returns the build metrics. Global RNG / thread settings are
    restored afterwards."""
    rec = resolve_recipe(None) if recipe is None else recipe
    out = Path(out_dir)
    t0 = time.perf_counter()
    task = SyntheticTask(**rec["task"])
    sft = rec["sft"]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(sft["threads"]))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sft["seed"]))
            tokenizer = build_tokenizer(task, **rec["tokenizer"], model_max_length=int(
                rec["model"]["max_position_embeddings"]))
            from transformers import LlamaConfig, LlamaForCausalLM  # ~1.5 s: only when building

            config = LlamaConfig(
                vocab_size=len(tokenizer), num_key_value_heads=rec["model"]["num_attention_heads"],
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                **rec["model"])
            model = LlamaForCausalLM(config)
            ids, mask, labels = _sft_tensors(tokenizer, task, int(sft["num_examples"]))
            opt = torch.optim.AdamW(model.parameters(), lr=sft["lr"], betas=(0.9, 0.98),
                                    weight_decay=sft["weight_decay"])
            warm = max(1, int(sft["warmup_steps"]))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
            # Early stop on sampled (T=1) accuracy over train-split problems the SFT never sees
            # (the split is a prefix-stable sequence): lands in the band whatever the seed/speed.
            n_ex, val_n = int(sft["num_examples"]), int(sft["val_n"])
            val = task.problems("train", n_ex + val_n)[n_ex:]
            val_kw = dict(temperature=1.0, max_new_tokens=int(rec["eval"]["max_new_tokens"]),
                          seed=int(sft["seed"]), batch_size=256, template=PROMPT_TEMPLATE)
            gen = torch.Generator().manual_seed(int(sft["seed"]))
            fixed = sft["steps"] is not None
            max_steps = int(sft["steps"]) if fixed else int(sft["max_steps"])
            every = int(sft["eval_every"])
            bar = tqdm(range(max_steps), desc="aapo-ray warm start (SFT)", disable=not progress)
            loss_val, val_acc, steps = float("nan"), None, 0
            for step in bar:
                model.train()
                idx = torch.randint(0, ids.shape[0], (int(sft["batch_size"]),), generator=gen)
                loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                loss_val, steps = loss.item(), step + 1
                if (not fixed and steps >= int(sft["eval_from"]) and steps % every == 0
                        and val_n > 0):
                    val_acc = evaluate_accuracy(model, tokenizer, [v[0] for v in val],
                                                [v[1] for v in val], **val_kw)
                    bar.set_postfix(loss=f"{loss_val:.3f}", val_acc_t1=f"{val_acc:.2f}")
                    if val_acc >= float(sft["target_accuracy"]):
                        break
                elif step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_val:.3f}")
            bar.close()
            model.eval()
            sft_seconds = time.perf_counter() - t0
            ev = rec["eval"]
            test = task.problems("test", int(ev["n"]))
            qs, golds = [t[0] for t in test], [t[1] for t in test]
            kw = dict(max_new_tokens=int(ev["max_new_tokens"]), seed=int(ev["seed"]),
                      batch_size=256, template=PROMPT_TEMPLATE)
            acc_t1 = evaluate_accuracy(model, tokenizer, qs, golds, temperature=1.0, **kw)
            acc_greedy = evaluate_accuracy(model, tokenizer, qs, golds, temperature=0.0, **kw)
    finally:
        torch.set_num_threads(old_threads)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=int(rec["eval"]["max_new_tokens"]))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {
        "build_seconds": round(time.perf_counter() - t0, 2),
        "sft_seconds": round(sft_seconds, 2),
        "sft_steps": steps,
        "final_sft_loss": round(loss_val, 4),
        "sft_val_accuracy_t1": val_acc,
        "heldout_n": int(rec["eval"]["n"]),
        "heldout_accuracy_t1": acc_t1,
        "heldout_accuracy_greedy": acc_greedy,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": weights_sha256(out),
    }
    (out / "recipe.json").write_text(json.dumps(
        {"recipe": rec, "code_version": MODEL_CODE_VERSION, "hash": recipe_hash(rec),
         "prompt_template": PROMPT_TEMPLATE, "build": metrics}, indent=2))
    return metrics


def model_identity(model_path) -> dict:
    """What a run records of its initial weights (``model.json``): the path, and for a built
    embedded model its recipe hash, SFT steps and weights fingerprint."""
    ident = {"path": str(model_path)}
    recipe = Path(model_path) / "recipe.json"
    if recipe.is_file():
        info = json.loads(recipe.read_text())
        build = info.get("build", {})
        ident.update(recipe_hash=info.get("hash"), sft_steps=build.get("sft_steps"),
                     weights_sha256=build.get("weights_sha256") or weights_sha256(model_path))
    return ident


def weights_sha256(model_dir) -> str:
    """SHA-256 of a model directory's ``*.safetensors`` files: the warm start's fingerprint (two
    machines built the same weights exactly when these agree)."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- evaluation
def evaluate_accuracy(model, tokenizer, questions: Sequence[str], golds: Sequence[str], *,
                      temperature: float = 1.0, max_new_tokens: int = 64,
                      num_samples: int = 1, seed: int = 0, batch_size: int = 64,
                      template: str | None = "{question}",
                      system_prompt: str | None = None, top_p: float = 1.0) -> float:
    """Mean ``accuracy_reward`` over ``num_samples`` completions per question, sampled by
    :class:`~aapo_ray.backends.HFBackend` (``temperature <= 0`` = greedy). Seeded; the global RNG
    state and the model's train/eval mode are restored afterwards.

    ``questions`` are rendered with :func:`aapo_ray.data.render_prompts`: the default
    template ``"{question}"`` uses them as-is, ``template=None`` applies the chat template.
    """
    if len(questions) != len(golds):
        raise ValueError(f"{len(questions)} questions but {len(golds)} golds")
    if not len(questions):
        raise ValueError("evaluate_accuracy needs at least one question")
    prompts = render_prompts(list(questions), template=template, tokenizer=tokenizer,
                             system_prompt=system_prompt)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids = [p for p in ids for _ in range(num_samples)]
    golds = [g for g in golds for _ in range(num_samples)]
    params = SamplingParams(temperature=max(float(temperature or 0.0), 0.0), top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed)
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            texts = HFBackend(model, tokenizer, batch_size=batch_size).generate(ids, params).texts
    finally:
        model.train(was_training)
    return sum(accuracy_reward(t, g) for t, g in zip(texts, golds)) / len(texts)


# ----------------------------------------------------------------------------- report
def warmstart_report(cache_dir=None, *, eval_n: int = 500, seed: int = 0) -> dict:
    """Build (or reuse) the default model and print its build time, held-out accuracy
    (sampled at T=1 and greedy) and parameter count. Returns the numbers."""
    t0 = time.perf_counter()
    path = default_model_path(cache_dir)
    wall = time.perf_counter() - t0
    info = read_recipe(path)
    model, tok = load_model_and_tokenizer(path)
    task = SyntheticTask(**info["recipe"]["task"])
    probs = task.problems("test", eval_n)
    qs, golds = [p[0] for p in probs], [p[1] for p in probs]
    mnt = int(info["recipe"]["eval"]["max_new_tokens"])
    kw = dict(max_new_tokens=mnt, seed=seed, batch_size=256, template=PROMPT_TEMPLATE)
    acc_t1 = evaluate_accuracy(model, tok, qs, golds, temperature=1.0, **kw)
    acc_g = evaluate_accuracy(model, tok, qs, golds, temperature=0.0, **kw)
    n_params = sum(p.numel() for p in model.parameters())
    b = info["build"]
    cached = wall < 0.5 * b["build_seconds"]
    print(f"default model: {path}")
    print(f"warm-start build time: {b['build_seconds']:.1f}s (SFT {b['sft_seconds']:.1f}s)"
          + (" [cached build]" if cached else ""))
    print(f"held-out accuracy on {eval_n} synthetic test problems: sampled T=1 {acc_t1:.1%}, "
          f"greedy {acc_g:.1%}")
    print(f"model parameters: {n_params:,}")
    return {"path": path, "build_seconds": b["build_seconds"], "cached": cached,
            "heldout_accuracy_t1": acc_t1, "heldout_accuracy_greedy": acc_g,
            "num_parameters": n_params}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    warmstart_report()
