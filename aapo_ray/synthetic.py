"""The built-in synthetic reasoning task: multi-step integer arithmetic.

A problem is a chain of additions / subtractions of small positive integers::

    question:  "Compute 7+5-3+8."
    solution:  "7+5=12, 12-3=9, 9+8=17. \\boxed{17}"
    gold:      "17"

The worked solution chains partial sums, so a tiny model has to carry a running total
across several steps: hard enough that a ~1M-parameter model only partly solves it after a
short supervised warm start, easy enough that RL can then improve it within minutes on CPU.
Partial sums never go negative (a subtraction that would is turned into an addition).

Splits are disjoint by construction: whether a question belongs to the held-out ``test``
split is decided by a stable hash of the question text (independent of the seed), and the
``train`` split only contains questions whose hash says ``train``. Within a split, problems
are drawn from an RNG seeded by ``(seed, split)``, without repetition, so
``problems(split, n)`` is deterministic and is a prefix of ``problems(split, m)`` for m > n.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

__all__ = ["PROMPT_TEMPLATE", "SPLITS", "DEFAULT_SPLIT_SIZES", "SyntheticTask", "split_of"]

#: How a synthetic question is turned into the model's prompt (``str.format`` with
#: ``{question}``). The default tiny model was warm-started with exactly this template.
PROMPT_TEMPLATE = "{question}\n"

SPLITS = ("train", "test")

#: Number of problems ``load_prompt_dataset("synthetic:<split>")`` yields by default.
DEFAULT_SPLIT_SIZES = {"train": 4000, "test": 500}

#: Fraction (in tenths) of the question space that belongs to the held-out split.
_TEST_TENTHS = 2


def split_of(question: str) -> str:
    """The split a question belongs to: a stable hash of its text, independent of any seed."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 10 < _TEST_TENTHS else "train"


@dataclass(frozen=True)
class SyntheticTask:
    """Generator of multi-step arithmetic problems.

    num_operands: integers per problem (>= 2); the solution has ``num_operands - 1`` steps.
    max_operand: operands are drawn uniformly from ``1..max_operand``.
    seed: seeds the draw order of problems within each split (not the split assignment).
    """

    num_operands: int = 4
    max_operand: int = 9
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.num_operands) < 2:
            raise ValueError(f"num_operands must be >= 2, got {self.num_operands}")
        if int(self.max_operand) < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")

    def config(self) -> dict:
        return asdict(self)

    # -- single problems -------------------------------------------------------------
    def _draw(self, rng: random.Random) -> tuple[str, str, str]:
        nums = [rng.randint(1, self.max_operand) for _ in range(self.num_operands)]
        total = nums[0]
        expr = str(nums[0])
        steps = []
        for x in nums[1:]:
            op = rng.choice("+-")
            if op == "-" and total - x < 0:
                op = "+"
            new = total + x if op == "+" else total - x
            steps.append(f"{total}{op}{x}={new}")
            expr += f"{op}{x}"
            total = new
        question = f"Compute {expr}."
        solution = ", ".join(steps) + f". \\boxed{{{total}}}"
        return question, str(total), solution

    @staticmethod
    def solve(question: str) -> str:
        """The gold answer of a question produced by this task (used for checks)."""
        expr = question.removeprefix("Compute ").rstrip(".")
        total, num, op = 0, "", "+"
        for ch in expr + "+":
            if ch.isdigit():
                num += ch
                continue
            total = total + int(num) if op == "+" else total - int(num)
            num, op = "", ch
        return str(total)

    def _space_upper_bound(self) -> int:
        return self.max_operand**self.num_operands * 2 ** (self.num_operands - 1)

    # -- splits ----------------------------------------------------------------------
    def problems(self, split: str, n: int) -> list[tuple[str, str, str]]:
        """``n`` distinct problems of ``split`` as ``(question, gold, worked_solution)``.

        Deterministic in ``(num_operands, max_operand, seed, split, n)``; raises
        ValueError when the split cannot hold ``n`` distinct problems.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"aapo-synthetic:{self.seed}:{split}")
        seen: set[str] = set()
        out: list[tuple[str, str, str]] = []
        attempts, max_attempts = 0, 50 * n + 2000
        while len(out) < n:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"synthetic task {self.config()} cannot provide {n} distinct '{split}' "
                    f"problems (found {len(out)}; the question space has at most "
                    f"~{self._space_upper_bound()} problems, ~{_TEST_TENTHS * 10}% of them "
                    "in 'test'); increase num_operands / max_operand or ask for fewer"
                )
            q, gold, sol = self._draw(rng)
            if q in seen or split_of(q) != split:
                continue
            seen.add(q)
            out.append((q, gold, sol))
        return out

    def prompts(self, split: str, n: int, template: str = PROMPT_TEMPLATE) -> list[str]:
        """Rendered prompts of ``problems(split, n)``."""
        return [template.format(question=q) for q, _, _ in self.problems(split, n)]

    def corpus(self, n: int = 2000) -> list[str]:
        """Text the default tokenizer is trained on: prompts + worked solutions (train split)."""
        return [PROMPT_TEMPLATE.format(question=q) + s for q, _, s in self.problems("train", n)]
