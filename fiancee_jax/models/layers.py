"""Small layers shared by the models: spectral-norm conv, nn.Conv / nn.Dense in a compute dtype,
resizing."""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fiancee_jax.models import precision
from fiancee_jax.ops import conv


class SNConv(nn.Module):
  """3x3 (or kxk) 'SAME' conv with optional spectral normalisation of its kernel.

  The kernel is divided by its largest singular value (kernel reshaped to
  [kh * kw * in, out]). Training runs one power-iteration step and stores `u` and
  `sigma` in the `batch_stats` collection (PyTorch `spectral_norm` keeps them as
  buffers, so they are not parameters); inference divides by the stored `sigma`.
  `conv_impl` names the conv implementation (ops/conv.py). The conv computes in `dtype`;
  the kernel, `u` and `sigma` stay float32 (the power iteration runs in float32).
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  spectral_norm: bool = True
  eps: float = 1e-12
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: float [B, H, W, Cin] -> [B, H, W, features] in `dtype`."""
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    if self.spectral_norm:
      mat = kernel.reshape(-1, self.features)
      u_var = self.variable(
          'batch_stats', 'u',
          lambda: jax.random.normal(jax.random.key(0), (self.features,)))
      sigma_var = self.variable('batch_stats', 'sigma', lambda: jnp.ones(()))
      if train:
        u = u_var.value
        v = mat @ u
        v = v / (jnp.linalg.norm(v) + self.eps)
        u = mat.T @ v
        u = u / (jnp.linalg.norm(u) + self.eps)
        u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        sigma = v @ mat @ u
        if not self.is_initializing():
          u_var.value = u
          sigma_var.value = jax.lax.stop_gradient(sigma)
      else:
        sigma = sigma_var.value
      kernel = kernel / sigma
    y = conv.conv2d_same(x.astype(self.dtype), kernel, self.conv_impl)
    if self.use_bias:
      y = precision.broadcast_add(y, self.param('bias', nn.initializers.zeros, (self.features,)))
    return y


class Conv(nn.Module):
  """nn.Conv with 'SAME' padding (same parameter names, shapes and initialisers) computing in
  `dtype`: x [B, H, W, C] -> [B, H / s, W / s, features]; the bias added by
  `precision.broadcast_add` (its gradient summed in float32)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
      y = precision.broadcast_add(y, bias)
    return y


class Dense(nn.Module):
  """nn.Dense (same parameter names, shapes and initialisers) computing in `dtype`:
  x [..., C] -> [..., features]; the bias added by `precision.broadcast_add`."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return precision.broadcast_add(y, bias)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to [B, h, w, C] (PyTorch 'nearest' rule)."""
  b, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  if h % size[0] == 0 and w % size[1] == 0:
    # Integer downscale: floor(i * h / size) = i * f, a strided slice (no gather).
    return x[:, ::h // size[0], ::w // size[1]]
  if size[0] % h == 0 and size[1] % w == 0:
    return jnp.repeat(jnp.repeat(x, size[0] // h, axis=1), size[1] // w, axis=2)
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest x2 upsampling, [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avgpool2x(x: jax.Array) -> jax.Array:
  """2x2 average pooling, [B, H, W, C] -> [B, H/2, W/2, C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
