"""One corpus of bad inputs: each one gets a clear error that names the problem, or a counted skip.

Four doors: the config (:func:`aapo_ray.config.load_config`), prompt data files
(:func:`aapo_ray.data.load_prompt_dataset`), model directories
(:func:`aapo_ray.models.load_model_and_tokenizer`) and completions to score
(:class:`aapo_ray.batch_scorer.BatchScorer`, bounded time per item). This file holds the cases no
other test has; the rest of the corpus lives next to the code it tests:

config (tests/test_config.py)
  - ``test_bad_configs_name_the_field``: unknown keys with did-you-mean (``algo.grup_size``,
    ``lerner``), wrong types (``group_size=six``), out of range (``zero_stage=5``,
    ``temperature=-1``, negative ``margin_clip``), impossible combinations (group size 1 with std
    scaling, completions not divisible by learners, sglang without GPUs, KL with AAPO, bf16 on
    CPU), unknown reward functions and import paths, malformed overrides;
  - ``test_bad_yaml_files``: missing file, invalid YAML, a YAML list;
  - ``test_cli_rejects_invalid_config_before_starting_anything``: exit 2, no Ray started.
data (tests/test_data.py)
  - ``test_each_bad_row_skip_and_fail`` (``BAD_ROWS``): missing question / answer, blank
    question, non-string gold, no gold marker, invalid JSON, non-object rows, non-UTF-8 bytes,
    over-long rows, each skipped and counted or (``bad_rows="fail"``) an error naming file and row;
  - ``test_bad_rows_in_parquet_name_the_row``, ``test_skip_counts_all_but_keeps_first_reasons``,
    ``test_empty_dataset_is_an_error`` (empty file, all rows bad, missing file, unknown type),
    ``test_duplicate_ids_name_both_rows``, ``test_extract_gold_errors``.
models (tests/test_models.py)
  - ``test_missing_paths_are_clear_errors`` (missing dir, no config.json),
    ``test_pickle_only_weights_refused_unless_allowed`` (and no tokenizer files, no weights),
    ``test_non_causal_lm_refused`` (a T5 checkpoint), ``test_pad_token_fallback_and_missing_eos``.
completions (tests/test_reward.py)
  - ``test_pathological_completions_are_bounded_and_counted``: huge powers and factorials, 5000
    nested braces, 3000-term LaTeX, a 10^6-digit number, a 1.35 MB output;
  - ``test_hard_deadline_kills_and_respawns_a_stuck_worker``,
    ``test_worker_crash_is_an_error_and_scoring_continues``, ``test_weighted_total_none_and_errors``.
serving (tests/test_serve.py)
  - ``BAD`` / ``test_bad_request_is_a_json_4xx``: malformed JSON and every field out of range;
  - oversized bodies, slow and vanishing clients, timeouts: the ``hostile clients`` section.

"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from aapo_ray.config import ConfigError, load_config

# ============================================================================= config
CONFIG_CASES = [
    (["learner.zero_stage=3"], "zero_stage=3 is not supported"),
    (["learner.offload_optimizer=true", "learner.zero_stage=0"], "offload_optimizer needs learner.zero_stage 1 or 2"),
    (["rollout.prompts_per_step=2", "algo.group_size=3", "learner.num_learners=4"], "6 completions do not split"),
    (["algo.margin_clip=[0.2]"], "algo.margin_clip"),
    (["algo.estimator=ppo"], "algo.estimator"),
    (["data.format=csv"], "data.format"),
    (["data.bad_rows=ignore"], "data.bad_rows"),
    (["run.steps=0"], "run.steps"),
    (["reward.timeout_s=0"], "reward.timeout_s"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["algo.group_size=2.5"], "algo.group_size"),
    (["learner.lr=fast"], "learner.lr"),
    (["rollout.max_new_tokens=null"], "rollout.max_new_tokens"),
    (["algo.group_size.size=3"], "algo.group_size"),  # a field used as a section
    (["model.trust_remote_cod=true"], "did you mean 'trust_remote_code'"),
    (["ray.adress=auto"], "did you mean 'address'"),
    (["=3"], "not KEY=VALUE"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value), str(e.value)


def test_config_file_with_several_errors_names_each(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  zero_stag: 2\nalgo:\n  group_size: many\nrollout:\n  top_p: 7\nlearnr: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    for expected in ("learner.zero_stag: unknown key; did you mean 'zero_stage'?", "algo.group_size",
                     "rollout.top_p", "learnr: unknown key; did you mean 'learner'?"):
        assert expected in text, text
    path.write_text("algo: 5\n")  # a section that is not a mapping
    with pytest.raises(ConfigError, match="algo"):
        load_config(path)
    path.write_bytes(b"algo:\n  group_size: \xff\xfe\n")  # not UTF-8
    with pytest.raises((ConfigError, UnicodeDecodeError)):
        load_config(path)


@pytest.mark.parametrize("override", ["reward.functions={accuracy: .nan}", "reward.functions={accuracy: .inf}",
                                      "reward.functions={}"])
def test_reward_weights_checked_before_start(override):
    with pytest.raises(ConfigError, match="reward.functions"):
        load_config(None, [override])


# ============================================================================= data files
GOOD = {"question": "What is 2+2?", "answer": "#### 4"}


def _jsonl(path: Path, rows: list) -> str:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


DATA_ROWS = {  # row -> the reason named for it (load_prompt_dataset defaults: fmt gsm8k, max 100k chars)
    "empty answer": ({"question": "q", "answer": ""}, "no '####'"),
    "empty gold after marker": ({"question": "q", "answer": "####   "}, "empty gold answer"),
    "empty question": ({"question": "", "answer": "#### 4"}, "empty question field"),
    "question is a list": ({"question": ["a", "b"], "answer": "#### 4"}, "not a string (list)"),
    "question is null": ({"question": None, "answer": "#### 4"}, "missing question field"),
    "answer is NaN": (b'{"question": "q", "answer": NaN}\n', "not a string (float)"),
    "truncated JSON": (b'{"question": "q", "answ\n', "invalid JSON"),
    "NUL bytes": (b"\x00" * 64 + b"\n", "invalid JSON"),
    "latin-1 bytes": ('{"question": "caf\u00e9 \u00fc", "answer": "#### 4"}\n'.encode("latin-1"), "not valid UTF-8"),
    "150k-char row": ({"question": "x" * 150_000, "answer": "#### 4"}, "too long (150"),  # decoded-size check
    "10 MB row": ({"question": "y" * 10_000_000, "answer": "#### 4"}, "too long (1000"),  # byte pre-check
}


@pytest.mark.parametrize("case", sorted(DATA_ROWS))
def test_bad_data_rows_are_counted_skips_or_named_errors(tmp_path, case):
    row, reason = DATA_ROWS[case]
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, row, GOOD])
    t0 = time.monotonic()
    from aapo_ray.data import load_prompt_dataset

    ds = load_prompt_dataset(path)
    assert time.monotonic() - t0 < 10  # a 10 MB row is skipped, not parsed at length
    assert (len(ds), ds.skipped) == (2, 1) and reason in ds.problems[0], ds.problems
    assert "row 1 (line 2)" in ds.problems[0]
    with pytest.raises(ValueError, match="row 1"):
        load_prompt_dataset(path, bad_rows="fail")


def test_lone_surrogate_row_is_a_counted_skip(tmp_path):
    from aapo_ray.data import load_prompt_dataset

    path = _jsonl(tmp_path / "s.jsonl", [GOOD, b'{"question": "a \\ud800 b", "answer": "#### 4"}\n', GOOD])
    ds = load_prompt_dataset(path)
    assert (len(ds), ds.skipped) == (2, 1) and "UTF-8" in ds.problems[0]


def test_bad_data_files(tmp_path):
    from aapo_ray.data import load_prompt_dataset

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n\n")  # only blank lines
    with pytest.raises(ValueError, match="empty data set"):
        load_prompt_dataset(str(blank))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ValueError, match="empty data set.*bad row"):
        load_prompt_dataset(str(binary))
    (tmp_path / "dir.jsonl").mkdir()  # a directory named like a file: looked at as a datasets dir
    with pytest.raises(Exception, match="dir.jsonl"):
        load_prompt_dataset(str(tmp_path / "dir.jsonl"))
    # ids: "1" and 1 are the same id; a bool is not an id
    path = _jsonl(tmp_path / "ids.jsonl", [dict(GOOD, id=1), dict(GOOD, id="1")])
    with pytest.raises(ValueError, match="duplicate prompt id 1"):
        load_prompt_dataset(path, id_field="id")
    ds = load_prompt_dataset(_jsonl(tmp_path / "b.jsonl", [dict(GOOD, id=True), dict(GOOD, id=2)]), id_field="id")
    assert ds.ids == [2] and "is a bool" in ds.problems[0]


def test_utf8_bom_file(tmp_path):
    """A JSON-Lines file saved with a UTF-8 byte-order mark (Windows editors): its first row must not
    vanish silently. Today it is a counted skip naming the BOM (load as utf-8-sig to accept it)."""
    from aapo_ray.data import load_prompt_dataset

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 3)
    ds = load_prompt_dataset(str(path))
    assert len(ds) == 3 or (len(ds) == 2 and ds.skipped == 1 and "BOM" in ds.problems[0]), ds.problems


# ============================================================================= model directories
@pytest.fixture(scope="module")
def tok():
    from aapo_ray.embedded import build_tokenizer
    from aapo_ray.synthetic import SyntheticTask

    return build_tokenizer(SyntheticTask(), vocab_size=300, corpus_size=200)


@pytest.fixture(scope="module")
def llama_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory, tok, llama_config) -> Path:
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("models") / "good"
    LlamaForCausalLM(llama_config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _variant(good: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(good, d)
    return d


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_good_model_loads(good_model):
    from aapo_ray.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(good_model)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


def test_bad_model_directories_are_clear_errors(good_model, tmp_path):
    from aapo_ray.models import load_model_and_tokenizer

    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model_and_tokenizer(a_file)

    d = _variant(good_model, tmp_path, "bad-json")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the model config.*bad-json"):
        load_model_and_tokenizer(d)

    d = _variant(good_model, tmp_path, "no-model-type")
    _edit_json(d / "config.json", model_type=None)
    with pytest.raises(ValueError, match="model_type"):
        load_model_and_tokenizer(d)

    d = _variant(good_model, tmp_path, "unknown-type")
    _edit_json(d / "config.json", model_type="not-a-real-architecture")
    with pytest.raises(ValueError, match="not-a-real-architecture"):
        load_model_and_tokenizer(d)

    d = _variant(good_model, tmp_path, "bad-tokenizer")
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        load_model_and_tokenizer(d)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "shape-mismatch"])
def test_damaged_weights_name_the_directory(good_model, tmp_path, damage):
    from aapo_ray.models import load_model_and_tokenizer

    d = _variant(good_model, tmp_path, f"damaged-{damage}")
    weights = d / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"garbage" * 100)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        _edit_json(d / "config.json", hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=f"damaged-{damage}"):
        load_model_and_tokenizer(d)


@pytest.mark.parametrize("kind", ["LlamaModel", "BertModel"])
def test_checkpoint_without_lm_head_refused(tok, llama_config, tmp_path, kind):
    from transformers import BertConfig, BertModel, LlamaModel

    from aapo_ray.models import load_model_and_tokenizer

    d = tmp_path / kind
    if kind == "LlamaModel":
        LlamaModel(llama_config).save_pretrained(d)
    else:
        BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(d)
    tok.save_pretrained(d)
    with pytest.raises(ValueError, match="causal"):
        load_model_and_tokenizer(d)


def test_tokenizer_without_pad_token_gets_eos_on_the_instance_only(good_model, tmp_path):
    """The pad fallback (tests/test_models.py) must not rewrite the checkpoint's files."""
    from aapo_ray.models import load_model_and_tokenizer

    d = _variant(good_model, tmp_path, "nopad")
    _edit_json(d / "tokenizer_config.json", pad_token=None)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    _, t = load_model_and_tokenizer(d)
    assert t.pad_token == t.eos_token
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before


# ============================================================================= completions to score
BOMBS = {  # completion, gold: each scores (or times out) within the per-item budget and counts
    "NUL bytes": ("\x00" * 10_000 + "\\boxed{2}\x00", "1"),
    "control characters": ("".join(map(chr, range(32))) * 300 + "The answer is 2", "1"),
    "bidi override": ("\u202e\\boxed{2}\u202c \u2066x\u2069", "1"),
    "lone surrogate": ("\ud800 \\boxed{2} \udfff", "1"),
    "unbalanced left": ("\\boxed{" + "\\left(" * 20_000 + "}", "1"),
    "nested fractions": ("$" + "\\frac{1}{" * 2_000 + "2" + "}" * 2_000 + "$", "1"),
    "nested roots": ("\\boxed{" + "\\sqrt{" * 3_000 + "2" + "}" * 3_000 + "}", "1"),
    "power tower": ("\\boxed{" + "2^{" * 2_000 + "2" + "}" * 2_000 + "}", "1"),
    "100k unclosed boxes": ("\\boxed{" * 100_000, "1"),
    "100k boxes": ("\\boxed{2}" * 100_000, "1"),
    "huge matrix": ("$\\begin{pmatrix}" + "1&" * 50_000 + "1\\end{pmatrix}$", "1"),
    "100k dollars": ("$" * 100_000, "1"),
    "exponent literal": ("The answer is 3e999999999", "1"),
    "giant sum": ("\\boxed{\\sum_{n=1}^{10^{100}} n^{n^{n}}}", "1"),
    "5 MB box": ("\\boxed{" + "x" * 5_000_000 + "}", "1"),
    "3 MB of digits": ("1" * 3_000_000, "1"),
    "1.7 MB of answers": ("The answer is 7. " * 100_000, "1"),
    "gold tower": ("\\boxed{1}", "9^{9^{9^{9^{9}}}}"),
    "gold NUL": ("\\boxed{1}", "\x00"),
}


def test_bad_completions_are_bounded_and_counted():
    from aapo_ray.batch_scorer import BatchScorer

    timeout_s = 1.0
    fns = {"accuracy": 1.0, "format": 0.5, "cosine": 0.5}
    names = sorted(BOMBS)
    completions = ["\\boxed{1}"] + [BOMBS[n][0] for n in names] + ["\\boxed{1}"]
    golds = ["1"] + [BOMBS[n][1] for n in names] + ["1"]
    with BatchScorer(fns, timeout_s=timeout_s, num_workers=2) as scorer:
        scorer.score(["\\boxed{1}"], ["1"])  # start-up is not part of the budget
        t0 = time.monotonic()
        res = scorer.score(completions, golds)
        wall = time.monotonic() - t0
        c = res.counters
        # every (completion, function) cell is accounted for: a value, or a counted none/error/timeout
        assert c["scored"] + c["none"] + c["errors"] + c["timeouts"] == len(completions) * len(fns), c
        assert np.isfinite(res.total).all()
        assert res.total[0] == res.total[-1] == pytest.approx(1.0 + 0.5 * 0.0 + 0.5 * (0.5 + 0.25 * (1 + np.cos(np.pi * 9 / 1000))))
        for i, name in enumerate(names, 1):  # no bomb is right: accuracy is 0 or not scored
            assert not res.per_function["accuracy"][i] == 1.0, name
        hard = scorer._hard_s
        assert wall < len(names) * hard / 2 + 15, (wall, c)  # 2 workers, each item bounded by the hard deadline
        again = scorer.score(["\\boxed{3}"], ["3"])  # the scorer keeps working
        assert again.per_function["accuracy"].tolist() == [1.0] and again.counters["timeouts"] == 0
    print(f"\n{len(names)} bad completions scored in {wall:.1f}s: {c}")


def test_scientific_notation_is_not_its_mantissa():
    from aapo_ray.batch_scorer import BatchScorer

    with BatchScorer({"accuracy": 1.0}, timeout_s=2.0) as scorer:
        res = scorer.score(["The answer is 1e5", "The answer is 1e5", "#### 2.5E-3"], ["1", "100000", "2.5"])
    assert res.per_function["accuracy"].tolist() == [0.0, 1.0, 0.0]
