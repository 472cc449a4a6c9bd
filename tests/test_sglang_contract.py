"""The sglang contract: the pinned wheel's real interface (read with ast) and the fake Engine built on it.

No skip: without the wheel (no network, no pin) these tests fail with the reason."""

import asyncio
import functools
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sglang_contract as sc

FAKE = Path(__file__).parent / "fake_sglang"


@pytest.fixture(scope="module")
def iface():
    return sc.load_interface()


@pytest.fixture(scope="module")
def sgl(iface):
    """The fake ``sglang`` package, configured with the pinned wheel's interface."""
    os.environ["AAPO_FAKE_SGLANG_INTERFACE"] = str(sc.interface_json())
    sys.path.insert(0, str(FAKE))
    sys.modules.pop("sglang", None)
    module = importlib.import_module("sglang")
    assert module.__file__.startswith(str(FAKE))
    yield module
    sys.path.remove(str(FAKE))
    sys.modules.pop("sglang", None)


@pytest.fixture(scope="module")
def engine(sgl, tiny_model_path):
    return sgl.Engine(model_path=str(tiny_model_path), random_seed=0, skip_tokenizer_init=True,
                      mem_fraction_static=0.5, dtype="bfloat16", trust_remote_code=False)


def _names(iface, method):
    return [p["name"] for p in iface["engine"][method]["params"]]


# ---------------------------------------------------------------------------- the real wheel


def test_pin_must_be_exact(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname="x"\n[project.optional-dependencies]\ngpu = ["sglang>=0.5"]\n')
    with pytest.raises(RuntimeError, match="must pin sglang exactly"):
        sc.pinned_version(tmp_path / "pyproject.toml")
    assert sc.PINNED == "0.5.23"


def test_missing_wheel_fails_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("AAPO_RAY_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip download --no-deps .*sglang==0\.0\.0\.999"):
        sc.wheel_path("0.0.0.999")


def test_wheel_interface_has_what_the_backend_calls(iface):
    assert iface["version"] == sc.PINNED
    fields = {f["name"]: f for f in iface["server_args"]}
    for name in ("model_path", "dtype", "mem_fraction_static", "random_seed", "skip_tokenizer_init",
                 "trust_remote_code", "enable_memory_saver", "enable_deterministic_inference",
                 "tp_size", "log_level"):
        assert name in fields, name
    assert [f["name"] for f in iface["server_args"] if f.get("required")] == ["model_path"]
    assert fields["random_seed"]["default"] is None
    assert fields["enable_deterministic_inference"]["default"] is False
    assert fields["enable_memory_saver"]["default"] is False
    assert {"input_ids", "sampling_params", "return_logprob", "stream"} <= set(_names(iface, "generate"))
    assert _names(iface, "generate") == _names(iface, "async_generate")
    assert iface["engine"]["async_generate"]["async"] and not iface["engine"]["generate"]["async"]
    assert _names(iface, "update_weights_from_tensor") == ["named_tensors", "load_format", "flush_cache"]
    assert _names(iface, "begin_weight_update") == ["selector"]
    assert _names(iface, "end_weight_update") == []
    assert _names(iface, "init_weights_update_group") == [
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"]
    assert _names(iface, "update_weights_from_distributed")[:4] == ["names", "dtypes", "shapes", "group_name"]
    assert _names(iface, "release_memory_occupation") == ["tags"]
    for key in ("temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids",
                "sampling_seed", "ignore_eos", "no_stop_trim", "n"):
        assert key in iface["sampling_params"], key
    assert "seed" not in iface["sampling_params"]
    types = {v["type"] for v in iface["finish_reasons"].values()}
    assert types == {"stop", "length", "abort"}
    assert set(iface["weight_update_refusals"]) == {
        "update_weights_from_tensor", "update_weights_from_distributed", "begin_weight_update",
        "end_weight_update"}
    assert iface["event_loop"]["captured_in_init"]
    assert iface["event_loop"]["ensure_event_loop_calls"][0] == "asyncio.get_running_loop"
    # Serve's rows: each async_generate names its request, and tokenizer_manager.abort_request drops it
    assert "rid" in _names(iface, "async_generate")
    assert iface["tokenizer_manager"]["assigned_in_init"]
    assert [p["name"] for p in iface["tokenizer_manager"]["abort_request"]["params"]] == ["rid", "abort_all"]
    assert any(r.startswith("torch==") for r in iface["requires_dist"])


# ---------------------------------------------------------------------------- the fake: interface


def test_fake_binds_the_real_signatures(sgl, engine, tiny_model_path):
    with pytest.raises(TypeError, match="mem_fraction"):
        sgl.Engine(model_path=str(tiny_model_path), mem_fraction=0.5)  # the field is mem_fraction_static
    with pytest.raises(TypeError, match="model_path"):
        sgl.Engine(dtype="bfloat16")
    with pytest.raises(TypeError, match="input_idz"):
        engine.generate(input_idz=[[1, 2]])
    with pytest.raises(TypeError, match="tensors"):
        engine.update_weights_from_tensor(tensors=[])
    with pytest.raises(TypeError):
        engine.init_weights_update_group("127.0.0.1", 1234, 1, 2)  # group_name missing
    with pytest.raises(TypeError, match="seed"):
        engine.generate(input_ids=[[1, 2]], sampling_params={"seed": 3})


# ---------------------------------------------------------------------------- the fake: generation


def _prompt(engine):
    return [5, 6, 7, 8]


def test_outputs_finish_reasons_and_per_request_params(engine):
    p = _prompt(engine)
    one = engine.generate(input_ids=p, sampling_params={"max_new_tokens": 3, "ignore_eos": True})
    assert isinstance(one, dict) and len(one["output_ids"]) == 3
    assert one["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert one["meta_info"]["prompt_tokens"] == 4 and one["meta_info"]["completion_tokens"] == 3
    assert "text" not in one  # skip_tokenizer_init
    outs = engine.generate(input_ids=[p, p], return_logprob=True,
                           sampling_params=[{"max_new_tokens": 2, "ignore_eos": True},
                                            {"max_new_tokens": 4, "ignore_eos": True}])
    assert [len(o["output_ids"]) for o in outs] == [2, 4]
    lps = outs[1]["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == outs[1]["output_ids"] and all(lp <= 0 for lp, _, _ in lps)
    # Stopping on EOS / a stop token keeps the matched token in output_ids.
    first = engine.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 1})
    tok = first["output_ids"][0]
    saved = engine.eos_token_ids
    engine.eos_token_ids = {tok}
    try:
        eos = engine.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 5})
    finally:
        engine.eos_token_ids = saved
    assert eos["output_ids"] == [tok] and eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    st = engine.generate(input_ids=p, sampling_params={"temperature": 0, "stop_token_ids": [tok]})
    assert st["output_ids"] == [tok]
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        engine.generate(input_ids=p, sampling_params={"stop": ["\n"]})


def test_stop_strings_trim_text_not_ids(sgl, tiny_model_path):
    eng = sgl.Engine(model_path=str(tiny_model_path), random_seed=0)
    p = eng.tokenizer("What is 2+3?")["input_ids"]
    free = eng.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True})
    stop = eng.tokenizer.decode(free["output_ids"][:3])[-2:]
    assert stop.strip(), stop
    out = eng.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 6, "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop in eng.tokenizer.decode(out["output_ids"]) and stop not in out["text"]
    kept = eng.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 6,
                                                      "stop": stop, "no_stop_trim": True})
    assert kept["text"].endswith(stop)


def test_abort(sgl, engine):
    p = _prompt(engine)
    default_hook = sgl.abort_hook
    sgl.abort_hook = lambda i, ids: {"message": "preempted", "status_code": None} if i == 1 else None
    try:
        outs = engine.generate(input_ids=[p, p], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        assert outs[0]["meta_info"]["finish_reason"]["type"] == "length"
        fr = outs[1]["meta_info"]["finish_reason"]
        assert fr["type"] == "abort" and fr["message"] == "preempted"
        sgl.abort_hook = lambda i, ids: {"message": "bad request", "status_code": 400}
        with pytest.raises(ValueError, match="bad request"):
            engine.generate(input_ids=[p], sampling_params={"max_new_tokens": 2})
    finally:
        sgl.abort_hook = default_hook


def test_async_requests_interleave_and_abort_by_rid(engine):
    """Requests in flight together advance together; ``tokenizer_manager.abort_request(rid)`` ends one with
    finish_reason ``abort`` at its next step, the others run on."""
    p, order = _prompt(engine), []

    async def one(rid, tokens):
        out = await engine.async_generate(input_ids=p, rid=rid,
                                          sampling_params={"max_new_tokens": tokens, "ignore_eos": True})
        order.append(rid)
        return out

    async def scenario():
        long = asyncio.ensure_future(one("long", 40))
        short = asyncio.ensure_future(one("short", 3))
        dropped = asyncio.ensure_future(one("dropped", 40))
        await short
        engine.tokenizer_manager.abort_request("dropped")
        with pytest.raises(TypeError):
            engine.tokenizer_manager.abort_request(rid_="x")  # bound to the real signature
        return await long, await short, await dropped

    long, short, dropped = asyncio.run(scenario())
    assert order == ["short", "dropped", "long"]  # the short one did not wait for the long one to finish
    assert len(long["output_ids"]) == 40 and len(short["output_ids"]) == 3
    assert dropped["meta_info"]["finish_reason"]["type"] == "abort" and len(dropped["output_ids"]) < 40


def test_stream_chunks_hold_every_token_so_far(engine):
    p = _prompt(engine)
    params = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}

    async def scenario():
        chunks = [(list(c["output_ids"]), c["meta_info"]["finish_reason"], c["meta_info"]["id"])
                  async for c in await engine.async_generate(input_ids=p, sampling_params=params, rid="s", stream=True)]
        return chunks, await engine.async_generate(input_ids=p, sampling_params=params)

    chunks, whole = asyncio.run(scenario())
    assert [ids for ids, _, _ in chunks] == [whole["output_ids"][:k] for k in range(1, 6)]
    assert [reason for _, reason, _ in chunks[:-1]] == [None] * 4 and chunks[-1][1]["type"] == "length"
    assert {rid for _, _, rid in chunks} == {"s"}


def test_seeds(sgl, engine, tiny_model_path):
    p = _prompt(engine)
    hot = {"temperature": 3.0, "max_new_tokens": 12, "ignore_eos": True}
    # Not deterministic: sampling_seed changes nothing; the engine RNG decides.
    a, b = engine.generate(input_ids=[p, p], sampling_params={**hot, "sampling_seed": 7})
    assert a["output_ids"] != b["output_ids"]
    # Deterministic: equal seeds (or none: 42 for all) give identical samples.
    det = sgl.Engine(model_path=str(tiny_model_path), skip_tokenizer_init=True,
                     enable_deterministic_inference=True)
    outs = det.generate(input_ids=[p] * 3, sampling_params=[{**hot, "sampling_seed": s} for s in (1, 1, 2)])
    assert outs[0]["output_ids"] == outs[1]["output_ids"] != outs[2]["output_ids"]
    same = det.generate(input_ids=[p, p], sampling_params=hot)
    assert same[0]["output_ids"] == same[1]["output_ids"]
    # Two engines with one random_seed (policy and reference) sample the same sequence.
    e1, e2 = (sgl.Engine(model_path=str(tiny_model_path), skip_tokenizer_init=True, random_seed=5)
              for _ in range(2))
    r1, r2 = (e.generate(input_ids=p, sampling_params=hot)["output_ids"] for e in (e1, e2))
    assert r1 == r2


# ---------------------------------------------------------------------------- the fake: weights


def test_weight_update_needs_begin_end(engine, iface):
    name, param = next(iter(engine.model.named_parameters()))
    before = param.detach().clone()
    new = torch.full_like(before, 0.5)
    ok, msg = engine.update_weights_from_tensor(named_tensors=[(name, new)])
    assert (ok, msg) == (False, iface["weight_update_refusals"]["update_weights_from_tensor"]["message"])
    assert torch.equal(param, before)  # nothing loaded
    assert engine.end_weight_update()[0] is False
    assert engine.begin_weight_update() == (True, "Success")
    assert engine.begin_weight_update()[0] is False  # no nesting
    assert engine.update_weights_from_tensor(named_tensors=[(name, new)], flush_cache=False) == (True, "Success")
    assert torch.equal(param, new)
    assert engine.end_weight_update() == (True, "Success")
    engine.begin_weight_update()
    engine.update_weights_from_tensor([(name, before)])
    engine.end_weight_update()
    assert torch.equal(param, before)


_TRAINER = textwrap.dedent("""
    import datetime, sys, torch
    from torch.distributed import distributed_c10d as c10d
    port, world, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    timeout = datetime.timedelta(seconds=60)
    store, rank, world = next(c10d.rendezvous(f"tcp://127.0.0.1:{port}", 0, world, timeout=timeout))
    pg, _ = c10d._new_process_group_helper(world, 0, [], c10d.Backend("gloo"), c10d.PrefixStore(name, store),
                                           group_name=name, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world)}
    t = torch.full((int(sys.argv[4]),), 0.25, dtype=torch.float32)
    torch.distributed.broadcast(t, src=0, group=pg)
    print("sent", flush=True)
    sys.stdin.readline()  # exit only once the engine has received: gloo aborts a process torn down mid-pair
""")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_update_over_gloo(engine):
    name, param = [(n, p) for n, p in engine.model.named_parameters() if p.dim() == 1][0]
    before = param.detach().clone()
    port = _free_port()
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, str(port), "2", "wug", str(param.numel())],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ok, msg = engine.init_weights_update_group(master_address="127.0.0.1", master_port=port,
                                                   rank_offset=1, world_size=2, group_name="wug",
                                                   backend="nccl")
        assert ok, msg
        refused = engine.update_weights_from_distributed(names=[name], dtypes=["float32"],
                                                         shapes=[list(param.shape)], group_name="wug")
        assert refused[0] is False and "begin_weight_update" in refused[1]
        engine.begin_weight_update()
        ok, msg = engine.update_weights_from_distributed(names=[name], dtypes=["float32"],
                                                         shapes=[list(param.shape)], group_name="wug")
        engine.end_weight_update()
        assert (ok, msg) == (True, "Succeeded to update parameter online.")
        assert torch.all(param == 0.25)
        out, err = trainer.communicate(input="done\n", timeout=60)
        assert trainer.returncode == 0 and "sent" in out, err
    finally:
        trainer.kill()
        engine.destroy_weights_update_group(group_name="wug")
        with torch.no_grad():
            param.copy_(before)


# ---------------------------------------------------------------------------- the fake: event loop


def test_event_loop_captured_at_construction(sgl, tiny_model_path):
    async def serve_replica():
        eng = sgl.Engine(model_path=str(tiny_model_path), skip_tokenizer_init=True)  # inside the loop
        assert eng.loop is asyncio.get_running_loop()
        call = functools.partial(eng.generate, input_ids=[5, 6], sampling_params={"max_new_tokens": 1})
        with pytest.raises(RuntimeError, match="already running"):
            await asyncio.get_running_loop().run_in_executor(None, call)
        out = await eng.async_generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 1})
        return out

    assert len(asyncio.run(serve_replica())["output_ids"]) == 1


def test_memory_occupation_and_flush(engine, sgl, tiny_model_path):
    assert engine.flush_cache().success
    with pytest.raises(KeyError):
        engine.resume_memory_occupation()  # never released
    assert engine.release_memory_occupation() is None
    assert engine.resume_memory_occupation() is None
    saver = sgl.Engine(model_path=str(tiny_model_path), skip_tokenizer_init=True, enable_memory_saver=True)
    w = next(saver.model.parameters())
    before = w.detach().clone()
    saver.release_memory_occupation(tags=["weights"])
    assert not torch.equal(w, before)
    saver.resume_memory_occupation(tags=["weights"])
    assert torch.equal(w, before)
    saver.shutdown()


def test_fake_importable_by_pythonpath_alone(sgl):
    """Ray workers import the fake through PYTHONPATH + AAPO_FAKE_SGLANG_INTERFACE only."""
    env = {**os.environ, "PYTHONPATH": str(FAKE)}
    code = "import sglang; print(sglang.__file__, sorted(sglang.interface()['engine'])[0])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(str(FAKE)), out.stderr
