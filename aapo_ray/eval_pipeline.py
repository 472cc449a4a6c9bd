"""The batch-inference pipeline of ``aapo eval`` on Ray Data.

``ray.data.from_items`` of problems (benchmark, problem_id, prompt, prompt_ids, gold, max_new_tokens,
seed) -> ``map_batches(Generate | EndpointGenerate)``: an actor pool (``concurrency``) whose actors each
build :func:`aapo_ray.backends.make_backend` once (hf on CPU, sglang on GPU: the training code path) or
talk to an OpenAI-compatible server, and emit k sample rows per problem -> ``map_batches(Score)``: CPU
actors scoring with :class:`aapo_ray.batch_scorer.BatchScorer` (math-verify in bounded time) and parsing the
final answer -> the driver iterates the output batches (``iter_batches``: streamed, never all in memory)
and appends them to ``samples.parquet``.

Seeds: sample j of a problem is drawn with its own seed, ``row_seeds(problem_seed(...), k)[j]`` (the base
seed, the benchmark and the problem's index), and every problem of a Ray Data batch is sampled in one
engine call (:mod:`aapo_ray.batch_inference`): on the hf backend a sample does not depend on how Ray
batches the problems or on the number of actors; SGLang honours the per-row seeds in its deterministic
mode. With ``--endpoint``, each sample is one request carrying its row seed.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import ray

from aapo_ray.batch_inference import BackendSampler
from aapo_ray.eval_stages import EndpointGenerate, Score, rows_of, sample_table

log = logging.getLogger(__name__)


class Generate(BackendSampler):
    """Ray Data callable class: one generation backend per actor, k samples per problem
    (:class:`aapo_ray.batch_inference.BackendSampler`)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        problems = rows_of(batch)
        done = self.sample([p["prompt_ids"] for p in problems], [p["max_new_tokens"] for p in problems],
                           [p["seed"] for p in problems])
        return sample_table(problems, [list(zip(c.texts, [len(t) for t in c.token_ids], c.finish_reasons))
                                       for c in done])


GENERATOR_START_TIMEOUT_S = 600  # a pool that cannot start in this time fails with Ray Data's own error


def build_dataset(problems: list[dict], *, generate_kwargs: dict, endpoint: str | None, generators: int,
                  cpus_per_generator: float, gpus_per_generator: float, scorers: int, score_timeout_s: float,
                  problems_per_batch: int):
    """The lazy Ray Data pipeline (nothing runs until it is iterated). ``scorers=0``: no scoring stage
    (generation alone, as ``benchmarks/eval_throughput.py`` measures it)."""
    # every generator is up (its model loaded) before the first batch goes out: otherwise the first
    # actor ready can take a short evaluation whole while the others, on other nodes, still load
    ray.data.DataContext.get_current().wait_for_min_actors_s = GENERATOR_START_TIMEOUT_S
    ds = ray.data.from_items(problems)
    common = dict(batch_format="pyarrow", batch_size=problems_per_batch, compute=ray.data.ActorPoolStrategy(size=generators))
    if endpoint:
        ds = ds.map_batches(EndpointGenerate, fn_constructor_kwargs=dict(url=endpoint, **generate_kwargs),
                            num_cpus=cpus_per_generator, **common)
    else:
        ds = ds.map_batches(Generate, fn_constructor_kwargs=generate_kwargs, num_cpus=cpus_per_generator,
                            num_gpus=gpus_per_generator or None, **common)
    if scorers == 0:
        return ds
    return ds.map_batches(Score, fn_constructor_kwargs={"timeout_s": score_timeout_s}, batch_format="pyarrow",
                          batch_size=None, compute=ray.data.ActorPoolStrategy(size=scorers),
                          num_cpus=0.5)
