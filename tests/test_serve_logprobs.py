"""``logprobs`` / ``echo`` (completions) and ``logprobs`` / ``top_logprobs`` (chat) of ``aapo serve``: a real
Serve app on the session's local Ray cluster, checked against the model's own forward pass
(``log_softmax(model(ids).logits)``, within 1e-5) and end to end with lm-eval's ``local-completions``
on a loglikelihood task built from the synthetic set (tests/fixtures/lm_eval_synthetic)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

NAME = "tiny-logprobs"
APP = "aapo-serve-logprobs-test"
MAX_LOGPROBS = 10
TOL = 1e-5
FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_synthetic"


@pytest.fixture(scope="module")
def server(serve_app, tiny_model_path):
    with serve_app(tiny_model_path, APP, name=NAME, max_batch_size=16, max_n=4, num_cpus=1,
                   max_logprobs=MAX_LOGPROBS) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    from aapo_ray.backends import HFBackend

    return HFBackend.load(tiny_model_path, device="cpu")


@pytest.fixture(scope="module")
def questions():
    from aapo_ray.synthetic import SyntheticTask

    return SyntheticTask().prompts("test", 3)  # each ends with "\n": the model's prompt template


def _forward(reference, ids):
    """log_softmax of the model's own logits over ``ids``: [len(ids), vocab]."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(reference.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _greedy_ids(reference, ids, max_tokens):
    from aapo_ray.sampling import SamplingParams

    out = reference.generate([ids], SamplingParams(temperature=0, max_new_tokens=max_tokens))
    return [int(t) for t in out.token_ids[0]], out.texts[0]


def _string(tok, ids, i, token=None):
    """Token ``i``'s string as the server decodes it (a few tokens of left context)."""
    left = ids[max(0, i - 4):i]
    cur = tok.decode(left + [ids[i] if token is None else token], skip_special_tokens=False)
    return cur[len(tok.decode(left, skip_special_tokens=False)):] if left else cur


def _check_completion_logprobs(tok, logp, ids, first, lp, k):
    """``lp`` (legacy logprobs of tokens ``first..``) against the forward pass ``logp`` over ``ids``."""
    import torch

    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) - first
    for j, i in enumerate(range(first, len(ids))):
        assert lp.tokens[j] == _string(tok, ids, i)
        if i == 0:
            assert lp.token_logprobs[j] is None and lp.top_logprobs[j] is None
            continue
        assert abs(lp.token_logprobs[j] - logp[i - 1, ids[i]].item()) < TOL
        top = torch.topk(logp[i - 1], k)
        want = [(_string(tok, ids, i, int(t)), v.item()) for t, v in zip(top.indices, top.values)]
        got = list(lp.top_logprobs[j].items())
        assert [s for s, _ in got[:k]] == [s for s, _ in want], "the top-k in the model's order"
        assert all(abs(a - b) < TOL for (_, a), (_, b) in zip(got, want))
        if lp.tokens[j] not in dict(want):  # the chosen token is always there, after the top k
            assert len(got) == k + 1 and abs(got[-1][1] - lp.token_logprobs[j]) < TOL
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]


# ----------------------------------------------------------------------------- against the forward pass
@pytest.mark.parametrize("max_tokens", [8192, 40])  # one padded batch; one row per forward pass
def test_backend_score_equals_forward_pass(reference, questions, max_tokens):
    """HFBackend.score: right-padded batches, logits only from the earliest scored position, any start."""
    import inspect

    import torch

    assert "logits_to_keep" in inspect.signature(reference.model.forward).parameters  # the path used here
    tok = reference.tokenizer
    seqs = [tok(q)["input_ids"] for q in questions] + [tok("1+1=2")["input_ids"]]
    starts = [1, len(seqs[1]) - 3, len(seqs[2]), 2]  # echo, a suffix, nothing to score, a short one
    scores = reference.score(seqs, starts, 3, max_tokens=max_tokens)
    for ids, start, sc in zip(seqs, starts, scores):
        logp = _forward(reference, ids)[start - 1:len(ids) - 1]
        want = logp.gather(1, torch.tensor(ids[start:])[:, None])[:, 0]
        assert sc.start == start and sc.logprobs.shape == (len(ids) - start,) and sc.top_ids.shape == (len(ids) - start, 3)
        assert torch.allclose(torch.as_tensor(sc.logprobs), want, atol=TOL, rtol=0)
        top = torch.topk(logp, 3, dim=-1)
        assert (torch.as_tensor(sc.top_ids) == top.indices).all()
        assert torch.allclose(torch.as_tensor(sc.top_logprobs), top.values, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="start"):
        reference.score([seqs[0]], [0], 1)


def test_completion_logprobs_and_echo_equal_forward_pass(client, reference, questions):
    tok = reference.tokenizer
    for q in questions:
        prompt = tok(q)["input_ids"]
        completion, text = _greedy_ids(reference, prompt, 12)
        ids = prompt + completion
        logp = _forward(reference, ids)
        got = client.completions.create(model=NAME, prompt=q, max_tokens=12, temperature=0, logprobs=5)
        assert got.choices[0].text == text
        _check_completion_logprobs(tok, logp, ids, len(prompt), got.choices[0].logprobs, 5)
        # greedy: every chosen token is the model's most likely one
        assert all(lp == max(top.values()) for lp, top in zip(got.choices[0].logprobs.token_logprobs,
                                                                got.choices[0].logprobs.top_logprobs))
        echo = client.completions.create(model=NAME, prompt=q, max_tokens=12, temperature=0, logprobs=3, echo=True)
        assert echo.choices[0].text == q + text
        _check_completion_logprobs(tok, logp, ids, 0, echo.choices[0].logprobs, 3)
        assert echo.usage.completion_tokens == len(completion)


def test_logprobs_are_the_models_not_the_sampling_temperatures(client, reference, questions):
    """A sampled completion (temperature 1.7, top_p 0.9) reports log_softmax(logits) at temperature 1."""
    from aapo_ray.sampling import SamplingParams

    tok = reference.tokenizer
    got = client.completions.create(model=NAME, prompt=questions[0], max_tokens=10, temperature=1.7, top_p=0.9,
                                    seed=3, logprobs=0, echo=True)
    prompt = tok(questions[0])["input_ids"]
    lp = got.choices[0].logprobs
    # what Serve sampled: a seeded request's choice 0 is sampled with row seed 3 (row_seeds(3, 1))
    sampled = reference.generate([prompt], SamplingParams(temperature=1.7, top_p=0.9, max_new_tokens=10), seeds=[3])
    ids = prompt + [int(t) for t in sampled.token_ids[0]]
    assert got.choices[0].text == tok.decode(ids, skip_special_tokens=True)
    assert "".join(lp.tokens) == tok.decode(ids) and len(lp.tokens) == len(ids)
    logp = _forward(reference, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - logp[i - 1, ids[i]].item()) < TOL
        assert list(lp.top_logprobs[i]) == [lp.tokens[i]]  # logprobs: 0 -> the chosen token alone


def test_echo_max_tokens_0_scores_token_id_prompts(client, reference, questions):
    """lm-eval's loglikelihood request: token-id prompts, echo, no generation."""
    tok = reference.tokenizer
    prompts = [tok(q + "7+8=15")["input_ids"] for q in questions]
    got = client.completions.create(model=NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2] and got.usage.completion_tokens == 0
    for ids, c in zip(prompts, got.choices):
        assert c.text == tok.decode(ids, skip_special_tokens=True) and c.finish_reason == "length"
        _check_completion_logprobs(tok, _forward(reference, ids), ids, 0, c.logprobs, 2)
    # lm-eval's exact payload (max_tokens 1): one generated token after the prompt
    raw = requests.post(f"{client.base_url}completions", timeout=60, json={
        "model": NAME, "prompt": [prompts[0]], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
        "echo": True}).json()
    lp = raw["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompts[0]) + 1
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(prompts[0])] == pytest.approx(got.choices[0].logprobs.token_logprobs[1:],
                                                                     abs=TOL)


def test_echo_without_logprobs_whole_and_streamed(client, reference, questions):
    q = questions[1]
    _, text = _greedy_ids(reference, reference.tokenizer(q)["input_ids"], 10)
    whole = client.completions.create(model=NAME, prompt=q, max_tokens=10, temperature=0, echo=True, n=2)
    assert [c.text for c in whole.choices] == [q + text] * 2 and whole.choices[0].logprobs is None
    chunks = list(client.completions.create(model=NAME, prompt=q, max_tokens=10, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == q
    assert "".join(c.choices[0].text for c in chunks) == q + text


def test_chat_logprobs_equal_forward_pass(client, reference, questions):
    import torch

    tok = reference.tokenizer
    content = questions[2].rstrip("\n")
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    completion, want_text = _greedy_ids(reference, prompt, 12)
    ids = prompt + completion
    logp = _forward(reference, ids)
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=12,
                                         temperature=0, logprobs=True, top_logprobs=4)
    assert got.choices[0].message.content == want_text
    items = got.choices[0].logprobs.content
    assert len(items) == len(completion) == got.usage.completion_tokens
    for j, i in enumerate(range(len(prompt), len(ids))):
        assert items[j].token == _string(tok, ids, i) and items[j].bytes == list(items[j].token.encode())
        assert abs(items[j].logprob - logp[i - 1, ids[i]].item()) < TOL
        top = torch.topk(logp[i - 1], 4)
        assert [t.token for t in items[j].top_logprobs] == [_string(tok, ids, i, int(t)) for t in top.indices]
        assert all(abs(t.logprob - v.item()) < TOL for t, v in zip(items[j].top_logprobs, top.values))
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                           max_tokens=4, temperature=0, logprobs=True)
    assert all(item.top_logprobs == [] for item in plain.choices[0].logprobs.content)
    off = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=4)
    assert off.choices[0].logprobs is None


# ----------------------------------------------------------------------------- bad requests
CHAT = [{"role": "user", "content": "1+1"}]
BAD = [
    ("/v1/completions", {"prompt": "1+1", "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ("/v1/completions", {"prompt": "1+1", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "1+1", "logprobs": "2"}, "logprobs"),
    ("/v1/completions", {"prompt": "1+1", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "1+1", "logprobs": 2, "stream": True}, "logprobs"),
    ("/v1/completions", {"prompt": "1+1", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "1+1", "echo": False, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "1+1", "echo": True, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "1+1", "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "stream": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0, "logprobs": True}, "max_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_logprob_requests_are_400s(server, path, body, param):
    r = requests.post(server + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


# ----------------------------------------------------------------------------- lm-eval end to end
def _direct_loglikelihoods(reference, docs):
    """Per doc, each choice's log-likelihood from the model's forward pass, tokenized as lm-eval does
    (context + continuation encoded together without special tokens, split at the context's length)."""
    tok, out = reference.tokenizer, []
    for doc in docs:
        ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            logp = _forward(reference, whole)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        out.append(lls)
    return out


def test_lm_eval_local_completions_matches_forward_pass(server, reference, tiny_model_path, tmp_path):
    pytest.importorskip("lm_eval")
    docs = [json.loads(line) for line in (FIXTURE / "synthetic_mc.jsonl").read_text().splitlines()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
           "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"base_url={server}/v1/completions,model={NAME},tokenizer_backend=huggingface,"
            f"tokenizer={tiny_model_path},num_concurrent=4,max_retries=1",
            "--tasks", "aapo_synthetic_mc", "--include_path", str(FIXTURE), "--output_path", str(tmp_path / "out"),
            "--log_samples", "--batch_size", "1"]
    run = subprocess.run(args, cwd=FIXTURE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results] = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    acc = json.loads(Path(results).read_text())["results"]["aapo_synthetic_mc"]["acc,none"]
    direct = _direct_loglikelihoods(reference, docs)
    want = sum(max(range(len(lls)), key=lls.__getitem__) == d["label"] for lls, d in zip(direct, docs)) / len(docs)
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(want, abs=1e-9), (acc, want)
    [samples] = glob.glob(str(tmp_path / "out" / "**" / "samples_aapo_synthetic_mc_*.jsonl"), recursive=True)
    for line in Path(samples).read_text().splitlines():
        s = json.loads(line)
        got = [float(r[0][0]) for r in s["resps"]]  # lm-eval logs them as strings
        assert got == pytest.approx(direct[s["doc_id"]], abs=1e-4), s["doc_id"]
    print(f"lm-eval aapo_synthetic_mc acc={acc:.4f} (forward pass: {want:.4f}) over {len(docs)} items")
