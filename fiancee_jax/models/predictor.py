"""Predictor: from the data alone, the distance of every exit to the backbone.

`Predictor` (label maps). Input features (cheap, computed inside the module): the one-hot label map average-pooled
by `pool` (class fractions per cell) and the fraction of pixels per cell whose right or
lower neighbour has another class (boundary density, the main cue for how hard a region
is). Then three stride-2 conv stages, global average pooling and a dense layer with a
softplus, so predictions are non-negative.

`PairPredictor` (reenactment): the source and driver images average-pooled by `pool`, and
their difference, through the same trunk.
"""
import chex
import jax
import jax.numpy as jnp
from flax import linen as nn


def boundary_map(labels: jax.Array) -> jax.Array:
  """labels int32 [B, H, W] -> float32 [B, H, W, 1], 1 where a neighbour differs."""
  right = jnp.pad(labels[:, :, 1:] != labels[:, :, :-1], ((0, 0), (0, 0), (0, 1)))
  down = jnp.pad(labels[:, 1:] != labels[:, :-1], ((0, 0), (0, 1), (0, 0)))
  return (right | down).astype(jnp.float32)[..., None]


class Predictor(nn.Module):
  """labels int32 [B, H, W] -> predicted distances float32 [B, num_outputs]."""
  num_classes: int
  num_outputs: int
  width: int = 16
  pool: int = 4

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    chex.assert_rank(labels, 3)
    b, h, w = labels.shape
    if h % self.pool or w % self.pool:
      raise ValueError(f'config.predictor.pool={self.pool} must divide the resolution {h}x{w}')
    x = jnp.concatenate([jax.nn.one_hot(labels, self.num_classes), boundary_map(labels)], -1)
    x = x.reshape(b, h // self.pool, self.pool, w // self.pool, self.pool, -1).mean((2, 4))
    return _trunk(x, self.width, self.num_outputs)


class PairPredictor(nn.Module):
  """source, driver float32 [B, H, W, 3] -> predicted distances float32 [B, num_outputs]."""
  num_outputs: int
  width: int = 16
  pool: int = 4

  @nn.compact
  def __call__(self, source: jax.Array, driver: jax.Array) -> jax.Array:
    chex.assert_rank([source, driver], 4)
    chex.assert_equal_shape([source, driver])
    b, h, w, _ = source.shape
    if h % self.pool or w % self.pool:
      raise ValueError(f'config.predictor.pool={self.pool} must divide the resolution {h}x{w}')
    x = jnp.concatenate([source, driver, driver - source], -1)
    x = x.reshape(b, h // self.pool, self.pool, w // self.pool, self.pool, -1).mean((2, 4))
    return _trunk(x, self.width, self.num_outputs)


def _trunk(x: jax.Array, width: int, num_outputs: int) -> jax.Array:
  """Pooled features [B, h, w, F] -> non-negative predictions [B, num_outputs] (in compact)."""
  for i, mult in enumerate((1, 2, 4)):
    x = nn.Conv(width * mult, (3, 3), strides=(2, 2) if i else (1, 1),
                name=f'conv_{i}')(x)
    x = nn.leaky_relu(x, 0.2)
  x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
  x = nn.leaky_relu(nn.Dense(width * 4, name='fc')(x), 0.2)
  return nn.softplus(nn.Dense(num_outputs, name='out')(x))
