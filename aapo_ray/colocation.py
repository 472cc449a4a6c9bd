"""Co-located roles (``ray.colocate``): the run's CPU roles share two actor processes (``split``, the default
on a laptop) or one (``one``) instead of one process each (``off``).

Every process of a role imports torch and transformers (the learner DeepSpeed too) before it loads a model:
~0.5 GB resident and seconds of start-up each. A shared process pays that once. Roles that work at the same
time go to different processes, so that they still use two cores between them: with ``split`` the policy
generators and the reward scorers share a :class:`SamplingHost`, the learner and the reference generators a
:class:`LearningHost` (the policy samples while the reference does, and, with ``rollout.overlap``, while
the learner trains). ``one`` puts all of them in one :class:`RoleHost`: least memory, but roles then take
turns at one interpreter lock, which costs a model as small as the embedded default ~10-15% per step.

The roles keep their Ray interface: :class:`CoLocated` is an actor source (:mod:`aapo_ray.actor_sources`)
whose handles (:class:`HostedRole`) take ``handle.method.remote(...)`` and ``.options(num_returns=...)``
like actor handles. Each role runs in a concurrency group, i.e. a thread, of its own: roles of one process
work at the same time (torch releases the GIL in its kernels) and each role's calls stay one at a time.
Roles in a shared process run torch on ``run.torch_threads`` threads (the learner too, unless
``learner.torch_threads`` is set): a thread count set by one role would otherwise apply to the others' math
libraries as well. Sampling draws from per-row generators (:class:`aapo_ray.backends.RowSeededSampler`),
never torch's global one, so roles sampling at once do not change each other's draws: a co-located run
gives the same results as a run of separate actors.

What it costs: roles share their process's fate. If it dies, its roles die with it; the run starts a new one
and continues as after any actor failure (the learners from the last checkpoint). Chosen automatically
(``split``) for a run on a local cluster of its own with CPU roles only and one learner; ``ray.colocate=off``
gives one process per role (per-role restarts and ``ray::`` process titles).
"""

from __future__ import annotations

import logging

import ray

from aapo_ray import import_gc
from aapo_ray.config import Config, ConfigError
from aapo_ray.launch import cluster_address

log = logging.getLogger(__name__)

# which process each role goes to, per ray.colocate mode: roles that run at the same time are apart
PROCESS_OF = {"split": {"policy": 0, "scorer": 0, "learner": 1, "reference": 1},
              "one": {"policy": 0, "scorer": 0, "learner": 0, "reference": 0}}


class RoleHost:
    """An actor process of co-located roles; ``call`` runs one role's method in that role's thread."""

    def __init__(self):
        # the roles' classes arrive with the first ``add`` calls, whose arguments import torch, transformers (and
        # DeepSpeed) before ``add`` runs: without the garbage collector (aapo_ray.import_gc), back on in ``add``
        import_gc.pause_for_imports()
        self.roles: dict[str, object] = {}
        self.start_errors: dict[str, BaseException] = {}

    def ping(self) -> bool:
        return True

    def add(self, key: str, actor_class: type, args: tuple) -> None:
        """Build a role (``actor_class(*args)``) under ``key``, replacing (and closing) any earlier one. If
        that raises, the role's calls raise the same error (as an actor whose ``__init__`` failed)."""
        import_gc.imports_done()  # before the role builds its models: their garbage is collected as usual
        self.drop(key)
        try:
            self.roles[key] = actor_class(*args)
        except BaseException as exc:
            self.start_errors[key] = exc
            raise

    def call(self, key: str, method: str, *args, **kwargs):
        if key in self.start_errors:
            raise self.start_errors[key]
        if key not in self.roles:
            raise RuntimeError(f"co-located role {key} is not running in this process (it was released)")
        return getattr(self.roles[key], method)(*args, **kwargs)

    def drop(self, key: str) -> None:
        """Close and forget a role (its models are freed)."""
        self.start_errors.pop(key, None)
        role = self.roles.pop(key, None)
        if role is not None and hasattr(role, "close"):
            role.close()


class SamplingHost(RoleHost):
    """``split``'s process of the policy generators and the reward scorers (``ray::SamplingHost``)."""


class LearningHost(RoleHost):
    """``split``'s process of the learner and the reference generators (``ray::LearningHost``)."""


HOST_CLASSES = {"split": (SamplingHost, LearningHost), "one": (RoleHost,)}


class HostedRole:
    """An actor-handle look-alike for one role in a :class:`RoleHost` (``handle.method.remote(*args)``)."""

    def __init__(self, host, key: str):
        self.host, self.key = host, key

    def __getattr__(self, method: str) -> "_HostedMethod":
        if method.startswith("_"):
            raise AttributeError(method)
        return _HostedMethod(self, method, {})

    def __repr__(self) -> str:
        return f"HostedRole({self.key})"


class _HostedMethod:
    def __init__(self, role: HostedRole, method: str, options: dict):
        self.role, self.method, self.call_options = role, method, options

    def options(self, **options) -> "_HostedMethod":
        return _HostedMethod(self.role, self.method, {**self.call_options, **options})

    def remote(self, *args, **kwargs):
        call = self.role.host.call.options(concurrency_group=self.role.key, **self.call_options)
        return call.remote(self.role.key, self.method, *args, **kwargs)


def colocate_mode(cfg: Config) -> str:
    """``"off"``, ``"split"`` or ``"one"``: ``ray.colocate``, or when unset ``split`` for a run on a local
    cluster of its own whose roles are CPU roles with one learner (the embedded default's shape)."""
    if cfg.ray.colocate is not None:
        return cfg.ray.colocate
    own_cluster = cluster_address(cfg.ray.address) is None
    return "split" if own_cluster and not colocate_refusal(cfg) else "off"


def colocate_refusal(cfg: Config) -> str | None:
    """Why this config's roles cannot share processes (``None``: they can)."""
    roll, learn = cfg.rollout, cfg.learner
    if roll.gpus_per_replica > 0 or learn.gpus_per_learner > 0:
        return "GPU roles each need a GPU process of their own (SGLang engines, CUDA learners)"
    if learn.num_learners > 1:
        return f"learner.num_learners={learn.num_learners}: each rank is a process of its own in the gloo group"
    if cfg.ray.keep_roles:
        return "ray.keep_roles keeps one actor per role loaded between runs"
    if cfg.ray.role_resources:
        return "ray.role_resources places each role on resources of its own"
    return None


def check_colocate(cfg: Config) -> None:
    """Refuse ``ray.colocate`` split / one where the roles cannot share processes (before any actor starts)."""
    why = colocate_refusal(cfg) if cfg.ray.colocate not in (None, "off") else None
    if why:
        raise ConfigError(f"invalid config:\n  ray.colocate={cfg.ray.colocate}: {why}; set ray.colocate=off "
                          f"(or leave it unset: chosen automatically)")


def role_cpus(cfg: Config, reference: bool) -> dict[str, float]:
    """CPUs each role's actors hold in all (``reference``: whether the run samples an online reference); a
    co-located process asks Ray for those of its roles."""
    roll, rew, learn = cfg.rollout, cfg.reward, cfg.learner
    return {"policy": roll.policy_replicas * roll.cpus_per_replica, "scorer": rew.num_scorers * rew.cpus_per_scorer,
            "learner": learn.num_learners * learn.cpus_per_learner,
            "reference": roll.reference_replicas * roll.cpus_per_replica if reference else 0.0}


class CoLocated:
    """The actor source of a co-located run (``mode`` ``split`` or ``one``); ``reference``: whether the run
    samples an online reference. Each process asks Ray for the CPUs of the roles it holds."""

    reused = 0

    def __init__(self, cfg: Config, mode: str, *, reference: bool):
        self.process_of = PROCESS_OF[mode]
        roll = cfg.rollout
        counts = {"policy": roll.policy_replicas, "reference": roll.reference_replicas if reference else 0,
                  "scorer": cfg.reward.num_scorers, "learner": 1}
        cpus = role_cpus(cfg, reference)
        self.specs = []  # per process: (actor class, its roles' slots, CPUs)
        for index, host_class in enumerate(HOST_CLASSES[mode]):
            roles = [r for r, i in self.process_of.items() if i == index]
            slots = [f"{r}/{k}" for r in roles for k in range(counts[r])]
            self.specs.append((host_class, slots, sum(cpus[r] for r in roles)))
        self.hosts = [self._new_host(i) for i in range(len(self.specs))]
        self.live: set[str] = set()  # roles started and not released
        self.ever: set[str] = set()  # roles ever started (a second start replaces one after a failure)

    def _new_host(self, index: int):
        host_class, slots, cpus = self.specs[index]
        return ray.remote(concurrency_groups={s: 1 for s in slots})(host_class).options(
            num_cpus=cpus, max_restarts=0, max_task_retries=0).remote()

    def start(self, actor_class: type, options: dict, args: tuple, role: str,  # noqa: ARG002 - see CoLocated
              index: int = 0) -> HostedRole:
        """``actor_class(*args)`` as ``role``'s ``index``-th instance (replica, rank, scorer); replacing one (after
        a failure) first makes sure its process is alive, and starts a new process if it died."""
        host, key = self.process_of[role], f"{role}/{index}"
        if key not in self.specs[host][1]:
            raise ValueError(f"a co-located run has no slot {key} (slots: {self.specs[host][1]})")
        if key in self.ever:
            self._revive(host)
        self.ever.add(key)
        self.live.add(key)
        self.hosts[host].add.options(concurrency_group=key).remote(key, actor_class, args)
        return HostedRole(self.hosts[host], key)

    def _revive(self, index: int) -> None:
        try:
            ray.get(self.hosts[index].ping.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            log.warning("a co-located roles' process died; starting a new one")
            ray.kill(self.hosts[index])
            self.hosts[index] = self._new_host(index)

    def ensure(self, handle, args: tuple, timeout_s: float = 300.0) -> bool:  # noqa: ARG002
        return False  # a host never restarts by itself: a dead one is replaced in start()

    def release(self, handles: list) -> None:
        """Close these roles; a process ends with its last role."""
        for handle in handles:
            self.live.discard(handle.key)
            if handle.host in self.hosts:
                try:
                    ray.get(handle.host.drop.options(concurrency_group=handle.key).remote(handle.key), timeout=60)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # dead or stuck: killed with its process
        for index, (_, slots, _) in enumerate(self.specs):
            if not self.live.intersection(slots):
                ray.kill(self.hosts[index])

    def forget(self, handles: list) -> None:
        self.release(handles)
