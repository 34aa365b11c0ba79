"""fiancee-jax: FIANCEE conditional early exits for GAN generators in JAX/Flax.

Public entry points: `fiancee_jax.load_model` (a trained workdir's artifacts),
`fiancee_jax.generate` (routed inference), `fiancee_jax.FianceeModel` (what both share),
`python -m fiancee_jax.main` (the pipeline), `python -m fiancee_jax.stats` (costs).
"""
from fiancee_jax.inference.generate import generate
from fiancee_jax.inference.loading import load_model
from fiancee_jax.model import FianceeModel

__all__ = ['FianceeModel', 'generate', 'load_model']
