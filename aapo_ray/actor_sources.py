"""Where a run's role actors come from. The pools (:mod:`aapo_ray.generator`, :mod:`aapo_ray.scorer`) and
the learner group ask their *source* for actors and hand them back to it, whichever source it is:

- :class:`FreshActors` (this module): a new Ray actor process per role, killed at the end;
- :class:`aapo_ray.kept_roles.KeptRoles`: actors that earlier runs kept loaded (``ray.keep_roles``);
- :class:`aapo_ray.colocation.CoLocated`: roles in shared processes (``ray.colocate``).

A source has ``start(actor_class, options, args, role, index)`` (stands in for
``ray.remote(actor_class).options(**options).remote(*args)``; ``index``: which of the role's actors, e.g.
the replica or the rank), ``ensure(handle, args, timeout_s)`` (after a
fault: re-initialise a handle Ray restarted with another run's arguments; returns whether it had to),
``release(handles)`` (the run is done with them), ``forget(handles)`` (they failed: never reuse) and
``reused`` (how many actors it did not have to start).
"""

from __future__ import annotations

import ray


class FreshActors:
    """One new actor process per role; ``release`` and ``forget`` kill it."""

    reused = 0

    def start(self, actor_class: type, options: dict, args: tuple, role: str, index: int = 0):  # noqa: ARG002
        return ray.remote(actor_class).options(**options).remote(*args)

    def ensure(self, handle, args: tuple, timeout_s: float = 300.0) -> bool:  # noqa: ARG002
        return False  # a restarted fresh actor re-ran __init__ with this run's arguments already

    def release(self, handles: list) -> None:
        for handle in handles:
            ray.kill(handle)

    def forget(self, handles: list) -> None:
        self.release(handles)
