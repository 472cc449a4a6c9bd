"""Chunked log-probs equal the full-logits path (values and gradients) and use less memory;
train mode after prepare_for_training is deterministic and checkpointing changes no gradient."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aapo_ray.algo import aapo_loss, chunked_token_logprobs, token_logprobs

ROOT = Path(__file__).resolve().parents[1]


def _inputs(dtype=torch.float64, B=3, T=37, H=16, V=101, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, b, tokens


def _grads(fn, hidden, weight, bias, tokens):
    mask = (torch.arange(tokens.shape[1]) % 5 != 0).float().expand_as(tokens)
    adv = torch.linspace(-1, 1, tokens.shape[0])
    lp = fn()
    aapo_loss(lp, mask, adv).backward()
    out = [lp.detach().clone()] + [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("chunk", [1, 7, 37, 64, 111, 500])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_unchunked_values_and_grads(chunk, bias):
    hidden, weight, b, tokens = _inputs(bias=bias)
    full = _grads(lambda: token_logprobs(torch.nn.functional.linear(hidden, weight, b), tokens, 0.7),
                  hidden, weight, b, tokens)
    chunked = _grads(lambda: chunked_token_logprobs(hidden, weight, tokens, 0.7, chunk, lm_head_bias=b),
                     hidden, weight, b, tokens)
    assert chunked[0].dtype == torch.float32 and chunked[0].shape == tokens.shape
    for a, c in zip(full, chunked):
        torch.testing.assert_close(c, a, atol=1e-6, rtol=0)


def test_chunked_float32_and_no_grad():
    hidden, weight, _, tokens = _inputs(dtype=torch.float32)
    with torch.no_grad():
        full = token_logprobs(hidden @ weight.T, tokens, 1.3)
        chunked = chunked_token_logprobs(hidden, weight, tokens, 1.3, 10)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert not chunked.requires_grad
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_logprobs(hidden, weight, tokens, 1.0, 0)


_MEM_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from aapo_ray.algo import chunked_token_logprobs, token_logprobs
    torch.manual_seed(0); torch.set_num_threads(1)
    B, T, H, V = 2, 512, 256, 32000          # full float32 logits: 2*512*32000*4 B = 131 MB
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.02).requires_grad_()
    tokens = torch.randint(0, V, (B, T))
    def hwm():  # the process's peak RSS in KiB (VmHWM), reset just before the measured calls
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # an earlier peak (imports, set-up) must not hide this one
    base = hwm()
    if sys.argv[1] == "full":
        lp = token_logprobs(hidden @ weight.T, tokens, 0.7)
    elif sys.argv[1] == "chunked":
        lp = chunked_token_logprobs(hidden, weight, tokens, 0.7, 128)
    else:  # baseline: the same calls on 2 tokens (first backward, weight gradient, library pages)
        lp = chunked_token_logprobs(hidden[:, :1], weight, tokens[:, :1], 0.7, 128)
    lp.sum().backward()
    peak = hwm()
    print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024}))
""")


def _peak(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              # big blocks via mmap, returned on free: RSS follows live tensors
                              "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunked_peak_memory_is_lower():
    """Fresh processes; the peak RSS (VmHWM, reset before the calls) of each path, net of a 1-token run."""
    base = _peak("base")["delta_mb"]
    full, chunked = _peak("full")["delta_mb"] - base, _peak("chunked")["delta_mb"] - base
    print(f"peak RSS above baseline: full {full:.0f} MB, chunked {chunked:.0f} MB")
    assert full > 250  # at least two float32 [B, T, V] copies of 131 MB each
    assert chunked < full / 3


# ----------------------------------------------------------------- HF model: train mode, checkpointing
transformers = pytest.importorskip("transformers")


def _tiny_llama(attention_dropout=0.3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=attention_dropout, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    return ids, attn


def test_train_mode_without_prepare_is_random_so_the_check_can_fail():
    model, (ids, attn) = _tiny_llama(), _batch()
    model.train()
    a, b = model(input_ids=ids, attention_mask=attn).logits, model(input_ids=ids, attention_mask=attn).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("ckpt", [False, True])
def test_prepared_train_mode_equals_eval_mode(ckpt):
    from aapo_ray.logprobs import checkpointing_enabled, policy_logprobs, prepare_for_training

    model, (ids, attn) = _tiny_llama(), _batch()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).logits
    info = prepare_for_training(model, gradient_checkpointing=ckpt)
    assert model.training and model.config.use_cache is False and info["dropout_zeroed"]
    assert checkpointing_enabled(model) == ckpt
    logits = model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=0)
    lp = policy_logprobs(model, ids, attn, temperature=0.7, chunk_tokens=9)
    torch.testing.assert_close(lp, token_logprobs(ref[:, :-1], ids[:, 1:], 0.7), atol=1e-6, rtol=0)


def _count_layer_calls(model):
    """Counts a decoder MLP's forward runs (a patched forward: hooks do not fire in the recompute)."""
    calls, mlp = [], model.model.layers[1].mlp
    orig = mlp.forward
    mlp.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    return calls


def test_checkpointing_recomputes_and_leaves_gradients_equal():
    from aapo_ray.logprobs import policy_logprobs, prepare_for_training

    ids, attn = _batch()
    mask = attn[:, 1:].float()
    adv = torch.tensor([1.0, -0.5, 0.25])
    grads, calls = {}, {}
    for ckpt in (False, True):
        model = _tiny_llama()
        prepare_for_training(model, gradient_checkpointing=ckpt)
        counter = _count_layer_calls(model)
        loss = aapo_loss(policy_logprobs(model, ids, attn, 1.0, chunk_tokens=16), mask, adv)
        loss.backward()
        calls[ckpt] = len(counter)
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls == {False: 1, True: 2}  # the layer ran again in backward: checkpointing is active
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-6, rtol=0, msg=name)
