"""DeepSpeed learners: one engine per rank of a torch.distributed group (gloo on CPU, NCCL on GPU).

A :class:`LearnerGroup` (driver side) starts ``learner.num_learners`` :class:`LearnerActor` s, gives
each its equal slice of a step's rollout batch and collects metrics. Gradients are exact sums
over the whole batch (split invariance, see :mod:`aapo_ray.algo`): every micro-batch loss is a
partial sum divided by the step's global ``loss_denominator``, and is multiplied by
``world_size * gradient_accumulation_steps`` to undo DeepSpeed's averaging over ranks and
micro-batches. Weights leave rank 0 in flat per-dtype buckets (:mod:`aapo_ray.weights`).
ZeRO stages 0-2 keep full parameters on every rank.
"""

from __future__ import annotations

import datetime
import gc
import logging
import math
import os
import resource
import socket
import time
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa
import ray
import torch

from aapo_ray.algo import get_estimator, grpo_loss
from aapo_ray.config import Config
from aapo_ray.actor_sources import FreshActors
from aapo_ray.colocation import CoLocated
from aapo_ray.kept_roles import KeepableRole
from aapo_ray.actor_process import setup_actor_process
from aapo_ray.launch import environment
from aapo_ray.logprobs import policy_logprobs, prepare_for_training
from aapo_ray.models import load_model_and_tokenizer
from aapo_ray.rollout import column_numpy, padded_tensors, sampling_temperature, shard
from aapo_ray.weights import bucket_metadata, bucket_parameters, broadcast_buckets, init_weight_update_group, tcp_store

CHECKPOINT_TAG = "deepspeed"  # engine.save_checkpoint(path, tag) writes path/deepspeed/...
REQUIRED_COLUMNS = ("prompt_ids", "completion_ids", "advantage")
LOSS_WEIGHT = "loss_weight"  # optional per-sequence weight w_i of algo.loss_weights (absent: all ones)


class LearnerError(RuntimeError):
    """A learner rank failed; the message names the rank and the call."""


# ----------------------------------------------------------------------------- config helpers
def rows_per_learner(cfg: Config) -> int:
    """Rollout rows each rank trains on per step."""
    return cfg.completions_per_step // cfg.learner.num_learners


def accumulation_steps(cfg: Config) -> int:
    """Micro-batches per rank per step: ``ceil(rows_per_learner / micro_batch_size)``."""
    return math.ceil(rows_per_learner(cfg) / cfg.learner.micro_batch_size)


def learner_threads(cfg: Config, placement: list[tuple[str, int]]) -> list[int]:
    """Torch threads per rank: ``learner.torch_threads``, or else each node's usable cores shared
    evenly by the ranks placed on it. ``placement`` is (node id, usable cores) per rank."""
    if cfg.learner.torch_threads is not None:
        return [cfg.learner.torch_threads] * len(placement)
    ranks_on = Counter(node for node, _ in placement)
    return [max(1, cores // ranks_on[node]) for node, cores in placement]


def check_rows(batch: pa.RecordBatch, cfg: Config, *, whole_step: bool = False) -> None:
    """Raise ValueError unless ``batch`` has the learner columns, finite advantages and the row
    count of one learner's shard (or of the whole step)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.schema.names]
    if missing:
        raise ValueError(f"rollout batch lacks columns {missing} (has {batch.schema.names})")
    expected = cfg.completions_per_step if whole_step else rows_per_learner(cfg)
    if batch.num_rows != expected:
        what = "per step" if whole_step else "per learner"
        raise ValueError(f"got {batch.num_rows} rows, expected {expected} {what} (rollout.prompts_per_step * "
                         f"algo.group_size{'' if whole_step else ' / learner.num_learners'}); the DeepSpeed "
                         f"accumulation steps are fixed at {accumulation_steps(cfg)}")
    bad = int((~np.isfinite(column_numpy(batch, "advantage"))).sum())
    if bad:
        raise ValueError(f"{bad} of {batch.num_rows} advantages are NaN or infinite")
    weights = column_numpy(batch, LOSS_WEIGHT) if LOSS_WEIGHT in batch.schema.names else np.zeros(0)
    if not (np.isfinite(weights) & (weights >= 0)).all():
        raise ValueError(f"{LOSS_WEIGHT} must be finite and >= 0")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step, as HF's ``get_{constant,cosine}_schedule_with_warmup``
    (linear warm-up from 0, then constant or cosine decay to 0 at ``total_steps``)."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config dict for ``cfg`` (fp32 on CPU; bf16 and optimizer offload need GPUs)."""
    lc = cfg.learner
    gpu = lc.gpus_per_learner > 0
    gas = accumulation_steps(cfg)
    zero: dict = {"stage": lc.zero_stage}
    if lc.offload_optimizer and gpu:  # on CPU the optimizer already lives on the host: ignored
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": lc.micro_batch_size * gas * lc.num_learners,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(lc.bf16 and gpu)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep the client torch AdamW even with offload
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _load_model(cfg: Config, model_path: str):
    """(model, tokenizer) in float32; DeepSpeed casts to bf16 itself when enabled."""
    return load_model_and_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code,
                                    dtype=torch.float32, allow_pickle=cfg.model.allow_pickle)


def _node_listener() -> socket.socket:
    """A socket listening on this node's IP at a free port, for a TCPStore to serve on: held from the moment
    the port is chosen, so no other process can take it before the store listens."""
    return socket.create_server((ray.util.get_node_ip_address(), 0), backlog=128)


# ----------------------------------------------------------------------------- the actor
class LearnerActor(KeepableRole):
    """One DeepSpeed engine on rank ``rank`` of ``world_size``. Create it with ``ray.remote``."""

    def __init__(self, cfg: Config, model_path: str, rank: int, world_size: int):
        gpu = cfg.learner.gpus_per_learner > 0
        os.environ["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"  # read when deepspeed is imported
        setup_actor_process(cfg.run.torch_threads, seed=cfg.run.seed)
        self.cfg, self.model_path = cfg, model_path
        self.rank, self.world_size = rank, world_size
        self.backend = "nccl" if gpu else "gloo"
        self.engine = None

    def master_address(self) -> tuple[str, int]:
        """(node IP, port) of the rendezvous store; called on rank 0, which holds the socket open
        (bound to the node IP only, and no race for the port between choosing and listening)."""
        self._listener = _node_listener()
        return self._listener.getsockname()[:2]

    def placement(self) -> tuple[str, int]:
        """(node id, usable cores): the fewer of the node's CPUs in Ray and this process's CPU affinity."""
        node = ray.get_runtime_context().get_node_id()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ray_cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
        return node, int(min(cores, ray_cpus or cores))

    def setup(self, master_addr: str, master_port: int, torch_threads: int) -> dict:
        """Join the process group, load the model(s) and build the DeepSpeed engine."""
        torch.set_num_threads(torch_threads)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")  # Ray shows each actor its own GPU
        import deepspeed  # only now: it reads DS_ACCELERATOR (set in __init__) when imported

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.backend == "gloo":
            # The shared-memory all-reduce op is only used for inference, never without LOCAL_SIZE;
            # skipping it avoids a ~30-50 s JIT compile (and a gcc dependency) at first start.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        else:
            torch.cuda.set_device(0)
        timeout = datetime.timedelta(seconds=self.cfg.learner.collective_timeout_s)
        # DeepSpeed builds its data-parallel groups with new_group(ranks), which ignores the world
        # group's timeout and takes torch's default (30 min gloo, 10 min NCCL): make that ours.
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        if torch.distributed.is_initialized():  # a kept learner (world size 1) keeps its group between runs
            if self.rank == 0:
                self._listener.close()
        else:  # env:// would make rank 0's store listen on every interface: it serves from our bound socket
            listen_fd = self._listener.detach() if self.rank == 0 else None
            store = tcp_store(master_addr, master_port, self.rank, self.world_size, timeout, listen_fd)
            torch.distributed.init_process_group(self.backend, store=store, rank=self.rank,
                                                 world_size=self.world_size, timeout=timeout)
        deepspeed.init_distributed(dist_backend=self.backend, timeout=timeout, verbose=False,
                                   auto_mpi_discovery=False)  # adopts the group above

        lc, algo = self.cfg.learner, self.cfg.algo
        model, self.tokenizer = _load_model(self.cfg, self.model_path)
        # train mode (HF checkpoints only then) with every dropout at 0: log-probs must match the sampler's
        prepare_for_training(model, lc.gradient_checkpointing)
        self.pad_id = self.tokenizer.pad_token_id
        optimizer = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=tuple(lc.betas),
                                      weight_decay=lc.weight_decay)
        warmup = math.ceil(lc.warmup_ratio * self.cfg.run.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(lc.lr_schedule, warmup, self.cfg.run.steps))
        # initialize imports DeepSpeed's Muon optimizer only to compare optimizer types, and that module wraps
        # functions in torch.compile, which imports torch's inductor: ~0.7 CPU-s and ~40 MB per learner for nothing
        # used here. torch.compile hands a function back as is while TORCHDYNAMO_DISABLE=1 (read at each call).
        with environment({"TORCHDYNAMO_DISABLE": "1"}):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=deepspeed_config(self.cfg))
        self.device = self.engine.device
        self.gas = accumulation_steps(self.cfg)
        self.estimator = get_estimator(algo.estimator)
        self.ref_model = None
        if algo.resolve("kl_beta") > 0:  # frozen initial policy for the grpo / dr_grpo KL term
            self.ref_model = _load_model(self.cfg, self.model_path)[0].to(self.device)
            self.ref_model.train(False).requires_grad_(False)
            if lc.bf16 and lc.gpus_per_learner > 0:
                self.ref_model.to(torch.bfloat16)
        return {"rank": self.rank, "torch_threads": torch.get_num_threads()}

    def _loss_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, micro: pa.RecordBatch,
                     temperature: float) -> dict:
        algo = self.cfg.algo
        kwargs = {}
        if LOSS_WEIGHT in micro.schema.names:  # per-sequence weights of algo.loss_agg
            kwargs["weights"] = torch.from_numpy(column_numpy(micro, LOSS_WEIGHT).astype(np.float32)).to(self.device)
        if self.estimator.loss is not grpo_loss:  # aapo / gpg take no more arguments
            return kwargs
        kwargs["clip_eps"] = algo.clip_eps
        if self.ref_model is not None:
            with torch.no_grad():
                kwargs.update(ref_logprobs=policy_logprobs(self.ref_model, input_ids, attention_mask, temperature,
                                                           self.cfg.learner.logprob_chunk_tokens),
                              kl_beta=algo.resolve("kl_beta"))
        return kwargs

    def train_step(self, batch: pa.RecordBatch, loss_denominator: float) -> dict[str, float]:
        """One optimizer step on this rank's rows; all ranks must call it together. Log-probs use the
        temperature the rows were sampled with (the batch's metadata)."""
        start = time.perf_counter()
        check_rows(batch, self.cfg)
        temperature = sampling_temperature(batch)
        if not loss_denominator > 0:
            raise ValueError(f"loss_denominator must be > 0, got {loss_denominator}")
        lr = float(self.engine.get_lr()[0])
        steps_before = self.engine.global_steps
        mbs, scale = self.cfg.learner.micro_batch_size, self.world_size * self.gas
        loss_sum, tokens, grad_norm = 0.0, 0, None
        for first in range(0, batch.num_rows, mbs):
            micro = batch.slice(first, mbs)
            t = padded_tensors(micro, self.pad_id)
            ids, attn = t["input_ids"].to(self.device), t["attention_mask"].to(self.device)
            mask = t["completion_mask"][:, 1:].to(self.device)
            adv = torch.from_numpy(column_numpy(micro, "advantage").astype(np.float32)).to(self.device)
            # the LM head in chunks: no [tokens x vocabulary] float32 logits for the whole micro-batch
            logprobs = policy_logprobs(self.engine, ids, attn, temperature, self.cfg.learner.logprob_chunk_tokens)
            loss = self.estimator.loss(logprobs, mask, adv, num_tokens=float(loss_denominator),
                                       **self._loss_kwargs(ids, attn, micro, temperature))
            self.engine.backward(loss * scale)
            if self.cfg.learner.zero_stage == 0 and first + mbs >= batch.num_rows:
                grad_norm = self._reduced_grad_norm()  # DeepSpeed reports none without ZeRO
            self.engine.step()
            loss_sum += loss.item()
            tokens += int(mask.sum().item())
        if self.engine.global_steps != steps_before + 1:
            raise RuntimeError(f"DeepSpeed took {self.engine.global_steps - steps_before} optimizer steps "
                               f"for {self.gas} micro-batches; expected exactly 1")
        if self.cfg.learner.zero_stage:
            grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss_sum,
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "lr": lr,
            "tokens": float(tokens),
            "step_s": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def _reduced_grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.stack(grads).norm().item() if grads else 0.0

    def export_weights(self, bucket_mb: float) -> list[ray.ObjectRef]:
        """Full parameters in flat per-dtype buckets, each ``ray.put`` (call on rank 0)."""
        buckets = bucket_parameters(self.engine.module.named_parameters(), bucket_mb)
        return [ray.put(b) for b in buckets]

    def weight_metadata(self, bucket_mb: float) -> list[tuple[list, list, list]]:
        """``(names, dtypes, shapes)`` per bucket, for generators that receive a broadcast (rank 0)."""
        return bucket_metadata(self.engine.module.named_parameters(), bucket_mb)

    def weight_group_address(self) -> tuple[str, int]:
        """(node IP, port) for the weight-update group's store; rank 0 listens there from now on, so the
        port cannot be taken before :meth:`init_weight_group` serves on it."""
        self._weight_listener = _node_listener()
        return self._weight_listener.getsockname()[:2]

    def init_weight_group(self, world_size: int, group_name: str) -> None:
        """Rank 0 of the weight-update group the generator engines join (ranks 1..world_size-1), served
        on :meth:`weight_group_address`'s socket."""
        host, port = self._weight_listener.getsockname()[:2]
        self._weight_group = init_weight_update_group(host, port, 0, world_size, group_name, self.backend,
                                                      listen_fd=self._weight_listener.detach())

    def broadcast_weights(self, bucket_mb: float) -> int:
        """Send every parameter to the engines of the weight-update group (rank 0; they receive)."""
        return broadcast_buckets(self.engine.module.named_parameters(), bucket_mb, self._weight_group)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 CPU logits of the current weights (for checking a weight sync)."""
        with torch.no_grad():
            return self.engine.module(input_ids=input_ids.to(self.device)).logits.float().cpu()

    def save_checkpoint(self, path: str) -> None:
        """Model, optimizer and LR scheduler state into ``path`` (every rank writes its part)."""
        self.engine.save_checkpoint(path, tag=CHECKPOINT_TAG)

    def load_checkpoint(self, path: str) -> None:
        if not os.path.isdir(os.path.join(path, CHECKPOINT_TAG)):  # before any collective
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {os.path.join(path, CHECKPOINT_TAG)}")
        load_path, _ = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {path}/{CHECKPOINT_TAG}")

    def close(self) -> None:  # before a kept learner builds the next run's engine
        self.engine = self.ref_model = None
        gc.collect()

    def save_hf(self, path: str) -> None:
        """Weights (safetensors) and tokenizer as a Hugging Face directory (call on rank 0)."""
        self.engine.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- the group
class LearnerGroup:
    """Driver-side handle on ``cfg.learner.num_learners`` learner ranks."""

    def __init__(self, cfg: Config, model_path: str, *, source=None):
        """Start the ranks and build their engines. ``source``: where a single learner (world size 1) comes
        from (:mod:`aapo_ray.actor_sources`: kept loaded by earlier runs, or in the co-located roles' process);
        it is handed back at :meth:`shutdown`. Larger groups always start fresh processes (their process group
        is formed anew each run)."""
        lc = cfg.learner
        self.cfg, self.world_size = cfg, lc.num_learners
        self.source = source if source and self.world_size == 1 else FreshActors()
        options = dict(num_cpus=lc.cpus_per_learner, num_gpus=lc.gpus_per_learner,
                       resources=cfg.ray.role_resources.get("learner") or None, max_restarts=0, max_task_retries=0)
        self.actors = [self.source.start(LearnerActor, options, (cfg, model_path, r, self.world_size), role="learner",
                                         index=r) for r in range(self.world_size)]
        try:  # all processes up first, so that the rendezvous does not wait on a slow start
            placement = self._gather("start", [a.placement.remote() for a in self.actors])
            shared = isinstance(self.source, CoLocated)  # other roles' threads share its math libraries' pools
            threads = [lc.torch_threads or cfg.run.torch_threads] if shared else learner_threads(cfg, placement)
            addr, port = self._gather("master_address", [self.actors[0].master_address.remote()])[0]
            setup = self._gather("setup", [a.setup.remote(addr, port, t) for a, t in zip(self.actors, threads)])
            self.torch_threads = [m["torch_threads"] for m in setup]
        except BaseException:
            self.kill()
            raise

    def _gather(self, what: str, refs: list) -> list:
        """Results in rank order; the first failure raises :class:`LearnerError` naming its rank."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results = [None] * len(refs)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - re-raised with the rank
                cause = getattr(exc, "cause", None) or exc  # the actor's own exception, not Ray's wrapper
                raise LearnerError(f"learner rank {rank} of {self.world_size} failed in {what}: "
                                   f"{type(cause).__name__}: {cause}") from exc
        return results

    def _call(self, method: str, *args) -> list:
        return self._gather(method, [getattr(a, method).remote(*args) for a in self.actors])

    def train_step(self, batch: pa.RecordBatch, loss_denominator: float) -> dict[str, float]:
        """One step on the whole batch (:func:`aapo_ray.rollout.learner_batch`), split into equal contiguous
        shards in rank order; each shard goes into the object store once, for its rank."""
        try:  # checked here too, so that bad data never reaches only some ranks
            shards = shard(batch, self.world_size)
            check_rows(batch, self.cfg, whole_step=True)
        except ValueError as exc:
            raise ValueError(f"learner.num_learners={self.world_size}: {exc}") from None
        refs = [a.train_step.remote(ray.put(s), loss_denominator) for a, s in zip(self.actors, shards)]
        per_rank = self._gather("train_step", refs)
        return {
            "loss": sum(m["loss"] for m in per_rank),  # the full-batch loss
            "grad_norm": per_rank[0]["grad_norm"],  # global norm, equal on every rank
            "lr": per_rank[0]["lr"],
            "tokens": sum(m["tokens"] for m in per_rank),
            "step_s": max(m["step_s"] for m in per_rank),
            "peak_rss_mb": max(m["peak_rss_mb"] for m in per_rank),
            "torch_threads": float(min(self.torch_threads)),
        }

    def export_weights(self, bucket_mb: float | None = None) -> list[ray.ObjectRef]:
        """Waits for rank 0's export; returns handles to its parameter buckets in the object store
        (for :func:`aapo_ray.weights.load_weight_buckets`)."""
        mb = self.cfg.learner.sync_bucket_mb if bucket_mb is None else bucket_mb
        return self._gather("export_weights", [self.actors[0].export_weights.remote(mb)])[0]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._gather("logits", [self.actors[0].logits.remote(input_ids)])[0]

    def rank0(self):
        """Rank 0's actor handle (it exports and broadcasts the weights)."""
        return self.actors[0]

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint of every rank into ``path`` (a shared file system across nodes)."""
        self._call("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self._call("load_checkpoint", path)

    def save_hf(self, path: str) -> None:
        self._gather("save_hf", [self.actors[0].save_hf.remote(path)])

    def shutdown(self) -> None:
        """Hand the ranks back to their source (fresh ones are killed, a kept learner stays loaded)."""
        self.source.release(self.actors)
        self.actors = []

    def kill(self) -> None:
        """Kill the ranks, kept or not (after a failure their state is unknown)."""
        self.source.forget(self.actors)
        self.actors = []

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
