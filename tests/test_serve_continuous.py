"""Continuous batching (the Serve replica's ``hf`` default): transformers' engine on the tiny model, in process.
Over HTTP the same path is exercised by every test of test_serve.py and test_serve_logprobs.py."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from aapo_ray.backends import HFBackend
from aapo_ray.continuous_batching import ContinuousBatcher, GreedyAwareTemperature, continuous_engine
from aapo_ray.models import load_model_and_tokenizer
from aapo_ray.openai_api import APIError
from aapo_ray.sampling import SamplingParams, row_seeds
from aapo_ray.serve_continuous import ContinuousJobs
from aapo_ray.serve_logprobs import LogprobRequest, score_rows
from aapo_ray.serve_options import ServeOptions
from aapo_ray.serve_replica import Job, OpenAIServer
from aapo_ray.synthetic import SyntheticTask

GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


@pytest.fixture(scope="module")
def backend(tiny_model_path):
    return HFBackend.load(tiny_model_path, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """A second copy of the model for plain ``generate`` (the engine's model is busy in its thread)."""
    return HFBackend.load(tiny_model_path, device="cpu")


@pytest.fixture(scope="module")
def jobs(backend):
    engine = continuous_engine(backend, 16)
    yield ContinuousJobs(backend, engine, ThreadPoolExecutor(1), set(backend.eos_ids))
    engine.close()


@pytest.fixture(scope="module")
def prompts(backend):
    return [backend.tokenizer(q)["input_ids"] for q in SyntheticTask().prompts("test", 6)]


async def _collect(jobs, job):
    return [e async for e in jobs.events(job)]


def _done(events):
    return {e[1]: e[2:] for e in events if e[0] == "done"}


def _streamed(events, c):
    return "".join(e[2] for e in events if e[0] == "delta" and e[1] == c)


def test_concurrent_rows_with_mixed_params_share_the_engine_and_equal_generate(jobs, reference, prompts):
    """Greedy rows (streamed or not, with and without a stop string) next to sampled rows at other settings,
    all in one engine at once: each greedy row is exactly ``generate``'s (text, finish reason, tokens)."""
    stop = SamplingParams(temperature=0, max_new_tokens=40, stop=("=",))
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20)

    async def scenario():
        return await asyncio.gather(*[_collect(jobs, Job([p], 1, GREEDY, i % 2 == 1)) for i, p in enumerate(prompts)],
                                    _collect(jobs, Job([prompts[0]], 1, stop, True)),
                                    _collect(jobs, Job([prompts[0]], 1, stop, False)),
                                    _collect(jobs, Job(prompts[:2], 3, sampled, True)))

    *greedy, stop_streamed, stop_whole, many = asyncio.run(scenario())
    want = reference.generate(prompts, GREEDY)
    for i, events in enumerate(greedy):
        text, reason, tokens = _done(events)[0]
        assert (text, reason, tokens) == (want.texts[i], want.finish_reasons[i], len(want.token_ids[i]))
        assert _streamed(events, 0) == (text if i % 2 == 1 else "")
        if i % 2 == 1:
            assert len([e for e in events if e[0] == "delta"]) > 3  # token by token, not one chunk
    cut = reference.generate(prompts[:1], stop)
    assert "=" not in cut.texts[0]
    for events, streamed in ((stop_streamed, True), (stop_whole, False)):
        assert _done(events)[0][:2] == (cut.texts[0], "stop")
        assert _streamed(events, 0) == (cut.texts[0] if streamed else "")
    done = _done(many)
    assert sorted(done) == list(range(6)) and all(_streamed(many, c) == done[c][0] for c in done)
    assert all(0 < done[c][2] <= 20 for c in done)
    assert jobs.engine.pending_handlers() == 0


def test_seeded_requests_repeat_and_logprobs_equal_a_forward_pass(jobs, reference, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    first, again = (asyncio.run(_collect(jobs, Job(prompts[:2], 2, seeded, True))) for _ in range(2))
    assert first == again
    want = reference.generate([p for p in prompts[:2] for _ in range(2)], seeded, seeds=row_seeds(7, 4))  # per choice
    assert [_done(first)[c][0] for c in range(4)] == want.texts

    events = asyncio.run(_collect(jobs, Job([prompts[1]], 1, GREEDY, False, LogprobRequest(3, False))))
    assert [e[0] for e in events] == ["logprobs", "done"]
    whole = reference.generate([prompts[1]], GREEDY)
    expected = score_rows(reference, [prompts[1]], whole, [LogprobRequest(3, False)])[0]
    ids, scores = events[0][2], events[0][3]
    assert np.array_equal(ids, whole.token_ids[0])
    assert np.allclose(scores.logprobs, expected.logprobs, atol=1e-5)
    assert np.array_equal(scores.top_ids, expected.top_ids)


def test_deadline_and_disconnect_cancel_rows_in_the_engine(jobs, prompts, monkeypatch):
    """A request past its deadline is a 504 and its unfinished rows are cancelled in the engine; so are a
    reader's that goes away. The engine then holds no row and no result handler."""
    srv = object.__new__(OpenAIServer)
    srv.continuous, srv.pumps, srv.o = jobs, set(), ServeOptions(request_timeout_s=0.05)
    long = SamplingParams(temperature=1.0, max_new_tokens=100)
    submitted, finished, cancelled = set(), set(), set()
    submit, cancel = jobs.engine.submit, jobs.engine.cancel

    def spy_submit(prompt, params, on_output, stream):
        def note(out):
            if out.is_finished():
                finished.add(out.request_id)
            on_output(out)

        rid = submit(prompt, params, note, stream)
        submitted.add(rid)
        return rid

    def spy_cancel(rid):
        cancelled.add(rid)
        cancel(rid)

    monkeypatch.setattr(jobs.engine, "submit", spy_submit)
    monkeypatch.setattr(jobs.engine, "cancel", spy_cancel)

    async def past_deadline():
        with pytest.raises(APIError) as e:
            [e async for e in srv._events(Job([prompts[0]], 4, long, True), time.monotonic() + 0.05)]
        assert (e.value.status, e.value.code) == (504, "request_timeout") and not srv.pumps

    async def client_gone():
        reader = srv._events(Job([prompts[1]], 4, long, True), time.monotonic() + 60)
        assert (await reader.__anext__())[0] == "delta"
        await reader.aclose()

    scheduler = jobs.engine.manager.batch_processor.scheduler
    for scenario in (past_deadline, client_gone):
        submitted.clear(), finished.clear(), cancelled.clear()
        asyncio.run(scenario())
        assert len(submitted) == 4 and cancelled and cancelled == submitted - finished
        for _ in range(1000):  # the engine drops cancelled rows at its next step
            if not scheduler.active_requests and not scheduler.waiting_requests:
                break
            time.sleep(0.01)
        assert not scheduler.active_requests and not scheduler.waiting_requests
        assert jobs.engine.pending_handlers() == 0
    assert _done(asyncio.run(_collect(jobs, Job([prompts[2]], 1, GREEDY, False))))  # still serving


def test_engine_failures_answer_their_own_request(jobs, prompts, monkeypatch):
    class Failed:
        error, generated_tokens = "boom", []

    def fail_at_once(prompt, params, on_output, stream):
        asyncio.get_running_loop().call_soon(on_output, Failed())
        return "rid"

    monkeypatch.setattr(jobs.engine, "submit", fail_at_once)
    monkeypatch.setattr(jobs.engine, "cancel", lambda rid: None)
    assert asyncio.run(_collect(jobs, Job([prompts[0]], 1, GREEDY, False))) == [("error", "generation failed: boom")]

    def refuse(*args, **kwargs):
        raise RuntimeError("the continuous-batching engine is not accepting requests")

    monkeypatch.setattr(jobs.engine, "submit", refuse)
    (kind, message), = asyncio.run(_collect(jobs, Job([prompts[0]], 1, GREEDY, True)))
    assert kind == "error" and "not accepting" in message


def test_a_checkpoints_generation_config_does_not_change_continuous_sampling(tiny_model_path, reference, prompts):
    """As for ``generate`` (test_models.py): penalties and filters in the model's generation_config never
    reach the engine, and an engine config with anything but temperature and top-p is refused."""
    model, tok = load_model_and_tokenizer(tiny_model_path)
    for key, value in dict(repetition_penalty=1.5, top_k=3, min_p=0.3, no_repeat_ngram_size=1, typical_p=0.5,
                           min_new_tokens=10, epsilon_cutoff=0.2).items():
        setattr(model.generation_config, key, value)
    poisoned = HFBackend(model, tok)
    engine = continuous_engine(poisoned, 8)
    try:
        jobs = ContinuousJobs(poisoned, engine, ThreadPoolExecutor(1), set(poisoned.eos_ids))
        events = asyncio.run(_collect(jobs, Job(prompts, 1, GREEDY, False)))
    finally:
        engine.close()
    want = reference.generate(prompts, GREEDY)
    assert [_done(events)[c][0] for c in range(len(prompts))] == want.texts
    config = poisoned.generation_config(SamplingParams(temperature=0.5, top_p=0.5))
    config.min_p, config.repetition_penalty = None, 1.5
    with pytest.raises(RuntimeError, match="only per-request temperature and top-p"):
        ContinuousBatcher(model, config, poisoned.eos_ids, max_requests=2, context_length=128)


def test_greedy_aware_temperature():
    class Original:
        temperature = 0.5

    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    temperature = torch.tensor([0.0, 2.0]).view(dtype=torch.int32)
    out = GreedyAwareTemperature(Original())(scores, temperature)
    assert torch.equal(out[0], torch.tensor([float("-inf"), 3.0, float("-inf")]))
    assert torch.equal(out[1], scores[1] / 2)
