"""GPU check: the paper's learner forward/backward at the paper's shapes, beside the memory plan.

Builds R1-Distill-Qwen-1.5B and Qwen2.5-Math-7B from their config numbers
(:data:`aapo_ray.memory_plan.KNOWN_ARCHS`) with random bf16 weights on one GPU (nothing is
downloaded) and runs the AAPO loss forward + backward at the paper's micro-batch and lengths
(cluster/configs) with gradient checkpointing and chunked log-probs, then the alternatives
(checkpointing off, log-probs unchunked; an out-of-memory is caught and reported). Prints peak
memory (``torch.cuda.max_memory_allocated``) and step time beside the planner's estimate.

One GPU, no DeepSpeed: it holds the whole bf16 model and full bf16 gradients (no ZeRO
partitioning, no optimizer states unless ``--adamw``). So the comparison is of the parts the
planner models for the *micro-batch* -- activations + log-prob transients, measured as
``peak - allocated before the step`` -- and of params + grads; the planner's per-GPU total for
the real cluster config (ZeRO-2 over N ranks) is printed for reference only.

Needs only torch; uses transformers' Qwen2 if installed, else the torch-only stand-in in
``benchmarks/_mini_qwen2.py`` (same parameters and math). Without CUDA it prints why and exits 0. ``--cpu-smoke`` runs the same code on a tiny architecture on CPU (for tests).
Usage: ``python benchmarks/gpu_check.py [--models 1.5b 7b] [--adamw] [--mini] [--cpu-smoke]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from aapo_ray.memory_plan import GiB, KNOWN_ARCHS, ModelArch, learner_parts  # noqa: E402 (stdlib only)

# The paper's settings as in cluster/configs (micro-batch, prompt, completion, temperature, ranks, offload).
CASES = {
    "1.5b": dict(name="DeepSeek-R1-Distill-Qwen-1.5B", micro_batch=4, prompt=512, completion=3584,
                 temperature=0.7, world=2, offload=True),
    "7b": dict(name="Qwen2.5-Math-7B", micro_batch=4, prompt=1024, completion=3072,
               temperature=1.0, world=4, offload=False),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, tie_word_embeddings=False, model_type="qwen2")
CHUNK = 1024


def _gb(x: float | None) -> str:
    return "   n/a" if x is None else f"{x / GiB:6.1f}"


def build_model(arch_cfg: dict, device, torch, mini: bool):
    """Random-weight Qwen2 (HF's, or the torch-only stand-in), bf16 on CUDA, fp32 on CPU."""
    fields = {k: v for k, v in arch_cfg.items() if k != "model_type"}
    if mini:
        from _mini_qwen2 import Qwen2ForCausalLM as Model

        config = SimpleNamespace(**fields)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM as Model

        config = Qwen2Config(**fields, attention_dropout=0.0, use_cache=False)
        config._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = Model(config)
    finally:
        torch.set_default_dtype(old)
    return model


def make_batch(case: dict, vocab: int, device, torch):
    g = torch.Generator().manual_seed(0)
    b, p, c = case["micro_batch"], case["prompt"], case["completion"]
    ids = torch.randint(0, vocab, (b, p + c), generator=g)
    attn = torch.ones_like(ids)
    attn[0, : p // 4] = 0  # one left-padded prompt, as the learner's padded batches have
    mask = torch.zeros(b, p + c - 1)
    mask[:, p - 1:] = 1.0
    adv = torch.linspace(-1.0, 1.0, b)
    return [t.to(device) for t in (ids, attn, mask, adv)]


def one_step(model, batch, temperature, chunk, torch):
    from aapo_ray.algo import aapo_loss, token_logprobs
    from aapo_ray.logprobs import policy_logprobs

    ids, attn, mask, adv = batch
    if chunk:
        lp = policy_logprobs(model, ids, attn, temperature, chunk)
    else:
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp = token_logprobs(logits[:, :-1], ids[:, 1:], temperature)
    loss = aapo_loss(lp, mask, adv)
    loss.backward()
    return loss.detach().item()


def measure(model, batch, temperature, ckpt, chunk, torch, cuda: bool) -> dict:
    """Warm-up step (allocates the gradients), then a timed step; memory net of what was allocated before."""
    from aapo_ray.logprobs import prepare_for_training

    prepare_for_training(model, gradient_checkpointing=ckpt)
    out = {}
    try:
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if cuda else None
            start = time.perf_counter()
            loss = one_step(model, batch, temperature, chunk, torch)
            if cuda:
                torch.cuda.synchronize()
            out = {"step_s": time.perf_counter() - start, "before": before, "loss": loss,
                   "peak": torch.cuda.max_memory_allocated() if cuda else None}
    except torch.cuda.OutOfMemoryError as exc:
        out = {"oom": str(exc).splitlines()[0][:120]}
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def adamw_step(model, torch, cuda: bool) -> dict:
    """One torch AdamW step on the bf16 params (bf16 m, v: 4 B/param; DeepSpeed keeps 16 B fp32)."""
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        start = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        res = {"step_s": time.perf_counter() - start, "peak": torch.cuda.max_memory_allocated() if cuda else None}
        del opt
        return res
    except torch.cuda.OutOfMemoryError as exc:
        return {"oom": str(exc).splitlines()[0][:120]}
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def check_model(key: str, case: dict, arch_cfg: dict, device, torch, adamw: bool, mini: bool) -> list[str]:
    cuda = device.type == "cuda"
    arch = ModelArch.from_hf_config(arch_cfg)
    seq = case["prompt"] + case["completion"]
    lines = [f"== {case['name']}: {arch.num_params / 1e9:.2f}B params, micro-batch {case['micro_batch']} x {seq} "
             f"tokens, T={case['temperature']}, {'bf16 on ' + torch.cuda.get_device_name() if cuda else 'fp32 CPU'}"]
    t0 = time.perf_counter()
    model = build_model(arch_cfg, device, torch, mini)
    batch = make_batch(case, arch.vocab_size, device, torch)
    weights = torch.cuda.memory_allocated() if cuda else None
    lines.append(f"   built in {time.perf_counter() - t0:.1f} s; weights {_gb(weights).strip()} GB allocated "
                 f"(planner: {2 * arch.num_params / GiB:.1f} GB bf16)")
    common = dict(arch=arch, micro_batch=case["micro_batch"], seq_len=seq, bf16=True, kl_ref=False)
    real = learner_parts(zero_stage=2, world=case["world"], offload=case["offload"], checkpointing=True,
                         chunk_tokens=CHUNK, **{k: v for k, v in common.items() if k != "arch"}, arch=arch)
    lines.append(f"   planner per-GPU total for the cluster config (ZeRO-2 over {case['world']} ranks, "
                 f"offload={case['offload']}, incl. 2 GB context): {sum(real.values()):.1f} GB")
    lines.append("   variant                     step s   peak GB  net GB     loss | planner: params+grads  net")
    for ckpt, chunk in ((True, CHUNK), (False, CHUNK), (True, None), (False, None)):
        label = f"ckpt={'on ' if ckpt else 'off'} logprobs={'chunked' if chunk else 'full   '}"
        plan = learner_parts(zero_stage=0, world=1, offload=False, checkpointing=ckpt, chunk_tokens=chunk, **common)
        static = plan["parameters"] + plan["gradients"]
        net_plan = sum(v for k, v in plan.items() if k.startswith(("activations", "log-probs")))
        res = measure(model, batch, case["temperature"], ckpt, chunk, torch, cuda)
        if "oom" in res:
            lines.append(f"   {label:<27} OOM ({res['oom']})  | planner {static:6.1f} {net_plan:8.1f}")
            continue
        net = None if res["peak"] is None else res["peak"] - res["before"]
        lines.append(f"   {label:<27} {res['step_s']:6.2f} {_gb(res['peak'])}  {_gb(net)} {res['loss']:8.5f} | planner "
                     f"{static:6.1f} {net_plan:8.1f}")
    if adamw:
        res = adamw_step(model, torch, cuda)
        lines.append("   AdamW step: " + (f"OOM ({res['oom']})" if "oom" in res else
                                          f"{res['step_s']:.2f} s, peak {_gb(res['peak']).strip()} GB"))
    del model, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(CASES), default=["1.5b", "7b"])
    ap.add_argument("--adamw", action="store_true", help="also one AdamW step (bf16 states) after the variants")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny architecture on CPU: exercises the code only")
    ap.add_argument("--mini", action="store_true", help="the torch-only Qwen2 stand-in even if transformers is here")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: SKIPPED: torch is not installed")
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_check: SKIPPED: no CUDA device (torch {torch.__version__}, "
              f"cuda build {torch.version.cuda}); nothing to measure on this machine")
        return 0
    mini, version = args.mini, "not used"
    if not mini:
        try:
            import transformers

            version = transformers.__version__
        except ImportError:
            mini = True
            print("gpu_check: transformers is not installed: using the torch-only Qwen2 stand-in "
                  "(benchmarks/_mini_qwen2.py; same shapes and math, HF's own activation layout may differ a little)")
    torch.manual_seed(0)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    print(f"gpu_check: torch {torch.__version__}, transformers {version}, model {'stand-in' if mini else 'HF'}, "
          f"device {device}")
    start = time.perf_counter()
    for key in args.models:
        case, arch_cfg = dict(CASES[key]), KNOWN_ARCHS[CASES[key]["name"]]
        if args.cpu_smoke:
            arch_cfg = TINY
            case.update(micro_batch=2, prompt=8, completion=24, name=f"tiny stand-in for {case['name']}")
        for line in check_model(key, case, arch_cfg, device, torch, args.adamw, mini):
            print(line, flush=True)
    print(f"gpu_check: done in {time.perf_counter() - start:.0f} s. 'net' = peak minus what was allocated "
          f"before the step (weights + gradients): the planner's activations + log-prob part; "
          f"the loss should agree across variants (bf16 rounding aside).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
