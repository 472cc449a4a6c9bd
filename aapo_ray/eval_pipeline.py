"""The batch-inference pipeline of ``aapo eval`` on Ray Data.

``ray.data.from_items`` of problems (benchmark, problem_id, prompt, prompt_ids, gold, max_new_tokens,
seed) -> ``map_batches(Generate | EndpointGenerate)``: an actor pool (``concurrency``) whose actors each
build :func:`aapo_ray.backends.make_backend` once (hf on CPU, sglang on GPU: the training code path) or
talk to an OpenAI-compatible server, and emit k sample rows per problem -> ``map_batches(Score)``: CPU
actors scoring with :class:`aapo_ray.reward.BatchScorer` (math-verify in bounded time) and parsing the
final answer -> the driver iterates the output batches (``iter_batches``: streamed, never all in memory)
and appends them to ``samples.parquet``.

Seeds: sample j of a problem is drawn with its own seed, ``row_seeds(problem_seed(...), k)[j]`` (the base
seed, the benchmark and the problem's index), and every problem of a Ray Data batch is sampled in one
engine call (throughput): on the hf backend a sample does not depend on how Ray batches the problems or on
the number of actors (per-row generators); SGLang honours the per-row seeds in its deterministic mode. A
seeded ``n=k`` request to ``aapo serve`` is sampled with the same row seeds.
"""

from __future__ import annotations

import concurrent.futures
import logging
import zlib

import numpy as np
import pyarrow as pa
import ray
import requests

from aapo_ray.backends import make_backend
from aapo_ray.eval_metrics import final_answer
from aapo_ray.launch import setup_actor_process
from aapo_ray.reward import BatchScorer
from aapo_ray.sampling import SamplingParams, chunk_seed, row_seeds

log = logging.getLogger(__name__)

SAMPLE_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("problem_id", pa.int64()), ("sample", pa.int32()), ("prompt", pa.string()),
    ("completion", pa.string()), ("gold", pa.string()), ("length", pa.int32()), ("finish_reason", pa.string()),
    ("seed", pa.int64()), ("node", pa.string()),
])
SCORED_SCHEMA = SAMPLE_SCHEMA.append(pa.field("correct", pa.float32())).append(pa.field("answer", pa.string()))


def problem_seed(base_seed: int, benchmark: str, index: int) -> int:
    """The sampling seed of one problem's k samples (independent of batching)."""
    return chunk_seed(base_seed + zlib.crc32(benchmark.encode()), index) % 2**63


def _rows(batch: pa.Table) -> list[dict]:
    return batch.to_pylist()


def _sample_table(problems: list[dict], completions: list[list[tuple[str, int, str]]]) -> pa.Table:
    """k rows per problem: ``completions[i]`` = [(text, length, finish_reason)] of problem i; ``node``: the
    Ray node that generated them (or asked the endpoint)."""
    node = ray.get_runtime_context().get_node_id()
    cols = {f.name: [] for f in SAMPLE_SCHEMA}
    for p, outs in zip(problems, completions):
        for s, (text, length, why) in enumerate(outs):
            for key in ("benchmark", "problem_id", "prompt", "gold", "seed"):
                cols[key].append(p[key])
            cols["sample"].append(s)
            cols["completion"].append(text)
            cols["length"].append(int(length))
            cols["finish_reason"].append(why)
            cols["node"].append(node)
    return pa.Table.from_pydict(cols, schema=SAMPLE_SCHEMA)


class Generate:
    """Ray Data callable class: one generation backend per actor, k samples per problem."""

    def __init__(self, *, backend: str, model_path: str, samples: int, temperature: float, top_p: float,
                 dtype: str = "float32", trust_remote_code: bool = False, torch_threads: int = 1,
                 batch_size: int = 64, deterministic: bool = False):
        setup_actor_process(torch_threads)
        self.kind, self.k = backend, samples
        self.temperature, self.top_p = temperature, top_p
        self.backend = make_backend(backend, model_path, trust_remote_code=trust_remote_code, dtype=dtype,
                                    device="cpu" if backend == "hf" and not _has_gpu() else None,
                                    batch_size=batch_size, deterministic=deterministic)

    def params(self, max_new_tokens: int, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=max_new_tokens, seed=seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """k rows per problem, every problem of the batch with the same budget in one engine call; row
        ``(problem, j)`` is seeded ``row_seeds(problem's seed, k)[j]`` (see the module docstring)."""
        problems = _rows(batch)
        outs: list = [None] * len(problems)
        by_budget: dict[int, list[int]] = {}
        for i, p in enumerate(problems):
            by_budget.setdefault(int(p["max_new_tokens"]), []).append(i)
        for budget, idx in by_budget.items():
            done = self.backend.generate([problems[i]["prompt_ids"] for i in idx for _ in range(self.k)],
                                         self.params(budget, problems[idx[0]]["seed"]),
                                         seeds=[s for i in idx for s in row_seeds(problems[i]["seed"], self.k)])
            flat = list(zip(done.texts, [len(t) for t in done.token_ids], done.finish_reasons))
            for j, i in enumerate(idx):
                outs[i] = flat[j * self.k:(j + 1) * self.k]
        return _sample_table(problems, outs)


def _has_gpu() -> bool:
    return bool(ray.get_gpu_ids()) if ray.is_initialized() else False


class EndpointGenerate:
    """Ray Data callable class: the same k samples per problem from an OpenAI-compatible server. Sample j
    is one request (``POST {url}/v1/completions`` with the prompt's token ids, ``n=1``, ``seed`` = the
    sample's row seed, as local engines use it), ``max_in_flight`` requests at a time per actor, so a
    server that honours ``seed`` per request (``aapo serve``) returns the local engines' samples. Lengths
    are the server's ``usage.completion_tokens``; a server that reports no usage gets the text
    re-tokenised (which can differ from what was generated by a token or two)."""

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

    def _one(self, p: dict, seed: int) -> tuple[str, int, str]:
        body = {"prompt": list(p["prompt_ids"]), "n": 1, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": int(p["max_new_tokens"]), "seed": int(seed)}
        if self.model_name:
            body["model"] = self.model_name
        resp = self.session.post(self.url, json=body, timeout=self.timeout_s)
        if resp.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:500]}")
        out = resp.json()
        text = out["choices"][0]["text"]
        n = (out.get("usage") or {}).get("completion_tokens")
        if n is None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return text, int(n), out["choices"][0].get("finish_reason") or "stop"

    def __call__(self, batch: pa.Table) -> pa.Table:
        problems = _rows(batch)
        jobs = [(p, s) for p in problems for s in row_seeds(p["seed"], self.k)]
        done = list(self.pool.map(lambda job: self._one(*job), jobs))
        return _sample_table(problems, [done[i * self.k:(i + 1) * self.k] for i in range(len(problems))])


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
