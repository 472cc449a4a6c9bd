"""``aapo serve``: the OpenAI-compatible Ray Serve app on a real local Ray cluster, over real HTTP,
called with the official ``openai`` client (and ``requests`` for raw bodies). Its parts that need no cluster
(timeouts and overload on a fake backend, grouped batching, the CLI, checkpoint resolution):
tests/test_serve_offline.py."""

import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import requests

KEY = "test-key-not-secret"
NAME = "tiny-served"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
BODY_TIMEOUT = 2.0
APP = "aapo-serve-test"


@pytest.fixture(scope="module")
def server(serve_app, tiny_model_path):
    with serve_app(tiny_model_path, APP, name=NAME, api_key=KEY, max_body_bytes=BODY_LIMIT, max_batch_size=16,
                   max_n=8, num_cpus=1, body_timeout_s=BODY_TIMEOUT) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """The same model's own in-process ``generate``."""
    from aapo_ray.backends import HFBackend

    return HFBackend.load(tiny_model_path, device="cpu")


@pytest.fixture(scope="module")
def questions():
    from aapo_ray.synthetic import SyntheticTask

    return [q.rstrip("\n") for q in SyntheticTask().prompts("test", 3)]


def _greedy(reference, ids, max_tokens, stop=()):
    from aapo_ray.sampling import SamplingParams

    return reference.generate([ids], SamplingParams(temperature=0, max_new_tokens=max_tokens, stop=stop))


def _chat_ids(tokenizer, content):
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- happy paths
def test_health_and_models(server, client):
    assert requests.get(f"{server}/health", timeout=30).json()["status"] == "ok"  # no key needed
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_completion_greedy_equals_generate(client, reference, questions):
    for q in questions:
        prompt = q + "\n"
        ids = reference.tokenizer(prompt)["input_ids"]
        want = _greedy(reference, ids, 40)
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
        assert got.choices[0].text == want.texts[0]
        assert got.choices[0].finish_reason == want.finish_reasons[0]
        assert got.usage.prompt_tokens == len(ids)
        assert got.usage.completion_tokens == len(want.token_ids[0])
        assert got.usage.total_tokens == len(ids) + len(want.token_ids[0])
        assert got.model == NAME


def test_chat_greedy_equals_generate(client, reference, questions):
    ids = _chat_ids(reference.tokenizer, questions[0])
    want = _greedy(reference, ids, 40)
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": questions[0]}],
                                         max_tokens=40, temperature=0)
    assert got.choices[0].message.content == want.texts[0]
    assert got.choices[0].message.role == "assistant"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.token_ids[0]))
    # max_completion_tokens (newer clients) is the same limit
    short = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": questions[0]}],
                                           max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_streaming_equals_whole_response(client, questions):
    prompt = questions[1] + "\n"
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 3, "the text arrives in several chunks"
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    msgs = [{"role": "user", "content": questions[1]}]
    whole = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, temperature=0,
                                                 n=2, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[0].message.content
        assert mine[-1].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_streamed_and_whole(client, reference, questions):
    prompt = questions[0] + "\n"
    want = _greedy(reference, reference.tokenizer(prompt)["input_ids"], 40, stop=("=",))
    assert "=" not in want.texts[0]
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop="=")
    assert got.choices[0].text == want.texts[0] and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=["="],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.texts[0]


def test_prompt_lists_n_and_seed(client, questions):
    kwargs = dict(model=NAME, prompt=[q + "\n" for q in questions[:2]], max_tokens=12, temperature=1.0,
                  top_p=0.9, n=2, seed=7)
    first = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # same seed, same batch
    ids = client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=4, temperature=0)  # token ids
    assert ids.usage.prompt_tokens == 3


# ----------------------------------------------------------------------------- errors
BAD = [
    ("/v1/completions", b'{"prompt": "1+1", ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "1+1", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "1+" * 200}, 400, "prompt"),
    ("/v1/completions", {"prompt": "1+1", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "1+1", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "1+1", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "1+1", "max_tokens": 126}, 400, "max_tokens"),  # prompt + 126 > 128
    ("/v1/completions", {"prompt": "1+1", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "1+1", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "1+1", "n": 9}, 400, "n"),
    ("/v1/completions", {"prompt": "1+1", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "1+1", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "1+1", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "1+1", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "1+1", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "1+1", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "1+1", "logprobs": 21}, 400, "logprobs"),  # max_logprobs: 20
    ("/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "1+" * 200}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_request_is_a_json_4xx(server, path, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(server + path, data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_unknown_routes_oversized_bodies_and_still_serving(server, client):
    r = requests.get(f"{server}/v1/nothing-here", headers=AUTH, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert requests.get(f"{server}/v1/completions", headers=AUTH, timeout=30).status_code == 405
    assert requests.get(f"{server}/v1/models/other", headers=AUTH, timeout=30).status_code == 404
    big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)}).encode()
    r = requests.post(f"{server}/v1/completions", data=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = (big[i:i + 8192] for i in range(0, len(big), 8192))  # no Content-Length
    assert requests.post(f"{server}/v1/completions", data=chunked, headers=AUTH, timeout=30).status_code == 413
    # after every bad request above, the same replica still answers
    assert client.completions.create(model=NAME, prompt="1+1", max_tokens=4, temperature=0).choices[0].text


def test_api_key(server):
    url, body = f"{server}/v1/completions", {"prompt": "1+1", "max_tokens": 2}
    assert requests.post(url, json=body, timeout=30).status_code == 401
    for bad in ("Bearer wrong", f"Basic {KEY}", "Bearer", KEY):
        r = requests.post(url, json=body, headers={"Authorization": bad}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert KEY not in r.text
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 401
    assert requests.post(url, json=body, headers=AUTH, timeout=30).status_code == 200


def _replica_errors() -> int:
    """Internal errors and cancellations logged so far by this test session's Ray workers (replicas included)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    return text.count("internal error") + text.count("TaskCancelledError")


def test_clients_hanging_up_mid_stream_log_no_errors(server, questions):
    """A client that hangs up mid-stream (a stop button, Ctrl-C) makes Serve's proxy cancel its read of that
    client; the replica must not log that as an internal error with a traceback (before the fix it did for
    about a third of such clients)."""
    before = _replica_errors()
    for i in range(20):
        body = json.dumps({"model": NAME, "prompt": questions[i % 3] + "\n", "max_tokens": 64, "temperature": 0,
                           "stream": True}).encode()
        s, data = _sock(server), b""
        s.sendall(_head("/v1/completions", len(body)) + body)
        while b"data: {" not in data:  # the first chunk, then hang up
            part = s.recv(65536)
            assert part, data
            data += part
        s.close()
        assert data.startswith(b"HTTP/1.1 200")
    time.sleep(1.0)  # the replica writes its stderr file itself: give a late traceback time to land
    assert _replica_errors() == before


def test_proxy_cancelled_read_is_a_lasting_disconnect():
    import asyncio

    import ray

    from aapo_ray.serve_replica import CancelledReadIsDisconnect

    reads, seen = [], []

    async def receive():
        reads.append(1)
        if len(reads) == 1:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        raise ray.exceptions.TaskCancelledError()

    async def app(scope, receive, send):
        seen.extend([await receive() for _ in range(3)])

    asyncio.run(CancelledReadIsDisconnect(app)({"type": "http"}, receive, None))
    assert [m["type"] for m in seen] == ["http.request", "http.disconnect", "http.disconnect"]
    assert len(reads) == 2  # the proxy is not asked again once it let go


def test_32_concurrent_streaming_clients(server, questions):
    import openai

    results, errors = {}, []

    def one(i):
        try:
            c = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
            if i % 2:
                stream = c.chat.completions.create(model=NAME, max_tokens=24, temperature=0, stream=True,
                                                   messages=[{"role": "user", "content": questions[i % 3]}])
                parts = [(ch.choices[0].delta.content or "", ch.choices[0].finish_reason) for ch in stream]
            else:
                stream = c.completions.create(model=NAME, prompt=questions[i % 3] + "\n", max_tokens=24,
                                              temperature=0.8, seed=i, stream=True)
                parts = [(ch.choices[0].text, ch.choices[0].finish_reason) for ch in stream]
            results[i] = parts
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert sorted(results) == list(range(32))
    for parts in results.values():
        assert "".join(text for text, _ in parts) and parts[-1][1] in ("stop", "length")


# ----------------------------------------------------------------------------- hostile clients (raw sockets)
def _port(server) -> int:
    return int(server.rsplit(":", 1)[1])


def _sock(server, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:  # before connect: caps the TCP window the server may fill
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", _port(server)))
    return s


def _head(path: str, length: int | None, extra: str = "") -> bytes:
    cl = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nConnection: close\r\n{cl}{extra}\r\n").encode()


def _response(s: socket.socket, within: float) -> tuple[int, bytes]:
    """(status, body) of an HTTP/1.1 response on a 'Connection: close' socket, read for at most ``within`` s."""
    data, end = b"", time.monotonic() + within
    while time.monotonic() < end:
        s.settimeout(max(0.05, end - time.monotonic()))
        try:
            part = s.recv(65536)
        except (socket.timeout, TimeoutError):
            break
        except OSError:
            break
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    if b"transfer-encoding: chunked" in head.lower():  # de-chunk
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, body


def _replicas(app: str) -> set:
    """The app's replica actors by name: a replica that died and was replaced has a new name."""
    import ray

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if app in a["name"] and "OpenAIServer" in a["name"]}
    assert names, "no replica of the app found: the restart check would check nothing"
    return names


def _ok(client, stream=False) -> float:
    """One small request with the official client; its latency in seconds."""
    t = time.monotonic()
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=NAME, prompt="1+1", max_tokens=4, temperature=0, stream=True))
    else:
        text = client.completions.create(model=NAME, prompt="1+1", max_tokens=4, temperature=0).choices[0].text
    assert text
    return time.monotonic() - t


def test_slow_body_clients_get_408_and_others_are_served(server, client):
    """Slowloris on the body: clients that send headers, then trickle (or never send) the body hold a
    replica slot for at most body_timeout_s, get an OpenAI-style 408, and block nobody meanwhile."""
    before = _replicas(APP)
    body = json.dumps({"prompt": "1+1", "max_tokens": 2}).encode()
    slow = [_sock(server) for _ in range(8)]
    for i, s in enumerate(slow):
        s.sendall(_head("/v1/completions", len(body) + 100 if i % 2 else None,
                        "" if i % 2 else "Transfer-Encoding: chunked\r\n"))
    stop = threading.Event()

    padded = body + b" " * 64  # JSON allows trailing blanks: every trickled byte is valid

    def trickle():  # one byte per socket every 0.2 s, bounded in count and time
        for k in range(40):
            if stop.wait(0.2):
                return
            for i, s in enumerate(slow):
                try:
                    s.sendall(padded[k:k + 1] if i % 2 else b"1\r\n" + padded[k:k + 1] + b"\r\n")
                except OSError:
                    pass

    mute = _sock(server)  # headers, a few body bytes, then silence
    mute.sendall(_head("/v1/completions", len(body)) + body[:5])
    t0 = time.monotonic()
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        latencies = [_ok(client, stream=bool(i % 2)) for i in range(4)]
        assert max(latencies) < BODY_TIMEOUT + 10, latencies  # served while the slow ones hang on
        for s in slow + [mute]:
            status, text = _response(s, BODY_TIMEOUT + 20)
            assert status == 408, (status, text[:300])
            err = json.loads(text)["error"]
            assert err["code"] == "body_timeout" and "not received within" in err["message"]
        assert time.monotonic() - t0 < BODY_TIMEOUT + 20
    finally:
        stop.set()
        thread.join(timeout=5)
        for s in slow + [mute]:
            s.close()
    _ok(client)
    assert _replicas(APP) == before, "the replica was restarted"


def test_slow_headers_garbage_and_lying_lengths(server, client):
    before = _replicas(APP)
    stalled = [_sock(server) for _ in range(16)]  # slowloris on the headers: never finish them
    for i, s in enumerate(stalled):
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-" + str(i).encode())
    try:
        assert _ok(client) < 30
        huge = _sock(server)  # claims 1 TB: refused from the header, before any body byte
        huge.sendall(_head("/v1/completions", 10**12))
        status, text = _response(huge, 20)
        assert status == 413 and json.loads(text)["error"]["code"] == "request_too_large"
        huge.close()
        # a TLS hello, a 4 MB header (Serve's proxy accepts it: 404), NUL bytes, a broken chunked body
        for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),
                     b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 4_000_000 + b"\r\n\r\n",
                     b"\x00" * 1000 + b"\r\n\r\n",
                     _head("/v1/completions", None, "Transfer-Encoding: chunked\r\n") + b"zz\r\nbad\r\n"):
            s = _sock(server)
            try:
                s.sendall(junk)
            except OSError:  # the server may close on us mid-send: also fine
                pass
            status, _ = _response(s, 20)
            assert status == 0 or 400 <= status < 500, status  # refused, closed or a 4xx: never a hang or 5xx
            s.close()
        assert _ok(client, stream=True) < 30
    finally:
        for s in stalled:
            s.close()
    assert _replicas(APP) == before


def test_stalled_stream_reader_and_abrupt_disconnects(server, client, questions):
    """A client that stops reading a big stream, and clients that vanish mid-request (RST), cost others
    nothing; the stalled stream still arrives whole once its client reads again."""
    before = _replicas(APP)
    big = {"prompt": [q + "\n" for q in questions] * 2 + [questions[0] + "\n"] * 2, "n": 8, "max_tokens": 100,
           "temperature": 1.0, "seed": 3, "stream": True}
    data = json.dumps(big).encode()
    stalled = _sock(server, rcvbuf=4096)
    stalled.sendall(_head("/v1/completions", len(data)) + data)  # 64 choices streamed, not read
    for i in range(12):  # requests whose clients vanish mid-flight (RST), streaming or not
        s = _sock(server)
        body = json.dumps({"prompt": questions[i % 3] + "\n", "max_tokens": 60, "stream": bool(i % 2)}).encode()
        s.sendall(_head("/v1/completions", len(body)) + body)
        if i % 3:
            time.sleep(0.05)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    try:
        latencies = [_ok(client, stream=bool(i % 2)) for i in range(6)]
        assert max(latencies) < 30, latencies
        status, text = _response(stalled, 120)  # now read it all
        assert status == 200
        events = [line[6:] for line in text.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        finished = {json.loads(e)["choices"][0]["index"] for e in events[:-1]
                    if json.loads(e)["choices"][0]["finish_reason"]}
        assert finished == set(range(64))
    finally:
        stalled.close()
    _ok(client)
    assert _replicas(APP) == before


@pytest.fixture(scope="module")
def timeout_server(server, tiny_model_path):
    """A second app (grouped batching) whose batches wait 1 s to fill but whose requests may take 0.3 s: every
    request times out. Continuous batching's deadline: test_serve_continuous.py."""
    from ray import serve

    from aapo_ray.serve import build_app

    app = build_app(tiny_model_path, name="slow", request_timeout_s=0.3, batching="grouped", batch_wait_timeout_s=1.0,
                    max_batch_size=64, num_cpus=0.5)
    serve.run(app, name="aapo-serve-timeout", route_prefix="/slow")
    yield f"{server}/slow"
    serve.delete("aapo-serve-timeout")


def test_request_timeout_is_an_openai_error(timeout_server):
    url = f"{timeout_server}/v1/completions"
    t0 = time.monotonic()
    r = requests.post(url, json={"prompt": "1+1", "max_tokens": 4}, timeout=30)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and err["type"] == "server_error" and "0.3s" in err["message"]
    assert time.monotonic() - t0 < 10
    r = requests.post(url, json={"prompt": "1+1", "max_tokens": 4, "stream": True}, timeout=30)
    assert r.status_code == 200  # the stream had started: the error comes in-band, then [DONE]
    events = [line[6:] for line in r.content.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert requests.get(f"{timeout_server}/health", timeout=30).json()["status"] == "ok"
