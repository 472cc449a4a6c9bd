"""Weight buckets: how parameters travel from learner rank 0 to generator replicas.

A bucket is ``(names, shapes, flat)``: tensors of one dtype concatenated into one flat CPU tensor of at
most ``sync_bucket_mb``, so a sync is a few large object-store puts instead of one per parameter. The
learner exports with :func:`bucket_parameters`; a generator backend loads with :func:`load_weight_buckets`
(HF) or hands :func:`unpack_bucket`'s views to its engine (SGLang). Generators on GPUs of their own can
instead receive a broadcast from rank 0 (:func:`init_weight_update_group`, :func:`broadcast_buckets`).
"""

from __future__ import annotations

import datetime
import math
from typing import Iterable

import ray
import torch
from torch.distributed import distributed_c10d as c10d


def bucket_layout(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors into buckets of <= ``bucket_mb`` MB per dtype, in order (a larger tensor gets its own)."""
    limit = int(bucket_mb * 2**20)
    open_buckets: dict[torch.dtype, list] = {}
    done: list[list] = []
    for name, tensor in named:
        items = open_buckets.setdefault(tensor.dtype, [])
        size = sum(t.numel() * t.element_size() for _, t in items)
        if items and size + tensor.numel() * tensor.element_size() > limit:
            done.append(open_buckets.pop(tensor.dtype))
            items = open_buckets.setdefault(tensor.dtype, [])
        items.append((name, tensor))
    return done + list(open_buckets.values())


def bucket_parameters(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> list[tuple]:
    """:func:`bucket_layout` as flat contiguous CPU buckets, each ``(names, shapes, flat)``."""
    return [([n for n, _ in items], [tuple(t.shape) for _, t in items],
             torch.cat([t.detach().reshape(-1) for _, t in items]).cpu()) for items in bucket_layout(named, bucket_mb)]


def bucket_metadata(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> list[tuple[list, list, list]]:
    """``(names, dtype names, shapes)`` per bucket: what an engine needs to receive a broadcast."""
    return [([n for n, _ in items], [str(t.dtype).removeprefix("torch.") for _, t in items],
             [list(t.shape) for _, t in items]) for items in bucket_layout(named, bucket_mb)]


def tcp_store(address: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta,
              listen_fd: int | None = None) -> torch.distributed.TCPStore:
    """A process group's rendezvous store at ``address:port``, served by rank 0. Rank 0 may pass ``listen_fd``,
    a socket already listening on ``port`` (the store then owns it), so that no other process can take the
    port between choosing it and listening."""
    listen = {} if listen_fd is None else {"master_listen_fd": listen_fd}
    return torch.distributed.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                                      use_libuv=True, **listen)


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                             backend: str, timeout: datetime.timedelta = datetime.timedelta(minutes=10),
                             listen_fd: int | None = None):
    """A process group of its own between learner rank 0 (rank 0 here) and the generator engines, formed
    the way SGLang's ``init_weights_update_group`` forms its side (a TCP store at the master's address, a
    store prefixed by ``group_name``, registered ranks), so that both ends can ``broadcast`` on it. Rank 0
    may pass ``listen_fd`` (:func:`tcp_store`)."""
    store = tcp_store(master_address, master_port, rank, world_size, timeout, listen_fd)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend),
                                              c10d.PrefixStore(group_name, store), group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def broadcast_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float, group) -> int:
    """Send every tensor from rank 0, in :func:`bucket_metadata` order; returns how many."""
    count = 0
    with torch.no_grad():
        for items in bucket_layout(named, bucket_mb):
            for _, tensor in items:
                torch.distributed.broadcast(tensor.detach().contiguous(), src=0, group=group)
                count += 1
    return count


def unpack_bucket(bucket) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views of one exported bucket (a tuple or an ObjectRef to one)."""
    names, shapes, flat = ray.get(bucket) if isinstance(bucket, ray.ObjectRef) else bucket
    sizes = [math.prod(s) for s in shapes]
    if len(names) != len(shapes) or sum(sizes) != flat.numel():
        raise ValueError(f"corrupt weight bucket: {len(names)} names, {len(shapes)} shapes, "
                         f"{flat.numel()} values for {sum(sizes)} expected")
    return [(name, part.view(shape)) for name, shape, part in zip(names, shapes, flat.split(sizes))]


def load_weight_buckets(model: torch.nn.Module, buckets: list, *, strict: bool = True) -> int:
    """Copy exported buckets (tuples or ObjectRefs to them) into ``model``'s parameters in place.

    Checks every name and shape; with ``strict`` every parameter of ``model`` must be covered.
    Tied parameters (embedding / lm_head) appear once, under their first name. Returns the
    number of tensors loaded.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for bucket in buckets:
            for name, tensor in unpack_bucket(bucket):
                if name not in params:
                    raise ValueError(f"weight sync: the learner sent {name!r}, which this model does not "
                                     f"have (different architecture or weight tying?)")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"weight sync: {name!r} has shape {tuple(tensor.shape)} from the learner "
                                     f"but {tuple(params[name].shape)} here")
                params[name].copy_(tensor)
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if strict and missing:
        raise ValueError(f"weight sync: {len(missing)} parameters were not in the buckets, e.g. "
                         f"{missing[:3]} (different architecture or weight tying?)")
    return len(loaded)
