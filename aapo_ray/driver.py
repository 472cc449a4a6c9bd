"""The training loop, one page: sample -> generate (policy + frozen reference, or the reference's rewards drawn
from a precomputed cache: :mod:`aapo_ray.reference_cache`) -> score -> AAPO advantages
-> learner update -> weight sync -> metrics, eval and checkpoints. Checks before start-up live in
:mod:`aapo_ray.preflight`; resume, learner restarts and Ctrl-C in :mod:`aapo_ray.recovery`."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from aapo_ray import checkpoint as ckpt
from aapo_ray.algo import advantage_diagnostics, get_estimator, gpg_alpha, loss_weights
from aapo_ray.collect import async_start, finish, gpg_topup
from aapo_ray.colocation import CoLocated, colocate_mode
from aapo_ray.config import Config, dump_config, ray_init_args
from aapo_ray.data import PromptSampler
from aapo_ray.evaluation import evaluate
from aapo_ray.generator import GeneratorPool
from aapo_ray.kept_roles import KeptRoles, make_room
from aapo_ray.launch import init_ray, interrupt_latch
from aapo_ray.learner import LearnerError, LearnerGroup
from aapo_ray.metrics import (MetricsLogger, generate_seconds, import_pyplot_in_background, plot_run_in_background,
                              progress_postfix, rollout_stats, summary)
from aapo_ray.preflight import (check_cluster_fits, check_config, check_keep_roles, check_reference_cache, load_prompts,
                                online_reference, record_model, resolve_model_path, run_resources)
from aapo_ray.recovery import Recovery
from aapo_ray.reference import ReferencePool
from aapo_ray.reference_build import open_reference
from aapo_ray.rollout import column_numpy, concat, learner_batch
from aapo_ray.sampling import step_seed
from aapo_ray.scorer import ScorerPool
from aapo_ray.weight_sync import sync_policy

log = logging.getLogger(__name__)


def train(cfg: Config, *, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the run directory."""
    check_config(cfg)
    check_keep_roles(cfg)
    estimator = get_estimator(cfg.algo.estimator)
    run_dir = Path(run_dir or Path(cfg.run.output_dir) / (cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")))
    if not resume and (run_dir / "metrics.jsonl").exists():  # a second run would append to the first one's log
        raise FileExistsError(f"{run_dir} already holds a run (metrics.jsonl): continue it with aapo train --resume "
                              f"{run_dir}, or start this one elsewhere (another --run-dir or run.name)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    # model and data problems surface before any actor starts (`aapo train` starts Ray meanwhile: launch.start_ray_early)
    model_path = resolve_model_path(cfg)
    record_model(run_dir, model_path)
    train_prompts, eval_prompts = load_prompts(cfg, model_path)
    precomputed = estimator.needs_reference and cfg.algo.reference == "precomputed"
    ref_identity = check_reference_cache(cfg, model_path, train_prompts) if precomputed else None
    if resume and ckpt.latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume {run_dir}: no complete checkpoint under {ckpt.checkpoints_root(run_dir)}")
    started = time.perf_counter()
    init_ray(**ray_init_args(cfg))  # started early by the `aapo` script: aapo_ray.launch.start_ray_early
    startup = {"time/ray_init_s": time.perf_counter() - started}  # the wait for it, where it started early
    check_cluster_fits(cfg)
    sampler = PromptSampler(train_prompts.num_rows, cfg.rollout.prompts_per_step, seed=cfg.run.seed)
    # the precomputed reference, built first (before the run's actors hold the cluster) when missing
    cache = open_reference(cfg, model_path, train_prompts, ref_identity, progress=progress) if precomputed else None

    with ExitStack() as roles:  # every actor this run starts is shut down on the way out
        interrupted = roles.enter_context(interrupt_latch())
        # every role starts at once: the generators load while the learners build their engines
        started = time.perf_counter()
        if not cfg.ray.keep_roles:
            make_room(run_resources(cfg))  # idle actors kept by other runs give way
        mode = colocate_mode(cfg)
        source = (KeptRoles() if cfg.ray.keep_roles  # actors earlier runs kept loaded, handed back at exit
                  else CoLocated(cfg, mode, reference=online_reference(cfg)) if mode != "off"  # shared processes
                  else None)  # a process per role
        policy = _started(roles, GeneratorPool(cfg, model_path, wait=False, source=source))
        reference = (_started(roles, ReferencePool(cfg, model_path, wait=False, source=source))
                     if online_reference(cfg) else None)
        scorers = _started(roles, ScorerPool(cfg, wait=False, source=source))
        learners = LearnerGroup(cfg, model_path, source=source)
        roles.callback(lambda: learners.shutdown())
        for pool in (policy, reference, scorers):
            if pool:
                pool.wait_ready()
        startup["time/roles_start_s"] = time.perf_counter() - started
        startup["roles/kept_reused"] = source.reused if source else 0
        actors = [*policy.actors, *(reference.actors if reference else []), *scorers.actors, *learners.actors]
        startup["roles/processes"] = float(len(source.hosts) if isinstance(source, CoLocated) else len(actors))
        recovery = Recovery(run_dir, cfg, model_path, sampler, policy)
        step = recovery.start(learners, resume)
        metrics_log = MetricsLogger(run_dir, resume_step=step if resume else None)
        if step == 0:
            metrics_log.log(0, {**evaluate(cfg, policy, scorers, eval_prompts), **startup})
        bar = tqdm(total=cfg.run.steps, initial=step, desc="aapo train", disable=not progress, unit="step")

        def launch(s: int):  # draw step s's prompts, start its generation and scoring; returns the jobs
            indices, visits = sampler.next_batch_with_visits()
            prompts = train_prompts.take(pa.array(indices))
            recovery.sampled(s)
            requests = [(policy, policy.chunks(prompts, cfg.algo.group_size,
                                               policy.sampling(step_seed(cfg.run.seed, s, "policy"))))]
            if reference:
                requests.append((reference, reference.chunks(prompts, cfg.algo.group_size, reference.sampling(
                    step_seed(cfg.run.seed, s, "reference")))))
            drawn = cache.draw(prompts.column("prompt_id").to_pylist(), visits) if cache else None
            return async_start(requests, scorers), drawn  # drawn: the step's stored reference samples

        pending = None  # the next step's jobs, started before this step trained (rollout.overlap=1)
        try:
            while step < cfg.run.steps:
                step += 1
                t0 = time.perf_counter()
                (jobs, drawn), pending = pending or launch(step), None
                batches, counters, faults = finish(jobs, scorers, max_staleness=cfg.rollout.overlap)
                rollouts = concat(batches[0])
                ref_batch = concat(batches[1]) if reference else drawn
                topup = {}
                if cfg.algo.gpg_valid_threshold > 0:  # GPG's beta_th: more prompt groups while too few vary
                    rollouts, topup = gpg_topup(cfg, rollouts, policy, scorers, train_prompts, sampler,
                                                step_seed(cfg.run.seed, step, "policy"), counters)
                    recovery.sampled(step)  # the top-up drew more prompts
                t_rollout = time.perf_counter()

                rewards = torch.tensor(column_numpy(rollouts, "reward"))
                ref_rewards = torch.tensor(_aligned_rewards(rollouts, ref_batch)) if ref_batch is not None else None
                advantages = estimator.advantages(rewards, ref_rewards, cfg.algo.group_size, margin_clip=cfg.algo.margin_clip,
                                                  scale_rewards=cfg.algo.resolve("scale_rewards"))
                lengths = np.diff(rollouts.column("completion_ids").offsets.to_numpy())
                weights, denominator = loss_weights(cfg.algo.resolve("loss_agg"), lengths, cfg.algo.group_size,
                                                    cfg.rollout.max_new_tokens)
                batch = learner_batch(rollouts, advantages, loss_weight=weights)
                if estimator.name == "gpg":
                    topup["gpg/alpha"] = gpg_alpha(rewards, cfg.algo.group_size)
                staleness = (step - 1) - column_numpy(rollouts, "weight_version")  # versions behind the update
                if cfg.rollout.overlap and step < cfg.run.steps:
                    pending = launch(step + 1)  # sampled by these weights while the learners train
                t_adv = time.perf_counter()

                if step == cfg.run.steps:  # the last update leaves the generators' core idle:
                    import_pyplot_in_background()  # the end-of-run plot's imports, meanwhile
                recovery.updating()  # from here until the checkpoint the learner state is ahead of the log
                try:
                    learner_metrics = learners.train_step(batch, denominator)
                    t_train = time.perf_counter()
                    sync_policy(policy, learners, version=step)
                    t_sync = time.perf_counter()
                    metrics = {
                        **advantage_diagnostics(rewards, ref_rewards, advantages, cfg.algo.group_size,
                                                cfg.algo.margin_clip if estimator.name == "aapo" else None),
                        **rollout_stats(rollouts, ref_batch, counters),
                        **{f"learner/{k}": v for k, v in learner_metrics.items()},
                        **topup, **faults, "faults/learner_restarts": recovery.learner_restarts,
                        "rollout/staleness_mean": float(staleness.mean()), "rollout/staleness_max": float(staleness.max()),
                        "faults/policy_replica_restarts": policy.restarted_replicas,
                        "time/generate_s": generate_seconds(batches[0]),
                        "time/ref_generate_s": generate_seconds(batches[1]) if reference else 0.0,
                        **(cache.metrics() if cache else {}),
                        "time/rollout_s": t_rollout - t0, "time/advantage_s": t_adv - t_rollout,
                        "time/train_s": t_train - t_adv, "time/sync_s": t_sync - t_train,
                    }
                    if (cfg.run.eval_every and step % cfg.run.eval_every == 0 and step >= cfg.run.eval_from
                            or step == cfg.run.steps):
                        metrics.update(evaluate(cfg, policy, scorers, eval_prompts))
                    metrics["time/step_s"] = time.perf_counter() - t0
                    metrics["tokens_per_s"] = metrics["completion_tokens"] / metrics["time/step_s"]
                    metrics_log.log(step, metrics)  # logged before the checkpoint: a crash in between re-runs the step
                    recovery.logged_step(step)
                    if cfg.run.save_every and step % cfg.run.save_every == 0 or step == cfg.run.steps:
                        recovery.save(step, learners)
                    recovery.done_updating()
                except LearnerError as exc:
                    learners, step = recovery.restart_learners(exc, step, learners)
                    pending = None  # started with the dead group's weights, and its prompts are drawn again
                    metrics_log.truncate_after(step)
                    bar.n = step
                    continue
                bar.set_postfix(progress_postfix(metrics), refresh=False)
                bar.update(1)
                if interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way
                    log.warning("Ctrl-C at step %d did not stop the step (its KeyboardInterrupt was swallowed); "
                                "stopping now", step)
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            recovery.interrupted(learners, bar.write)
            raise
        finally:
            bar.close()
            metrics_log.close()
        plotted = plot_run_in_background(run_dir)  # drawn while the roles shut down (leaving this block)
    plotted.result()
    print(summary(run_dir))
    return run_dir


def _started(stack: ExitStack, role):
    stack.callback(role.shutdown)
    return role


def _aligned_rewards(rollouts: pa.RecordBatch, ref_batch: pa.RecordBatch) -> np.ndarray:
    """Reference rewards in the policy batch's (group, sample) order: AAPO pairs the i-th samples."""
    for key in ("group_index", "sample_index"):
        if not np.array_equal(column_numpy(rollouts, key), column_numpy(ref_batch, key)):
            raise RuntimeError(f"policy and reference rollouts are not index-aligned on {key}")
    return column_numpy(ref_batch, "reward")
