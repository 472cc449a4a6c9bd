"""Prompt datasets: gold extraction, loading, bad rows, rendering, sampling, synthetic task."""

import json
from pathlib import Path

import pytest

from aapo_ray.data import (
    R1_SYSTEM_PROMPT,
    PromptSampler,
    extract_gold,
    last_boxed,
    load_prompt_dataset,
    render_prompts,
)
from aapo_ray.synthetic import PROMPT_TEMPLATE, SyntheticTask, split_of

FIX = Path(__file__).parent / "fixtures"
GSM8K = FIX / "data_gsm8k_test_head30.jsonl"
MATH = FIX / "data_math500_test_sample.jsonl"


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


# ----------------------------------------------------------------------------- gold
def test_gsm8k_gold_on_real_rows():
    golds = [extract_gold(r["answer"], "gsm8k") for r in _rows(GSM8K)]
    assert golds[:5] == ["18", "3", "70000", "540", "20"]
    assert all(g.lstrip("-").replace(".", "").isdigit() for g in golds)
    assert extract_gold("so 1,234 + 1 = 1,235\n#### 1,235", "gsm8k") == "1235"
    assert extract_gold("#### 3\nmore\n#### 4 ", "gsm8k") == "4"


def test_math_gold_on_real_rows_matches_stated_answer():
    rows = _rows(MATH)
    for r in rows:  # MATH-500 rows end with "The answer is: <same as the last box>"
        stated = r["answer"].rsplit("The answer is: ", 1)[1].strip()
        assert extract_gold(r["answer"], "math") == stated
    assert extract_gold(rows[0]["answer"], "math") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert any(extract_gold(r["answer"], "math").count("{") >= 3 for r in rows)


def test_last_boxed_braces_fbox_and_fallbacks():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a^{2}}{b}}") == "\\frac{a^{2}}{b}"
    assert last_boxed("x \\fbox{7} y") == "7"
    assert last_boxed("\\boxed{1} and \\fbox{2}") == "2"
    assert last_boxed("\\boxed{5} and an unclosed \\boxed{6") == "5"
    assert last_boxed("$\\boxed 42$") == "42"
    assert last_boxed("no box") is None
    assert extract_gold("  \\dfrac{1}{2} ", "raw") == "\\dfrac{1}{2}"


@pytest.mark.parametrize("text,fmt", [("no marker 5", "gsm8k"), ("#### ", "gsm8k"),
                                      ("answer 5", "math"), ("\\boxed{}", "math"),
                                      ("  ", "raw"), ("5", "nope")])
def test_extract_gold_errors(text, fmt):
    with pytest.raises(ValueError):
        extract_gold(text, fmt)


# ----------------------------------------------------------------------------- loading
def test_load_jsonl_parquet_and_hf_dir_agree(tmp_path):
    import datasets

    ref = load_prompt_dataset(str(MATH), fmt="math")
    assert len(ref) == len(_rows(MATH)) and ref.skipped == 0
    assert ref.ids == list(range(len(ref)))
    hf = datasets.Dataset.from_list(_rows(MATH))
    hf.to_parquet(str(tmp_path / "m.parquet"))
    hf.save_to_disk(str(tmp_path / "hfdir"))
    datasets.DatasetDict({"test": hf}).save_to_disk(str(tmp_path / "hfdict"))
    for src, kw in [(tmp_path / "m.parquet", {}), (tmp_path / "hfdir", {}),
                    (tmp_path / "hfdict", {}), (tmp_path / "hfdict", {"split": "test"})]:
        ds = load_prompt_dataset(str(src), fmt="math", **kw)
        assert (ds.ids, ds.questions, ds.golds) == (ref.ids, ref.questions, ref.golds)
    with pytest.raises(ValueError, match="no split"):
        load_prompt_dataset(str(tmp_path / "hfdict"), fmt="math", split="train")


def test_load_gsm8k_fields_limit_and_ids(tmp_path):
    ds = load_prompt_dataset(str(GSM8K), limit=7)
    assert len(ds) == 7 and ds.golds[0] == "18" and ds[0][1].startswith("Janet")
    rows = [{"q": f"Q{i}", "a": f"#### {i}", "pid": 100 + i} for i in range(5)]
    p = _write_jsonl(tmp_path / "x.jsonl", rows)
    ds = load_prompt_dataset(p, question_field="q", answer_field="a", id_field="pid")
    assert ds.ids == [100, 101, 102, 103, 104] and ds.golds == ["0", "1", "2", "3", "4"]


GOOD = {"question": "What is 2+2?", "answer": "#### 4"}
BAD_ROWS = {
    "missing question": ({"answer": "#### 4"}, "missing question field 'question'"),
    "missing answer": ({"question": "q"}, "missing answer field 'answer'"),
    "empty question": ({"question": "  ", "answer": "#### 4"}, "empty question"),
    "non-string gold": ({"question": "q", "answer": 4}, "not a string (int)"),
    "no gold marker": ({"question": "q", "answer": "4"}, "no '####'"),
    "invalid json": (b'{"question": "q", "answer": \n', "invalid JSON"),
    "not an object": (b"[1, 2]\n", "not an object"),
    "non-utf8": (b'{"question": "caf\xe9", "answer": "#### 4"}\n', "not valid UTF-8"),
    "too long": ({"question": "x" * 5000, "answer": "#### 4"}, "too long"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_each_bad_row_skip_and_fail(tmp_path, case):
    bad, reason = BAD_ROWS[case]
    p = _write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    ds = load_prompt_dataset(p, max_row_chars=1000)
    assert len(ds) == 2 and ds.ids == [0, 2] and ds.skipped == 1
    assert p in ds.problems[0] and "row 1 (line 2)" in ds.problems[0]
    assert reason in ds.problems[0]
    with pytest.raises(ValueError) as e:
        load_prompt_dataset(p, max_row_chars=1000, bad_rows="fail")
    assert p in str(e.value) and "row 1" in str(e.value) and reason in str(e.value)


def test_bad_rows_in_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"question": ["a", None, "c"], "answer": ["\\boxed{1}", "\\boxed{2}", "3"]})
    pq.write_table(t, tmp_path / "b.parquet")
    ds = load_prompt_dataset(str(tmp_path / "b.parquet"), fmt="math")
    assert ds.ids == [0] and ds.skipped == 2
    assert "row 1: missing question" in ds.problems[0] and "row 2: answer" in ds.problems[1]


def test_skip_counts_all_but_keeps_first_reasons(tmp_path):
    rows = [{"question": "q"}] * 25 + [GOOD]
    ds = load_prompt_dataset(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(ds) == 1 and ds.skipped == 25 and len(ds.problems) == 10


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty data set"):
        load_prompt_dataset(_write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(ValueError, match="empty data set.*1 bad row"):
        load_prompt_dataset(_write_jsonl(tmp_path / "f.jsonl", [{"question": "q"}]))
    with pytest.raises(FileNotFoundError):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unsupported"):
        load_prompt_dataset(_write_jsonl(tmp_path / "x.csv", [GOOD]))


def test_duplicate_ids_name_both_rows(tmp_path):
    rows = [dict(GOOD, id=1), dict(GOOD, id=2), dict(GOOD, id=1)]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"duplicate prompt id 1 .*row 0 and row 2"):
        load_prompt_dataset(p, id_field="id")
    p = _write_jsonl(tmp_path / "e.jsonl", [dict(GOOD, id="x"), dict(GOOD, id=3)])
    ds = load_prompt_dataset(p, id_field="id")
    assert ds.ids == [3] and "id field 'id' is not an integer" in ds.problems[0]


def test_synthetic_source():
    ds = load_prompt_dataset("synthetic:test:20")
    assert len(ds) == 20 and ds.default_template == PROMPT_TEMPLATE
    assert ds.questions == [p[0] for p in SyntheticTask().problems("test", 20)]
    assert len(load_prompt_dataset("synthetic:train", limit=5)) == 5
    with pytest.raises(ValueError, match="synthetic"):
        load_prompt_dataset("synthetic:val")


# ----------------------------------------------------------------------------- rendering
def test_render_prompts_template_and_chat():
    from aapo_ray.embedded import build_tokenizer

    assert render_prompts(["a", "b"], template="Q: {question}\nA:") == ["Q: a\nA:", "Q: b\nA:"]
    assert render_prompts(["x^{2}"], template="{question}") == ["x^{2}"]
    assert render_prompts(["a"], template="{system_prompt}|{question}",
                          system_prompt="S") == ["S|a"]
    with pytest.raises(ValueError, match="placeholder"):
        render_prompts(["a"], template="{question}", system_prompt="S")
    with pytest.raises(ValueError, match="literal braces"):
        render_prompts(["a"], template="\\boxed{} {question}")
    tok = build_tokenizer(SyntheticTask(), corpus_size=200)
    assert render_prompts(["Compute 1+2."], template=None, tokenizer=tok) == \
        [PROMPT_TEMPLATE.format(question="Compute 1+2.")]
    out = render_prompts(["q"], template=None, tokenizer=tok, system_prompt=R1_SYSTEM_PROMPT)
    assert out == [R1_SYSTEM_PROMPT + "\nq\n"]
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompts(["q"], template=None, tokenizer=tok)


# ----------------------------------------------------------------------------- sampler
def test_sampler_epochs_full_batches_and_determinism():
    s = PromptSampler(10, 4, seed=3)
    batches = [s.next_batch() for _ in range(5)]  # 20 indices = exactly two epochs
    assert all(len(b) == 4 for b in batches)
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh permutation each epoch
    t = PromptSampler(10, 4, seed=3)
    assert [t.next_batch() for _ in range(5)] == batches
    assert [PromptSampler(10, 4, seed=4).next_batch() for _ in range(5)] != batches
    big = PromptSampler(3, 7, seed=0).next_batch()  # batch larger than the data set
    assert len(big) == 7 and set(big) == {0, 1, 2}


@pytest.mark.parametrize("n,bs", [(12, 4), (10, 4), (5, 5)])
def test_sampler_resume_at_and_around_epoch_boundaries(n, bs):
    ref = PromptSampler(n, bs, seed=11)
    expected = [ref.next_batch() for _ in range(12)]
    for k in range(8):  # k = n/bs resumes exactly at an epoch boundary when bs divides n
        s = PromptSampler(n, bs, seed=11)
        for _ in range(k):
            s.next_batch()
        state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
        r = PromptSampler(n, bs, seed=11)
        r.load_state_dict(state)
        assert [r.next_batch() for _ in range(12 - k)] == expected[k:]
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSampler(n + 1, bs, seed=11).load_state_dict(ref.state_dict())


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_splits_disjoint_and_deterministic():
    task = SyntheticTask(seed=0)
    train, test = task.problems("train", 3000), task.problems("test", 600)
    assert not {p[0] for p in train} & {p[0] for p in test}
    assert len({p[0] for p in train}) == 3000
    assert all(split_of(q) == "train" for q, _, _ in train)
    other = SyntheticTask(seed=1)
    assert not {p[0] for p in other.problems("train", 500)} & {p[0] for p in test}
    assert task.problems("train", 3000) == train and task.problems("train", 50) == train[:50]
    assert other.problems("train", 50) != train[:50]


def test_synthetic_problem_format():
    from aapo_ray.reward import accuracy_reward

    for q, gold, sol in SyntheticTask(num_operands=5, max_operand=20).problems("train", 200):
        assert q.startswith("Compute ") and q.endswith(".")
        assert gold == SyntheticTask.solve(q) and int(gold) >= 0
        assert sol.endswith(f"\\boxed{{{gold}}}") and sol.count("=") == 4
    q, gold, sol = SyntheticTask().problems("test", 1)[0]
    assert accuracy_reward(sol, gold) == 1.0
    assert accuracy_reward(sol.replace(f"{{{gold}}}", f"{{{int(gold) + 1}}}"), gold) == 0.0
    with pytest.raises(ValueError, match="cannot provide"):
        SyntheticTask(num_operands=2, max_operand=2).problems("train", 50)
    with pytest.raises(ValueError):
        SyntheticTask(num_operands=1)
