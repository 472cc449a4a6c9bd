"""``sglang.Engine`` as a generation backend (GPU only; the optional ``gpu`` extra).

Written against the pinned sglang release (see ``pyproject.toml``) and tested against a fake engine
derived from that release's source (``tests/test_sglang_contract.py``); never executed on a GPU in CI.
"""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from aapo_ray.sampling import Completions, SamplingParams
from aapo_ray.weights import unpack_bucket


class SGLangBackend:
    """``sglang.Engine`` fed with token ids; weights synced with ``update_weights_from_tensor``."""

    def __init__(self, model_path: str, *, trust_remote_code: bool = False, dtype: str = "bfloat16",
                 mem_fraction: float = 0.6, seed: int = 0, **_):
        try:
            import sglang  # optional (the gpu extra), GPU only
        except ImportError as exc:
            raise RuntimeError(
                "rollout.backend=sglang needs SGLang on a CUDA machine: pip install 'aapo-ray[gpu]' "
                "(with a CUDA build of torch). On CPU use rollout.backend=hf.") from exc
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.engine = sglang.Engine(model_path=model_path, dtype=dtype, mem_fraction_static=mem_fraction,
                                    random_seed=seed, skip_tokenizer_init=True,
                                    trust_remote_code=trust_remote_code)
        self.eos_ids = [self.tokenizer.eos_token_id]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        sampling = {"temperature": params.temperature, "top_p": params.top_p,
                    "max_new_tokens": params.max_new_tokens}
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        outputs = self.engine.generate(input_ids=prompt_ids, sampling_params=sampling)
        rows = [np.asarray(o["output_ids"], dtype=np.int32) for o in outputs]
        reasons = [(o["meta_info"].get("finish_reason") or {}).get("type", "length") for o in outputs]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return Completions(rows, texts, ["stop" if r == "stop" else "length" for r in reasons])

    def load_weights(self, buckets: list) -> int:
        named = [pair for bucket in buckets for pair in unpack_bucket(bucket)]
        self.engine.update_weights_from_tensor(named_tensors=named)
        return len(named)
