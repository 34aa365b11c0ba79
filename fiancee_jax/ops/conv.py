"""'SAME' stride-1 2-D convolution in one of several implementations, chosen by name.

Every implementation computes the same convolution; they differ in the HLO they give XLA.
A model receives the name as a module field (`conv_impl`), set from `config.kernels.conv`
by models/factory.py (ops/kernels.py resolves 'auto'); nothing here looks at the backend.

- 'xla': `lax.conv_general_dilated`.
- 'toeplitz' (per call, on small maps only): on a map of at most (kh//2 + 1) x (kw//2 + 1)
  pixels (OASIS's 2x2 stem and first block) every output pixel sees every input pixel, so
  the conv is one matmul [B, H*W*C] x [H*W*C, H*W*F] with the kernel taps laid out
  block-Toeplitz. It multiplies exactly the MACs that XLA counts for the conv. XLA:CPU lowers
  a conv on such a map to a batch-as-features conv that runs far below matmul speed; at
  batch 1-2 the two forms take about the same time.
- 'even': an odd number of input channels (above one) gets one zero channel (in x and in the
  kernel). XLA:CPU runs convs with some odd input widths (11, 13, 15, 19, ...) several times
  slower than with one channel more; the guided exits have such inputs (labels + the 3-channel
  guide). The zero channel's MACs run, and XLA counts them (+1/C of such a conv).
- 'toeplitz_even': 'toeplitz' where the kernel spans the map and the batch is at least 4,
  else 'even'.

Every form computes in x's dtype (the kernel is cast to it), so a bfloat16 model runs
bfloat16 convs on every implementation.

Reported GFLOPs never depend on this choice: metrics/costs.py counts every model on 'xla'.
Thin convs (<= 4 output channels) as broadcast multiply-adds are not offered: alone they beat
XLA:CPU's conv, but inside a model XLA fuses them with their neighbours and they run far
slower.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fiancee_jax.models import precision

# Implementations of conv2d_same; the first three are per-call forms, the last picks by shape.
CONV_IMPLS = ('xla', 'toeplitz', 'even', 'toeplitz_even')
_DIMS = ('NHWC', 'HWIO', 'NHWC')
# From this batch on 'toeplitz_even' uses the Toeplitz matmul.
TOEPLITZ_MIN_BATCH = 4


def xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """lax.conv_general_dilated, 'SAME', stride 1: [B, H, W, C] x [kh, kw, C, F] -> [B, H, W, F]."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_DIMS)


def kernel_spans_map(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
  """Whether every output pixel of this 'SAME' conv sees every input pixel (odd kernel, map
  of at most (kh//2 + 1) x (kw//2 + 1) pixels, kernel larger than 1x1): the Toeplitz case."""
  _, h, w, _ = x_shape
  kh, kw = kernel_shape[:2]
  return bool(kh % 2 and kw % 2 and kh * kw > 1 and h <= kh // 2 + 1 and w <= kw // 2 + 1)


def form_for(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], impl: str) -> str:
  """The per-call form ('xla', 'toeplitz' or 'even') that `impl` runs for these shapes."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; known: {CONV_IMPLS}')
  if impl != 'toeplitz_even':
    return impl
  if x_shape[0] >= TOEPLITZ_MIN_BATCH and kernel_spans_map(x_shape, kernel_shape):
    return 'toeplitz'
  return 'even'


def conv2d_same(x: jax.Array, kernel: jax.Array, impl: str = 'xla') -> jax.Array:
  """'SAME' stride-1 conv without bias.

  Args:
    x: float [B, H, W, C]; its dtype is the compute dtype.
    kernel: float [kh, kw, C, F], cast to x's dtype.
    impl: one of CONV_IMPLS.

  Returns:
    [B, H, W, F] in x's dtype.

  Raises:
    ValueError: shapes that do not make a conv, an unknown implementation, or 'toeplitz' on a
      map larger than the kernel's reach or with an even kernel.
  """
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'conv2d_same needs x [B, H, W, C] and kernel [kh, kw, C, F], got '
                     f'{x.shape} and {kernel.shape}')
  form = form_for(x.shape, kernel.shape, impl)
  kernel = kernel.astype(x.dtype)
  if form == 'xla':
    return xla_conv(x, kernel)
  if form == 'even':
    if x.shape[-1] % 2 == 0 or x.shape[-1] == 1:
      return xla_conv(x, kernel)
    return xla_conv(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1))),
                    jnp.pad(kernel, ((0, 0), (0, 0), (0, 1), (0, 0))))
  b, h, w, c = x.shape
  kh, kw, _, f = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0 or h > kh // 2 + 1 or w > kw // 2 + 1:
    raise ValueError(f'the toeplitz conv needs an odd kernel and a map of at most '
                     f'{kh // 2 + 1}x{kw // 2 + 1} pixels for it, got a {kh}x{kw} kernel on '
                     f'{h}x{w}')
  # big[i', j', i, j] = kernel[i' - i + kh // 2, j' - j + kw // 2]: input (i', j') -> output (i, j).
  dy = np.arange(h)[:, None] - np.arange(h)[None, :] + kh // 2
  dx = np.arange(w)[:, None] - np.arange(w)[None, :] + kw // 2
  big = kernel[dy[:, None, :, None], dx[None, :, None, :]]  # [h, w, h, w, C, F]
  big = big.transpose(0, 1, 4, 2, 3, 5).reshape(h * w * c, h * w * f)
  return (x.reshape(b, h * w * c) @ big).reshape(b, h, w, f)


class Conv(nn.Module):
  """nn.Conv's 'SAME' stride-1 case (same parameter names, shapes and initialisers), run
  through `conv2d_same` with `conv_impl`: x [B, H, W, C] -> [B, H, W, features] in `dtype`
  (the compute dtype; parameters stay float32 and are cast at use, as nn.Conv's `dtype`)."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return precision.broadcast_add(conv2d_same(x.astype(self.dtype), kernel, self.conv_impl),
                                   bias)
