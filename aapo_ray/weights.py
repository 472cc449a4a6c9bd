"""Weight buckets: how parameters travel from learner rank 0 to generator replicas.

A bucket is ``(names, shapes, flat)``: tensors of one dtype concatenated into one flat CPU tensor of at
most ``sync_bucket_mb``, so a sync is a few large object-store puts instead of one per parameter. The
learner exports with :func:`bucket_parameters`; a generator backend loads with :func:`load_weight_buckets`
(HF) or hands :func:`unpack_bucket`'s views to its engine (SGLang).
"""

from __future__ import annotations

import math
from typing import Iterable

import ray
import torch


def bucket_parameters(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> list[tuple]:
    """Group tensors into flat contiguous CPU buckets of <= ``bucket_mb`` MB per dtype.

    Each bucket is ``(names, shapes, flat)``; a tensor larger than the limit gets its own bucket.
    """
    limit = int(bucket_mb * 2**20)
    open_buckets: dict[torch.dtype, list] = {}
    done: list[tuple] = []

    def close(dtype):
        items = open_buckets.pop(dtype)
        flat = torch.cat([t.detach().reshape(-1) for _, t in items]).cpu()
        done.append(([n for n, _ in items], [tuple(t.shape) for _, t in items], flat))

    for name, tensor in named:
        items = open_buckets.setdefault(tensor.dtype, [])
        size = sum(t.numel() * t.element_size() for _, t in items)
        if items and size + tensor.numel() * tensor.element_size() > limit:
            close(tensor.dtype)
            items = open_buckets.setdefault(tensor.dtype, [])
        items.append((name, tensor))
    for dtype in list(open_buckets):
        close(dtype)
    return done


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
