"""One-shot face reenactment after MegaPortraits (Drobyshev et al. 2022), small and staged.

source image ──► appearance encoder ──► volume v_s [B, D, h, w, C] + identity e_s [B, I]
source, driver ──► motion encoder ──► (rotation, translation, expression) each
v_s ──warp to canonical (R_s, t_s, flow W(e_s, z_s))──► G3D (3-D ResBlocks)
    ──warp to the driver (R_d, t_d, flow W(e_s, z_d))──► orthographic projection (depth
    into channels) ──► 1x1 conv ══► G2D blocks (ResBlocks at h x w, then upsampling
    ResBlocks) ══► image head
source image ──(area-resized, `source_skip`)──► every G2D block

Everything up to and including the 1x1 conv is the `stem`; the G2D blocks are the stages
exits attach to, exactly like OASIS's SPADE blocks (`fiancee_jax.models.exits` needs no
change): `conditioning(source, driver)` packs both images into one [B, H, W, 6] array that
the stem unpacks, and `light_factory` builds narrow G2D blocks with the same upsampling.
With `source_skip` every G2D block (backbone or light) also reads the source image at its
output resolution, so that static background and clothes are copied rather than squeezed
through the coarse volume; the driver never reaches G2D except through the motion code.
Without it the blocks ignore `cond`.

Warps (`fiancee_jax.models.warp`) are backward: each output voxel computes where to read,
and a trilinear sampler reads there. The flows are predicted from (e_s, z) and start at
zero, and rotations and translations near zero, so the untrained model is about an
autoencoder of the source.

Inference is deterministic and per-example: GroupNorm (no batch statistics) and spectral
norm on the G2D and discriminator convs, whose sigmas are stored in `batch_stats` and only
updated when `train=True`. Those convs run through ops/conv.py with the implementation named
by the modules' `conv_impl` field (it changes no parameter).

Every module computes in its `dtype` field (models/precision.py; parameters, GroupNorm
statistics and spectral-norm sigmas stay float32). The geometry does not: motion codes,
flows and warp coordinates are float32 (in bfloat16 a coordinate in [-1, 1] moves in steps of
up to 1/128, several % of a voxel), and so are the images the generator returns.
"""
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from fiancee_jax.models import layers
from fiancee_jax.models import precision
from fiancee_jax.models import warp


def _groups(c: int) -> int:
  """GroupNorm groups for c channels: the largest of 32, 16, ..., 1 dividing c."""
  return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


def _gn(x: jax.Array, name: str, dtype: Any = jnp.float32) -> jax.Array:
  """GroupNorm over all non-batch axes, groups chosen from the width (call in compact);
  statistics in float32, output in `dtype`."""
  return nn.GroupNorm(num_groups=_groups(x.shape[-1]), dtype=dtype, name=name)(x)


def area_resize(images: jax.Array, size: Sequence[int]) -> jax.Array:
  """Area (box) downsampling by integer factors: [B, H, W, C] -> [B, h, w, C]; h | H, w | W."""
  b, hh, ww, c = images.shape
  h, w = size
  if hh % h or ww % w:
    raise ValueError(f'cannot area-resize {(hh, ww)} to {(h, w)}: not integer factors')
  if (h, w) == (hh, ww):
    return images
  return images.reshape(b, h, hh // h, w, ww // w, c).mean(axis=(2, 4))


# ---------------------------------------------------------------------------
# Building blocks.


class ResBlock2D(nn.Module):
  """Pre-activation ResBlock (GN-LReLU-conv3x3 twice) with optional x`factor` upsampling.

  Convs are spectral-normalised `SNConv`s; a 1x1 shortcut (no bias) when widths differ.
  An optional `skip` image (the source, area-resized to the output resolution) is
  concatenated to the input of the first conv and of the (then always present) 1x1
  shortcut, so that what the driver does not move (the background, the clothes) can be
  copied instead of rendered from the coarse volume. The shortcut matters: GroupNorm at
  these widths normalises almost every channel on its own, so after it a flat background
  has lost its colour; the linear shortcut keeps it.
  """
  features: int
  factor: int = 1  # nearest upsampling at the block input (1 = none)
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin], skip: [B, H, W, S] or None -> [B, h f, w f, features], f = factor;
    (H, W) must be integer multiples of (h f, w f)."""
    dt = self.dtype
    sn = dict(spectral_norm=self.spectral_norm, conv_impl=self.conv_impl, dtype=dt)
    x = x.astype(dt)
    skip = None if skip is None else skip.astype(dt)
    up = (lambda t: t) if self.factor == 1 else (
        lambda t: jnp.repeat(jnp.repeat(t, self.factor, 1), self.factor, 2))
    dx = up(nn.leaky_relu(_gn(x, 'norm_0', dt), 0.2))
    if skip is not None:
      dx = jnp.concatenate([dx, area_resize(skip, dx.shape[1:3])], axis=-1)
    dx = layers.SNConv(self.features, name='conv_0', **sn)(dx, train=train)
    dx = nn.leaky_relu(_gn(dx, 'norm_1', dt), 0.2)
    dx = layers.SNConv(self.features, name='conv_1', **sn)(dx, train=train)
    xs = up(x)
    if skip is not None:
      xs = jnp.concatenate([xs, area_resize(skip, xs.shape[1:3])], axis=-1)
    if xs.shape[-1] != self.features:
      xs = layers.SNConv(self.features, 1, use_bias=False, name='conv_s', **sn)(xs, train=train)
    return xs + dx


class DownBlock2D(nn.Module):
  """Encoder ResBlock: 2x2 average pooling, then GN-LReLU-conv3x3 twice and a 1x1 shortcut.

  Pooling first runs the convs at the output resolution (4x cheaper than convs then pooling,
  and most of the appearance encoder's time on the CPU); fine detail reaches G2D through
  the source skip, the volume only needs coarse features.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H / 2, W / 2, features]."""
    dt = self.dtype
    x = layers.avgpool2x(x.astype(dt))
    dx = layers.Conv(self.features, (3, 3), dtype=dt, name='conv_0')(
        nn.leaky_relu(_gn(x, 'norm_0', dt), 0.2))
    dx = layers.Conv(self.features, (3, 3), dtype=dt, name='conv_1')(
        nn.leaky_relu(_gn(dx, 'norm_1', dt), 0.2))
    return layers.Conv(self.features, (1, 1), use_bias=False, dtype=dt, name='conv_s')(x) + dx


class ResBlock3D(nn.Module):
  """Pre-activation 3-D ResBlock (GN-LReLU-conv3x3x3 twice), width kept."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, D, H, W, C] -> same shape, in `dtype`."""
    c, dt = x.shape[-1], self.dtype
    x = x.astype(dt)
    dx = warp.Conv3x3x3(c, dtype=dt, name='conv_0')(nn.leaky_relu(_gn(x, 'norm_0', dt), 0.2))
    dx = warp.Conv3x3x3(c, dtype=dt, name='conv_1')(nn.leaky_relu(_gn(dx, 'norm_1', dt), 0.2))
    return x + dx


class ImageHead(nn.Module):
  """[GN ->] LReLU(0.2) -> 3x3 conv to RGB -> tanh.

  Without `norm`, absolute feature levels reach the conv: GroupNorm at a few channels per
  group removes each image's per-channel mean, hence the colour of flat regions, which the
  source skip would otherwise bring.
  """
  norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """[B, H, W, C] -> image float32 [B, H, W, 3] in [-1, 1]."""
    h = h.astype(self.dtype)
    if self.norm:
      h = _gn(h, 'norm', self.dtype)
    return precision.to_output(jnp.tanh(
        layers.Conv(3, (3, 3), dtype=self.dtype, name='conv_img')(nn.leaky_relu(h, 0.2))))


class AppearanceEncoder(nn.Module):
  """Source image -> feature volume [B, D, h, w, C] and identity descriptor [B, id_dim]."""
  widths: tuple[int, ...]  # conv at full resolution, then one x2-down block per width
  depth: int
  channels: int
  id_dim: int
  blocks_3d: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """image [B, H, W, 3] -> (volume [B, D, h, w, C], identity [B, id_dim]), in `dtype`."""
    dt = self.dtype
    x = layers.Conv(self.widths[0], (3, 3), dtype=dt, name='conv_in')(image)
    for i, w in enumerate(self.widths[1:]):
      x = DownBlock2D(w, dt, name=f'down_{i}')(x)
    x = nn.leaky_relu(_gn(x, 'norm_out', dt), 0.2)
    identity = layers.Dense(self.id_dim, dtype=dt, name='identity')(x.mean(axis=(1, 2)))
    b, h, w, _ = x.shape
    vol = layers.Conv(self.depth * self.channels, (1, 1), dtype=dt, name='to_volume')(x)
    vol = vol.reshape(b, h, w, self.depth, self.channels).transpose(0, 3, 1, 2, 4)
    for i in range(self.blocks_3d):
      vol = ResBlock3D(dt, name=f'res3d_{i}')(vol)
    return vol, identity


class MotionEncoder(nn.Module):
  """Image -> motion code [B, 6 + expr_dim]: rotation (3, radians), translation (3), expression.

  Works on the image area-downsampled to at most `input_size`, with stride-2 convs whose
  last feature map is flattened into a dense layer (pose lives in positions). The last
  layer starts
  small, so an untrained encoder says: almost no rotation or translation, neutral
  expression (exactly zero would block the gradient of an L1 consistency term at 0).
  """
  widths: tuple[int, ...]
  expr_dim: int
  input_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """image [B, H, W, 3] -> motion code float32 [B, 6 + expr_dim] (computed in `dtype`)."""
    b, h, w, _ = image.shape
    dt = self.dtype
    f = max(1, max(h, w) // self.input_size)
    while h % f or w % f:
      f -= 1
    x = image.reshape(b, h // f, f, w // f, f, 3).mean(axis=(2, 4))
    for i, width in enumerate(self.widths):
      x = nn.leaky_relu(layers.Conv(width, (3, 3), strides=(2, 2), dtype=dt,
                                    name=f'conv_{i}')(x), 0.2)
    # Flattened, not pooled: a shallow net's pooled features keep colours, not positions.
    x = nn.leaky_relu(layers.Dense(4 * self.widths[-1], dtype=dt, name='fc')(x.reshape(b, -1)),
                      0.2)
    raw = precision.to_output(layers.Dense(6 + self.expr_dim, dtype=dt, name='out',
                                           kernel_init=nn.initializers.normal(1e-2))(x))
    rotation = (jnp.pi / 2) * jnp.tanh(raw[:, :3])
    translation = 0.5 * jnp.tanh(raw[:, 3:6])
    expression = jnp.tanh(raw[:, 6:])
    return jnp.concatenate([rotation, translation, expression], axis=-1)


class PatchDiscriminator(nn.Module):
  """Patch discriminator: (SNConv3x3-LReLU-avgpool) per width, then 3x3 convs to one logit."""
  widths: tuple[int, ...]
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """image float32 [B, H, W, 3] -> logits float32 [B, H / 2**n, W / 2**n, 1] (computed in
    `dtype`)."""
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f'the discriminator takes images float32 [B, H, W, 3], got '
                       f'{image.shape}')
    sn = dict(spectral_norm=self.spectral_norm, conv_impl=self.conv_impl, dtype=self.dtype)
    x = image
    for i, w in enumerate(self.widths):
      x = layers.avgpool2x(nn.leaky_relu(
          layers.SNConv(w, name=f'conv_{i}', **sn)(x, train=train), 0.2))
    x = nn.leaky_relu(layers.SNConv(self.widths[-1], name='conv_out', **sn)(x, train=train),
                      0.2)
    return precision.to_output(layers.SNConv(1, name='logits', **sn)(x, train=train))


# ---------------------------------------------------------------------------
# Generator.


@dataclasses.dataclass(frozen=True)
class ReenactLightFactory:
  """Builds the lightweight G2D blocks that exit branches are made of."""
  widths: tuple[int, ...]  # [stem out, block 0 out, ..., block K-1 out]
  factors: tuple[int, ...]  # upsampling factor of each block (1 for the ResBlocks)
  spectral_norm: bool = True
  source_skip: bool = False  # blocks see the source image (and a guide, if any)
  head_norm: bool = True  # GroupNorm in the image heads
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32  # the light blocks' and heads' compute dtype

  @property
  def num_blocks(self) -> int:
    return len(self.widths) - 1

  def condition(self, cond: jax.Array) -> jax.Array:
    """The conditioning light blocks see: with `source_skip` the source image [B, H, W, 3]
    (never the driver: its identity must not leak), else cond unchanged (and ignored)."""
    return cond[..., :3] if self.source_skip else cond

  def latent(self, cond: jax.Array) -> None:
    """No per-image latent: the driver's motion is already in the features."""
    del cond

  def block_width(self, j: int, width_mult: float) -> int:
    """Output width of light block j."""
    return max(1, round(self.widths[j + 1] * width_mult))

  def block(self, j: int, width_mult: float, name: str,
            hidden_mult: float | None = None) -> nn.Module:
    """Light G2D block j: same upsampling as backbone block j, fewer channels."""
    del hidden_mult  # G2D blocks have no SPADE
    return LightG2DBlock(self.block_width(j, width_mult), self.factors[j],
                         self.spectral_norm, self.source_skip, self.conv_impl, self.dtype,
                         name=name)

  def head(self, name: str) -> nn.Module:
    return ImageHead(self.head_norm, self.dtype, name=name)


class LightG2DBlock(nn.Module):
  """A narrow G2D block for exit branches.

  With `source_skip`, `cond` (what `ReenactLightFactory.condition` kept, the source image,
  plus the guiding map if the exit is guided) is the block's skip input, as in the backbone;
  otherwise it is ignored.
  """
  features: int
  factor: int
  spectral_norm: bool = True
  source_skip: bool = False
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, cond: jax.Array | None = None, *, train: bool = False,
               momentum: float = 0.9) -> jax.Array:
    """h: [B, h, w, C] -> [B, h f, w f, features]; cond: [B, H, W, S] or None."""
    del momentum  # there are no batch statistics
    skip = cond if self.source_skip else None
    return ResBlock2D(self.features, self.factor, self.spectral_norm, self.conv_impl,
                      self.dtype, name='res')(h, skip, train=train)


class ReenactGenerator(nn.Module):
  """(source, driver) images -> the source's identity with the driver's motion.

  Attributes:
    enc_widths: appearance encoder widths: a conv at full resolution, then one x2-down
      block per further width; len(enc_widths) - 1 must equal log2(prod(up_factors)).
    volume_depth: D of the feature volume.
    volume_channels: C of the feature volume (the projection has D * C channels).
    app_blocks_3d: 3-D ResBlocks on the source volume (in the appearance encoder).
    g3d_blocks: 3-D ResBlocks on the canonical volume (G3D).
    id_dim: identity descriptor size.
    expr_dim: expression latent size.
    motion_widths: stride-2 convs of the motion encoder.
    motion_input: the motion encoder sees the image area-downsampled to at most this side.
    warp_width: width of the warp generators.
    flow_scale: bound of the non-rigid flows (volume coordinates, [-1, 1] per axis).
    g2d_width: G2D width after the 1x1 reduction (512 in MegaPortraits).
    num_res_blocks: G2D ResBlocks at the latent resolution.
    up_widths: output widths of the upsampling G2D blocks.
    up_factors: their upsampling factors (image side = latent side * prod).
    spectral_norm: spectral norm on the G2D convs.
    source_skip: every G2D block also sees the source image, area-resized to its output
      resolution (a skip path that lets static background be copied, not re-rendered).
    warp_padding: what warps read outside the volume ('border' or 'zeros';
      `warp.trilinear_sample`).
    head_norm: GroupNorm at the input of the image head (and of the exits' heads).
    conv_impl: implementation of the G2D convs (ops/conv.py), light blocks included.
    dtype: the compute dtype (models/precision.py), light blocks included.
  """
  enc_widths: tuple[int, ...]
  volume_depth: int
  volume_channels: int
  app_blocks_3d: int
  g3d_blocks: int
  id_dim: int
  expr_dim: int
  motion_widths: tuple[int, ...]
  motion_input: int
  warp_width: int
  flow_scale: float
  g2d_width: int
  num_res_blocks: int
  up_widths: tuple[int, ...]
  up_factors: tuple[int, ...]
  spectral_norm: bool = True
  source_skip: bool = False
  warp_padding: str = 'border'
  head_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @property
  def num_blocks(self) -> int:
    return self.num_res_blocks + len(self.up_widths)

  @property
  def widths(self) -> tuple[int, ...]:
    """Channel widths [stem out, block 0 out, ..., block K-1 out]."""
    return (self.g2d_width,) * (self.num_res_blocks + 1) + tuple(self.up_widths)

  @property
  def block_factors(self) -> tuple[int, ...]:
    return (1,) * self.num_res_blocks + tuple(self.up_factors)

  @property
  def light_factory(self) -> ReenactLightFactory:
    return ReenactLightFactory(self.widths, self.block_factors, self.spectral_norm,
                               self.source_skip, self.head_norm, self.conv_impl, self.dtype)

  def latent_size(self, resolution: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the volume and of G2D's first blocks; ValueError if they do not fit."""
    up = math.prod(self.up_factors)
    h, w = (int(v) for v in resolution)
    if len(self.up_factors) != len(self.up_widths):
      raise ValueError(f'config.backbone.up_factors={self.up_factors} and up_widths='
                       f'{self.up_widths} must have the same length')
    if up & (up - 1) or 2 ** (len(self.enc_widths) - 1) != up:
      raise ValueError(
          f'the appearance encoder halves the image {len(self.enc_widths) - 1} times '
          f'(len(config.backbone.enc_widths) - 1) but G2D upsamples by {up} '
          f'(prod(config.backbone.up_factors)); make 2**(len(enc_widths) - 1) == {up}')
    if h % up or w % up:
      raise ValueError(f'resolution {(h, w)} is not divisible by the G2D upsampling {up} '
                       '(prod(config.backbone.up_factors)); change config.data.resolution')
    return h // up, w // up

  def setup(self):
    dt = self.dtype
    self.appearance = AppearanceEncoder(self.enc_widths, self.volume_depth,
                                        self.volume_channels, self.id_dim, self.app_blocks_3d,
                                        dt)
    self.motion = MotionEncoder(self.motion_widths, self.expr_dim, self.motion_input, dt)
    self.warp_to_canonical = warp.WarpGenerator(self.warp_width, self.flow_scale, dt)
    self.warp_to_driver = warp.WarpGenerator(self.warp_width, self.flow_scale, dt)
    self.g3d = [ResBlock3D(dt) for _ in range(self.g3d_blocks)]
    self.g2d_in = layers.Conv(self.g2d_width, (1, 1), dtype=dt)
    self.g2d_blocks = [ResBlock2D(self.widths[i + 1], self.block_factors[i],
                                  self.spectral_norm, self.conv_impl, dt)
                       for i in range(self.num_blocks)]
    self.g2d_head = ImageHead(self.head_norm, dt)

  # -- Staged interface (what fiancee_jax.models.exits uses). --

  def conditioning(self, source: jax.Array, driver: jax.Array) -> jax.Array:
    """source, driver: float32 [B, H, W, 3] in [-1, 1] -> cond [B, H, W, 6] in `dtype`.

    Raises:
      ValueError: shapes or dtypes that are not two float [B, H, W, 3] batches that the
        backbone can decode to (H, W).
    """
    for name, x in (('source', source), ('driver', driver)):
      if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f'{name} must be float32 [B, H, W, 3] in [-1, 1], got shape '
                         f'{tuple(x.shape)}')
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f'{name} must be float32 [B, H, W, 3] in [-1, 1], got dtype '
                         f'{x.dtype}; convert uint8 images with x / 127.5 - 1')
    if source.shape != driver.shape:
      raise ValueError(f'source {tuple(source.shape)} and driver {tuple(driver.shape)} '
                       'must have the same shape')
    self.latent_size(source.shape[1:3])
    return jnp.concatenate([source, driver], axis=-1).astype(self.dtype)

  def stem(self, cond: jax.Array) -> jax.Array:
    """cond [B, H, W, 6] -> G2D input [B, h, w, g2d_width]: encoders, warps, G3D,
    projection and the 1x1 reduction."""
    return self.g2d_in(self.project(self.driven_volume(cond[..., :3], cond[..., 3:])))

  def block(self, i: int, h: jax.Array, cond: jax.Array, *, train: bool = False,
            momentum: float = 0.9) -> jax.Array:
    """G2D block i (static): [B, h, w, widths[i]] -> [B, h f, w f, widths[i + 1]], f its
    upsampling factor. With `source_skip` the block also sees the source (cond[..., :3]);
    `momentum` is unused (no batch statistics)."""
    del momentum
    return self.g2d_blocks[i](h, self._skip(cond[..., :3]), train=train)

  def _skip(self, source: jax.Array | None) -> jax.Array | None:
    return source if self.source_skip else None

  def head(self, h: jax.Array) -> jax.Array:
    """[B, H, W, widths[-1]] -> image float32 [B, H, W, 3] in [-1, 1]."""
    return self.g2d_head(h)

  def __call__(self, source: jax.Array, driver: jax.Array, *, train: bool = False,
               momentum: float = 0.9) -> jax.Array:
    """Full backbone: source, driver float32 [B, H, W, 3] -> image float32 [B, H, W, 3]."""
    cond = self.conditioning(source, driver)
    h = self.stem(cond)
    for i in range(self.num_blocks):
      h = self.block(i, h, cond, train=train, momentum=momentum)
    return self.head(h)

  # -- The parts of the stem. --

  def motion_code(self, image: jax.Array) -> jax.Array:
    """image float32 [B, H, W, 3] -> motion code float32 [B, 6 + expr_dim]:
    (yaw, pitch, roll) in radians, translation (x, y, z), expression in [-1, 1]."""
    return self.motion(image)

  def driven_volume(self, source: jax.Array, driver: jax.Array) -> jax.Array:
    """The source's feature volume moved to the driver's motion: [B, D, h, w, C]."""
    b = source.shape[0]
    vol, identity = self.appearance(source)
    codes = self.motion(jnp.concatenate([source, driver]))  # one pass for both
    m_s, m_d = codes[:b], codes[b:]
    shape = vol.shape[1:4]
    grid = warp.volume_grid(*shape)[None]
    flow_s = self.warp_to_canonical(identity, m_s[:, 6:], shape)
    coords = warp.canonical_coords(grid, warp.rotation_matrix(m_s[:, :3]), m_s[:, 3:6], flow_s)
    canonical = warp.trilinear_sample(vol, coords, self.warp_padding)
    for block in self.g3d:
      canonical = block(canonical)
    flow_d = self.warp_to_driver(identity, m_d[:, 6:], shape)
    coords = warp.driver_coords(grid, warp.rotation_matrix(m_d[:, :3]), m_d[:, 3:6], flow_d)
    return warp.trilinear_sample(canonical, coords, self.warp_padding)

  def project(self, volume: jax.Array) -> jax.Array:
    """Orthographic projection: [B, D, h, w, C] -> [B, h, w, D * C] (depth into channels)."""
    b, d, h, w, c = volume.shape
    return volume.transpose(0, 2, 3, 1, 4).reshape(b, h, w, d * c)

  def g2d(self, features: jax.Array, source: jax.Array | None = None, *,
          train: bool = False) -> jax.Array:
    """G2D alone: projected features [B, h, w, D * C] (and, with `source_skip`, the source
    image [B, H, W, 3]) -> image [B, H, W, 3]."""
    if self.source_skip and source is None:
      raise ValueError('this G2D has a source skip (config.backbone.source_skip): pass the '
                       'source image')
    h = self.g2d_in(features)
    for i in range(self.num_blocks):
      h = self.g2d_blocks[i](h, self._skip(source), train=train)
    return self.head(h)


# ---------------------------------------------------------------------------
# From a config (models/factory.py dispatches here on backbone.name).


def make_generator(config: ml_collections.ConfigDict, conv_impl: str = 'xla',
                   dtype: Any = jnp.float32) -> ReenactGenerator:
  """The ReenactGenerator of config.backbone (name 'reenact'), its convs run by `conv_impl`
  (ops/conv.py; models/factory.py passes the one config.kernels names), computing in
  `dtype`."""
  b = config.backbone
  if b.name != 'reenact':
    raise ValueError(f"config.backbone.name={b.name!r} is not the reenactment backbone "
                     "('reenact')")
  return ReenactGenerator(
      enc_widths=tuple(b.enc_widths), volume_depth=b.volume_depth,
      volume_channels=b.volume_channels, app_blocks_3d=b.app_blocks_3d,
      g3d_blocks=b.g3d_blocks, id_dim=b.id_dim, expr_dim=b.expr_dim,
      motion_widths=tuple(b.motion_widths), motion_input=b.motion_input,
      warp_width=b.warp_width, flow_scale=b.flow_scale, g2d_width=b.g2d_width,
      num_res_blocks=b.num_res_blocks, up_widths=tuple(b.up_widths),
      up_factors=tuple(b.up_factors), spectral_norm=b.spectral_norm,
      # Keys that configs may leave out.
      source_skip=b.get('source_skip', False), warp_padding=b.get('warp_padding', 'border'),
      head_norm=b.get('head_norm', True), conv_impl=conv_impl, dtype=dtype)


def make_discriminator(config: ml_collections.ConfigDict, conv_impl: str = 'xla',
                       dtype: Any = jnp.float32) -> PatchDiscriminator:
  """The PatchDiscriminator of config.backbone, computing in `dtype`."""
  b = config.backbone
  return PatchDiscriminator(tuple(b.d_widths), b.spectral_norm, conv_impl, dtype)
