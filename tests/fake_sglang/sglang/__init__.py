"""A CPU stand-in for ``sglang.Engine`` that enforces the real (pinned) interface and behaviour.

Import it by putting ``tests/fake_sglang`` on ``sys.path`` / ``PYTHONPATH``. The interface comes
from ``$AAPO_FAKE_SGLANG_INTERFACE``: the JSON ``tests/sglang_contract.py`` reads from the pinned
wheel with ``ast``. Constructor kwargs are bound against the real ServerArgs fields and every
public method against the real signature (TypeError on a mismatch). Generation is real: a HF causal
LM on CPU. Upstream references below are to sglang 0.5.23 (``python/sglang/srt/...``):

* engine.py:278-396  ``Engine(**kwargs)`` builds ``ServerArgs(**kwargs)`` (a msgspec Struct,
  server_args.py:541-554: unknown kwarg -> TypeError); ``server_args=`` passes a prebuilt one.
* engine.py:396,1404-1415 the loop is captured at construction: the *running* loop if there is
  one, else the policy's loop, else a new one. Every sync method is
  ``self.loop.run_until_complete(...)`` (e.g. generate engine.py:542), so calling it from a thread
  while that loop runs raises "This event loop is already running"; ``async_generate``
  (engine.py:545-648) awaits on the caller's loop. Not mirrored: importing the real engine module
  sets uvloop's policy process-wide (engine.py:168), whose message is "this event loop is already
  running." (lower case).
* managers/io_struct.py:533-546,738-744 ``sampling_params``: None, one dict (shared) or a list
  (one dict per request, equal ``n``); tokenizer_manager.py:1565 ``SamplingParams(**d)``, a
  kw-only msgspec Struct: unknown key -> TypeError.
* schedule_batch.py:2007-2046 finish order per step: stop string, then stop token / EOS (unless
  ignore_eos), then max_new_tokens. The matched token and the stop string's tokens stay in
  ``output_ids`` (finished_len = pos + 1, 1873-1875; 1923-1926); only ``text`` is trimmed
  (detokenizer_manager.py:194-226; ``no_stop_trim`` keeps it). finish_reason JSON:
  schedule_batch.py:284-345. tokenizer_manager.py:2506-2559 meta_info keys.
  sampling_params.py:440-466 stop strings need the tokenizer (skip_tokenizer_init -> ValueError).
* tokenizer_manager.py:1891-1922 an abort with status_code 400 raises ValueError (non-stream);
  other aborts come back as ``{"type": "abort", ...}``.
* engine.py:343 ``self.tokenizer_manager``; tokenizer_manager.py:2241-2265 ``abort_request(rid)``: the
  scheduler drops that request at its next step, which then finishes with finish_reason ``abort``. The
  Engine has no abort method of its own. Concurrent ``async_generate`` calls share the running loop and
  advance a token at a time (the real scheduler batches them continuously).
* sampling_batch_info.py:157-172 ``sampling_seed`` is used only under
  ``enable_deterministic_inference``, where a missing seed means 42 and equal seeds give equal
  samples (multinomial_with_seed: sample = f(seed, position)); otherwise the engine RNG, seeded by
  ``random_seed`` (scheduler.py:1261; None -> random, arg_groups/serving_hook.py:660-665).
* layers/sampler.py:190-199 returned logprobs are log_softmax(logits / temperature).
* managers/scheduler_components/weight_updater.py:187-335 weight updates: tensor and
  distributed updates refuse with ``(False, msg)`` outside begin/end (before receiving anything);
  begin twice / end without begin refuse too. Success messages: "Success",
  "Succeeded to update parameter online.". model_runner_components/weight_updater.py:100-146
  ``init_weights_update_group``: rank = rank_offset + tp_rank, a custom group (not the default
  one) via tcp://addr:port with a PrefixStore(group_name) (utils/common.py:2859-2927);
  255-293 one broadcast from src=0 per tensor, dtype given as a torch dtype name.
* weight_updater.py:337-405 release/resume: release asserts the engine idle; resume of a tag
  never released raises KeyError (set.remove); without enable_memory_saver both are no-ops
  (torch_memory_saver_adapter.py:139-160). Both return None; flush_cache returns an object with
  ``success``/``message`` (io_struct.py:1859).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import types
import uuid

__version__ = "0.0.0+fake"
_INTERFACE = None
GPU_MEMORY_ALL_TYPES = ["kv_cache", "weights", "cuda_graph"]  # srt/constants.py
step_delay_s = 0.0  # tests set it to make a generation last (seconds per token, the loop free meanwhile)
TOP_K_ALL = 1 << 30  # sampling_params.py:43


def abort_hook(index: int, prompt_ids: list) -> dict | None:
    """Tests replace this (or set ``$AAPO_FAKE_SGLANG_ABORT_TOKEN``) to abort chosen requests.

    Return None to generate normally, or ``{"message": ..., "status_code": None|int}``: the
    request stops after one token with finish_reason ``abort`` (status 400 raises ValueError)."""
    token = os.environ.get("AAPO_FAKE_SGLANG_ABORT_TOKEN")
    if token is not None and int(token) in prompt_ids:
        return {"message": "Aborted (fake)", "status_code": None}
    return None


def interface() -> dict:
    global _INTERFACE
    if _INTERFACE is None:
        path = os.environ.get("AAPO_FAKE_SGLANG_INTERFACE")
        if not path:
            raise RuntimeError("fake sglang: set AAPO_FAKE_SGLANG_INTERFACE to the interface JSON "
                               "of tests/sglang_contract.py")
        with open(path) as f:
            _INTERFACE = json.load(f)
    return _INTERFACE


_MISSING = object()


def _signature(name: str) -> inspect.Signature:
    params = []
    spec = (interface()["tokenizer_manager"]["abort_request"] if name == "abort_request"
            else interface()["engine"][name])
    for p in spec["params"]:
        default = inspect.Parameter.empty
        if not p.get("required", False) and p["kind"] not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            default = p.get("default", _MISSING)  # a non-literal default reads as _MISSING
        params.append(inspect.Parameter(p["name"], getattr(inspect.Parameter, p["kind"]),
                                        default=default))
    return inspect.Signature(params)


def _bind(name: str, args, kwargs) -> dict:
    try:
        bound = _signature(name).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"Engine.{name}(): {exc}") from None
    bound.apply_defaults()
    return {k: (None if v is _MISSING else v) for k, v in bound.arguments.items()}


def _server_args(kwargs: dict) -> types.SimpleNamespace:
    fields = interface()["server_args"]
    known = {f["name"] for f in fields}
    for key in kwargs:
        if key not in known:
            raise TypeError(f"Unexpected keyword argument {key!r}")  # msgspec's wording
    values = {}
    for f in fields:
        if f["name"] in kwargs:
            values[f["name"]] = kwargs[f["name"]]
        elif f.get("required"):
            raise TypeError(f"Missing required argument {f['name']!r}")
        else:
            values[f["name"]] = f.get("default")
    return types.SimpleNamespace(**values)


def _ensure_event_loop() -> asyncio.AbstractEventLoop:
    """engine.py:1404-1415: the running loop, else the policy's, else a new one set current."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    try:
        return asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop


class Engine:
    """``sglang.Engine`` on CPU: see the module docstring for what each behaviour follows."""

    def __init__(self, *args, **kwargs):
        _bind("__init__", args, kwargs)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        sa = kwargs.pop("server_args", None) or _server_args(kwargs)
        self.server_args = sa
        # float32 whatever ``dtype`` says: CPU bfloat16 matmuls are slow and the tests compare weights.
        self.model = AutoModelForCausalLM.from_pretrained(sa.model_path, dtype=torch.float32)
        self.model.eval()
        # transformers >= 5.2x renamed past_key_values to cache
        self._cache_kw = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                          else "past_key_values")
        self.tokenizer = (None if sa.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            sa.tokenizer_path or sa.model_path, trust_remote_code=sa.trust_remote_code))
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.random_seed = sa.random_seed if sa.random_seed is not None else random.randint(0, 1 << 30)
        self.rng = torch.Generator().manual_seed(self.random_seed)
        self._session = None
        self._groups = {}
        self._offloaded: set[str] = set()
        self._stash = None
        self.calls: list[str] = []  # method names in call order, for tests
        self.tokenizer_manager = TokenizerManager(self)
        self.loop = _ensure_event_loop()

    # ------------------------------------------------------------------ generation

    def generate(self, *args, **kwargs):
        a = _bind("generate", args, kwargs)
        self.calls.append("generate")
        coro = self._generate(a)
        try:
            return self.loop.run_until_complete(coro)
        except RuntimeError:
            coro.close()
            raise

    async def async_generate(self, *args, **kwargs):
        a = _bind("async_generate", args, kwargs)
        self.calls.append("async_generate")
        return await self._generate(a)

    async def _generate(self, a: dict):
        if a["prompt"] is not None:
            if a["input_ids"] is not None:
                raise ValueError("Either text or input_ids should be provided.")
            if self.tokenizer is None:
                raise ValueError("The engine initialized with skip_tokenizer_init=True cannot "
                                 "accept text prompts. Please provide input_ids or re-initialize "
                                 "the engine with skip_tokenizer_init=False.")
            single = isinstance(a["prompt"], str)
            texts = [a["prompt"]] if single else a["prompt"]
            prompts = [self.tokenizer(t)["input_ids"] for t in texts]
        else:
            ids = a["input_ids"]
            single = bool(ids) and isinstance(ids[0], int)
            prompts = [ids] if single else ids
        sp = a["sampling_params"]
        if sp is None:
            per = [{}] * len(prompts)
        elif isinstance(sp, dict):
            per = [sp] * len(prompts)
        else:
            per = list(sp)
            if len({d.get("n", 1) for d in per}) > 1:
                raise ValueError("The parallel_sample_num should be the same for all samples in "
                                 "sample params.")
        want_lp = a["return_logprob"]
        rids = a["rid"] if isinstance(a["rid"], list) else [a["rid"]] * len(prompts)
        if a["stream"]:  # engine.py:645-646: the chunks' async generator itself
            if not single:
                raise NotImplementedError("fake sglang: a streamed batch")
            return self._steps(0, list(prompts[0]), _sampling_params(per[0], self.tokenizer), bool(want_lp),
                               rids[0] or uuid.uuid4().hex)
        outs = []
        for i, prompt in enumerate(prompts):
            params = _sampling_params(per[i], self.tokenizer)  # IndexError if the list is short
            lp = want_lp[i] if isinstance(want_lp, list) else bool(want_lp)
            outs.append(await self._one(i, list(prompt), params, lp, rids[i] or uuid.uuid4().hex))
        return outs[0] if single else outs

    async def _one(self, index: int, prompt: list, p: dict, want_logprob: bool, rid: str) -> dict:
        async for result in self._steps(index, prompt, p, want_logprob, rid):
            pass
        return result

    async def _steps(self, index: int, prompt: list, p: dict, want_logprob: bool, rid: str):
        """One request: a stream chunk per token (tokenizer_manager.py:2676-2703, incremental_streaming_output
        off: ``output_ids`` is every token so far, the engine's own list, extended later; ``finish_reason``
        None), then the finished output."""
        import torch

        if p["n"] != 1:
            raise NotImplementedError("fake sglang: n > 1")
        det = bool(self.server_args.enable_deterministic_inference)
        rng = (torch.Generator().manual_seed(p["sampling_seed"] if p["sampling_seed"] is not None else 42)
               if det else self.rng)
        greedy = 0 <= p["temperature"] < 1e-6  # sampling_params.py:245-249
        temp = 1.0 if greedy else float(p["temperature"])
        top_k = 1 if greedy else (TOP_K_ALL if p["top_k"] in (-1, None) else p["top_k"])
        stop_ids = set(p["stop_token_ids"] or ()) | self.eos_token_ids
        stops = p["stop"] if isinstance(p["stop"], list) else [p["stop"]] if p["stop"] else []
        abort = abort_hook(index, prompt)
        out, logprobs, finish, past = [], [], None, None
        ids = torch.tensor([prompt])
        with torch.no_grad():
            while finish is None:
                await asyncio.sleep(step_delay_s)  # one scheduler step: other requests on this loop advance too
                if rid in self.tokenizer_manager.aborted:
                    finish = {"type": "abort", "message": f"Abort request {rid}", "status_code": None,
                              "err_type": None}
                    break
                o = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: past})
                past = o.past_key_values
                logits = o.logits[0, -1].float() / temp
                logp = torch.log_softmax(logits, -1)
                probs = torch.softmax(logits, -1)
                if top_k < probs.numel():
                    kth = torch.topk(probs, top_k).values[-1]
                    probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
                if p["top_p"] < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p > p["top_p"] * sorted_p.sum()
                    probs = probs.clone()
                    probs[order[drop]] = 0
                tok = int(torch.multinomial(probs / probs.sum(), 1, generator=rng))
                out.append(tok)
                logprobs.append((float(logp[tok]), tok, None))
                ids = torch.tensor([[tok]])
                text = self.tokenizer.decode(out) if stops else ""
                hit = next((s for s in stops if s in text), None)
                if abort is not None:
                    finish = {"type": "abort", "message": abort["message"],
                              "status_code": abort.get("status_code"), "err_type": None}
                elif hit is not None:
                    finish = {"type": "stop", "matched": hit}
                elif not p["ignore_eos"] and tok in stop_ids:
                    finish = {"type": "stop", "matched": tok}
                elif len(out) >= p["max_new_tokens"]:
                    finish = {"type": "length", "length": p["max_new_tokens"]}
                if finish is None:
                    yield {"output_ids": out, "meta_info": {"id": rid, "finish_reason": None,
                                                            "prompt_tokens": len(prompt),
                                                            "completion_tokens": len(out)}}
        if finish["type"] == "abort" and finish["status_code"] == 400:
            raise ValueError(finish["message"])  # tokenizer_manager.py:1916-1917
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                "weight_version": self.server_args.weight_version, "completion_tokens": len(out),
                "cached_tokens": 0}
        if want_logprob:
            meta["output_token_logprobs"] = logprobs
        result = {"output_ids": out, "meta_info": meta}
        if self.tokenizer is not None:
            result["text"] = self._text(out, finish, p)
        yield result

    def _text(self, out: list, finish: dict, p: dict) -> str:
        matched = finish.get("matched")
        ids = out[:-1] if isinstance(matched, int) and not p["no_stop_trim"] else out
        text = self.tokenizer.decode(ids, skip_special_tokens=p["skip_special_tokens"])
        if isinstance(matched, str) and matched in text:
            pos = text.find(matched)
            text = text[: pos + len(matched)] if p["no_stop_trim"] else text[:pos]
        return text

    # ------------------------------------------------------------------ weights

    def begin_weight_update(self, *args, **kwargs):
        a = _bind("begin_weight_update", args, kwargs)
        self.calls.append("begin_weight_update")
        if self._session is not None:
            return False, self._refusal("begin_weight_update")
        self._session = {"selector": a["selector"], "loaded": False}
        return True, "Success"

    def end_weight_update(self, *args, **kwargs):
        _bind("end_weight_update", args, kwargs)
        self.calls.append("end_weight_update")
        if self._session is None:
            return False, self._refusal("end_weight_update")
        self._session = None
        return True, "Success"

    def update_weights_from_tensor(self, *args, **kwargs):
        a = _bind("update_weights_from_tensor", args, kwargs)
        self.calls.append("update_weights_from_tensor")
        named = list(a["named_tensors"])  # serialized before the session check (engine.py:1691)
        if self._session is None:
            return False, self._refusal("update_weights_from_tensor")
        if a["load_format"] not in (None, "direct"):
            raise NotImplementedError(f"fake sglang: load_format={a['load_format']!r}")
        self._load(named)
        return True, "Success"

    def init_weights_update_group(self, *args, **kwargs):
        a = _bind("init_weights_update_group", args, kwargs)
        self.calls.append("init_weights_update_group")
        import torch
        from torch.distributed import distributed_c10d as c10d

        backend = a["backend"]
        if backend == "nccl" and not torch.cuda.is_available():
            backend = "gloo"  # the fake runs on CPU; real sglang passes the backend through
        try:
            import datetime

            timeout = datetime.timedelta(minutes=30)  # torch's default_pg_timeout
            store, rank, world = next(c10d.rendezvous(
                f"tcp://{a['master_address']}:{a['master_port']}", a["rank_offset"], a["world_size"],
                timeout=timeout))
            store.set_timeout(timeout)
            store = c10d.PrefixStore(a["group_name"], store)
            pg, _ = c10d._new_process_group_helper(world, rank, [], c10d.Backend(backend), store,
                                                   group_name=a["group_name"], timeout=timeout)
            c10d._world.pg_group_ranks[pg] = {i: i for i in range(world)}  # as utils/common.py:2925
            self._groups[a["group_name"]] = pg
            return True, "Succeeded to initialize custom process group."
        except Exception as e:  # model_runner weight_updater.py:142-145
            return False, f"Failed to initialize custom process group: {e}."

    def destroy_weights_update_group(self, *args, **kwargs):
        a = _bind("destroy_weights_update_group", args, kwargs)
        import torch

        pg = self._groups.pop(a["group_name"], None)
        if pg is None:
            return False, "The group to be destroyed does not exist."
        torch.distributed.destroy_process_group(pg)
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(self, *args, **kwargs):
        a = _bind("update_weights_from_distributed", args, kwargs)
        self.calls.append("update_weights_from_distributed")
        import torch

        if self._session is None:  # refuses before joining the broadcast: the sender then hangs
            return False, self._refusal("update_weights_from_distributed")
        if a["group_name"] not in self._groups:
            raise AssertionError(f"Group {a['group_name']} not in {list(self._groups)}. "
                                 "Please call `init_weights_update_group` first.")
        if a["load_format"] is not None:
            raise NotImplementedError(f"fake sglang: load_format={a['load_format']!r}")
        received = []
        for name, dtype, shape in zip(a["names"], a["dtypes"], a["shapes"]):
            dt = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
            t = torch.empty(shape, dtype=dt)
            torch.distributed.broadcast(t, src=0, group=self._groups[a["group_name"]])
            received.append((name, t))
        self._load(received)
        return True, "Succeeded to update parameter online."

    def _load(self, named) -> None:
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for pair in named:
                name, tensor = pair  # a (name, tensor) pair, as real sglang deserializes
                if name not in params:
                    raise KeyError(f"fake sglang: no parameter {name!r}")
                params[name].copy_(tensor.to(params[name].dtype))
        if self._session is not None:
            self._session["loaded"] = True

    def _refusal(self, name: str) -> str:
        return interface()["weight_update_refusals"][name]["message"]

    # ------------------------------------------------------------------ memory / lifecycle

    def flush_cache(self, *args, **kwargs):
        _bind("flush_cache", args, kwargs)
        self.calls.append("flush_cache")
        return types.SimpleNamespace(success=True, message="")

    def release_memory_occupation(self, *args, **kwargs):
        a = _bind("release_memory_occupation", args, kwargs)
        self.calls.append("release_memory_occupation")
        tags = a["tags"] or GPU_MEMORY_ALL_TYPES
        self._offloaded.update(tags)
        if self.server_args.enable_memory_saver and "weights" in tags:
            import torch

            self._stash = {k: v.clone() for k, v in self.model.state_dict().items()}
            with torch.no_grad():  # the weights are gone until resume: sampling would be garbage
                for v in self.model.parameters():
                    v.zero_()
        return None

    def resume_memory_occupation(self, *args, **kwargs):
        a = _bind("resume_memory_occupation", args, kwargs)
        self.calls.append("resume_memory_occupation")
        tags = a["tags"] or GPU_MEMORY_ALL_TYPES
        for tag in tags:
            self._offloaded.remove(tag)  # KeyError when never released, as upstream
        if self._stash is not None and "weights" in tags:
            self.model.load_state_dict(self._stash)
            self._stash = None
        return None

    def shutdown(self, *args, **kwargs):
        _bind("shutdown", args, kwargs)
        self.calls.append("shutdown")
        for name in list(self._groups):
            self.destroy_weights_update_group(group_name=name)


def _sampling_params(d: dict, tokenizer) -> dict:
    """SamplingParams(**d) (kw-only msgspec Struct) with its __post_init__ defaults that matter."""
    allowed = interface()["sampling_params"]
    for key in d:
        if key not in allowed:
            raise TypeError(f"Unexpected keyword argument {key!r}")
    p = {"max_new_tokens": 128, "stop": None, "stop_token_ids": None, "temperature": 1.0,
         "top_p": 1.0, "top_k": -1, "n": 1, "ignore_eos": False, "skip_special_tokens": True,
         "no_stop_trim": False, "sampling_seed": None, "stop_regex": None, "min_new_tokens": 0}
    p.update({k: v for k, v in d.items() if v is not None})
    if tokenizer is None and (p["stop"] or p["stop_regex"]):
        raise ValueError(f"stop={p['stop']!r} is unavailable when skip_tokenizer_init=True "
                         "(requires tokenizer to decode tokens to text for matching).")
    if p["stop_regex"] or p["min_new_tokens"]:
        raise NotImplementedError("fake sglang: stop_regex / min_new_tokens")
    if not 0.0 < p["top_p"] <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p['top_p']}.")
    return p


def __getattr__(name):
    # Anything else of sglang's public API is absent here: fail loudly, not with None.
    raise AttributeError(f"fake sglang has no attribute {name!r}")


class TokenizerManager:
    """``Engine.tokenizer_manager``: only ``abort_request`` (bound to the real signature)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.aborted: set[str] = set()

    def abort_request(self, *args, **kwargs):
        a = _bind("abort_request", args, kwargs)
        self.engine.calls.append("abort_request")
        if a["abort_all"]:
            raise NotImplementedError("fake sglang: abort_all")
        if a["rid"]:  # an empty rid is ignored (tokenizer_manager.py:2243)
            self.aborted.add(a["rid"])
