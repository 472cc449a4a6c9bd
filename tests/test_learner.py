"""DeepSpeed learners on a real local Ray cluster (gloo, CPU): split invariance against a plain
torch update, weight export into a generator-side model, checkpoint resume, clear errors.

The single-rank groups take their learner from ``KeptRoles`` (as ``ray.keep_roles`` runs do): the first starts
a process, the later ones re-initialise it with their own config; multi-rank groups always start fresh."""

import os
import sys
import time

import numpy as np
import pytest
import ray
import torch

from aapo_ray.algo import aapo_loss, get_estimator, grpo_loss, token_logprobs
from aapo_ray.config import AlgoConfig, Config, LearnerConfig, RolloutConfig, RunConfig
from aapo_ray.kept_roles import KeptRoles
from aapo_ray.rollout import learner_batch, make_rollout_batch, padded_tensors, with_columns

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("kept_roles_cleared")]

VOCAB, PAD, EOS = 64, 0, 1
PROMPTS, GROUP = 4, 2  # 8 rows per step: 4 per learner with 2 learners


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random tied-embedding Llama and a WordLevel tokenizer, saved as safetensors."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    tok.save_pretrained(path)
    return str(path)


def make_batch(seed: int, rows: int = PROMPTS * GROUP):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, VOCAB, rng.integers(2, 6)).tolist() for _ in range(-(-rows // GROUP))]
    prompt_ids = [prompts[i // GROUP] for i in range(rows)]
    completion_ids = [rng.integers(4, VOCAB, rng.integers(1, 7)).tolist() + [EOS] for _ in range(rows)]
    batch = make_rollout_batch(
        prompt_ids=prompt_ids, completion_ids=completion_ids, prompt_id=np.arange(rows) // GROUP,
        group_index=np.arange(rows) // GROUP, sample_index=np.arange(rows) % GROUP,
        prompt=[""] * rows, completion=[""] * rows, gold=[""] * rows, finish_reason=["stop"] * rows,
        weight_version=0)
    return learner_batch(batch, rng.normal(size=rows), temperature=0.7)


def denominator(batch) -> float:
    tokens = int(padded_tensors(batch, PAD)["completion_mask"].sum())
    return get_estimator("aapo").loss_denominator(tokens, batch.num_rows, 8)


def make_cfg(num_learners: int, zero_stage: int, micro_batch_size: int = 3) -> Config:
    learner = LearnerConfig(num_learners=num_learners, zero_stage=zero_stage, micro_batch_size=micro_batch_size,
                            lr=1e-2, weight_decay=0.01, grad_clip=0.05, lr_schedule="cosine",
                            cpus_per_learner=0.5, collective_timeout_s=120)
    return Config(learner=learner, algo=AlgoConfig(group_size=GROUP),
                  rollout=RolloutConfig(prompts_per_step=PROMPTS, temperature=0.7), run=RunConfig(steps=4))


def load(model_dir):
    from aapo_ray.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir)[0].train(False)


def exported_params(group, model_dir) -> dict[str, torch.Tensor]:
    from aapo_ray.weights import load_weight_buckets

    model = load(model_dir)
    load_weight_buckets(model, group.export_weights(0.002))  # ~2 KB buckets: many of them
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def reference_update(model_dir, cfg: Config, batch, more_batches=(), denom=None):
    """Plain single-process AdamW steps on full batches: (params, first loss, first pre-clip norm).
    A ``loss_weight`` column weights each sequence's token sum (then ``denom`` is the D to use)."""
    from aapo_ray.learner import lr_lambda

    lc, algo = cfg.learner, cfg.algo
    model, frozen = load(model_dir), load(model_dir).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(lc.lr_schedule, 0, cfg.run.steps))
    first = None
    for b in (batch, *more_batches):
        t = padded_tensors(b, PAD)
        ids, mask = t["input_ids"], t["completion_mask"][:, 1:]
        logits = model(input_ids=ids, attention_mask=t["attention_mask"]).logits
        logprobs = token_logprobs(logits[:, :-1], ids[:, 1:], cfg.rollout.temperature)
        adv = torch.from_numpy(b.column("advantage").to_numpy().copy())
        if algo.estimator == "grpo":
            ref_logits = frozen(input_ids=ids, attention_mask=t["attention_mask"]).logits
            ref_lp = token_logprobs(ref_logits[:, :-1], ids[:, 1:], cfg.rollout.temperature)
            loss = grpo_loss(logprobs, mask, adv, clip_eps=algo.clip_eps, ref_logprobs=ref_lp,
                             kl_beta=algo.kl_beta, num_tokens=denominator(b))
        elif "loss_weight" in b.schema.names:
            loss = aapo_loss(logprobs, mask, adv, num_tokens=denom,
                             weights=torch.from_numpy(b.column("loss_weight").to_numpy().copy()))
        else:
            loss = aapo_loss(logprobs, mask, adv, num_tokens=denominator(b))
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
        opt.step()
        sched.step()
        first = first or (loss.item(), norm.item())
    return {k: v.detach().clone() for k, v in model.named_parameters()}, *first


def assert_params_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max parameter difference {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def group1(ray_cluster, model_dir):
    """2 learners, ZeRO-1, 2 micro-batches each (3 + 1 rows); trained one step on batch 0."""
    from aapo_ray.learner import LearnerGroup

    group = LearnerGroup(make_cfg(2, 1), model_dir)
    batch = make_batch(0)
    group.metrics = group.train_step(batch, denominator(batch))
    group.params = exported_params(group, model_dir)
    yield group
    group.shutdown()


def test_two_learners_zero1_match_one_learner_and_torch(ray_cluster, model_dir, group1):
    from aapo_ray.learner import LearnerGroup

    cfg, batch = make_cfg(2, 1), make_batch(0)
    ref, ref_loss, ref_norm = reference_update(model_dir, cfg, batch)
    assert ref_norm > cfg.learner.grad_clip  # clipping is exercised
    assert group1.metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    # Adam's first step hides a constant gradient scale (e.g. a missing world_size factor), so the
    # loss and pre-clip norm are compared too; a wrong split (per-micro-batch tokens) moves params ~1e-2.
    assert group1.metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert group1.metrics["lr"] == pytest.approx(cfg.learner.lr)
    assert group1.metrics["tokens"] == denominator(batch)
    assert group1.metrics["peak_rss_mb"] > 0
    assert_params_close(group1.params, ref, atol=1e-5)
    cores = min(len(os.sched_getaffinity(0)), 8)  # the test cluster has 8 logical CPUs
    assert group1.torch_threads == [max(1, cores // 2)] * 2  # the node's cores, shared by its 2 ranks
    # DeepSpeed's initialize left torch's compiler unimported (aapo_ray/learner.py: TORCHDYNAMO_DISABLE)
    compiler = [a.__ray_call__.remote(lambda _: "torch._inductor.compile_fx" in sys.modules) for a in group1.actors]
    assert ray.get(compiler) == [False, False]
    # 1 rank, 3 micro-batches (3 + 3 + 2)
    with LearnerGroup(make_cfg(1, 1), model_dir, source=KeptRoles()) as single:
        metrics = single.train_step(batch, denominator(batch))
        assert single.torch_threads == [cores] and metrics["torch_threads"] == cores  # more threads, same result
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        assert_params_close(exported_params(single, model_dir), group1.params, atol=1e-5)


def test_learner_threads_split_each_node_between_its_ranks():
    from aapo_ray.learner import learner_threads

    assert learner_threads(Config(), [("a", 8), ("a", 8), ("b", 4)]) == [4, 4, 4]
    assert learner_threads(Config(), [("a", 2), ("a", 2), ("a", 2)]) == [1, 1, 1]  # never 0
    assert learner_threads(Config(learner=LearnerConfig(torch_threads=3)), [("a", 8)] * 2) == [3, 3]


@pytest.fixture(scope="module")
def group2(ray_cluster, model_dir):
    """2 learners, ZeRO-2, micro-batches of 2 rows; short collective timeout."""
    from aapo_ray.learner import LearnerGroup

    cfg = make_cfg(2, 2, micro_batch_size=2)
    cfg.learner.collective_timeout_s = 10
    group = LearnerGroup(cfg, model_dir)
    yield group
    group.shutdown()


def test_two_learners_zero2_match_torch(model_dir, group2):
    batch = make_batch(0)
    ref, ref_loss, ref_norm = reference_update(model_dir, group2.cfg, batch)
    metrics = group2.train_step(batch, denominator(batch))
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert_params_close(exported_params(group2, model_dir), ref, atol=1e-5)


def test_collective_times_out_and_names_rank(group2):
    """Only rank 0 steps: its gradient reduction must fail after collective_timeout_s, not hang."""
    from aapo_ray.learner import LearnerError
    from aapo_ray.rollout import shard

    batch = make_batch(3)
    lonely = group2.actors[0].train_step.remote(shard(batch, 2)[0], denominator(batch))
    start = time.monotonic()
    with pytest.raises(LearnerError, match="learner rank 0 of 2 failed in train_step: .*Timed out"):
        group2._gather("train_step", [lonely])
    assert time.monotonic() - start < 60  # collective_timeout_s=10, not torch's 30 min default


def test_grpo_with_kl_two_steps_match_torch(ray_cluster, model_dir):
    """grpo + KL to the frozen initial model (loaded on the learner): two steps, cosine LR."""
    from aapo_ray.learner import LearnerGroup

    cfg = make_cfg(1, 1, micro_batch_size=5)
    cfg.algo.estimator, cfg.algo.kl_beta = "grpo", 0.5
    batches = [make_batch(0), make_batch(1)]
    ref, _, _ = reference_update(model_dir, cfg, batches[0], batches[1:])
    with LearnerGroup(cfg, model_dir, source=KeptRoles()) as group:
        for b in batches:
            group.train_step(b, denominator(b))
        assert_params_close(exported_params(group, model_dir), ref, atol=1e-5)


@pytest.mark.parametrize("agg", ["group_token_mean"])
def test_loss_weight_column_two_learners_match_one_learner_and_torch(ray_cluster, model_dir, agg):
    """algo.loss_agg through the loss_weight column: 2 learners x 2 micro-batches (3 + 1 rows, cutting
    a group in two) and 1 learner x 3 micro-batches (3 + 3 + 2) both equal a full-batch torch step."""
    from aapo_ray.algo import loss_weights
    from aapo_ray.learner import LearnerGroup

    batch = make_batch(4)
    lengths = padded_tensors(batch, PAD)["completion_mask"].sum(1).numpy()
    w, d = loss_weights(agg, lengths, GROUP, 8)
    batch = with_columns(batch, loss_weight=w)
    ref, ref_loss, ref_norm = reference_update(model_dir, make_cfg(2, 1), batch, denom=d)
    plain, _, _ = reference_update(model_dir, make_cfg(2, 1), batch.drop_columns(["loss_weight"]))
    assert max((plain[k] - ref[k]).abs().max().item() for k in ref) > 1e-4  # the weights change the update
    for learners in (2, 1):
        with LearnerGroup(make_cfg(learners, 1), model_dir, source=KeptRoles()) as group:
            metrics = group.train_step(batch, d)
            assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
            assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
            assert_params_close(exported_params(group, model_dir), ref, atol=1e-5)


def test_weight_export_gives_learner_logits(model_dir, group1):
    from aapo_ray.weights import load_weight_buckets

    ids = torch.from_numpy(np.random.default_rng(5).integers(0, VOCAB, (3, 9)))
    fresh = load(model_dir)
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
        buckets = group1.export_weights(0.002)
        assert len(buckets) > 3
        assert load_weight_buckets(fresh, buckets) == len(dict(fresh.named_parameters()))
        after = fresh(input_ids=ids).logits
    learner = group1.logits(ids)
    assert torch.allclose(after, learner, atol=1e-6, rtol=0)
    assert not torch.allclose(before, learner, atol=1e-4)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied


def test_load_weight_buckets_rejects_mismatch(model_dir):
    from aapo_ray.weights import bucket_parameters, load_weight_buckets

    model = load(model_dir)
    named = list(model.named_parameters())
    wrong = [(n if i else "model.nope.weight", p) for i, (n, p) in enumerate(named)]
    with pytest.raises(ValueError, match="model.nope.weight"):
        load_weight_buckets(model, bucket_parameters(wrong, 1.0))
    with pytest.raises(ValueError, match="shape"):
        load_weight_buckets(model, bucket_parameters([(named[0][0], torch.zeros(2, 2))], 1.0))
    with pytest.raises(ValueError, match="not in the buckets"):
        load_weight_buckets(model, bucket_parameters(named[:2], 1.0))


def test_invalid_batches_give_clear_errors(group1, tmp_path):
    from aapo_ray.learner import LearnerError

    with pytest.raises(ValueError, match="num_learners=2.*equal shards"):
        group1.train_step(make_batch(1, rows=7), 10.0)
    with pytest.raises(ValueError, match="got 6 rows, expected 8 per step"):
        group1.train_step(make_batch(1, rows=6), 10.0)
    batch = make_batch(1)
    with pytest.raises(ValueError, match="8 of 8 advantages are NaN"):
        group1.train_step(with_columns(batch, advantage=np.full(batch.num_rows, np.nan)), 10.0)
    with pytest.raises(ValueError, match="lacks columns"):
        group1.train_step(batch.drop_columns(["advantage"]), 10.0)
    with pytest.raises(LearnerError, match=r"learner rank \d of 2 failed in load_checkpoint: FileNotFoundError"):
        group1.load_checkpoint(str(tmp_path / "missing"))


def test_checkpoint_resume_is_exact(ray_cluster, model_dir, group1, tmp_path):
    """save -> new group -> load -> next step equals the group that never stopped (cosine LR)."""
    from aapo_ray.learner import LearnerGroup

    group1.save_checkpoint(str(tmp_path / "ckpt"))
    group1.save_hf(str(tmp_path / "hf"))
    batch = make_batch(2)
    m_cont = group1.train_step(batch, denominator(batch))
    continued = exported_params(group1, model_dir)
    with LearnerGroup(make_cfg(2, 1), model_dir) as resumed:
        resumed.load_checkpoint(str(tmp_path / "ckpt"))
        m_res = resumed.train_step(batch, denominator(batch))
        assert m_res["lr"] == m_cont["lr"] < make_cfg(2, 1).learner.lr  # scheduler state restored
        assert_params_close(exported_params(resumed, model_dir), continued, atol=0.0)
    hf = load(str(tmp_path / "hf"))  # the HF export holds the step-1 weights
    assert_params_close(dict(hf.named_parameters()), group1.params, atol=0.0)


def test_checkpointing_and_chunked_logprobs_train_the_same(ray_cluster, model_dir, group1):
    """The GPU memory path (GPU-path issue, defect 5): the learner trains in train mode with activation
    checkpointing on and the LM head in chunks smaller than a sequence, and the update is the same."""
    from aapo_ray.learner import LearnerGroup
    from aapo_ray.logprobs import checkpointing_enabled

    cfg = make_cfg(2, 1)
    cfg.learner.gradient_checkpointing, cfg.learner.logprob_chunk_tokens = True, 3
    with LearnerGroup(cfg, model_dir) as lean:
        mode = ray_cluster.get(lean.rank0().__ray_call__.remote(
            lambda self: (self.engine.module.training, checkpointing_enabled(self.engine.module),
                          self.engine.module.config.use_cache)))
        assert mode == (True, True, False)
        batch = make_batch(0)
        metrics = lean.train_step(batch, denominator(batch))
        assert metrics["loss"] == pytest.approx(group1.metrics["loss"], rel=1e-6)
        assert_params_close(exported_params(lean, model_dir), group1.params, atol=1e-5)  # as the ZeRO checks
