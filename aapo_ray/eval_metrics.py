"""Evaluation metrics of ``aapo eval`` (pure Python / numpy): avg@k, unbiased pass@k, maj@k, lengths.

- **avg@k**: mean correctness over all k samples of all problems.
- **pass@k'** for every k' <= k: the unbiased estimator of Chen et al. 2021 (Codex paper), per problem
  ``1 - C(n - c, k') / C(n, k')`` with n samples of which c are correct, computed as the stable product
  ``1 - prod_{i = n - c + 1}^{n} (1 - k' / i)``; averaged over problems.
- **maj@k**: per problem the most frequent *normalised final answer* (:func:`final_answer`) among the
  samples that have one; a sample without an answer never wins. **Ties go to the answer whose first
  occurrence (lowest sample index) is earliest.** The problem counts as solved when the first sample
  giving the majority answer was scored correct by math-verify (samples with the same normalised answer
  score the same). A problem without any parsed answer counts as wrong. Votes are grouped by string after
  normalisation, not by math equivalence (``1/2`` and ``\\frac{1}{2}`` are two votes).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from aapo_ray.data import last_boxed

_HASHES = re.compile(r"####[ \t]*([^\n]+)")
_ANSWER_IS = re.compile(r"(?i:the[ \t]+(?:final[ \t]+)?answer[ \t]+is)[ \t]*:?[ \t]*([^\n]+)")
_WRAPPERS = re.compile(r"\\(?:left|right|displaystyle|!|,|;|:)|\\text\{\s*\}|\s+")


def normalise_answer(ans: str) -> str:
    """Whitespace, ``$``, ``\\left``/``\\right``, thin spaces and a trailing full stop removed;
    ``\\dfrac``/``\\tfrac`` -> ``\\frac``; thousands commas of a plain number dropped."""
    s = _WRAPPERS.sub("", ans).strip("$").rstrip(".")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def final_answer(completion: str) -> str | None:
    """The completion's normalised final answer: the last ``\\boxed{}``, else the text after the last
    ``####``, else after the last "the answer is"; None when there is none. Pure string work (bounded)."""
    ans = last_boxed(completion)
    if ans is None:
        for pattern in (_HASHES, _ANSWER_IS):
            hits = pattern.findall(completion)
            if hits:
                ans = re.split(r"[.;!?](?=\s|$)", hits[-1], maxsplit=1)[0]
                break
    if ans is None:
        return None
    ans = normalise_answer(ans)
    return ans or None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct (Chen et al. 2021)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: list[str | None]) -> int | None:
    """Index of the sample that carries the majority answer (its first occurrence); ties: the answer
    first seen earliest; None when no sample has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return None
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def problem_metrics(correct: list[float], answers: list[str | None]) -> dict:
    """Per-problem numbers: ``c`` (correct samples), ``pass`` (pass@k' for k' = 1..n), ``maj`` (0/1)."""
    n = len(correct)
    c = int(round(sum(correct)))
    maj = majority_vote(answers)
    return {"n": n, "c": c, "pass": [pass_at_k(n, c, k) for k in range(1, n + 1)],
            "maj": 0.0 if maj is None else float(correct[maj])}


def benchmark_metrics(rows: dict[str, list]) -> dict:
    """Metrics of one benchmark from its per-sample columns ``problem_id``, ``sample``, ``correct``,
    ``answer``, ``length``, ``finish_reason`` (any order). Every problem must have the same k."""
    by_problem: dict[int, list] = defaultdict(list)
    for pid, s, ok, ans in zip(rows["problem_id"], rows["sample"], rows["correct"], rows["answer"]):
        by_problem[pid].append((s, float(ok), ans))
    ks = {len(v) for v in by_problem.values()}
    if len(ks) != 1:
        raise ValueError(f"problems have different sample counts {sorted(ks)}")
    k = ks.pop()
    per = []
    for pid in sorted(by_problem):
        samples = sorted(by_problem[pid], key=lambda t: t[0])
        per.append(problem_metrics([t[1] for t in samples], [t[2] for t in samples]))
    lengths = np.asarray(rows["length"], dtype=np.float64)
    truncated = np.asarray([r == "length" for r in rows["finish_reason"]], dtype=np.float64)
    return {
        "n": len(per), "k": k,
        "avg@k": float(np.mean([p["c"] / p["n"] for p in per])),
        "pass@k": {str(j): float(np.mean([p["pass"][j - 1] for p in per])) for j in range(1, k + 1)},
        "maj@k": float(np.mean([p["maj"] for p in per])),
        "mean_length": float(lengths.mean()) if lengths.size else 0.0,
        "truncation_rate": float(truncated.mean()) if truncated.size else 0.0,
    }


def paper_table(rows: list[tuple[str, dict[str, dict]]], titles: dict[str, str], paper_sets: tuple[str, ...]) -> str:
    """Markdown table, the paper's layout: a row per model / checkpoint, a column per benchmark (avg@k in
    percent: the paper's sets in its order, then the others), then ``avg`` over the paper's sets evaluated."""
    present = {name for _, res in rows for name in res}
    cols = [b for b in paper_sets if b in present] + sorted(present - set(paper_sets), key=list(titles).index)
    avg_name = "avg" if set(cols) <= set(paper_sets) else "avg (paper sets)"
    lines = ["| model | " + " | ".join(titles[c] for c in cols) + f" | {avg_name} |",
             "|---|" + "---|" * (len(cols) + 1)]
    for label, res in rows:
        paper = [res[c]["avg@k"] for c in cols if c in paper_sets and c in res]
        avg = f"{100 * sum(paper) / len(paper):.1f}" if paper else "-"
        cells = [f"{100 * res[c]['avg@k']:.1f}" if c in res else "-" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)
