"""Roles kept loaded between runs on a cluster that outlives them (``ray.keep_roles``).

A run's fixed cost is mostly its actors' start: a fresh process per role that imports torch and
transformers (the learners DeepSpeed) before it loads a model. With ``ray.keep_roles`` the pools take
*detached, named* actors instead and, at the end of the run, hand them back loaded. The next run on
the same cluster claims them, and each re-runs its own ``__init__`` with the new run's arguments in
the process it already has (:meth:`KeepableRole.reinit`): same code path as a fresh actor, without
the process start and the imports.

Who holds an actor: a *lease token*, an object the run's driver put into the object store. A run
that ended handed its actors back; a run that died left a token whose owner is gone, which Ray
reports as ``OwnerDiedError`` (within ~5 s of a killed driver), so its actors are free again without any
clean-up. Idle kept actors hold their CPUs / GPUs: a run that needs them for actors of another shape kills
idle ones first. Their logs stay with the run that started them. Names carry a
fingerprint of this package's source and of the actor's resource options, so a changed checkout
never claims actors running older code; such stale, unclaimed actors are killed when found.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import uuid
from pathlib import Path

import ray

log = logging.getLogger(__name__)

PREFIX = "aapo-kept"
CLAIM_TIMEOUT_S = 10.0  # an actor busy for longer (a live run's long call) counts as taken


def code_fingerprint() -> str:
    """Hash of this package's Python source: actors are only reused by runs of the same code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class KeepableRole:
    """Mixin of every role actor class: claim, re-initialise in place, hand back."""

    _lease: list | None = None  # [ObjectRef] of the run holding this actor
    _leased_before = False

    def claim(self, token: list) -> str:
        """``"fresh"`` (never leased), ``"reuse"`` (handed back, or its run died) or ``"busy"``;
        on anything but ``"busy"`` the actor now belongs to ``token``'s run."""
        if self._lease is not None:
            try:
                ray.get(self._lease[0], timeout=CLAIM_TIMEOUT_S)
                return "busy"
            except ray.exceptions.ObjectLostError:  # OwnerDiedError among them: that run's driver is gone
                log.info("taking over an actor whose run ended without handing it back")
            except ray.exceptions.GetTimeoutError:
                return "busy"
        state = "reuse" if self._leased_before else "fresh"
        self._lease, self._leased_before = token, True
        return state

    def holds(self, token: list) -> bool:
        """Whether ``token``'s run holds this actor (False after Ray restarted it: the lease is lost)."""
        return self._lease is not None and self._lease[0] == token[0]

    def reinit(self, *args) -> None:
        """Run ``__init__`` again with a new run's arguments, in this process."""
        self.close()
        self.__init__(*args)

    def release(self) -> None:
        """Hand the actor back, loaded, for the next run."""
        self._lease = None

    def close(self) -> None:
        """Free what ``__init__`` built before it runs again (override where that holds processes)."""


def _shape(code: str, actor_class: type, options: dict) -> str:
    blob = json.dumps([code, actor_class.__qualname__, options], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class KeptRoles:
    """One run's lease on kept actors. :meth:`start` stands in for ``ray.remote(cls).options(...).remote(...)``;
    :meth:`release` hands the run's actors back (the driver calls it on the way out)."""

    def __init__(self):
        self.token = [ray.put(uuid.uuid4().hex)]  # in a list so that Ray passes the ref, not its value
        self.code = code_fingerprint()
        self.held: list = []
        self.reused = 0
        self._kill_stale()

    def start(self, actor_class: type, options: dict, args: tuple, role: str, index: int = 0):  # noqa: ARG002
        """A handle on a claimed actor of ``actor_class`` initialised with ``args`` (the reuse's
        re-initialisation is queued, so the call does not wait for a model to load). Any free kept actor of
        the role serves, whatever ``index``."""
        shape = _shape(self.code, actor_class, options)
        for slot in itertools.count():
            name = f"{PREFIX}/{role}/{self.code}/{shape}/{slot}"
            try:
                handle = ray.get_actor(name)
            except ValueError:  # no such actor yet: start it, detached, under that name
                self._make_room(options, shape)
                try:
                    handle = ray.remote(actor_class).options(**options, name=name, lifetime="detached").remote(*args)
                except ValueError:  # another run took the name in between
                    continue
                handle.claim.remote(self.token)  # queued behind __init__; the name is ours
                self.held.append(handle)
                return handle
            if self._claim(handle) == "busy":
                continue
            handle.reinit.remote(*args)
            self.reused += 1
            self.held.append(handle)
            return handle

    def ensure(self, handle, args: tuple, timeout_s: float = 300.0) -> bool:
        """After a fault: if Ray restarted ``handle`` (its ``__init__`` re-ran with the arguments it was
        created with, perhaps by another run, and its lease is gone), claim it again and re-initialise it
        with this run's ``args``. Returns whether it had to."""
        if ray.get(handle.holds.remote(self.token), timeout=timeout_s):
            return False
        self._claim(handle)
        ray.get(handle.reinit.remote(*args), timeout=timeout_s)
        return True

    def _claim(self, handle) -> str:
        try:
            return ray.get(handle.claim.remote(self.token), timeout=CLAIM_TIMEOUT_S + 5)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return "busy"

    def forget(self, handles: list) -> None:
        """Kill ``handles`` (failed or in an unknown state): they are never handed back."""
        for handle in handles:
            ray.kill(handle)
            if handle in self.held:
                self.held.remove(handle)

    def release(self, handles: list | None = None) -> None:
        """Hand ``handles`` (default: all this run holds) back loaded; dead ones are skipped."""
        handles = list(self.held if handles is None else handles)
        refs = [h.release.remote() for h in handles]
        for ref in refs:
            try:
                ray.get(ref, timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # a dead actor holds nothing; a stuck one is free once this driver exits
        self.held = [h for h in self.held if h not in handles]

    def _kill_idle(self, doomed) -> None:
        """Kill every kept actor whose name ``doomed(parts)`` selects and that no live run holds."""
        for name in kept_actor_names():
            parts = name.split("/")
            if len(parts) != 5 or not doomed(parts):
                continue
            try:
                handle = ray.get_actor(name)
            except ValueError:
                continue
            if handle not in self.held and self._claim(handle) != "busy":
                ray.kill(handle)
                log.info("killed idle kept actor %s", name)

    def _kill_stale(self) -> None:
        """Kill idle kept actors of other code versions: no run of this code can claim them."""
        self._kill_idle(lambda parts: parts[2] != self.code)

    def _make_room(self, options: dict, shape: str) -> None:
        """Before a new actor starts: if the cluster lacks the CPUs / GPUs it asks for, free those that
        idle kept actors of other shapes hold (they would otherwise hold them for good)."""
        if not _fits({"CPU": options.get("num_cpus") or 0, "GPU": options.get("num_gpus") or 0}):
            self._kill_idle(lambda parts: parts[3] != shape)


def kept_actor_names() -> list[str]:
    """Names of the kept actors in this namespace (held or idle, any code version)."""
    names = (e if isinstance(e, str) else e["name"] for e in ray.util.list_named_actors(all_namespaces=False))
    return sorted(n for n in names if n.startswith(PREFIX + "/"))


def _fits(need: dict[str, float]) -> bool:
    free = ray.available_resources()
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def make_room(need: dict[str, float]) -> None:
    """Before a run without ``ray.keep_roles`` starts its actors: if the cluster lacks ``need`` (e.g.
    ``{"CPU": 1.75, "GPU": 0}``) and idle kept actors are what holds it, kill those (a run that does not
    keep roles would otherwise wait for their CPUs / GPUs for good)."""
    if kept_actor_names() and not _fits(need):
        KeptRoles()._kill_idle(lambda parts: True)
