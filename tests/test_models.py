"""Model loading errors, the embedded tokenizer, the warm start and its cache."""

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from aapo_ray import embedded as models
from aapo_ray.backends import HFBackend
from aapo_ray.embedded import build_tokenizer, default_model_path, evaluate_accuracy, read_recipe
from aapo_ray.models import load_model_and_tokenizer
from aapo_ray.sampling import SamplingParams
from aapo_ray.synthetic import PROMPT_TEMPLATE, SyntheticTask

# A cheap recipe: real tokenizer + Llama, a few SFT steps, no accuracy to speak of.
QUICK = {"sft": {"steps": 3}, "eval": {"n": 4, "max_new_tokens": 8}}


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory):
    """The default recipe, built once per session (the real warm start)."""
    cache = tmp_path_factory.mktemp("aapo_cache")
    t0 = time.perf_counter()
    path = default_model_path(cache, progress=False)
    return cache, path, time.perf_counter() - t0


@pytest.fixture(scope="session")
def quick_dir(tmp_path_factory):
    return default_model_path(tmp_path_factory.mktemp("quick"), recipe=QUICK, progress=False)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    task = SyntheticTask()
    tok = build_tokenizer(task)
    tok.save_pretrained(tmp_path)
    re = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(re, PreTrainedTokenizerFast)
    assert len(re) == len(tok) and re.vocab_size == tok.vocab_size
    for name in ("pad", "eos", "bos", "unk"):
        assert getattr(re, f"{name}_token_id") == getattr(tok, f"{name}_token_id") is not None
    q, _, sol = task.problems("test", 1)[0]
    texts = [PROMPT_TEMPLATE.format(question=q) + sol, "Janet’s ducks: 1,234 \\frac{1}{2} ü"]
    for t in texts:
        a = tok(t, add_special_tokens=False)["input_ids"]
        assert re(t, add_special_tokens=False)["input_ids"] == a
        assert re(t)["input_ids"] == a  # no special tokens are added implicitly
        assert re.decode(a) == t
    assert all(len(tok.tokenize(d)) == 1 for d in "0123456789")  # digits split individually
    ids = tok(sol, add_special_tokens=False)["input_ids"]
    assert len(ids) + 1 <= 32  # completion + eos is short
    msgs = [{"role": "user", "content": q}]
    assert re.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        PROMPT_TEMPLATE.format(question=q)


# ----------------------------------------------------------------------------- loading errors
def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_model_and_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(tmp_path / "empty")


def test_pickle_only_weights_refused_unless_allowed(quick_dir, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(quick_dir, d)
    sd = {k: v for k, v in __import__("safetensors.torch").torch.load_file(
        d / "model.safetensors").items()}
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        load_model_and_tokenizer(d)
    model, _ = load_model_and_tokenizer(d, allow_pickle=True)
    ref, _ = load_model_and_tokenizer(quick_dir)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    for f in d.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_model_and_tokenizer(d, allow_pickle=True)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model_and_tokenizer(d)


def test_non_causal_lm_refused(tmp_path):
    from safetensors.torch import save_file
    from transformers import T5Config

    T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'t5' checkpoint.*not a causal language model"):
        load_model_and_tokenizer(tmp_path)


def test_pad_token_fallback_and_missing_eos(quick_dir, tmp_path, caplog):
    d = tmp_path / "nopad"
    shutil.copytree(quick_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="aapo_ray.models"):
        _, tok = load_model_and_tokenizer(d)
    assert tok.pad_token == tok.eos_token == "</s>" and "no pad token" in caplog.text
    cfg.pop("eos_token", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        load_model_and_tokenizer(d)


# ----------------------------------------------------------------------------- generation
def generate_texts(model, tok, prompts, temperature, max_new_tokens, seed=0):
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return HFBackend(model, tok).generate(ids, params).texts


def test_generation_batched_left_padding_matches_unbatched(quick_dir):
    model, tok = load_model_and_tokenizer(quick_dir)
    prompts = ["Compute 1+2.\n", "Compute 3+4-5+6+7.\n", "Compute 9.\n", "7"]
    one = [generate_texts(model, tok, [p], 0, 6)[0] for p in prompts]
    assert generate_texts(model, tok, prompts, 0, 6) == one
    a = generate_texts(model, tok, prompts * 4, 1.0, 6, seed=5)
    assert generate_texts(model, tok, prompts * 4, 1.0, 6, seed=5) == a


def test_row_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(quick_dir):
    """With one seed per row, a row's completion is a function of its prompt and seed alone: the same
    alone, in a batch, in another order, split across generate batches."""
    model, tok = load_model_and_tokenizer(quick_dir)
    prompts = tok(["Compute 1+2.\n", "Compute 3+4-5+6+7.\n", "Compute 9.\n", "7"], add_special_tokens=False)["input_ids"]
    rows, seeds = prompts * 2, [11, 12, 13, 14, 15, 16, 17, 18]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=123)
    together = HFBackend(model, tok).generate(rows, params, seeds=seeds)
    alone = [HFBackend(model, tok).generate([r], params, seeds=[s]) for r, s in zip(rows, seeds)]
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = HFBackend(model, tok, batch_size=3).generate([rows[i] for i in order], params, seeds=[seeds[i] for i in order])
    ids = [r.tolist() for r in together.token_ids]
    assert ids == [a.token_ids[0].tolist() for a in alone]
    assert [ids[i] for i in order] == [r.tolist() for r in shuffled.token_ids]
    assert ids[:4] != ids[4:]  # same prompts, other seeds: other samples
    with pytest.raises(ValueError, match="2 seeds for 8 rows"):
        HFBackend(model, tok).generate(rows, params, seeds=seeds[:2])


def test_row_seeded_sampling_draws_from_the_temperature_top_p_distribution(quick_dir):
    """The first token of 4000 seeded rows against the model's own temperature + top-p distribution."""
    model, tok = load_model_and_tokenizer(quick_dir)
    prompt = tok("Compute 3+4-5+6+7.\n", add_special_tokens=False)["input_ids"]
    t, top_p, n = 1.3, 0.9, 4000
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float() / t
    probs = logits.softmax(-1)
    ranked = probs.sort(descending=True)
    keep = ranked.indices[:int((ranked.values.cumsum(0) < top_p).sum()) + 1]  # the nucleus
    want = torch.zeros_like(probs)
    want[keep] = probs[keep] / probs[keep].sum()
    assert len(keep) >= 3  # a distribution worth testing
    out = HFBackend(model, tok, batch_size=1000).generate(
        [prompt] * n, SamplingParams(temperature=t, top_p=top_p, max_new_tokens=1), seeds=list(range(n)))
    got = torch.bincount(torch.tensor([int(r[0]) for r in out.token_ids]), minlength=len(probs)).float() / n
    assert float(got[want == 0].sum()) == 0.0  # nothing outside the nucleus
    tolerance = 4 * (want * (1 - want) / n).sqrt() + 1e-9
    assert bool(((got - want).abs() <= tolerance).all()), (got[keep], want[keep])


def test_a_checkpoints_generation_config_does_not_change_sampling(quick_dir, tmp_path):
    """Rollouts are temperature + top-p samples, whatever penalties or filters a checkpoint's
    generation_config asks for (the learner's log-probs model nothing else)."""
    model, tok = load_model_and_tokenizer(quick_dir)
    prompts = tok(["Compute 1+2.\n", "Compute 3+4-5+6+7.\n"] * 8, add_special_tokens=False)["input_ids"]
    params = [SamplingParams(temperature=t, top_p=1.0, max_new_tokens=12, seed=3) for t in (1.0, 0.0)]
    clean = [HFBackend(model, tok).generate(prompts, p) for p in params]
    for key, value in dict(repetition_penalty=1.5, top_k=3, min_p=0.3, no_repeat_ngram_size=1, typical_p=0.5,
                           min_new_tokens=10, min_length=40, epsilon_cutoff=0.2).items():
        setattr(model.generation_config, key, value)
    poisoned = [HFBackend(model, tok).generate(prompts, p) for p in params]
    for a, b in zip(clean, poisoned):
        assert a.texts == b.texts and all(np.array_equal(x, y) for x, y in zip(a.token_ids, b.token_ids))


# ----------------------------------------------------------------------------- warm start
def test_warm_start_lands_in_accuracy_band(warm_cache):
    cache, path, seconds = warm_cache
    info = read_recipe(path)
    b = info["build"]
    print(f"\nwarm start: {b} (fixture wall {seconds:.1f}s)")
    assert 0.10 <= b["heldout_accuracy_t1"] <= 0.50
    assert b["heldout_accuracy_greedy"] >= b["heldout_accuracy_t1"] - 0.05
    assert 0.5e6 < b["num_parameters"] < 2e6
    model, tok = load_model_and_tokenizer(path)
    assert model.config.model_type == "llama" and isinstance(tok, PreTrainedTokenizerFast)
    # reloaded next to a llama config it stays the saved tokenizer: no added tokens / bos
    assert len(tok) == model.config.vocab_size
    assert tok("Compute 1+2.")["input_ids"] == tok("Compute 1+2.", add_special_tokens=False)["input_ids"]
    probs = SyntheticTask(**info["recipe"]["task"]).problems("test", 300)[100:]
    acc = evaluate_accuracy(model, tok, [p[0] for p in probs], [p[1] for p in probs],
                            temperature=1.0, max_new_tokens=40, seed=1, batch_size=128,
                            template=PROMPT_TEMPLATE)
    assert 0.10 <= acc <= 0.50
    files = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= files


def test_cache_reused_and_rebuilt_on_recipe_change(warm_cache, monkeypatch, capsys):
    cache, path, _ = warm_cache
    calls = []
    real_build = models.build_default_model

    def counting_build(out, recipe, **kw):
        calls.append(json.dumps(recipe, sort_keys=True))
        time.sleep(0.3)  # widen the race window for the concurrent callers below
        return real_build(out, recipe, **kw)

    monkeypatch.setattr(models, "build_default_model", counting_build)
    t0 = time.perf_counter()
    assert default_model_path(cache, progress=False) == path
    assert time.perf_counter() - t0 < 2 and calls == []

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        default_model_path(cache, recipe=QUICK, progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and results[0] != path
    assert read_recipe(results[0])["recipe"]["sft"]["steps"] == 3
    assert not [p for p in Path(cache).iterdir() if p.name.startswith(".tmp")]
    assert default_model_path(cache, recipe=QUICK, progress=False) == results[0]
    assert len(calls) == 1

    version = models.MODEL_CODE_VERSION
    monkeypatch.setattr(models, "MODEL_CODE_VERSION", "test-bump")
    assert default_model_path(cache, recipe=QUICK, progress=False) != results[0]
    assert len(calls) == 2
    with pytest.raises(ValueError, match="unknown recipe key"):
        default_model_path(cache, recipe={"sft": {"stepz": 1}})

    monkeypatch.setattr(models, "MODEL_CODE_VERSION", version)
    out = models.warmstart_report(cache, eval_n=50)
    text = capsys.readouterr().out
    assert len(calls) == 2 and out["path"] == path and out["cached"]
    assert "warm-start build time" in text and "greedy" in text and "parameters" in text
    assert out["num_parameters"] == read_recipe(path)["build"]["num_parameters"]
