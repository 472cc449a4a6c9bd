"""The batch-inference pipeline of ``aapo eval`` on Ray Data.

``ray.data.from_items`` of problems (benchmark, problem_id, prompt, prompt_ids, gold, max_new_tokens,
seed) -> ``map_batches(Generate | EndpointGenerate)``: an actor pool (``concurrency``) whose actors each
build :func:`aapo_ray.backends.make_backend` once (hf on CPU, sglang on GPU: the training code path) or
talk to an OpenAI-compatible server, and emit k sample rows per problem -> ``map_batches(Score)``: CPU
actors scoring with :class:`aapo_ray.reward.BatchScorer` (math-verify in bounded time) and parsing the
final answer -> the driver iterates the output batches (``iter_batches``: streamed, never all in memory)
and appends them to ``samples.parquet``.

Seeds: each problem's k samples are seeded with :func:`aapo_ray.sampling.problem_seed` (the base seed,
the benchmark and the problem's index); see :mod:`aapo_ray.batch_inference` for what that guarantees.
"""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np
import pyarrow as pa
import ray
import requests

from aapo_ray.batch_inference import BackendSampler
from aapo_ray.eval_metrics import final_answer
from aapo_ray.reward import BatchScorer
from aapo_ray.sampling import problem_seed  # noqa: F401 - part of this module's API (aapo_ray.eval_cmd)

log = logging.getLogger(__name__)

SAMPLE_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("problem_id", pa.int64()), ("sample", pa.int32()), ("prompt", pa.string()),
    ("completion", pa.string()), ("gold", pa.string()), ("length", pa.int32()), ("finish_reason", pa.string()),
    ("seed", pa.int64()),
])
SCORED_SCHEMA = SAMPLE_SCHEMA.append(pa.field("correct", pa.float32())).append(pa.field("answer", pa.string()))


def _rows(batch: pa.Table) -> list[dict]:
    return batch.to_pylist()


def _sample_table(problems: list[dict], completions: list[list[tuple[str, int, str]]]) -> pa.Table:
    """k rows per problem: ``completions[i]`` = [(text, length, finish_reason)] of problem i."""
    cols = {f.name: [] for f in SAMPLE_SCHEMA}
    for p, outs in zip(problems, completions):
        for s, (text, length, why) in enumerate(outs):
            for key in ("benchmark", "problem_id", "prompt", "gold", "seed"):
                cols[key].append(p[key])
            cols["sample"].append(s)
            cols["completion"].append(text)
            cols["length"].append(int(length))
            cols["finish_reason"].append(why)
    return pa.Table.from_pydict(cols, schema=SAMPLE_SCHEMA)


class Generate(BackendSampler):
    """Ray Data callable class: one generation backend per actor, k samples per problem
    (:class:`aapo_ray.batch_inference.BackendSampler`)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        problems = _rows(batch)
        done = self.sample([p["prompt_ids"] for p in problems], [p["max_new_tokens"] for p in problems],
                           [p["seed"] for p in problems])
        return _sample_table(problems, [list(zip(c.texts, [len(t) for t in c.token_ids], c.finish_reasons))
                                        for c in done])


class EndpointGenerate:
    """Ray Data callable class: the same k samples per problem from an OpenAI-compatible server
    (``POST {url}/v1/completions`` with the prompt's token ids, ``n=k``, ``seed``), ``max_in_flight``
    requests at a time per actor. Lengths are the completions re-tokenised with the local tokenizer."""

    def __init__(self, *, url: str, model_path: str, samples: int, temperature: float, top_p: float,
                 model_name: str | None = None, max_in_flight: int = 4, timeout_s: float = 600.0,
                 api_key: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoTokenizer  # heavy; only the endpoint client needs a tokenizer here

        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/completions"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.k, self.temperature, self.top_p, self.model_name = samples, temperature, top_p, model_name
        self.pool = concurrent.futures.ThreadPoolExecutor(max_in_flight)
        self.session = requests.Session()
        self.timeout_s = timeout_s
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _one(self, p: dict) -> list[tuple[str, int, str]]:
        body = {"prompt": list(p["prompt_ids"]), "n": self.k, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": int(p["max_new_tokens"]), "seed": int(p["seed"])}
        if self.model_name:
            body["model"] = self.model_name
        resp = self.session.post(self.url, json=body, timeout=self.timeout_s)
        if resp.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:500]}")
        choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            n = len(self.tokenizer(c["text"], add_special_tokens=False)["input_ids"])
            out.append((c["text"], n, c.get("finish_reason") or "stop"))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        problems = _rows(batch)
        return _sample_table(problems, list(self.pool.map(self._one, problems)))


class Score:
    """Ray Data callable class: accuracy (math-verify in worker subprocesses, ``timeout_s`` per item;
    a timeout or error scores 0) and the normalised final answer of every sample."""

    def __init__(self, *, timeout_s: float = 5.0):
        self.scorer = BatchScorer({"accuracy": 1.0}, timeout_s=timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("completion").to_pylist()
        result = self.scorer.score(texts, batch.column("gold").to_pylist())
        correct = np.nan_to_num(result.per_function["accuracy"], nan=0.0).astype(np.float32)
        return (batch.append_column("correct", pa.array(correct, pa.float32()))
                .append_column("answer", pa.array([final_answer(t) for t in texts], pa.string())))


def build_dataset(problems: list[dict], *, generate_kwargs: dict, endpoint: str | None, generators: int,
                  cpus_per_generator: float, gpus_per_generator: float, scorers: int, score_timeout_s: float,
                  problems_per_batch: int):
    """The lazy Ray Data pipeline (nothing runs until it is iterated)."""
    ds = ray.data.from_items(problems)
    common = dict(batch_format="pyarrow", batch_size=problems_per_batch, compute=ray.data.ActorPoolStrategy(size=generators))
    if endpoint:
        ds = ds.map_batches(EndpointGenerate, fn_constructor_kwargs=dict(url=endpoint, **generate_kwargs),
                            num_cpus=cpus_per_generator, **common)
    else:
        ds = ds.map_batches(Generate, fn_constructor_kwargs=generate_kwargs, num_cpus=cpus_per_generator,
                            num_gpus=gpus_per_generator or None, **common)
    return ds.map_batches(Score, fn_constructor_kwargs={"timeout_s": score_timeout_s}, batch_format="pyarrow",
                          batch_size=None, compute=ray.data.ActorPoolStrategy(size=scorers),
                          num_cpus=0.5)
