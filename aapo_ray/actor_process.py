"""The setup every role's actor process runs first. Kept apart from :mod:`aapo_ray.launch`, which the
``aapo`` command line imports before torch to start Ray early (:func:`aapo_ray.launch.start_ray_early`)."""

from __future__ import annotations

import torch


def setup_actor_process(torch_threads: int, seed: int | None = None) -> None:
    """Called first in every actor: bound torch's threads (2 cores are shared by all roles) and seed."""
    torch.set_num_threads(torch_threads)
    if seed is not None:
        torch.manual_seed(seed)
