"""Predictor: from the inputs alone, the distance of every exit to the backbone.

`Predictor` (label maps + z). Input features (cheap, computed inside the module): the
one-hot label map average-pooled by `pool` (class fractions per cell) and the fraction of
pixels per cell whose right or lower neighbour has another class (boundary density). Then
three stride-2 conv stages (z added to the first one's features when `use_z`), mean and
max pooling and two dense layers; `members` such trunks are averaged.

`PairPredictor` (reenactment): the source and driver images average-pooled by `pool`, and
their difference, through the same trunk.

Both compute in their `dtype` (models/precision.py; parameters stay float32) and return
float32 predictions.
"""
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from fiancee_jax.models import layers
from fiancee_jax.models import precision


def label_features(labels: jax.Array, num_classes: int, pool: int) -> jax.Array:
  """labels int32 [B, H, W] -> float32 [B, H / pool, W / pool, num_classes + 1]: the class
  fractions and the boundary density (boundary_map) of every pool x pool cell."""
  b, h, w = labels.shape
  x = jnp.concatenate([jax.nn.one_hot(labels, num_classes), boundary_map(labels)], -1)
  return x.reshape(b, h // pool, pool, w // pool, pool, -1).mean((2, 4))


def boundary_map(labels: jax.Array) -> jax.Array:
  """labels int32 [B, H, W] -> float32 [B, H, W, 1], 1 where a neighbour differs."""
  right = jnp.pad(labels[:, :, 1:] != labels[:, :, :-1], ((0, 0), (0, 0), (0, 1)))
  down = jnp.pad(labels[:, 1:] != labels[:, :-1], ((0, 0), (0, 1), (0, 0)))
  return (right | down).astype(jnp.float32)[..., None]


class Predictor(nn.Module):
  """labels int32 [B, H, W], z float32 [B, z_dim] -> predicted distances [B, num_outputs].

  With `use_z`, z is added to the first conv's features through a Dense layer (FiLM-style):
  most of an exit's distance to the backbone varies with z for a fixed label map. With
  `members` > 1 the prediction is the mean of that many independently initialised trunks
  (an ensemble; `per_member=True` returns [members, B, num_outputs] for training).
  """
  num_classes: int
  num_outputs: int
  width: int = 16
  pool: int = 4
  use_z: bool = False
  members: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, labels: jax.Array, z: jax.Array | None = None, *,
               per_member: bool = False) -> jax.Array:
    chex.assert_rank(labels, 3)
    b, h, w = labels.shape
    if h % self.pool or w % self.pool:
      raise ValueError(f'config.predictor.pool={self.pool} must divide the resolution {h}x{w}')
    if self.use_z:
      if z is None:
        raise ValueError('the predictor was built with use_z=True but got no z')
      chex.assert_rank(z, 2)
    x = label_features(labels, self.num_classes, self.pool).astype(self.dtype)
    outs = jnp.stack([
        _Member(self.width, self.num_outputs, self.dtype, name=f'member_{i}')(
            x, z if self.use_z else None)
        for i in range(self.members)])
    return outs if per_member else outs.mean(0)


class _Member(nn.Module):
  width: int
  num_outputs: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array | None) -> jax.Array:
    film = None if z is None else layers.Dense(self.width, dtype=self.dtype, name='z_film')(z)
    return trunk(x, self.width, self.num_outputs, film, self.dtype)


class PairPredictor(nn.Module):
  """source, driver float32 [B, H, W, 3] -> predicted distances float32 [B, num_outputs]."""
  num_outputs: int
  width: int = 16
  pool: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, source: jax.Array, driver: jax.Array, *,
               per_member: bool = False) -> jax.Array:
    chex.assert_rank([source, driver], 4)
    chex.assert_equal_shape([source, driver])
    b, h, w, _ = source.shape
    if h % self.pool or w % self.pool:
      raise ValueError(f'config.predictor.pool={self.pool} must divide the resolution {h}x{w}')
    x = jnp.concatenate([source, driver, driver - source], -1)
    x = x.reshape(b, h // self.pool, self.pool, w // self.pool, self.pool, -1).mean((2, 4))
    out = trunk(x, self.width, self.num_outputs, dtype=self.dtype)
    return out[None] if per_member else out


def trunk(x: jax.Array, width: int, num_outputs: int,
          film: jax.Array | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """Pooled features [B, h, w, F] -> predictions float32 [B, num_outputs] (in compact).

  film: optional [B, width] added to the first conv's output. The output is linear: the
  trainer standardises the targets and folds their mean and scale into the last layer.
  dtype: the compute dtype.
  """
  for i, mult in enumerate((1, 2, 4)):
    x = layers.Conv(width * mult, (3, 3), strides=(2, 2) if i else (1, 1), dtype=dtype,
                    name=f'conv_{i}')(x)
    if i == 0 and film is not None:
      x = precision.broadcast_add(x, film[:, None, None, :])
    x = nn.leaky_relu(x, 0.2)
  x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
  x = nn.leaky_relu(layers.Dense(width * 4, dtype=dtype, name='fc')(x), 0.2)
  return precision.to_output(layers.Dense(num_outputs, dtype=dtype, name='out')(x))
