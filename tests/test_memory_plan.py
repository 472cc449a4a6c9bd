"""The memory planner against hand computations and DeepSpeed's published estimate; its verdicts on
the paper configs; the GPU check's no-CUDA exit."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from aapo_ray import memory_plan as mp
from aapo_ray.config import ConfigError, load_config
from aapo_ray.preflight import load_checked_config
from aapo_ray.memory_plan import GiB, KNOWN_ARCHS, ModelArch, check_memory, plan_memory, resolve_arch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"
Q7 = ModelArch.from_hf_config(KNOWN_ARCHS["Qwen2.5-Math-7B"])
Q15 = ModelArch.from_hf_config(KNOWN_ARCHS["DeepSeek-R1-Distill-Qwen-1.5B"])


def with_learner(cfg, **learner):
    """The config with extra learner knobs (gradient_checkpointing, ...) that Config may not have yet."""
    lc = SimpleNamespace(**{**cfg.learner.model_dump(), **learner})
    return SimpleNamespace(model=cfg.model, algo=cfg.algo, rollout=cfg.rollout, learner=lc, ray=cfg.ray,
                           completions_per_step=cfg.completions_per_step)


def test_parameter_counts_by_hand():
    h, inter, layers, vocab = 3584, 18944, 28, 152064
    q, kv = 28 * 128, 4 * 128
    layer = h * q + 2 * h * kv + q * h + (q + 2 * kv) + 3 * h * inter + 2 * h
    assert Q7.num_params == layers * layer + 2 * vocab * h + h == 7_615_616_512  # HF: "7.62B params"
    assert Q15.num_params == 1_777_088_000  # HF: "1.78B params" (untied embeddings)
    assert Q7.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2 == 57_344


@pytest.mark.parametrize("world,offload", [(1, False), (4, False), (8, False), (2, True), (4, True)])
def test_zero2_equals_deepspeed_published_formula(world, offload):
    psi = Q7.num_params
    s = mp.model_state_bytes(psi, 2, world, bf16=True, offload=offload)
    ours = s["params"] + s["grads"] + s["optimizer"]
    assert ours == pytest.approx(mp.deepspeed_zero2_estimate(psi, world, offload), rel=1e-9)
    # by hand: 2 Psi + 18 Psi / N (no offload), 2 Psi (offload)
    assert ours == pytest.approx(2 * psi if offload else 2 * psi + 18 * psi / world, rel=1e-9)


def test_zero2_matches_deepspeed_itself_when_installed():
    stage = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    for world, offload in ((4, False), (2, True)):
        _, gpu = stage.estimate_zero2_model_states_mem_needs(Q7.num_params, num_gpus_per_node=world,
                                                              cpu_offload=offload)
        s = mp.model_state_bytes(Q7.num_params, 2, world, bf16=True, offload=offload)
        assert sum(s.values()) == pytest.approx(gpu, abs=1)


def test_other_stages_by_hand():
    psi = 1e9
    assert sum(mp.model_state_bytes(psi, 0, 4, True, False).values()) == 20 * psi
    assert sum(mp.model_state_bytes(psi, 1, 4, True, False).values()) == 4 * psi + 16 * psi / 4
    assert sum(mp.model_state_bytes(psi, 1, 4, True, True).values()) == 4 * psi
    assert sum(mp.model_state_bytes(psi, 2, 4, False, False).values()) == 4 * psi + 12 * psi / 4


def test_activation_formula_by_hand():
    n, h, kv, inter, a = 4 * 4096, 3584, 512, 18944, 2
    layer = n * (8 * h + 10 * a * h + 2 * a * kv + 4 * a * inter)
    assert mp.layer_activation_bytes(Q7, n, 4096, 4, a) == layer
    final = n * (4 + 2 * a) * h
    assert mp.activation_bytes(Q7, 4, 4096, a, checkpointing=False) == 28 * layer + final
    assert mp.activation_bytes(Q7, 4, 4096, a, checkpointing=True) == 28 * n * a * h + 2 * layer + final
    # eager attention adds Korthikanti et al.'s 5 * heads * s^2 * b per layer
    assert (mp.layer_activation_bytes(Q7, n, 4096, 4, a, "eager") - layer) == 5 * 28 * 4096 ** 2 * 4
    # full float32 logits of 4 x 4096 tokens: the "about 10 GB each"
    assert 4 * n * 152064 / 1e9 == pytest.approx(10.0, rel=0.01)


def test_paper_7b_fits_only_with_checkpointing_and_chunking():
    cfg = load_config(CONFIGS / "qwen2.5-math-7b-aapo.yaml", ["learner.micro_batch_size=4"])  # the paper's
    plan = check_memory(with_learner(cfg, gradient_checkpointing=True, logprob_chunk_tokens=1024), 80.0, Q7)
    assert plan.fits and 55 < plan.role("learner").total_gb < 80
    with pytest.raises(ValueError) as err:
        check_memory(with_learner(cfg, gradient_checkpointing=False), 80.0, Q7)
    msg = str(err.value)
    assert "learner" in msg and "GB" in msg and "gradient_checkpointing=true" in msg
    with pytest.raises(ValueError, match="logprob_chunk_tokens=1024"):
        check_memory(with_learner(cfg, logprob_chunk_tokens=0), 80.0, Q7)


@pytest.mark.parametrize("name", ["qwen2.5-math-7b-aapo", "qwen2.5-math-7b-grpo",
                                  "r1-distill-qwen-1.5b-aapo", "r1-distill-qwen-1.5b-grpo"])
def test_paper_configs_fit_with_the_defaults(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    plan = check_memory(cfg, 80.0)  # arch from the built-in table: /models/... is not on this machine
    assert plan is not None and plan.fits
    roles = {r.role for r in plan.roles}
    assert roles == ({"learner", "policy generator", "reference generator"} if "aapo" in name
                     else {"learner", "policy generator"})
    print(plan.format_table())


def test_absurd_micro_batch_is_refused_at_load_with_numbers():
    with pytest.raises(ConfigError) as err:  # config validation runs the planner: refused before any actor
        load_checked_config(CONFIGS / "qwen2.5-math-7b-aapo.yaml", ["learner.micro_batch_size=24"])
    msg = str(err.value)
    assert "learner: needs" in msg and "of a 80.0 GB budget" in msg
    assert "learner.micro_batch_size=12" in msg and "activations" in msg


def test_generator_without_room_for_one_sequence_is_refused():
    with pytest.raises(ConfigError, match="policy generator: KV cache .* cannot hold one 4096-token sequence"):
        load_checked_config(CONFIGS / "qwen2.5-math-7b-aapo.yaml", ["rollout.sglang_mem_fraction=0.18"])


def test_cpu_runs_and_unknown_models_are_not_planned(tmp_path):
    assert check_memory(load_config(None), 80.0) is None  # embedded model on CPU
    assert resolve_arch(str(tmp_path / "SomeOtherModel")) is None
    assert resolve_arch("/models/Qwen2.5-Math-7B/") == Q7


def test_arch_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**KNOWN_ARCHS["Qwen2.5-Math-7B"], "head_dim": 128}))
    assert resolve_arch(str(tmp_path)) == ModelArch.from_hf_config({**KNOWN_ARCHS["Qwen2.5-Math-7B"],
                                                                    "head_dim": 128})


def test_memory_plan_imports_without_torch_ray_or_pydantic():
    code = ("import sys; sys.modules.update({m: None for m in ('torch', 'ray', 'deepspeed', 'pydantic', 'yaml')});"
            "import aapo_ray.memory_plan as m; print(m.ModelArch.from_hf_config(m.KNOWN_ARCHS['Qwen2.5-Math-7B'])"
            ".num_params)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "7615616512", out.stderr


def test_gpu_check_modules_import_without_ray_deepspeed_pydantic_or_transformers():
    blocked = "('ray', 'deepspeed', 'pydantic', 'yaml', 'pyarrow', 'transformers')"
    code = (f"import sys; sys.modules.update({{m: None for m in {blocked}}}); sys.path.insert(0, 'benchmarks');"
            "import aapo_ray.algo, aapo_ray.logprobs, aapo_ray.memory_plan, gpu_check, _mini_qwen2")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


def test_gpu_check_without_cuda_exits_0_with_the_reason():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "SKIPPED: no CUDA device" in out.stdout, out.stdout + out.stderr


def test_gpu_check_cpu_smoke_runs_every_variant():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--models", "7b"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "ckpt=" in line]
    assert len(rows) == 4 and not any("OOM" in r for r in rows)
    losses = {r.split("|")[0].split()[-1] for r in rows}
    assert len(losses) == 1, rows  # same loss with/without checkpointing and chunking


def test_gpu_check_stand_in_runs_every_variant():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--mini"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "model stand-in" in out.stdout, out.stderr
    rows = [line for line in out.stdout.splitlines() if "ckpt=" in line]
    assert len(rows) == 8 and len({r.split("|")[0].split()[-1] for r in rows[:4]}) == 1, rows


def test_stand_in_qwen2_equals_transformers():
    """The torch-only stand-in with HF's weights gives HF's logits (at non-padded positions)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _mini_qwen2 import Qwen2ForCausalLM as Mini

    arch = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=211, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**arch, attn_implementation="sdpa")).eval()
    mini = Mini(SimpleNamespace(**arch)).eval()
    mini.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, 211, (2, 13))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=attn).logits, mini(ids, attn).logits
    keep = attn.bool()
    torch.testing.assert_close(b[keep], a[keep], atol=1e-5, rtol=1e-5)


def test_kl_reference_is_counted_only_with_kl_beta():
    cfg = load_config(CONFIGS / "qwen2.5-math-7b-grpo.yaml", ["algo.kl_beta=0"])
    assert "KL reference model" not in plan_memory(cfg, 80.0, Q7).role("learner").parts
    kl = load_config(CONFIGS / "qwen2.5-math-7b-grpo.yaml", ["algo.kl_beta=0.04", "learner.micro_batch_size=2"])
    part = plan_memory(kl, 80.0, Q7).role("learner").parts["KL reference model"]
    assert 2 * Q7.num_params / GiB < part < 2 * Q7.num_params / GiB + 5  # bf16 weights + no-grad transients
