"""aapo-ray: AAPO (Advantage-Augmented Policy Optimization) post-training on Ray.

The algorithm lives in :mod:`aapo_ray.algo` (pure torch); each Ray role has its own module
(:mod:`~aapo_ray.generator`, :mod:`~aapo_ray.reference`, :mod:`~aapo_ray.scorer`,
:mod:`~aapo_ray.learner`); :mod:`aapo_ray.driver` is the loop.
"""

__version__ = "0.1.0"
