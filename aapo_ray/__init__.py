"""aapo-ray: AAPO (Advantage-Augmented Policy Optimization) post-training on Ray.

The algorithm lives in :mod:`aapo_ray.algo` (pure torch); each Ray role has its own module
(:mod:`~aapo_ray.generator`, :mod:`~aapo_ray.reference`, :mod:`~aapo_ray.scorer`,
:mod:`~aapo_ray.learner`); :mod:`aapo_ray.driver` is the loop.
"""

import os

# Keep every port of a local Ray cluster on 127.0.0.1. Set here, before any module of the
# package (or of Ray) is imported; kept light: reward worker processes import this package.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
