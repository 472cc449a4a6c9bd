"""The real SGLang backend, generator actor, weight sync and Serve replica against the fake engine built from
the pinned sglang wheel (tests/fake_sglang, tests/sglang_contract.py). Each test names the defect it catches."""

import asyncio
import importlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sglang_contract as sc
from aapo_ray.config import load_config
from aapo_ray.sampling import SamplingParams, engine_seed, row_seeds
from aapo_ray.weights import bucket_parameters

FAKE = Path(__file__).parent / "fake_sglang"


@pytest.fixture(scope="module")
def fake_env():
    """The fake ``sglang`` importable here and in Ray workers (PYTHONPATH + the interface JSON)."""
    env = {"PYTHONPATH": str(FAKE), "AAPO_FAKE_SGLANG_INTERFACE": str(sc.interface_json())}
    os.environ["AAPO_FAKE_SGLANG_INTERFACE"] = env["AAPO_FAKE_SGLANG_INTERFACE"]
    sys.path.insert(0, str(FAKE))
    sys.modules.pop("sglang", None)
    assert importlib.import_module("sglang").__file__.startswith(str(FAKE))
    yield env
    sys.path.remove(str(FAKE))
    sys.modules.pop("sglang", None)


@pytest.fixture(scope="module")
def backend(fake_env, tiny_model_path):
    from aapo_ray.sglang_backend import SGLangBackend

    b = SGLangBackend(tiny_model_path, seed=7, deterministic=True)
    yield b
    b.shutdown()


def prompts(tiny_model_path, n=1):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    return tok(["Compute 1+2+3+4.\n", "Compute 9-3+2+1.\n"] * n, add_special_tokens=False)["input_ids"]


def test_weight_sync_loads_inside_a_session_and_checks_every_result(backend, tiny_model_path):
    """Defect 1: outside begin/end sglang loads nothing and says so only in its return value."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    backend.engine.calls.clear()
    assert backend.load_weights(bucket_parameters(model.named_parameters(), 0.05)) == len(list(model.parameters()))
    for (name, want), got in zip(model.named_parameters(), backend.engine.model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    calls = backend.engine.calls
    assert calls[0] == "begin_weight_update" and calls[-1] == "end_weight_update"
    assert calls.count("update_weights_from_tensor") > 1  # several buckets, one session
    backend.engine.begin_weight_update()  # a session left open elsewhere: the next sync is refused, loudly
    try:
        with pytest.raises(RuntimeError, match="begin_weight_update failed"):
            backend.load_weights(bucket_parameters(model.named_parameters(), 1.0))
    finally:
        backend.engine.end_weight_update()


def test_rows_get_their_own_seeds(backend, fake_env, tiny_model_path):
    """Defect 2: one sampling_seed for all G copies of a prompt makes the group identical."""
    from aapo_ray.sglang_backend import SGLangBackend

    group = prompts(tiny_model_path)[:1] * 6
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)
    out = backend.generate(group, params)
    assert len({tuple(r) for r in out.token_ids}) > 1  # the group has variance
    again = backend.generate(group, params)
    assert [r.tolist() for r in again.token_ids] == [r.tolist() for r in out.token_ids]  # and is reproducible
    # explicit per-row seeds (aapo eval, aapo serve) replace the derived ones, row by row
    seeded = backend.generate(group[:2], params, seeds=row_seeds(11, 6)[4:])
    assert [r.tolist() for r in seeded.token_ids] == [r.tolist() for r in out.token_ids[4:]]
    assert len({engine_seed(0, role, replica) for role in ("policy", "reference") for replica in range(4)}) == 8
    free = SGLangBackend(tiny_model_path, seed=engine_seed(0, "policy", 0))  # not deterministic: no seeds sent
    try:
        free.engine.calls.clear()
        free.generate(group, params)
        assert free.engine.server_args.random_seed == engine_seed(0, "policy", 0)
    finally:
        free.shutdown()


def test_stop_strings_and_aborts(backend, fake_env, tiny_model_path, monkeypatch):
    """Defect 4: stop strings ignored; an aborted row trained on as if it ran out of length."""
    import sglang

    ids = prompts(tiny_model_path)
    full = backend.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=16))
    stop = full.texts[0][2:4]
    cut = backend.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=16, stop=(stop,)))
    assert cut.texts[0] == full.texts[0][:full.texts[0].find(stop)] and cut.finish_reasons[0] == "stop"
    eos = AutoTokenizer.from_pretrained(tiny_model_path).eos_token_id
    for row, why in zip(full.token_ids, full.finish_reasons):
        assert (row[-1] == eos) == (why == "stop")  # output ids include the EOS, as sglang's do
    attempts = []

    def abort_first_row_once(index, prompt_ids):
        attempts.append(index)
        if len(attempts) == 1:
            return {"message": "retracted", "status_code": None}
        return None

    monkeypatch.setattr(sglang, "abort_hook", abort_first_row_once)
    again = backend.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=16))
    assert again.texts == full.texts and "abort" not in again.finish_reasons  # re-sampled, not "length"
    monkeypatch.setattr(sglang, "abort_hook", lambda index, prompt_ids: {"message": "gone", "status_code": None})
    with pytest.raises(RuntimeError, match="aborted .* never trained on"):
        backend.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=4))


def test_serving_rows_are_concurrent_async_calls_and_cancelled_rows_are_aborted(fake_env, tiny_model_path):
    """Defect 5: one synchronous generate at a time never lets SGLang batch requests as they come. Served, each
    row is its own async_generate on the engine's running loop; a dropped row is aborted in the engine."""
    from aapo_ray.sglang_backend import SGLangBackend, SGLangError

    served = SGLangBackend(tiny_model_path, seed=3)
    ids = prompts(tiny_model_path)
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (6, 12)]
    want = [served.generate(ids[i:i + 1], params).token_ids[0].tolist() for i, params in enumerate(greedy)]

    async def serve():
        rows, loop = served.serve_rows(), asyncio.get_running_loop()
        outputs = [loop.create_future() for _ in range(3)]
        rids = [rows.submit(ids[i % 2], params, outputs[i].set_result, stream=False)
                for i, params in enumerate([*greedy, SamplingParams(temperature=1.0, max_new_tokens=200)])]
        rows.cancel(rids[2])  # its reader is gone: dropped at the engine's next step
        streamed, finished = [], loop.create_future()
        rows.submit(ids[1], greedy[1], lambda out: (streamed.append(out.generated_tokens),
                                                    out.is_finished() and finished.set_result(out)), stream=True)
        done = await asyncio.gather(*outputs[:2])
        await finished
        for _ in range(100):
            if not rows.pending_handlers():
                break
            await asyncio.sleep(0.05)
        seeded = await loop.run_in_executor(None, served.generate, ids, SamplingParams(max_new_tokens=4, seed=1))
        return rids, done, outputs[2].done(), rows.pending_handlers(), seeded, streamed

    try:
        served.engine.calls.clear()
        rids, done, cancelled_delivered, pending, seeded, streamed = asyncio.run(serve())
        assert [out.generated_tokens for out in done] == want and all(out.error is None for out in done)
        assert streamed == [want[1][:k] for k in range(1, len(want[1]) + 1)]  # a token at a time, copied
        assert served.completions([done[0].generated_tokens]).token_ids[0].tolist() == want[0]
        assert not cancelled_delivered and pending == 0
        assert rids[2] in served.engine.tokenizer_manager.aborted
        assert len(seeded.token_ids) == 2  # generate works while serving, through async_generate
        assert "generate" not in served.engine.calls and served.engine.calls.count("async_generate") == 5
        with pytest.raises(SGLangError, match="serving"):
            served.init_weight_group("127.0.0.1", 1, 1, 2, "g")  # a served checkpoint takes no weights
    finally:
        served.shutdown()


class Request:
    """What a replica's ``_complete`` reads of a Starlette request: a JSON completion body (greedy, 4 tokens)."""

    headers = {"content-type": "application/json"}

    def __init__(self, **body):
        self.body = {"prompt": "Compute 1+2.\n", "max_tokens": 4, "temperature": 0, **body}

    async def stream(self):
        yield json.dumps(self.body).encode()


def test_serve_replica_builds_the_engine_inside_a_running_loop(fake_env, tiny_model_path, quiet_batch_queue):
    """Defect 3: Serve builds the replica inside its event loop and generates from an executor thread."""
    from aapo_ray.openai_api import APIError
    from aapo_ray.serve_replica import OpenAIServer
    from aapo_ray.sglang_backend import SGLangRows

    async def replica():
        srv = OpenAIServer(tiny_model_path, "m", {"backend": "sglang"})  # as Serve does: inside its loop
        assert isinstance(srv.continuous.engine, SGLangRows)  # continuous batching: SGLang's own scheduler
        try:
            response = await srv._complete(Request(), chat=False)
            seeded = await srv._complete(Request(seed=5, n=2, temperature=1.0), chat=False)
            assert len(json.loads(seeded.body)["choices"]) == 2
            stream = await srv._complete(Request(stream=True), chat=False)
            events = [line[6:] for chunk in [c async for c in stream.body_iterator]
                      for line in (chunk.decode() if isinstance(chunk, bytes) else chunk).split("\n")
                      if line.startswith("data: {")]
            deltas = [json.loads(e)["choices"][0]["text"] for e in events if json.loads(e)["choices"]]
            echoed = await srv._complete(Request(echo=True, max_tokens=0), chat=False)
            with pytest.raises(APIError) as refused:  # no scoring with sglang: log-probs are refused
                await srv._complete(Request(logprobs=1), chat=False)
        finally:
            srv.backend.shutdown()
        return json.loads(response.body), json.loads(echoed.body), refused.value, "".join(deltas)

    body, echoed, refused, streamed = asyncio.run(replica())
    assert streamed == body["choices"][0]["text"]  # the stream's text is the whole response's
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1
    assert echoed["choices"][0]["text"] == "Compute 1+2.\n" and echoed["usage"]["completion_tokens"] == 0
    assert (refused.status, refused.code, refused.param) == (400, "unsupported", "logprobs")


def test_serve_replica_timeout_is_a_504_and_aborts_the_rows(fake_env, tiny_model_path, quiet_batch_queue,
                                                           monkeypatch):
    """The continuous path's error paths hold on SGLang: a request past request_timeout_s is a 504 and its
    rows are aborted in the engine (not generated to the end), and the replica serves the next request."""
    import sglang

    from aapo_ray.openai_api import APIError
    from aapo_ray.serve_replica import OpenAIServer

    async def replica():
        srv = OpenAIServer(tiny_model_path, "m", {"backend": "sglang", "request_timeout_s": 0.5})
        try:
            monkeypatch.setattr(sglang, "step_delay_s", 0.05)  # 100 tokens: 5 s, ten times the deadline
            with pytest.raises(APIError) as late:
                await srv._complete(Request(max_tokens=100, n=2), chat=False)
            for _ in range(100):
                if not srv.continuous.engine.pending_handlers():
                    break
                await asyncio.sleep(0.05)
            left = srv.continuous.engine.pending_handlers()
            monkeypatch.setattr(sglang, "step_delay_s", 0.0)
            after = json.loads((await srv._complete(Request(max_tokens=4), chat=False)).body)
        finally:
            srv.backend.shutdown()
        return late.value, left, srv.backend.engine.tokenizer_manager.aborted, after

    late, left, aborted, after = asyncio.run(replica())
    assert (late.status, late.code) == (504, "request_timeout")
    assert left == 0 and len(aborted) == 2  # both rows (n=2) dropped in the engine, the finished one not
    assert after["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def sglang_cfg(tiny_model_path, fake_env):
    cfg = load_config(None, [f"model.path={tiny_model_path}", "rollout.prompts_per_step=2", "algo.group_size=2",
                             "rollout.max_new_tokens=8", "learner.micro_batch_size=4", "learner.sync_bucket_mb=0.05"])
    cfg.rollout.backend, cfg.rollout.weight_sync = "sglang", "nccl"  # GPU-only settings, checked by config
    return cfg


def test_generator_actor_and_nccl_style_broadcast_from_a_real_learner(ray_cluster, sglang_cfg, fake_env,
                                                                     tiny_model_path):
    """Weights broadcast from DeepSpeed rank 0 (gloo here, NCCL on GPUs) into the engines' group: the
    generator's engine holds exactly the learner's weights, and its version advances."""
    from aapo_ray.generator import GeneratorActor, GeneratorPool
    from aapo_ray.learner import LearnerGroup
    from aapo_ray.rollout import concat, learner_batch, make_prompt_batch
    from aapo_ray.weight_sync import sync_policy

    class FakeEnginePool(GeneratorPool):
        def _new_actor(self, replica):
            return ray.remote(GeneratorActor).options(num_cpus=0.5, max_restarts=0, runtime_env={
                "env_vars": fake_env}).remote(self.cfg, self.model_path, self.role, replica)

    policy, learners = FakeEnginePool(sglang_cfg, tiny_model_path, replicas=2), LearnerGroup(sglang_cfg, tiny_model_path)
    try:
        ids = prompts(tiny_model_path)
        batch = make_prompt_batch([0, 1], ids, ["a", "b"], ["10", "9"])
        rollouts = concat(ray.get(policy.async_generate(batch, 2, policy.sampling(seed=1))))
        assert rollouts.num_rows == 4
        learners.train_step(learner_batch(rollouts, np.array([1.0, -1.0, 0.5, -0.5])),
                            float(len(rollouts.column("completion_ids").values)))
        sync_policy(policy, learners, version=1)
        want = ray.get(learners.rank0().__ray_call__.remote(
            lambda self: {k: v.detach().cpu().clone() for k, v in self.engine.module.named_parameters()}))
        for actor in policy.actors:
            got = ray.get(actor.__ray_call__.remote(
                lambda self: {k: v.detach().clone() for k, v in self.backend.engine.model.named_parameters()}))
            for name, tensor in want.items():
                torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
            state = ray.get(actor.ready.remote())
            assert state["version"] == 1
        calls = ray.get(policy.actors[0].__ray_call__.remote(lambda self: list(self.backend.engine.calls)))
        assert calls.count("init_weights_update_group") == 1 and "update_weights_from_tensor" not in calls
        sync_policy(policy, learners, version=2)  # the group is formed once, reused every step
        assert ray.get(policy.actors[0].ready.remote())["version"] == 2
        host, port = ray.get(learners.rank0().weight_group_address.remote())
        with pytest.raises(OSError):  # held from the moment it is handed out: no process can take it first
            socket.create_server((host, port)).close()
    finally:
        policy.shutdown()
        learners.shutdown()


