"""``aapo serve``'s parts that need no Ray cluster: the replica's timeouts, overload answer and grouped
batching on a fake backend, its streamed text's stop strings, the CLI, and resolving a run's checkpoint.
(The app itself, on a real local Ray cluster over real HTTP: tests/test_serve.py.)"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

NAME = "tiny-served"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    """The tiny model's tokenizer (the fake backends below generate nothing real)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


# ----------------------------------------------------------------------------- timeouts and overload (no Ray)
@pytest.fixture
def bare_server(tokenizer, quiet_batch_queue):
    """An OpenAIServer without a replica around it: a real serve.batch queue, a slow fake backend."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from aapo_ray.sampling import Completions
    from aapo_ray.serve_options import ServeOptions
    from aapo_ray.serve_replica import OpenAIServer

    class SlowBackend:
        calls = 0

        def generate(self, prompts, params, seeds=None):
            SlowBackend.calls += 1
            time.sleep(0.5)
            return Completions([[1]] * len(prompts), ["x"] * len(prompts), ["length"] * len(prompts))

    def make(wait: float, **options):
        srv = object.__new__(OpenAIServer)
        srv.backend, srv.tokenizer, srv.eos_ids = SlowBackend(), tokenizer, {2}
        srv.pool, srv.streamer, srv.can_stream, srv.pumps = ThreadPoolExecutor(1), None, False, set()
        srv.continuous = None  # the grouped (@serve.batch) path
        srv.o, srv.key_hash, srv.name = ServeOptions(**options), None, NAME
        srv.vocab, srv.context, srv.max_tokens = len(tokenizer), 128, 128
        srv.batched = serve.batch(max_batch_size=8, batch_wait_timeout_s=wait)(srv._run_batch)
        return srv

    return make, SlowBackend


def test_timed_out_jobs_are_dropped_before_their_batch_and_drained_after(bare_server):
    import asyncio

    from aapo_ray.sampling import SamplingParams
    from aapo_ray.openai_api import APIError
    from aapo_ray.serve_replica import Job

    make, backend = bare_server

    async def collect(srv, within):
        return [e async for e in srv._events(Job([[5]], 1, SamplingParams(), False), time.monotonic() + within)]

    async def scenario():
        srv = make(0.4)  # the batch waits 0.4 s to fill; the request may wait 0.1 s
        with pytest.raises(APIError) as e:
            await collect(srv, 0.1)
        assert (e.value.status, e.value.code) == (504, "request_timeout")
        await asyncio.sleep(0.8)
        assert backend.calls == 0 and not srv.pumps  # dropped from the queue: never generated

        srv = make(0.0)  # the batch starts at once, generation takes 0.5 s, the request may wait 0.1 s
        with pytest.raises(APIError):
            await collect(srv, 0.1)
        assert len(srv.pumps) == 1  # started: still draining
        await asyncio.sleep(0.8)
        assert backend.calls == 1 and not srv.pumps
        assert await collect(srv, 5) == [("done", 0, "x", "length", 1)]  # the queue works on

    asyncio.run(scenario())


def test_overload_is_a_503_with_retry_after(bare_server):
    import asyncio

    from aapo_ray.openai_api import APIError

    make, _ = bare_server

    class FakeRequest:
        headers = {"content-length": "40"}

        async def stream(self):
            yield json.dumps({"prompt": "1+1", "max_tokens": 2}).encode()

    async def scenario():
        srv = make(0.0, max_pending_requests=2)
        srv.pumps.update({object(), object()})  # two abandoned requests still generating
        with pytest.raises(APIError) as e:
            await srv._complete(FakeRequest(), chat=False)
        assert (e.value.status, e.value.code, e.value.headers) == (503, "server_overloaded", {"Retry-After": "1"})
        srv.pumps.clear()
        response = await srv._complete(FakeRequest(), chat=False)
        assert json.loads(response.body)["choices"][0]["text"] == "x"

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- CLI and model resolution
def test_cli_help_lists_flags():
    out = subprocess.run([sys.executable, "-m", "aapo_ray", "serve", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--checkpoint", "--host", "--port", "--api-key", "--num-replicas", "--autoscaling-config",
                 "--backend", "--name"):
        assert flag in out.stdout


def test_cli_defaults_and_bad_path(tmp_path, capsys):
    from aapo_ray.cli import build_parser, main

    args = build_parser().parse_args(["serve", "some/run"])
    assert (args.host, args.port, args.backend, args.checkpoint) == ("127.0.0.1", 8000, "hf", None)
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path):
    """A fake run: step 1 and 2 complete, step 3 torn (no state.json)."""
    run = tmp_path_factory.mktemp("runs") / "my-run"
    for step, complete in ((1, True), (2, True), (3, False)):
        ck = run / "checkpoints" / f"step_{step:06d}"
        shutil.copytree(tiny_model_path, ck / "hf")
        if complete:
            (ck / "state.json").write_text(json.dumps({"step": step}))
    return run


def test_resolve_model_dir(run_dir, tiny_model_path, tmp_path):
    from aapo_ray.checkpoint import resolve_model_dir

    ck = run_dir / "checkpoints"
    assert resolve_model_dir(run_dir) == (ck / "step_000002" / "hf", "my-run")  # torn step 3 skipped
    for name in ("step_1", "step_000001", "1"):
        assert resolve_model_dir(run_dir, name) == (ck / "step_000001" / "hf", "my-run")
    assert resolve_model_dir(ck / "step_000001") == (ck / "step_000001" / "hf", "my-run")
    plain = Path(tiny_model_path).resolve()
    assert resolve_model_dir(tiny_model_path) == (plain, plain.name)
    with pytest.raises(ValueError, match="step_000001"):
        resolve_model_dir(run_dir, "step_3")  # torn
    with pytest.raises(ValueError):
        resolve_model_dir(run_dir, "latest-ish")
    with pytest.raises(ValueError):
        resolve_model_dir(tiny_model_path, "step_1")  # not a run directory
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "nope")


def test_app_builder_takes_string_args(run_dir):
    from ray.serve import Application

    from aapo_ray.serve import app_builder

    app = app_builder({"model": str(run_dir), "checkpoint": "step_1", "num_replicas": "2", "max_batch_size": "8",
                       "autoscaling_config": '{"min_replicas": 1, "max_replicas": 3}', "name": "x"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError):
        app_builder({"model": str(run_dir), "no_such_option": 1})


# ----------------------------------------------------------------------------- batching internals (no Ray)
def test_batch_groups_by_params_and_isolates_failures(tokenizer):
    """One @serve.batch batch with mixed sampling params: one generate call per distinct params; a failing
    group answers its own requests with an error event; a backend without a streamer hook (sglang) still
    streams (its text in one chunk at the end)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from aapo_ray.sampling import Completions, SamplingParams
    from aapo_ray.serve_replica import Job, OpenAIServer

    calls = []

    class Backend:
        def generate(self, prompts, params, seeds=None):
            assert seeds is not None and len(seeds) == len(prompts)  # every choice sampled with its own seed
            calls.append((len(prompts), params.temperature))
            if params.temperature == 0.5:
                raise RuntimeError("boom")
            return Completions([[1, 2]] * len(prompts), [f"t{params.temperature}"] * len(prompts),
                               ["length"] * len(prompts))

    srv = object.__new__(OpenAIServer)
    srv.backend, srv.tokenizer, srv.eos_ids = Backend(), tokenizer, {2}
    srv.pool, srv.streamer, srv.can_stream = ThreadPoolExecutor(1), None, False
    jobs = [Job([[5, 6]], 2, SamplingParams(temperature=0.0), False),
            Job([[5], [6]], 1, SamplingParams(temperature=0.5), False),
            Job([[7]], 1, SamplingParams(temperature=0.0), True)]

    async def drain():
        events = [[] for _ in jobs]
        done = [False] * len(jobs)
        async for step in srv._run_batch(jobs):
            for i, item in enumerate(step):
                if item is StopIteration:
                    done[i] = True
                else:
                    assert not done[i]
                    events[i] += item
        return events

    events = asyncio.run(drain())
    assert calls == [(3, 0.0), (2, 0.5)]
    assert [e for e in events[0] if e[0] == "done"] == [("done", c, "t0.0", "length", 2) for c in (0, 1)]
    assert events[1][0][0] == "error" and "boom" in events[1][0][1]
    assert events[2] == [("delta", 0, "t0.0"), ("done", 0, "t0.0", "length", 2)]


def test_stream_text_holds_back_stop_prefixes(tokenizer):
    from aapo_ray.openai_api import StreamText

    tok = tokenizer
    ids = tok("1+2=3, 4+5=9", add_special_tokens=False)["input_ids"]
    st = StreamText(tok, {tok.eos_token_id}, ("=3,",))
    sent = "".join(st.push(t) for t in ids)
    assert sent == "1+2" and st.done
    st = StreamText(tok, {tok.eos_token_id}, ())
    assert "".join(st.push(t) for t in ids + [tok.eos_token_id] + ids) == "1+2=3, 4+5=9"
