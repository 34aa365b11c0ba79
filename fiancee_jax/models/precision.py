"""Compute dtypes: what the models compute in, by name (`config.train.dtype`, the benchmark).

Mixed precision as Flax modules do it: every module that computes takes a `dtype` field (the
computation dtype; float32 by default) and keeps its parameters in float32. A module casts its
inputs and, at use, its parameters to `dtype`; normalisation statistics (batch norm, group
norm, spectral-norm sigmas) are computed and stored in float32; images, logits and
predictions leave the model in float32, so that losses, metrics and optimizer updates are
float32 whatever the compute dtype. Gradients reach the float32 parameters through the casts,
so the optimizer state stays float32 too.

One more rule keeps those gradients float32 in substance, not only in type: where a bias (or
any per-channel or per-image term) is broadcast over many pixels, its gradient is a sum over
all of them, and JAX differentiates the broadcast into a sum in the compute dtype. In
bfloat16 a sum of thousands of terms keeps 8 bits of their total (measured: 73 % error in the
gradient of a discriminator's output bias). `broadcast_add` adds in the compute dtype but sums
that gradient in float32; every bias of the models goes through it (layers.Conv and
layers.Dense are nn.Conv and nn.Dense with the same parameters that do so).

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


@jax.custom_vjp
def _add_f32_grad(y: jax.Array, b: jax.Array) -> jax.Array:
  return y + b.astype(y.dtype)


def _add_fwd(y, b):
  return y + b.astype(y.dtype), b


def _add_bwd(b, ct):
  # The axes b was broadcast along (numpy rules: leading axes, then its size-1 axes).
  lead = ct.ndim - b.ndim
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(b.shape)
                                    if n == 1 and ct.shape[lead + i] != 1)
  db = jnp.sum(ct.astype(jnp.float32), axis=axes).reshape(b.shape)
  return ct, db.astype(b.dtype)


_add_f32_grad.defvjp(_add_fwd, _add_bwd)


def broadcast_add(y: jax.Array, b: jax.Array) -> jax.Array:
  """y + b (b broadcast against y, numpy rules), in y's dtype.

  In float32 this is the plain sum. In a lower dtype b's gradient (a sum over every axis it
  was broadcast along) is accumulated in float32 and returned in b's dtype, instead of in
  y's dtype as JAX's own rule would.

  Args:
    y: [..., C] activations in the compute dtype.
    b: a term that broadcasts against y, e.g. a float32 bias [C] or offsets [B, 1, 1, C].

  Returns:
    y + b in y's dtype.
  """
  if y.dtype == jnp.float32:
    return y + b
  return _add_f32_grad(y, b)

