"""The training loop, one page: sample -> generate (policy + frozen reference) -> score ->
AAPO advantages -> learner update -> weight sync -> metrics, eval and checkpoints."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm.auto import tqdm

from aapo_ray import checkpoint as ckpt
from aapo_ray.algo import advantage_diagnostics, get_estimator, gpg_alpha, gpg_fill, loss_weights
from aapo_ray.collect import ACTOR_FAILURES, collect_scored
from aapo_ray.config import EMBEDDED_MODEL, Config, dump_config
from aapo_ray.data import PromptSampler, load_prompt_dataset, render_prompts
from aapo_ray.generator import GeneratorPool, make_prompt_batch
from aapo_ray.launch import init_ray, interrupt_latch
from aapo_ray.learner import LearnerError, LearnerGroup
from aapo_ray.metrics import MetricsLogger, plot_run, read_metrics
from aapo_ray.reference import ReferencePool
from aapo_ray.rollout import REWARD_PREFIX, column_numpy, concat, with_columns
from aapo_ray.scorer import ScorerPool

log = logging.getLogger(__name__)


def train(cfg: Config, *, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the run directory."""
    run_dir = Path(run_dir or Path(cfg.run.output_dir) / (cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_path = resolve_model_path(cfg)  # model and data problems surface before Ray starts
    train_prompts, eval_prompts = load_prompts(cfg, model_path)
    if resume and ckpt.latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume {run_dir}: no complete checkpoint under {ckpt.checkpoints_root(run_dir)}")
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace, torch_threads=cfg.run.torch_threads)
    check_cluster_fits(cfg)
    estimator = get_estimator(cfg.algo.estimator)
    sampler = PromptSampler(train_prompts.num_rows, cfg.rollout.prompts_per_step, seed=cfg.run.seed)

    with ExitStack() as roles:  # every actor this run starts is shut down on the way out
        interrupted = roles.enter_context(interrupt_latch())
        policy = _started(roles, GeneratorPool(cfg, model_path))
        reference = _started(roles, ReferencePool(cfg, model_path)) if estimator.needs_reference else None
        scorers = _started(roles, ScorerPool(cfg))
        learners = LearnerGroup(cfg, model_path)
        roles.callback(lambda: learners.shutdown())
        step = restore(run_dir, cfg, learners, policy, sampler) if resume else 0
        logger = MetricsLogger(run_dir, resume_step=step if resume else None)
        if step == 0:
            logger.log(0, evaluate(cfg, policy, scorers, eval_prompts))
        bar = tqdm(total=cfg.run.steps, initial=step, desc="aapo train", disable=not progress, unit="step")
        learner_restarts = 0
        # Ctrl-C saves the last fully logged step, unless the learner was mid-update (state unknown).
        logged, in_update, sampler_after = step, False, {step: sampler.state_dict()}
        try:
            while step < cfg.run.steps:
                step += 1
                t0 = time.perf_counter()
                prompts = train_prompts.take(pa.array(sampler.next_batch()))
                sampler_after = {step - 1: sampler_after[step - 1], step: sampler.state_dict()}
                seed = cfg.run.seed * 1_000_003 + step
                requests = [(policy, policy.chunks(prompts, cfg.algo.group_size, policy.sampling(seed)))]
                if reference:
                    requests.append((reference, reference.chunks(prompts, cfg.algo.group_size,
                                                                 reference.sampling(seed + 500_009))))
                batches, counters, faults = collect_scored(requests, scorers)
                rollouts = concat(batches[0])
                ref_batch = concat(batches[1]) if reference else None
                topup = {}
                if cfg.algo.gpg_valid_threshold > 0:  # GPG's beta_th: more prompt groups while too few vary
                    rollouts, topup = gpg_topup(cfg, rollouts, policy, scorers, train_prompts, sampler, seed, counters)
                    sampler_after[step] = sampler.state_dict()
                t_rollout = time.perf_counter()

                rewards = torch.tensor(column_numpy(rollouts, "reward"))
                ref_rewards = torch.tensor(_aligned_rewards(rollouts, ref_batch)) if reference else None
                advantages = estimator.advantages(rewards, ref_rewards, cfg.algo.group_size, margin_clip=cfg.algo.margin_clip,
                                                  scale_rewards=cfg.algo.resolve("scale_rewards"))
                lengths = np.diff(rollouts.column("completion_ids").offsets.to_numpy())
                weights, denominator = loss_weights(cfg.algo.resolve("loss_agg"), lengths, cfg.algo.group_size,
                                                    cfg.rollout.max_new_tokens)
                batch = with_columns(rollouts, advantage=advantages, **({} if weights is None else {"loss_weight": weights}))
                if estimator.name == "gpg":
                    topup["gpg/alpha"] = gpg_alpha(rewards, cfg.algo.group_size)
                t_adv = time.perf_counter()

                in_update = True  # from here until the checkpoint the learner state is ahead of the log
                try:
                    learner_metrics = learners.train_step(ray.put(batch), denominator)
                    t_train = time.perf_counter()
                    policy.update_weights(learners.export_weights(cfg.learner.sync_bucket_mb), version=step)
                    t_sync = time.perf_counter()
                    metrics = {
                        **advantage_diagnostics(rewards, ref_rewards, advantages, cfg.algo.group_size,
                                                cfg.algo.margin_clip if estimator.name == "aapo" else None),
                        **_rollout_stats(rollouts, ref_batch, counters),
                        **{f"learner/{k}": v for k, v in learner_metrics.items()},
                        **topup, **faults, "faults/learner_restarts": learner_restarts,
                        "faults/policy_replica_restarts": policy.restarted_replicas,
                        "time/generate_s": _generate_seconds(batches[0]),
                        "time/ref_generate_s": _generate_seconds(batches[1]) if reference else 0.0,
                        "time/rollout_s": t_rollout - t0, "time/advantage_s": t_adv - t_rollout,
                        "time/train_s": t_train - t_adv, "time/sync_s": t_sync - t_train,
                    }
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0 or step == cfg.run.steps:
                        metrics.update(evaluate(cfg, policy, scorers, eval_prompts))
                    metrics["time/step_s"] = time.perf_counter() - t0
                    metrics["tokens_per_s"] = metrics["completion_tokens"] / metrics["time/step_s"]
                    logger.log(step, metrics)  # logged before the checkpoint: a crash in between re-runs the step
                    logged = step
                    if cfg.run.save_every and step % cfg.run.save_every == 0 or step == cfg.run.steps:
                        ckpt.save_checkpoint(run_dir, step, learners, {"sampler": sampler_after[step]}, cfg.run.keep_checkpoints)
                    in_update = False
                except LearnerError as exc:
                    if not isinstance(exc.__cause__, ACTOR_FAILURES) or learner_restarts >= cfg.run.max_learner_restarts:
                        raise RuntimeError(f"learner failed at step {step}: {exc}. The run directory is resumable: "
                                           f"aapo train --resume {run_dir}") from exc
                    learner_restarts += 1
                    log.warning("learner died at step %d (%s); restarting the group from the last checkpoint", step, exc)
                    learners.shutdown()
                    learners = LearnerGroup(cfg, model_path)
                    step = restore(run_dir, cfg, learners, policy, sampler)
                    logger.truncate_after(step)
                    logged, in_update, sampler_after = step, False, {step: sampler.state_dict()}
                    bar.n = step
                    continue
                bar.set_postfix(_postfix(metrics), refresh=False)
                bar.update(1)
                if interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way
                    log.warning("Ctrl-C at step %d did not stop the step (its KeyboardInterrupt was swallowed); "
                                "stopping now", step)
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            last = ckpt.latest_checkpoint(run_dir)
            if in_update:
                bar.write(f"interrupted during a learner update: resume restarts from {last or 'the start'}")
            elif logged > 0 and (last is None or last.name != f"step_{logged:06d}"):
                bar.write(f"interrupted: saving a checkpoint of step {logged} in {run_dir}")
                ckpt.save_checkpoint(run_dir, logged, learners, {"sampler": sampler_after[logged]}, cfg.run.keep_checkpoints)
            raise
        finally:
            bar.close()
            logger.close()
    plot_run(run_dir)
    print(summary(run_dir))
    return run_dir


def restore(run_dir: Path, cfg: Config, learners: LearnerGroup, policy: GeneratorPool, sampler: PromptSampler) -> int:
    """Load the last complete checkpoint (or the initial state) into fresh learners; returns its step."""
    last = ckpt.latest_checkpoint(run_dir)
    step = 0
    if last is not None:
        state = ckpt.load_state(last)
        learners.load_checkpoint(str(last / "learner"))
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        log.info("restored %s from %s (step %d)", run_dir, last.name, step)
    else:
        sampler.load_state_dict({**sampler.state_dict(), "epoch": 0, "pos": 0})
    policy.update_weights(learners.export_weights(cfg.learner.sync_bucket_mb), version=step)
    return step


def check_cluster_fits(cfg: Config) -> None:
    """Fail before any actor starts if the cluster cannot hold the configured roles."""
    total = ray.cluster_resources()
    r, roll, learn = cfg.reward, cfg.rollout, cfg.learner
    replicas = roll.policy_replicas + (roll.reference_replicas if get_estimator(cfg.algo.estimator).needs_reference else 0)
    need = {"CPU": replicas * roll.cpus_per_replica + r.num_scorers * r.cpus_per_scorer + learn.num_learners * learn.cpus_per_learner,
            "GPU": replicas * roll.gpus_per_replica + learn.num_learners * learn.gpus_per_learner}
    short = [f"{k}: need {v:g}, cluster has {total.get(k, 0):g}" for k, v in need.items() if v > total.get(k, 0) + 1e-9]
    if short:
        raise ValueError("the Ray cluster cannot hold this run's actors (" + "; ".join(short) + "): lower "
                         "learner.num_learners / rollout.*_replicas / cpus_per_* or add nodes (ray.num_cpus for a local cluster)")


def resolve_model_path(cfg: Config) -> str:
    """``model.path``, or the embedded tiny default (built and warm-started once, then cached)."""
    if cfg.model.path == EMBEDDED_MODEL:
        from aapo_ray.models import default_model_path

        return str(default_model_path())
    path = Path(cfg.model.path).expanduser()
    if not path.is_dir() and (cfg.model.path.startswith((".", "/", "~")) or path.parent.is_dir()):
        raise FileNotFoundError(f"model.path={cfg.model.path}: no such directory; point it at a local "
                                f"HF model directory (config.json + *.safetensors + tokenizer files)")
    return str(path) if path.is_dir() else cfg.model.path


def load_prompts(cfg: Config, model_path: str) -> tuple[pa.RecordBatch, pa.RecordBatch | None]:
    """Training and held-out prompts as Arrow prompt batches (rendered and tokenised once)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    data = cfg.data

    def table(source: str, limit: int | None) -> pa.RecordBatch:
        ds = load_prompt_dataset(source, fmt=data.format, question_field=data.question_field,
                                 answer_field=data.answer_field, id_field=data.id_field,
                                 bad_rows=data.bad_rows, limit=limit)
        template = None if data.chat_template else (data.template or ds.default_template or "{question}")
        texts = render_prompts(ds.questions, template=template, tokenizer=tokenizer, system_prompt=data.system_prompt)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep = [i for i, t in enumerate(ids) if len(t) <= cfg.rollout.max_prompt_tokens]
        if len(keep) < len(ids):
            log.warning("%s: skipped %d prompts longer than rollout.max_prompt_tokens=%d",
                        source, len(ids) - len(keep), cfg.rollout.max_prompt_tokens)
        if not keep:
            raise ValueError(f"{source}: every prompt is longer than rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
        return make_prompt_batch([ds.ids[i] for i in keep], [ids[i] for i in keep],
                                 [texts[i] for i in keep], [ds.golds[i] for i in keep])

    train = table(data.train, None)
    if train.num_rows < cfg.rollout.prompts_per_step:
        raise ValueError(f"{data.train}: {train.num_rows} prompts < rollout.prompts_per_step={cfg.rollout.prompts_per_step}")
    return train, table(data.eval, data.eval_limit) if data.eval else None


def evaluate(cfg: Config, policy: GeneratorPool, scorers: ScorerPool, prompts: pa.RecordBatch | None) -> dict:
    """Held-out accuracy of the current policy (fixed seed, ``run.eval_temperature``)."""
    if prompts is None:
        return {}
    t0 = time.perf_counter()
    params = policy.sampling(cfg.run.seed, temperature=cfg.run.eval_temperature)
    batches, _, _ = collect_scored([(policy, policy.chunks(prompts, cfg.run.eval_samples, params))], scorers)
    scored = concat(batches[0])
    acc = np.nan_to_num(column_numpy(scored, REWARD_PREFIX + "accuracy"))
    return {"eval/accuracy": float(acc.mean()), "eval/reward": float(column_numpy(scored, "reward").mean()),
            "time/eval_s": time.perf_counter() - t0}


def summary(run_dir: Path) -> str:
    rows = read_metrics(run_dir)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    train = [r["reward_mean"] for r in rows if "reward_mean" in r]
    lines = [f"run directory: {run_dir}"]
    if evals:
        lines.append(f"held-out accuracy: {evals[0][1]:.3f} (step {evals[0][0]}) -> {evals[-1][1]:.3f} (step {evals[-1][0]})")
    if train:
        k = max(1, len(train) // 5)
        lines.append(f"training reward: first {k} steps {np.mean(train[:k]):.3f} -> last {k} steps {np.mean(train[-k:]):.3f}")
    return "\n".join(lines)


def _started(stack: ExitStack, role):
    stack.callback(role.shutdown)
    return role


def gpg_topup(cfg: Config, rollouts: pa.RecordBatch, policy: GeneratorPool, scorers: ScorerPool,
              prompts: pa.RecordBatch, sampler: PromptSampler, seed: int, counters: list[dict]) -> tuple[pa.RecordBatch, dict]:
    """GPG's threshold top-up: while fewer than ``algo.gpg_valid_threshold`` of the step's samples
    are in groups whose rewards vary, sample another ``prompts_per_step`` prompts (at most
    ``algo.gpg_max_topups`` rounds) and train on a batch of the usual size made of the valid groups
    first, zero-variance groups to fill (:func:`aapo_ray.algo.gpg_fill`); alpha = B / (B - M) of
    that batch then corrects for the zero-variance groups left in it."""
    G, num_groups = cfg.algo.group_size, rollouts.num_rows // cfg.algo.group_size
    pool, rounds = [rollouts], 0
    while True:
        order, share = gpg_fill(torch.tensor(np.concatenate([column_numpy(b, "reward") for b in pool])), G, num_groups)
        if share >= cfg.algo.gpg_valid_threshold or rounds >= cfg.algo.gpg_max_topups:
            break
        rounds += 1
        extra = prompts.take(pa.array(sampler.next_batch()))
        batches, more, _ = collect_scored([(policy, policy.chunks(extra, G, policy.sampling(seed + 250_007 * rounds)))], scorers)
        pool.append(concat(batches[0]))
        counters.extend(more)
    if rounds:
        every = concat(pool)
        rows = (order[:, None] * G + torch.arange(G)).flatten().numpy()
        picked = every.take(pa.array(rows))
        rollouts = picked.set_column(picked.schema.get_field_index("group_index"), picked.schema.field("group_index"),
                                     pa.array(np.arange(len(rows), dtype=np.int32) // G))
    return rollouts, {"gpg/topup_rounds": float(rounds), "gpg/valid_share": share}


def _aligned_rewards(rollouts: pa.RecordBatch, ref_batch: pa.RecordBatch) -> np.ndarray:
    """Reference rewards in the policy batch's (group, sample) order: AAPO pairs the i-th samples."""
    for key in ("group_index", "sample_index"):
        if not np.array_equal(column_numpy(rollouts, key), column_numpy(ref_batch, key)):
            raise RuntimeError(f"policy and reference rollouts are not index-aligned on {key}")
    return column_numpy(ref_batch, "reward")


def _generate_seconds(batches: list[pa.RecordBatch]) -> float:
    """Busy time of the slowest replica (replicas generate concurrently)."""
    return max((float(b.schema.metadata[b"generate_s"]) for b in batches), default=0.0)


def _rollout_stats(rollouts: pa.RecordBatch, ref_batch: pa.RecordBatch | None, counters: list[dict]) -> dict:
    lengths = np.diff(rollouts.column("completion_ids").offsets.to_numpy())
    stats = {
        "completion_len_mean": float(lengths.mean()),
        "truncated_frac": float(np.mean(np.asarray(rollouts.column("finish_reason").to_pylist()) == "length")),
        "completion_tokens": float(lengths.sum()),
    }
    for name in rollouts.schema.names:
        if name.startswith(REWARD_PREFIX):
            stats[name.removeprefix(REWARD_PREFIX) + "_mean"] = float(np.nanmean(column_numpy(rollouts, name)))
    if ref_batch is not None:
        stats["completion_tokens"] += float(len(ref_batch.column("completion_ids").values))
    for key in ("timeouts", "errors", "none", "unparseable_gold"):
        stats[f"reward/{key}"] = float(sum(c.get(key, 0) for c in counters))
    stats["time/score_s"] = float(sum(c["score_s"] for c in counters))  # scorer busy time (policy + reference)
    return stats


def _postfix(m: dict) -> dict:
    keys = {"reward_mean": "reward", "accuracy_mean": "acc", "zero_variance_group_frac": "zvar",
            "margin_mean": "margin", "tokens_per_s": "tok/s", "eval/accuracy": "eval"}
    return {short: f"{m[k]:.3g}" for k, short in keys.items() if k in m}
