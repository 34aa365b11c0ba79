"""3-D feature-volume warping (MegaPortraits' rigid + non-rigid warps), backward and
differentiable.

A warp says, for every output voxel, where in the input volume to read; `trilinear_sample`
reads there (gathers of the 8 neighbours). Coordinates are (x, y, z) in [-1, 1] per axis
(`volume_grid`), rotations come from (yaw, pitch, roll) angles (`rotation_matrix`):

- to the canonical pose: canonical voxel X reads the source volume at R_s (X + f_s(X)) + t_s
  (`canonical_coords`);
- to the driver's pose: driver voxel Y reads the canonical volume at R_d^T (Y - t_d) + f_d(Y)
  (`driver_coords`).

The non-rigid flows f come from `WarpGenerator` (identity, expression -> flow field), whose
3-D convs are `Conv3x3x3`, a 3x3x3 conv written as one 2-D conv (the G3D blocks of
`fiancee_jax.models.reenact` use it too).
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fiancee_jax.models import layers
from fiancee_jax.models import precision

PADDINGS = ('border', 'zeros')


def rotation_matrix(angles: jax.Array) -> jax.Array:
  """angles float32 [B, 3] (yaw, pitch, roll; radians) -> rotations float32 [B, 3, 3].

  Volume axes are (x = width, y = height, z = depth); R = R_z(roll) R_y(yaw) R_x(pitch).
  """
  yaw, pitch, roll = angles[:, 0], angles[:, 1], angles[:, 2]
  c, s = jnp.cos, jnp.sin
  one, zero = jnp.ones_like(yaw), jnp.zeros_like(yaw)
  ry = jnp.stack([c(yaw), zero, s(yaw), zero, one, zero, -s(yaw), zero, c(yaw)], -1)
  rx = jnp.stack([one, zero, zero, zero, c(pitch), -s(pitch), zero, s(pitch), c(pitch)], -1)
  rz = jnp.stack([c(roll), -s(roll), zero, s(roll), c(roll), zero, zero, zero, one], -1)
  ry, rx, rz = (m.reshape(-1, 3, 3) for m in (ry, rx, rz))
  return rz @ ry @ rx


def volume_grid(depth: int, height: int, width: int) -> jax.Array:
  """float32 [D, H, W, 3]: (x, y, z) voxel centres in [-1, 1] (align_corners=True)."""

  def axis(n):
    return jnp.linspace(-1.0, 1.0, n) if n > 1 else jnp.zeros((1,))

  z, y, x = jnp.meshgrid(axis(depth), axis(height), axis(width), indexing='ij')
  return jnp.stack([x, y, z], axis=-1)


def trilinear_sample(volume: jax.Array, coords: jax.Array, padding: str = 'border'
                     ) -> jax.Array:
  """Differentiable trilinear sampling of a feature volume.

  Args:
    volume: float32 [B, D, H, W, C].
    coords: float32 [B, ..., 3], (x, y, z) in [-1, 1]: -1 / +1 are the centres of the first
      / last voxel along W, H, D (PyTorch grid_sample with align_corners=True).
    padding: what points outside the volume read (PyTorch's padding_mode): 'border' the
      nearest voxel (coordinates clamped to [-1, 1], so their gradient is 0 along a
      clamped axis), 'zeros' zero features, fading in linearly over the outer half voxel.
      Zeros leave dark bands wherever a warp reads past the edge (the bottom of a face
      moved up, say); border continues the edge, which for a static background is right.

  Returns:
    [B, ..., C] in volume's dtype (the weights are computed from the coordinates in theirs,
    then cast). Differentiable in both arguments (gathers of the 8 neighbours, weights linear
    in the coordinates).

  Raises:
    ValueError: coords not [B, ..., 3], or an unknown padding.
  """
  b, d, h, w, c = volume.shape
  if coords.shape[0] != b or coords.shape[-1] != 3:
    raise ValueError(f'coords must be [B={b}, ..., 3], got {coords.shape}')
  if padding not in PADDINGS:
    raise ValueError(f'padding={padding!r} is not one of {PADDINGS} '
                     '(config.backbone.warp_padding)')
  out_shape = coords.shape[1:-1]
  pts = coords.reshape(b, -1, 3)
  pos = [(pts[..., k] + 1.0) * 0.5 * (n - 1) for k, n in enumerate((w, h, d))]
  if padding == 'border':
    pos = [jnp.clip(p, 0.0, n - 1) for p, n in zip(pos, (w, h, d))]
  lo = [jnp.floor(p) for p in pos]
  frac = [p - l for p, l in zip(pos, lo)]
  lo = [l.astype(jnp.int32) for l in lo]
  flat = volume.reshape(b, d * h * w, c)
  gather = jax.vmap(lambda f, i: f[i])
  out = jnp.zeros((b, pts.shape[1], c), volume.dtype)
  for dz in (0, 1):
    for dy in (0, 1):
      for dx in (0, 1):
        xi, yi, zi = lo[0] + dx, lo[1] + dy, lo[2] + dz
        # With border padding, only the upper neighbours of a clamped last voxel are out,
        # and their weight is already 0.
        valid = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & (zi >= 0) & (zi < d))
        weight = ((frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1])
                  * (frac[2] if dz else 1 - frac[2]) * valid)
        idx = (jnp.clip(zi, 0, d - 1) * h + jnp.clip(yi, 0, h - 1)) * w + jnp.clip(xi, 0, w - 1)
        out = out + gather(flat, idx) * weight[..., None].astype(volume.dtype)
  return out.reshape(b, *out_shape, c)


def canonical_coords(grid: jax.Array, rotation: jax.Array, translation: jax.Array,
                     flow: jax.Array) -> jax.Array:
  """Where each canonical voxel X reads the source volume: R_s (X + f_s(X)) + t_s.

  Args:
    grid: float32 [1 or B, D, H, W, 3], the voxel centres (`volume_grid`).
    rotation: float32 [B, 3, 3], R_s.
    translation: float32 [B, 3], t_s.
    flow: float32 [B, D, H, W, 3], f_s in volume coordinates.

  Returns:
    float32 [B, D, H, W, 3] coordinates for `trilinear_sample`.
  """
  coords = jnp.einsum('bdhwj,bij->bdhwi', grid + flow, rotation)
  return coords + translation[:, None, None, None]


def driver_coords(grid: jax.Array, rotation: jax.Array, translation: jax.Array,
                  flow: jax.Array) -> jax.Array:
  """Where each driver voxel Y reads the canonical volume: R_d^T (Y - t_d) + f_d(Y).

  Arguments and result as `canonical_coords`, with the driver's R_d, t_d and f_d.
  """
  coords = jnp.einsum('bdhwj,bji->bdhwi', grid - translation[:, None, None, None], rotation)
  return coords + flow


class Conv3x3x3(nn.Module):
  """A 3x3x3 'SAME' conv computed as one 2-D conv: ~10x faster on XLA:CPU than nn.Conv's 3-D
  convolution (forward and backward), with nn.Conv's parameters ('kernel' [3, 3, 3, Cin,
  Cout], 'bias' [Cout]) and result.

  The depth neighbours d-1, d, d+1 are stacked into channels ([B, D, H, W, 3 Cin], zeros
  past the ends) and depth folded into the batch; the kernel is reshaped to [3, 3, 3 Cin,
  Cout] to match.
  """
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float [B, D, H, W, Cin] -> [B, D, H, W, features] in `dtype`."""
    b, d, h, w, c = x.shape
    kernel = self.param('kernel', self.kernel_init, (3, 3, 3, c, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    kernel, x = kernel.astype(self.dtype), x.astype(self.dtype)
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate([padded[:, k:k + d] for k in range(3)], axis=-1)
    kernel_2d = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, self.features)
    y = jax.lax.conv_general_dilated(stacked.reshape(b * d, h, w, 3 * c), kernel_2d, (1, 1),
                                     'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return precision.broadcast_add(y.reshape(b, d, h, w, self.features), bias)


class WarpGenerator(nn.Module):
  """(identity, expression) -> flow field float32 [B, D, h, w, 3] in volume coordinates.

  Dense to a coarse volume (size / 4), a 3x3x3 conv, trilinear upsampling to (D, h, w), and a
  zero-initialised 3x3x3 conv to the flow, bounded by `scale` (tanh). Computed in `dtype`;
  the flow is float32 (it becomes warp coordinates).
  """
  width: int
  scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, identity: jax.Array, expression: jax.Array,
               shape: tuple[int, int, int]) -> jax.Array:
    """identity [B, I], expression [B, E], shape (D, h, w) static -> flow [B, D, h, w, 3]."""
    d, h, w = shape
    coarse = (max(d // 4, 1), max(h // 4, 1), max(w // 4, 1))
    b = identity.shape[0]
    dt = self.dtype
    x = layers.Dense(math.prod(coarse) * self.width, dtype=dt, name='fc')(
        jnp.concatenate([identity.astype(dt), expression.astype(dt)], axis=-1))
    x = nn.leaky_relu(x.reshape(b, *coarse, self.width), 0.2)
    x = nn.leaky_relu(Conv3x3x3(self.width, dtype=dt, name='conv')(x), 0.2)
    x = jax.image.resize(x, (b, d, h, w, self.width), 'linear')
    flow = Conv3x3x3(3, kernel_init=nn.initializers.zeros, dtype=dt, name='flow')(x)
    return self.scale * jnp.tanh(flow.astype(jnp.float32))
