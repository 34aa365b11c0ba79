"""'SAME' stride-1 2-D convolution, lowered differently where XLA:CPU's own lowering is slow.

Measured at batch 64 on 2 EPYC cores (XLA of jax 0.10.2); on every other backend, and for every
other shape, it is `lax.conv_general_dilated` ('xla').

'toeplitz': on a map of at most (kh//2 + 1) x (kw//2 + 1) pixels (OASIS's 2x2 stem and first block)
every output pixel sees every input pixel, so the conv is one matmul
[B, H*W*C] x [H*W*C, H*W*F] with the kernel taps laid out block-Toeplitz ('toeplitz'). It
multiplies exactly the MACs that XLA counts for the conv, so reported GFLOPs do not move.
XLA:CPU (jax 0.10.2) rewrites such a conv to a batch-as-features layout that ran at
~3 GFLOP/s: 9.6 ms at batch 64 for 128 -> 128 channels on 2x2, against 0.5 ms for the
matmul (~25 ms less per exit path of the default config). Only from batch 4 on: at batch 1
and 2 the two take the same time alone (~0.2 ms), and inside the batch-1 `lax.switch` the
Toeplitz form made the backbone branch 6 % slower than its direct path.

'even': an odd number of input channels gets one zero channel (in x and in the kernel).
XLA:CPU ran convs with 11, 13, 15 or 19 input channels 2-4x slower than with one channel
more (15 -> 24 channels at 64x64: 30-59 ms, 14-16 ms padded). The guided exits have such
inputs: 12 label channels + the 3-channel guide, features + the guide. XLA counts the zero
channel's MACs, because they run: +1/C of such a conv, +1.3 % of exit 0's GFLOPs in the
default config.

Also tried, and left out: thin convs (<= 4 output channels) as broadcast multiply-adds were
2-4x faster alone, but inside a model XLA:CPU fuses them with their neighbours (it drops
optimization barriers before fusion) and they ran up to 75x slower.

`cpu_lowerings(False)` turns both lowerings (and the database's two-stage top-k) off for what
is traced inside it, so that the benchmark can time both forms of the same model in one run.
"""
import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

LOWERINGS = ('auto', 'xla', 'toeplitz', 'even')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


_CPU_LOWERINGS = contextvars.ContextVar('fiancee_jax_cpu_lowerings', default=True)


@contextlib.contextmanager
def cpu_lowerings(enabled: bool) -> Iterator[None]:
  """Within the block, functions traced use (enabled) or skip (not) the CPU lowerings.

  Trace-time only: an executable traced before keeps its lowering, and jit reuses a trace of
  the same function object, so trace a new function inside the block.
  """
  token = _CPU_LOWERINGS.set(bool(enabled))
  try:
    yield
  finally:
    _CPU_LOWERINGS.reset(token)


def cpu_lowerings_active(backend: str | None = None) -> bool:
  """Whether code traced now should use the CPU lowerings (backend default: JAX's default)."""
  backend = jax.default_backend() if backend is None else backend
  return backend == 'cpu' and _CPU_LOWERINGS.get()


def xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """lax.conv_general_dilated, 'SAME', stride 1: [B, H, W, C] x [kh, kw, C, F] -> [B, H, W, F]."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_DIMS)


def lowering_for(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                 backend: str | None = None) -> str:
  """The lowering 'auto' picks for these shapes on `backend` (default: JAX's default)."""
  b, h, w, c = x_shape
  kh, kw = kernel_shape[:2]
  if not cpu_lowerings_active(backend):
    return 'xla'
  if b >= 4 and kh % 2 and kw % 2 and kh * kw > 1 and h <= kh // 2 + 1 and w <= kw // 2 + 1:
    return 'toeplitz'
  if c % 2 and c > 1:
    return 'even'
  return 'xla'


class Conv(nn.Module):
  """nn.Conv's 'SAME' stride-1 case (same parameter names, shapes and initialisers), run
  through `conv2d_same`: x [B, H, W, C] -> [B, H, W, features]."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return conv2d_same(x, kernel) + bias


def conv2d_same(x: jax.Array, kernel: jax.Array, lowering: str = 'auto') -> jax.Array:
  """'SAME' stride-1 conv without bias.

  Args:
    x: float [B, H, W, C].
    kernel: float [kh, kw, C, F].
    lowering: one of LOWERINGS; 'auto' = `lowering_for(x.shape, kernel.shape)`.

  Returns:
    [B, H, W, F].

  Raises:
    ValueError: shapes that do not make a conv, an unknown lowering, or 'toeplitz' on a map
      larger than the kernel's reach or with an even kernel.
  """
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'conv2d_same needs x [B, H, W, C] and kernel [kh, kw, C, F], got '
                     f'{x.shape} and {kernel.shape}')
  if lowering not in LOWERINGS:
    raise ValueError(f'unknown conv lowering {lowering!r}; known: {LOWERINGS}')
  if lowering == 'auto':
    lowering = lowering_for(x.shape, kernel.shape)
  if lowering == 'xla':
    return xla_conv(x, kernel)
  if lowering == 'even':
    if x.shape[-1] % 2 == 0:
      return xla_conv(x, kernel)
    return xla_conv(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1))),
                    jnp.pad(kernel, ((0, 0), (0, 0), (0, 1), (0, 0))))
  b, h, w, c = x.shape
  kh, kw, _, f = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0 or h > kh // 2 + 1 or w > kw // 2 + 1:
    raise ValueError(f'the toeplitz lowering needs an odd kernel and a map of at most '
                     f'{kh // 2 + 1}x{kw // 2 + 1} pixels for it, got a {kh}x{kw} kernel on '
                     f'{h}x{w}')
  # big[i', j', i, j] = kernel[i' - i + kh // 2, j' - j + kw // 2]: input (i', j') -> output (i, j).
  dy = np.arange(h)[:, None] - np.arange(h)[None, :] + kh // 2
  dx = np.arange(w)[:, None] - np.arange(w)[None, :] + kw // 2
  big = kernel[dy[:, None, :, None], dx[None, :, None, :]]  # [h, w, h, w, C, F]
  big = big.transpose(0, 1, 4, 2, 3, 5).reshape(h * w * c, h * w * f)
  return (x.reshape(b, h * w * c) @ big).reshape(b, h, w, f)
