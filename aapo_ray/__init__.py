"""aapo-ray: AAPO (Advantage-Augmented Policy Optimization) post-training on Ray.

The algorithm lives in :mod:`aapo_ray.algo` (pure torch); each Ray role has its own module
(:mod:`~aapo_ray.generator`, :mod:`~aapo_ray.reference`, :mod:`~aapo_ray.scorer`,
:mod:`~aapo_ray.learner`); :mod:`aapo_ray.driver` is the loop.
"""

import os

# Keep a local Ray cluster on 127.0.0.1 (aapo_ray.launch.LOOPBACK_ENV). Set here, at the package's import, so that
# processes this one starts (a `ray start`, a script joining its cluster) inherit it; init_ray does not rely on it,
# as Ray reads it when ray is first imported, which may have been before this. Kept light: reward workers import this.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
