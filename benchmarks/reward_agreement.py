"""Reward agreement and throughput on the full shared data.

- GSM8K: the 5,276 labelled model solutions scored with ``accuracy`` against the gold
  answer (last "A: N" line of ``ground_truth``); agreement with ``is_correct``.
- MATH-500: every reference solution against its own boxed answer (expect 1.0) and
  against the next problem's answer (expect 0.0 unless the answers are equal).

Usage: python benchmarks/reward_agreement.py [--data-dir ../shared/data] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aapo_ray.batch_scorer import BatchScorer  # noqa: E402

SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (brace-matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def load_gsm8k(data_dir: Path) -> tuple[list[str], list[str], list[bool]]:
    completions, golds, labels = [], [], []
    with open(data_dir / "gsm8k" / "model_solutions_labeled.jsonl") as f:
        for line in f:
            row = json.loads(line)
            gold = row["ground_truth"].strip().splitlines()[-1].removeprefix("A:").strip()
            for solver in SOLVERS:
                completions.append(row[solver]["solution"])
                golds.append(gold)
                labels.append(bool(row[solver]["is_correct"]))
    return completions, golds, labels


def load_math500(data_dir: Path) -> tuple[list[str], list[str]]:
    with open(data_dir / "math500" / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r["answer"] for r in rows], [last_boxed(r["answer"]) or "" for r in rows]


def timed_score(scorer: BatchScorer, completions, golds):
    t0 = time.perf_counter()
    res = scorer.score(completions, golds)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--show-disagreements", type=int, default=10)
    args = ap.parse_args()

    completions, golds, labels = load_gsm8k(args.data_dir)
    sols, answers = load_math500(args.data_dir)
    shifted = answers[1:] + answers[:1]

    for nw in args.workers:
        with BatchScorer({"accuracy": 1.0}, timeout_s=args.timeout_s, num_workers=nw) as scorer:
            scorer.score(["A: 1"], ["1"])  # wait for workers to start; not timed
            g, g_s = timed_score(scorer, completions, golds)
            self_res, s_s = timed_score(scorer, sols, answers)
            cross_res, c_s = timed_score(scorer, sols, shifted)
        print(f"\n=== num_workers={nw} ===")
        acc = g.per_function["accuracy"]
        agree = [(a == 1.0) == lab for a, lab in zip(acc, labels)]
        print(f"GSM8K labelled: {sum(agree)}/{len(agree)} agree with is_correct "
              f"({100 * sum(agree) / len(agree):.2f}%), {len(completions) / g_s:.0f} completions/s, "
              f"counters {g.counters}")
        if nw == args.workers[0]:
            bad = [i for i, ok in enumerate(agree) if not ok]
            for i in bad[: args.show_disagreements]:
                tail = completions[i].strip().splitlines()[-1][:100]
                print(f"  disagree #{i}: gold={golds[i]!r} label={labels[i]} reward={acc[i]} last line={tail!r}")
        s = self_res.per_function["accuracy"]
        print(f"MATH-500 self: {int((s == 1.0).sum())}/{len(s)} = 1.0, {len(sols) / s_s:.0f} completions/s, "
              f"counters {self_res.counters}")
        if nw == args.workers[0]:
            for i in [i for i, v in enumerate(s) if v != 1.0]:
                print(f"  self miss #{i}: answer={answers[i]!r} reward={s[i]}")
        c = cross_res.per_function["accuracy"]
        equal = [a.strip() == b.strip() for a, b in zip(answers, shifted)]
        wrong = [i for i, v in enumerate(c) if (v == 1.0) != equal[i]]
        print(f"MATH-500 cross: {int((c == 1.0).sum())}/{len(c)} scored 1.0 "
              f"({sum(equal)} string-equal pairs), {len(wrong)} differ from string equality (listed; check by hand), "
              f"{len(sols) / c_s:.0f} completions/s")
        if nw == args.workers[0]:
            for i in wrong:
                print(f"  cross #{i}: own={answers[i]!r} other={shifted[i]!r} reward={c[i]}")


if __name__ == "__main__":
    main()
