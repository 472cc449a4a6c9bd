"""Rewards (spec section 2) and bounded-time BatchScorer, with real math-verify (no mocks).

Fixtures are subsets of the shared data (see /work/shared/data/README.md, MIT licensed):
- fixtures/gsm8k_labeled_subset.jsonl: 100 rows (400 labelled solutions) of
  gsm8k/model_solutions_labeled.jsonl, including every row with an unusual final line.
- fixtures/math500_subset.jsonl: MATH-500 rows 0-99, 186, 187, 403, 404 (the last two
  pairs have string-equal answers, so the cross check sees both outcomes).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aapo_ray.batch_scorer import REWARD_NAMES, BatchScorer, ScoreResult
from aapo_ray.reward import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    cosine_reward,
    format_reward,
    resolve_reward_fn,
    reward_counters,
)

FIXTURES = Path(__file__).parent / "fixtures"
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
HERE = __name__  # import path prefix of the user reward fns below, as the workers see it


# --- user reward fns, resolved by import path inside the worker processes -----------------

def raising_reward(completion: str, gold: str) -> float:
    raise RuntimeError("user bug")


def none_reward(completion: str, gold: str) -> float | None:
    return None if "skip" in completion else 1.0


def stubborn_reward(completion: str, gold: str) -> float:
    """Swallows the soft SIGALRM deadline, so only the parent's hard kill can stop it."""
    if "hang" not in completion:
        return 1.0
    while True:
        try:
            time.sleep(60)
        except BaseException:  # noqa: BLE001 - deliberately pathological
            pass


def crashing_reward(completion: str, gold: str) -> float:
    if "crash" in completion:
        os._exit(3)
    return 1.0


# --- helpers ---------------------------------------------------------------------------------

def last_boxed(text: str) -> str:
    start = text.rfind("\\boxed{")
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    raise AssertionError("unbalanced \\boxed")


def load_jsonl(name: str) -> list[dict]:
    with open(FIXTURES / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def scorer():
    with BatchScorer({"accuracy": 1.0}, timeout_s=5.0, num_workers=2) as s:
        yield s


# --- accuracy against real labels -----------------------------------------------------------

def test_gsm8k_agreement_with_labels(scorer):
    completions, golds, labels = [], [], []
    for row in load_jsonl("gsm8k_labeled_subset.jsonl"):
        gold = row["ground_truth"].strip().splitlines()[-1].removeprefix("A:").strip()
        for solver in SOLVERS:
            completions.append(row[solver]["solution"])
            golds.append(gold)
            labels.append(row[solver]["is_correct"])
    assert len(completions) == 400
    res = scorer.score(completions, golds)
    acc = res.per_function["accuracy"]
    agreement = np.mean([(a == 1.0) == lab for a, lab in zip(acc, labels)])
    assert agreement >= 0.99, agreement
    assert res.counters["timeouts"] == res.counters["errors"] == res.counters["unparseable_gold"] == 0


def test_math500_self_and_cross(scorer):
    rows = load_jsonl("math500_subset.jsonl")
    sols = [r["answer"] for r in rows]
    answers = [last_boxed(s) for s in sols]
    own = scorer.score(sols, answers).per_function["accuracy"]
    assert own.tolist() == [1.0] * len(rows)

    other = answers[1:] + answers[:1]
    cross = scorer.score(sols, other).per_function["accuracy"]
    string_equal = [a.strip() == b.strip() for a, b in zip(answers, other)]
    assert sum(string_equal) == 2  # the 186/187 and 403/404 pairs
    # math-equal but not string-equal pairs found in this subset (checked by hand):
    equivalent = {("5", "x=5")}
    for i, value in enumerate(cross):
        expected = string_equal[i] or (answers[i], other[i]) in equivalent
        assert value == (1.0 if expected else 0.0), (i, answers[i], other[i], value)


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("first 3 then \\boxed{4} and later 3", "4", 1.0),  # boxed beats the last number
        ("$(3, \\frac{\\pi}{2})$ hence \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})", 1.0),
        ("5 + 7 = 12 apples\n#### 12", "12", 1.0),
        ("He pays 1,000 dollars.\n#### 1,000", "1000", 1.0),
        ("The answer is 42. Check: 6*7 = 42, not 41", "42", 1.0),  # beats the last number (41)
        ("He had 3 then 5 more, 8 total.\nA: 8\n", "8", 1.0),
        ("Total: 10 - 3 = 7", "7", 1.0),  # math-verify's own last-number fallback
        ("\\boxed{5}", "6", 0.0),
        ("no numbers here", "6", 0.0),
    ],
)
def test_accuracy_reward_extraction(completion, gold, expected):
    assert accuracy_reward(completion, gold) == expected


def test_unparseable_gold_scores_zero_and_is_counted():
    before = reward_counters()["unparseable_gold"]
    assert accuracy_reward("\\boxed{1}", "") == 0.0
    assert reward_counters()["unparseable_gold"] == before + 1


# --- format / cosine ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "completion, expected",
    [
        ("reasoning</think> answer", 1.0),
        ("<think>reasoning</think> answer", 1.0),
        ("no think tag", 0.0),
        ("a</think>b</think>c", 0.0),
        ("</think> x <think>", 0.0),
        ("<think>a<think>b</think>", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, "ignored gold") == expected


def test_cosine_reward_hand_computed():
    right, wrong = "\\boxed{7}", "\\boxed{8}"
    pad = lambda s, n: " " * (n - len(s)) + s  # noqa: E731 - completion of exactly n chars
    # L = 0 is impossible with an answer, so use L = len(right) = 9 for the short case.
    L = len(right)
    assert cosine_reward(right, "7") == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * L / 1000)))
    assert cosine_reward(pad(right, 500), "7") == pytest.approx(0.75)  # cos(pi/2) = 0
    assert cosine_reward(pad(right, 1000), "7") == pytest.approx(0.5)
    assert cosine_reward(pad(wrong, 500), "7") == pytest.approx(-0.25)
    assert cosine_reward(pad(wrong, 1000), "7") == pytest.approx(-0.5)
    assert cosine_reward("", "7") == pytest.approx(0.0)  # wrong, L = 0
    # Clamped (default): beyond max_len it stays at the L_max value ...
    assert cosine_reward(pad(right, 2000), "7") == pytest.approx(0.5)
    assert cosine_reward(pad(wrong, 1500), "7") == pytest.approx(-0.5)
    # ... unclamped (the authors' behaviour) it oscillates: cos(2pi) = 1, cos(1.5pi) = 0.
    assert cosine_reward(pad(right, 2000), "7", clamp=False) == pytest.approx(1.0)
    assert cosine_reward(pad(wrong, 1500), "7", clamp=False) == pytest.approx(-0.25)
    assert cosine_reward(pad(right, 100), "7", max_len=200) == pytest.approx(0.75)


@settings(max_examples=40, deadline=None)
@given(body=st.text(alphabet="ab 1\n{}()</think>", max_size=60), length=st.integers(0, 3000),
       correct=st.booleans())
def test_cosine_range_and_monotone_shape(body, length, correct):
    completion = (body + " " * length)[:length] + ("\\boxed{7}" if correct else "")
    value = cosine_reward(completion, "7")
    acc = accuracy_reward(completion, "7")
    lo, hi = (0.5, 1.0) if acc == 1.0 else (-0.5, 0.0)
    assert lo - 1e-9 <= value <= hi + 1e-9
    if correct:  # a trailing boxed answer is what gets extracted
        assert acc == 1.0
    assert format_reward(completion) in (0.0, 1.0)


# --- registry ------------------------------------------------------------------------------------

def test_registry_and_import_paths():
    assert set(REWARD_FUNCTIONS) == {"accuracy", "format", "cosine"}
    assert tuple(REWARD_FUNCTIONS) == REWARD_NAMES  # the names a scorer's parent accepts without math-verify
    assert resolve_reward_fn("format") is format_reward
    assert resolve_reward_fn("aapo_ray.reward:cosine_reward") is cosine_reward
    assert resolve_reward_fn(f"{HERE}:none_reward") is none_reward
    assert resolve_reward_fn(format_reward) is format_reward
    with pytest.raises(ValueError, match="unknown reward function 'acuracy'.*'accuracy'"):
        resolve_reward_fn("acuracy")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.rewards'.*PYTHONPATH"):
        resolve_reward_fn("no_such_pkg.rewards:fn")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        resolve_reward_fn("aapo_ray.reward:nope")
    with pytest.raises(ValueError, match="non-callable"):
        resolve_reward_fn("aapo_ray.reward:REWARD_FUNCTIONS")
    with pytest.raises(ValueError, match="unknown reward function 'acuracy'.*'accuracy'"):
        BatchScorer({"acuracy": 1.0})
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        BatchScorer({"aapo_ray.reward:nope": 1.0})
    with pytest.raises(ValueError, match="registry name or an import path"):
        BatchScorer({lambda c, g: 1.0: 1.0})


# --- BatchScorer: weights, None, errors, crashes, timeouts, threads --------------------------------

def test_weighted_total_none_and_errors():
    rewards = {"accuracy": 1.0, "format": 0.5, f"{HERE}:none_reward": 2.0, f"{HERE}:raising_reward": 1.0}
    with BatchScorer(rewards, timeout_s=5.0) as s:
        res = s.score(["x</think>\\boxed{2}", "skip \\boxed{3}", "nothing"], ["2", "2", "2"])
        assert isinstance(res, ScoreResult)
        assert res.per_function["accuracy"].tolist() == [1.0, 0.0, 0.0]
        assert res.per_function["format"].tolist() == [1.0, 0.0, 0.0]
        none = res.per_function[f"{HERE}:none_reward"]
        assert none[0] == 1.0 and np.isnan(none[1]) and none[2] == 1.0
        assert np.isnan(res.per_function[f"{HERE}:raising_reward"]).all()
        assert res.total.dtype == np.float32 and res.total.tolist() == [3.5, 0.0, 2.0]
        assert res.counters["none"] == 1 and res.counters["errors"] == 3
        assert res.counters["scored"] == 8 and res.counters["timeouts"] == 0
        empty = s.score([], [])
        assert empty.total.shape == (0,) and empty.per_function["accuracy"].shape == (0,)
        with pytest.raises(ValueError, match="2 completions but 1 golds"):
            s.score(["a", "b"], ["1"])


def test_unparseable_gold_counted_by_scorer():
    with BatchScorer({"accuracy": 1.0, "cosine": 1.0}) as s:
        res = s.score(["\\boxed{1}", "\\boxed{1}"], ["", "1"])
    assert res.counters["unparseable_gold"] == 1  # once per completion, not per function
    assert res.per_function["accuracy"].tolist() == [0.0, 1.0]


def test_pathological_completions_are_bounded_and_counted():
    timeout_s = 1.0
    patho = [
        "\\boxed{9^{9^{9^{9}}}}",  # huge power
        "\\boxed{(10^{8})!}",  # huge factorial
        "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # deeply nested braces
        "$" + "+".join(f"\\frac{{x^{{{i}}}}}{{{i + 1}}}" for i in range(3000)) + "$",  # huge LaTeX
        "The answer is " + "7" * 1_000_000,  # a number with 10^6 digits
        "blah 1 + " * 150_000,  # megabyte-long output
    ]
    completions = ["\\boxed{1}"] + patho + ["\\boxed{1}"]
    with BatchScorer({"accuracy": 1.0, "format": 1.0}, timeout_s=timeout_s) as s:
        s.score(["\\boxed{1}"], ["1"])  # worker start-up is not part of the budget
        t0 = time.monotonic()
        res = s.score(completions, ["1"] + ["2"] * len(patho) + ["1"])
        wall = time.monotonic() - t0
        assert res.total[0] == 1.0 and res.total[-1] == 1.0
        assert (res.total[1:-1] == 0.0).all()
        assert res.counters["timeouts"] >= 2 * 4  # both fns of at least the 4 slow LaTeX items
        assert wall < len(patho) * (timeout_s + 0.25) + 5.0, wall
        again = s.score(["\\boxed{2}"], ["2"])
        assert again.total.tolist() == [1.0] and again.counters["timeouts"] == 0


def test_hard_deadline_kills_and_respawns_a_stuck_worker():
    with BatchScorer({f"{HERE}:stubborn_reward": 1.0}, timeout_s=0.5) as s:
        s.score(["ok"], ["1"])
        t0 = time.monotonic()
        res = s.score(["ok", "hang", "ok", "ok"], ["1"] * 4)
        wall = time.monotonic() - t0
        assert res.total.tolist() == [1.0, 0.0, 1.0, 1.0]
        assert res.counters["timeouts"] == 1 and res.counters["worker_restarts"] == 1
        assert wall < 0.5 + 0.125 + 15.0  # deadline + grace + one worker respawn on a busy box
        assert s.score(["ok"], ["1"]).total.tolist() == [1.0]


def test_worker_crash_is_an_error_and_scoring_continues():
    with BatchScorer({f"{HERE}:crashing_reward": 1.0}, num_workers=2) as s:
        res = s.score(["ok", "crash", "ok", "ok", "ok"], ["1"] * 5)
        assert res.total.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
        assert res.counters["errors"] == 1 and res.counters["worker_restarts"] == 1


def test_scoring_from_a_non_main_thread():
    results, errors = [], []

    def run():
        try:
            # Direct calls: math-verify's signal.alarm would raise here; we skip it off-main.
            results.append(accuracy_reward("\\boxed{\\frac{1}{2}}", "0.5"))
            with BatchScorer({"accuracy": 1.0}, timeout_s=1.0) as s:
                r = s.score(["\\boxed{3}", "\\boxed{9^{9^{9^{9}}}}", "A: 4"], ["3", "1", "5"])
            results.append(r)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    assert results[0] == 1.0
    res = results[1]
    assert res.total.tolist() == [1.0, 0.0, 0.0] and res.counters["timeouts"] == 1
