"""fiancee-jax: FIANCEE conditional early exits for GAN generators in JAX/Flax.

Public entry points: `fiancee_jax.generate` (routed inference), `fiancee_jax.load_model`
(a trained workdir), `python -m fiancee_jax.main` (the pipeline), `python -m fiancee_jax.stats`.
"""


def __getattr__(name):
  # Lazy, so that `import fiancee_jax` does not import JAX-heavy modules.
  if name == 'generate':
    from fiancee_jax.inference import generate  # pylint: disable=g-import-not-at-top
    return generate
  if name == 'load_model':
    from fiancee_jax.workdir import load_model  # pylint: disable=g-import-not-at-top
    return load_model
  raise AttributeError(name)
