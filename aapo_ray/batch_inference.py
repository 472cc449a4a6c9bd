"""The generation stage shared by the Ray Data batch-inference jobs (``aapo eval``'s pipeline and the
precomputed reference build): an actor that builds :func:`aapo_ray.backends.make_backend` once (hf on
CPU, sglang on GPU: the training code path) and samples ``k`` completions per prompt.

Seeds: :meth:`BackendSampler.sample` draws sample ``j`` of a prompt with its own seed,
``row_seeds(prompt's seed, k)[j]``, and samples all the prompts of a batch (with the same budget) in one
engine call: on hf (one ``torch.Generator`` per row) a sample depends neither on how Ray batches the
prompts nor on the number of actors; SGLang honours the per-row seeds in its deterministic mode.
:meth:`BackendSampler.sample_together` instead draws one call's rows as a training generator does
(:func:`aapo_ray.backends.sample_rows`).
"""

from __future__ import annotations

import ray

from aapo_ray.backends import make_backend, sample_rows
from aapo_ray.actor_process import setup_actor_process
from aapo_ray.sampling import Completions, SamplingParams, row_seeds


class BackendSampler:
    """One generation backend per Ray Data actor; :meth:`sample` gives ``k`` completions per prompt."""

    def __init__(self, *, backend: str, model_path: str, samples: int, temperature: float, top_p: float,
                 dtype: str = "float32", trust_remote_code: bool = False, torch_threads: int = 1,
                 batch_size: int = 64, deterministic: bool = False, allow_pickle: bool = False):
        setup_actor_process(torch_threads)
        self.k = samples
        self.temperature, self.top_p = temperature, top_p
        self.backend = make_backend(backend, model_path, trust_remote_code=trust_remote_code, dtype=dtype,
                                    device="cpu" if backend == "hf" and not _has_gpu() else None,
                                    batch_size=batch_size, deterministic=deterministic, allow_pickle=allow_pickle)

    def params(self, max_new_tokens: int, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=max_new_tokens, seed=seed)

    def sample(self, prompt_ids: list[list[int]], max_new_tokens: list[int], seeds: list[int]) -> list[Completions]:
        """``k`` completions of each prompt, row ``(prompt i, sample j)`` seeded ``row_seeds(seeds[i], k)[j]``;
        one engine call per distinct ``max_new_tokens``."""
        out: list = [None] * len(prompt_ids)
        by_budget: dict[int, list[int]] = {}
        for i, m in enumerate(max_new_tokens):
            by_budget.setdefault(int(m), []).append(i)
        for budget, idx in by_budget.items():
            done = self.backend.generate([prompt_ids[i] for i in idx for _ in range(self.k)],
                                         self.params(budget, seeds[idx[0]]),
                                         seeds=[s for i in idx for s in row_seeds(seeds[i], self.k)])
            for i, per_prompt in zip(idx, self._per_prompt(done, len(idx))):
                out[i] = per_prompt
        return out

    def sample_together(self, prompt_ids: list[list[int]], max_new_tokens: int, seed: int) -> list[Completions]:
        """``k`` completions of each prompt from one generate call seeded with ``seed`` (rows ordered
        prompt by prompt, as :meth:`aapo_ray.generator.GeneratorActor.generate` orders a chunk's)."""
        rows = [p for p in prompt_ids for _ in range(self.k)]
        done = sample_rows(self.backend, rows, self.params(max_new_tokens, seed))
        return self._per_prompt(done, len(prompt_ids))

    def _per_prompt(self, done: Completions, prompts: int) -> list[Completions]:
        """A call's rows (``k`` per prompt, prompt by prompt) as one :class:`Completions` per prompt."""
        rows = [slice(i * self.k, (i + 1) * self.k) for i in range(prompts)]
        return [Completions(done.token_ids[r], done.texts[r], done.finish_reasons[r]) for r in rows]


def _has_gpu() -> bool:
    return bool(ray.get_gpu_ids()) if ray.is_initialized() else False
