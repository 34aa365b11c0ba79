"""Compute dtypes: what the models compute in, by name (`config.train.dtype`, the benchmark).

Mixed precision as Flax modules do it: every module that computes takes a `dtype` field (the
computation dtype; float32 by default) and keeps its parameters in float32. A module casts its
inputs and, at use, its parameters to `dtype`; normalisation statistics (batch norm, group
norm, spectral-norm sigmas) are computed and stored in float32; images, logits and
predictions leave the model in float32, so that losses, metrics and optimizer updates are
float32 whatever the compute dtype. Gradients reach the float32 parameters through the casts,
so the optimizer state stays float32 too.

  g = oasis.OasisGenerator(..., dtype=precision.compute_dtype('bfloat16'))
"""
from typing import Any

import jax
import jax.numpy as jnp

# The names a config may give (float32 first: the default, and what every published figure
# was computed in).
DTYPES = ('float32', 'bfloat16')
# The dtype of everything that leaves a model: images, logits, predicted distances.
OUTPUT_DTYPE = jnp.float32


def compute_dtype(name: str) -> jnp.dtype:
  """The JAX dtype of a compute-dtype name ('float32' or 'bfloat16').

  Raises:
    ValueError: any other name, naming the known ones.
  """
  if name not in DTYPES:
    raise ValueError(f'compute dtype {name!r} is not one of {DTYPES} (config.train.dtype, '
                     'config.benchmark.dtypes)')
  return jnp.dtype(name)


def name_of(dtype: Any) -> str:
  """'float32' or 'bfloat16' for a JAX dtype (or its name)."""
  return jnp.dtype(dtype).name


def to_output(x: jax.Array) -> jax.Array:
  """x in OUTPUT_DTYPE (float32): what a model returns, whatever it computed in."""
  return x.astype(OUTPUT_DTYPE)
