"""Completions per second through the bounded-time scorer (math-verify accuracy, 1 worker process) on the
synthetic task's worked solutions. Usage: python benchmarks/reward_throughput.py [--n 2000]"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)

from aapo_ray.batch_scorer import BatchScorer
from aapo_ray.synthetic import SyntheticTask


def reward_throughput(n: int = 2000) -> float:
    problems = SyntheticTask().problems("test", n)
    completions, golds = [p[2] for p in problems], [p[1] for p in problems]
    with BatchScorer({"accuracy": 1.0}) as scorer:
        scorer.score(completions[:20], golds[:20])  # start the worker outside the timing
        start = time.perf_counter()
        result = scorer.score(completions, golds)
        elapsed = time.perf_counter() - start
    if result.total.mean() < 0.99:
        raise RuntimeError(f"worked solutions scored {result.total.mean():.3f}, expected 1.0")
    return len(completions) / elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    print(f"reward throughput: {reward_throughput(parser.parse_args().n):.0f} completions/s")
