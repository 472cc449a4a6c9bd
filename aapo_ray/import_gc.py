"""Heavy imports without Python's cyclic garbage collector, for the processes this package owns.

Importing torch, transformers, DeepSpeed and math-verify leaves ~350k objects that the collector tracks, and
on the way it runs full collections over all of them: ~18% of the import time (``aapo train``'s runner: 2.8 s
against 2.3 s with the collector off, 2-core VM), for ~9k unreachable objects (~1 MB) found. After the imports
everything alive is moved to the collector's permanent generation (``gc.freeze``), so later full collections
skip the loaded modules (one took 0.24 s before, ~0 after); the few cycles the imports left are kept.

Used by the ``aapo`` console script around its runner's import (:func:`aapo_ray.cli.run`) and by the
co-located role processes around their roles' imports (:class:`aapo_ray.colocation.RoleHost`); never by a
library caller's process (an in-process :func:`aapo_ray.cli.main`, a notebook).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


def pause_for_imports() -> None:
    """Turn the collector off until :func:`imports_done`."""
    gc.disable()


def imports_done() -> None:
    """Freeze what is alive (the imported modules) and turn the collector back on; once, after
    :func:`pause_for_imports` (a no-op while the collector is on)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """The block (imports) with the collector off, then :func:`imports_done`; a no-op where it was off."""
    if not gc.isenabled():
        yield
        return
    pause_for_imports()
    try:
        yield
    finally:
        imports_done()
