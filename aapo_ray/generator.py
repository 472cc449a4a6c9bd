"""Policy generators: Ray actors that sample completions and return Arrow rollout batches.

A :class:`GeneratorPool` owns ``replicas`` :class:`GeneratorActor` s, spreads a step's prompt
groups over them, and pushes new weights to every replica after each learner update. The
frozen reference pool (:mod:`aapo_ray.reference`) is the same actor that never takes weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from aapo_ray.backends import make_backend, sample_rows
from aapo_ray.config import Config
from aapo_ray.actor_sources import FreshActors
from aapo_ray.kept_roles import KeepableRole
from aapo_ray.actor_process import setup_actor_process
from aapo_ray.rollout import make_rollout_batch
from aapo_ray.sampling import SamplingParams, chunk_seed, engine_seed

FROZEN = "the reference pool is frozen: it never takes weights (AAPO spec section 1)"


class GeneratorActor(KeepableRole):
    """One generation replica (hf or sglang backend) holding a versioned copy of the weights."""

    def __init__(self, cfg: Config, model_path: str, role: str, replica: int):
        setup_actor_process(cfg.run.torch_threads)
        self.role, self.replica = role, replica
        self.backend = make_backend(
            cfg.rollout.backend, model_path, trust_remote_code=cfg.model.trust_remote_code,
            dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle,
            batch_size=cfg.rollout.generation_batch_size, mem_fraction=cfg.rollout.sglang_mem_fraction,
            seed=engine_seed(cfg.run.seed, role, replica), deterministic=cfg.rollout.sglang_deterministic)
        self.weight_version = 0

    def ready(self) -> dict:
        return {"role": self.role, "replica": self.replica, "version": self.weight_version}

    def generate(self, prompts: pa.RecordBatch, first_group: int, n: int, params: SamplingParams) -> pa.RecordBatch:
        """``n`` samples for every prompt row; rows ordered (group, sample)."""
        start = time.perf_counter()
        prompt_lists = prompts.column("prompt_ids").to_pylist()
        repeated = [p for p in prompt_lists for _ in range(n)]
        out = sample_rows(self.backend, repeated, params)  # a generator per row, never torch's global one
        rows = np.repeat(np.arange(prompts.num_rows), n)
        batch = make_rollout_batch(
            prompt_ids=repeated, completion_ids=out.token_ids,
            prompt_id=prompts.column("prompt_id").to_numpy()[rows],
            group_index=rows + first_group, sample_index=np.tile(np.arange(n), prompts.num_rows),
            prompt=prompts.column("prompt").take(pa.array(rows)).to_pylist(),
            completion=out.texts, gold=prompts.column("gold").take(pa.array(rows)).to_pylist(),
            finish_reason=out.finish_reasons, weight_version=self.weight_version)
        elapsed = time.perf_counter() - start  # the metadata travels with the batch to the learners
        return batch.replace_schema_metadata({"generate_s": str(elapsed), "temperature": str(params.temperature)})

    def update_weights(self, buckets: list, version: int) -> int:
        """Copy learner weights (bucket ObjectRefs, resolved here) into the backend."""
        self._check_takes_weights()
        buckets = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in buckets]
        loaded = self.backend.load_weights(buckets)
        self.weight_version = version
        return loaded

    def join_weight_group(self, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                          backend: str) -> None:
        """Join learner rank 0's weight-update group as ``rank`` (sglang backend)."""
        self.backend.init_weight_group(master_address, master_port, rank, world_size, group_name, backend)

    def receive_weights(self, metadata: list, group_name: str, version: int) -> int:
        """Receive rank 0's broadcast of ``metadata``'s buckets; the version advances only if all loaded."""
        self._check_takes_weights()
        loaded = self.backend.load_weights_broadcast(metadata, group_name)
        self.weight_version = version
        return loaded

    def _check_takes_weights(self) -> None:
        if self.role == "reference":
            raise RuntimeError(FROZEN)

    def logits(self, input_ids):
        return self.backend.logits(input_ids)

    def close(self) -> None:  # before a kept actor loads the next run's model
        if hasattr(self.backend, "shutdown"):  # an SGLang engine and its thread
            self.backend.shutdown()
        self.backend = None


@dataclass
class Chunk:
    """A contiguous run of prompt groups sampled by one call (retried as a unit on failure)."""

    prompts: pa.RecordBatch
    first_group: int
    n: int
    params: SamplingParams


class GeneratorPool:
    """Driver-side handle on ``replicas`` generator actors of one role.

    Replicas are Ray-restarted if their process dies; :meth:`heal` then pushes the latest
    weights to any replica whose version is behind, so a retried chunk is sampled by the
    same policy as the rest of the step.
    """

    role = "policy"
    actor_class = GeneratorActor  # its name is the actor processes' title (ray::GeneratorActor)

    def __init__(self, cfg: Config, model_path: str, replicas: int | None = None, *, wait: bool = True,
                 source=None):
        """Start the replicas; ``wait=False`` returns at once (call :meth:`wait_ready` before use), so that
        the driver starts every role concurrently. ``source``: where the actors come from (default: fresh
        processes; :mod:`aapo_ray.actor_sources`); they are handed back to it at :meth:`shutdown`."""
        self.cfg, self.model_path, self.source = cfg, model_path, source or FreshActors()
        self._latest: tuple[list | None, int] = ([], 0)  # (weight bucket refs, version) last pushed; None: broadcast
        self.broadcast_group = False  # the replicas joined learner rank 0's weight-update group (aapo_ray.weight_sync)
        self.restarted_replicas = 0  # replicas found behind the latest weights (Ray restarted them)
        self._turn = itertools.count()
        self.actors = [self._new_actor(i) for i in range(replicas or cfg.rollout.policy_replicas)]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every replica has loaded its model (an actor's start-up error is raised here)."""
        ray.get([a.ready.remote() for a in self.actors])

    def _new_actor(self, replica: int):
        roll = self.cfg.rollout
        resources = self.cfg.ray.role_resources.get(self.role, {})
        options = dict(num_cpus=roll.cpus_per_replica, num_gpus=roll.gpus_per_replica, resources=resources or None,
                       max_restarts=3, max_task_retries=0)
        return self.source.start(self.actor_class, options, (self.cfg, self.model_path, self.role, replica),
                                 role=self.role, index=replica)

    def sampling(self, seed: int, *, temperature: float | None = None, top_p: float | None = None) -> SamplingParams:
        roll = self.cfg.rollout
        return SamplingParams(temperature=roll.temperature if temperature is None else temperature,
                              top_p=roll.top_p if top_p is None else top_p, max_new_tokens=roll.max_new_tokens,
                              seed=seed)

    def chunks(self, prompts: pa.RecordBatch, n: int, params: SamplingParams) -> list[Chunk]:
        """One chunk of contiguous groups per replica, each with its own derived seed."""
        out = []
        for i, rows in enumerate(np.array_split(np.arange(prompts.num_rows), len(self.actors))):
            if len(rows):
                out.append(Chunk(prompts.slice(int(rows[0]), len(rows)), int(rows[0]), n,
                                 dataclasses.replace(params, seed=chunk_seed(params.seed, i))))
        return out

    def async_submit(self, chunk: Chunk, replica: int | None = None) -> ray.ObjectRef:
        """Sample one chunk; ``replica=None`` picks the next replica in turn."""
        actor = self.actors[next(self._turn) % len(self.actors) if replica is None else replica]
        return actor.generate.remote(chunk.prompts, chunk.first_group, chunk.n, chunk.params)

    def async_generate(self, prompts: pa.RecordBatch, n: int, params: SamplingParams) -> list[ray.ObjectRef]:
        """Spread prompt groups over replicas in contiguous chunks; refs come back in group order."""
        return [self.async_submit(c, i) for i, c in enumerate(self.chunks(prompts, n, params))]

    def update_weights(self, buckets: list[ray.ObjectRef], version: int) -> None:
        self._latest = (buckets, version)
        try:
            ray.get([a.update_weights.remote(buckets, version) for a in self.actors])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self.heal()  # a replica died: once restarted it takes these weights

    def mark_synced(self, version: int) -> None:
        """Every replica received ``version`` by broadcast (no buckets in the object store to re-push)."""
        self._latest = (None, version)

    def heal(self, timeout_s: float = 300.0) -> int:
        """Make every replica usable with the latest weights; returns how many needed it."""
        healed = 0
        buckets, version = self._latest
        for i, actor in enumerate(self.actors):
            try:
                current = ray.get(actor.ready.remote(), timeout=timeout_s)["version"]
            except ray.exceptions.RayActorError:  # out of restarts: start a fresh one
                self.actors[i] = actor = self._new_actor(i)
                current = ray.get(actor.ready.remote(), timeout=timeout_s)["version"]
            if self.source.ensure(actor, (self.cfg, self.model_path, self.role, i), timeout_s):
                current = 0  # re-initialised with this run's model: the initial weights
            if current != version:  # restarted with the initial weights (never true for the reference)
                if buckets is None:
                    raise RuntimeError(f"{self.role} replica {i} restarted while weights travel by broadcast "
                                       "(rollout.weight_sync=nccl): its weight-update group cannot be re-formed; "
                                       "resume the run (aapo train --resume RUN_DIR)")
                ray.get(actor.update_weights.remote(buckets, version))
                healed += 1
        self.restarted_replicas += healed
        return healed

    @property
    def version(self) -> int:
        """The weight version every replica should be sampling with."""
        return self._latest[1]

    def shutdown(self) -> None:
        """Hand the replicas back to their source (fresh ones are killed, kept ones stay loaded)."""
        self.source.release(self.actors)
        self.actors = []
