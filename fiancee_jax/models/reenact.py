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

Warps are backward: each output voxel computes where to read, and a trilinear sampler
(`trilinear_sample`, gathers, border padding) reads there. Canonical voxel X reads the source
volume at R_s (X + f_s(X)) + t_s; driver voxel Y reads the processed canonical volume at
R_d^T (Y - t_d) + f_d(Y). The flows f are predicted from (e_s, z) and start at zero, and
rotations and translations near zero, so the untrained model is about an autoencoder of
the source.

Inference is deterministic and per-example: GroupNorm (no batch statistics) and spectral
norm on the G2D and discriminator convs, whose sigmas are stored in `batch_stats` and only
updated when `train=True`.
"""
import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from fiancee_jax.metrics import flops
from fiancee_jax.models import layers


def _groups(c: int) -> int:
  """GroupNorm groups for c channels: the largest of 32, 16, ..., 1 dividing c."""
  return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


def _gn(x: jax.Array, name: str) -> jax.Array:
  """GroupNorm over all non-batch axes, groups chosen from the width (call in compact)."""
  return nn.GroupNorm(num_groups=_groups(x.shape[-1]), name=name)(x)


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


PADDINGS = ('border', 'zeros')


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
    float32 [B, ..., C]. Differentiable in both arguments (gathers of the 8 neighbours,
    weights linear in the coordinates).

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
        out = out + gather(flat, idx) * weight[..., None]
  return out.reshape(b, *out_shape, c)


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

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin], skip: [B, H, W, S] or None -> [B, h f, w f, features], f = factor;
    (H, W) must be integer multiples of (h f, w f)."""
    sn = dict(spectral_norm=self.spectral_norm)
    up = (lambda t: t) if self.factor == 1 else (
        lambda t: jnp.repeat(jnp.repeat(t, self.factor, 1), self.factor, 2))
    dx = up(nn.leaky_relu(_gn(x, 'norm_0'), 0.2))
    if skip is not None:
      dx = jnp.concatenate([dx, area_resize(skip, dx.shape[1:3])], axis=-1)
    dx = layers.SNConv(self.features, name='conv_0', **sn)(dx, train=train)
    dx = nn.leaky_relu(_gn(dx, 'norm_1'), 0.2)
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H / 2, W / 2, features]."""
    x = layers.avgpool2x(x)
    dx = nn.Conv(self.features, (3, 3), name='conv_0')(nn.leaky_relu(_gn(x, 'norm_0'), 0.2))
    dx = nn.Conv(self.features, (3, 3), name='conv_1')(nn.leaky_relu(_gn(dx, 'norm_1'), 0.2))
    return nn.Conv(self.features, (1, 1), use_bias=False, name='conv_s')(x) + dx


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float32 [B, D, H, W, Cin] -> [B, D, H, W, features]."""
    b, d, h, w, c = x.shape
    kernel = self.param('kernel', self.kernel_init, (3, 3, 3, c, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate([padded[:, k:k + d] for k in range(3)], axis=-1)
    kernel_2d = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, self.features)
    y = jax.lax.conv_general_dilated(stacked.reshape(b * d, h, w, 3 * c), kernel_2d, (1, 1),
                                     'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape(b, d, h, w, self.features) + bias


class ResBlock3D(nn.Module):
  """Pre-activation 3-D ResBlock (GN-LReLU-conv3x3x3 twice), width kept."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, D, H, W, C] -> same shape."""
    c = x.shape[-1]
    dx = Conv3x3x3(c, name='conv_0')(nn.leaky_relu(_gn(x, 'norm_0'), 0.2))
    dx = Conv3x3x3(c, name='conv_1')(nn.leaky_relu(_gn(dx, 'norm_1'), 0.2))
    return x + dx


class ImageHead(nn.Module):
  """[GN ->] LReLU(0.2) -> 3x3 conv to RGB -> tanh.

  Without `norm`, absolute feature levels reach the conv: GroupNorm at a few channels per
  group removes each image's per-channel mean, hence the colour of flat regions, which the
  source skip would otherwise bring.
  """
  norm: bool = True

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """[B, H, W, C] -> image float32 [B, H, W, 3] in [-1, 1]."""
    if self.norm:
      h = _gn(h, 'norm')
    return jnp.tanh(nn.Conv(3, (3, 3), name='conv_img')(nn.leaky_relu(h, 0.2)))


class AppearanceEncoder(nn.Module):
  """Source image -> feature volume [B, D, h, w, C] and identity descriptor [B, id_dim]."""
  widths: tuple[int, ...]  # conv at full resolution, then one x2-down block per width
  depth: int
  channels: int
  id_dim: int
  blocks_3d: int

  @nn.compact
  def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nn.Conv(self.widths[0], (3, 3), name='conv_in')(image)
    for i, w in enumerate(self.widths[1:]):
      x = DownBlock2D(w, name=f'down_{i}')(x)
    x = nn.leaky_relu(_gn(x, 'norm_out'), 0.2)
    identity = nn.Dense(self.id_dim, name='identity')(x.mean(axis=(1, 2)))
    b, h, w, _ = x.shape
    vol = nn.Conv(self.depth * self.channels, (1, 1), name='to_volume')(x)
    vol = vol.reshape(b, h, w, self.depth, self.channels).transpose(0, 3, 1, 2, 4)
    for i in range(self.blocks_3d):
      vol = ResBlock3D(name=f'res3d_{i}')(vol)
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

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    b, h, w, _ = image.shape
    f = max(1, max(h, w) // self.input_size)
    while h % f or w % f:
      f -= 1
    x = image.reshape(b, h // f, f, w // f, f, 3).mean(axis=(2, 4))
    for i, width in enumerate(self.widths):
      x = nn.leaky_relu(nn.Conv(width, (3, 3), strides=(2, 2), name=f'conv_{i}')(x), 0.2)
    # Flattened, not pooled: a shallow net's pooled features keep colours, not positions.
    x = nn.leaky_relu(nn.Dense(4 * self.widths[-1], name='fc')(x.reshape(b, -1)), 0.2)
    raw = nn.Dense(6 + self.expr_dim, kernel_init=nn.initializers.normal(1e-2), name='out')(x)
    rotation = (jnp.pi / 2) * jnp.tanh(raw[:, :3])
    translation = 0.5 * jnp.tanh(raw[:, 3:6])
    expression = jnp.tanh(raw[:, 6:])
    return jnp.concatenate([rotation, translation, expression], axis=-1)


class WarpGenerator(nn.Module):
  """(identity, expression) -> flow field float32 [B, D, h, w, 3] in volume coordinates.

  Dense to a coarse volume (size / 4), a 3x3x3 conv, trilinear upsampling to (D, h, w), and a
  zero-initialised 3x3x3 conv to the flow, bounded by `scale` (tanh).
  """
  width: int
  scale: float

  @nn.compact
  def __call__(self, identity: jax.Array, expression: jax.Array,
               shape: tuple[int, int, int]) -> jax.Array:
    """identity [B, I], expression [B, E], shape (D, h, w) static -> flow [B, D, h, w, 3]."""
    d, h, w = shape
    coarse = (max(d // 4, 1), max(h // 4, 1), max(w // 4, 1))
    b = identity.shape[0]
    x = nn.Dense(math.prod(coarse) * self.width, name='fc')(
        jnp.concatenate([identity, expression], axis=-1))
    x = nn.leaky_relu(x.reshape(b, *coarse, self.width), 0.2)
    x = nn.leaky_relu(Conv3x3x3(self.width, name='conv')(x), 0.2)
    x = jax.image.resize(x, (b, d, h, w, self.width), 'linear')
    flow = Conv3x3x3(3, kernel_init=nn.initializers.zeros, name='flow')(x)
    return self.scale * jnp.tanh(flow)


class PatchDiscriminator(nn.Module):
  """Patch discriminator: (SNConv3x3-LReLU-avgpool) per width, then 3x3 convs to one logit."""
  widths: tuple[int, ...]
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """image float32 [B, H, W, 3] -> logits float32 [B, H / 2**n, W / 2**n, 1]."""
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f'the discriminator takes images float32 [B, H, W, 3], got '
                       f'{image.shape}')
    sn = dict(spectral_norm=self.spectral_norm)
    x = image
    for i, w in enumerate(self.widths):
      x = layers.avgpool2x(nn.leaky_relu(
          layers.SNConv(w, name=f'conv_{i}', **sn)(x, train=train), 0.2))
    x = nn.leaky_relu(layers.SNConv(self.widths[-1], name='conv_out', **sn)(x, train=train),
                      0.2)
    return layers.SNConv(1, name='logits', **sn)(x, train=train)


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
                         self.spectral_norm, self.source_skip, name=name)

  def head(self, name: str) -> nn.Module:
    return ImageHead(self.head_norm, name=name)


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

  @nn.compact
  def __call__(self, h: jax.Array, cond: jax.Array | None = None, *, train: bool = False,
               momentum: float = 0.9) -> jax.Array:
    """h: [B, h, w, C] -> [B, h f, w f, features]; cond: [B, H, W, S] or None."""
    del momentum  # there are no batch statistics
    skip = cond if self.source_skip else None
    return ResBlock2D(self.features, self.factor, self.spectral_norm, name='res')(
        h, skip, train=train)


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
      `trilinear_sample`).
    head_norm: GroupNorm at the input of the image head (and of the exits' heads).
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
                               self.source_skip, self.head_norm)

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
    self.appearance = AppearanceEncoder(self.enc_widths, self.volume_depth,
                                        self.volume_channels, self.id_dim, self.app_blocks_3d)
    self.motion = MotionEncoder(self.motion_widths, self.expr_dim, self.motion_input)
    self.warp_to_canonical = WarpGenerator(self.warp_width, self.flow_scale)
    self.warp_to_driver = WarpGenerator(self.warp_width, self.flow_scale)
    self.g3d = [ResBlock3D() for _ in range(self.g3d_blocks)]
    self.g2d_in = nn.Conv(self.g2d_width, (1, 1))
    self.g2d_blocks = [ResBlock2D(self.widths[i + 1], self.block_factors[i],
                                  self.spectral_norm) for i in range(self.num_blocks)]
    self.g2d_head = ImageHead(self.head_norm)

  # -- Staged interface (what fiancee_jax.models.exits uses). --

  def conditioning(self, source: jax.Array, driver: jax.Array) -> jax.Array:
    """source, driver: float32 [B, H, W, 3] in [-1, 1] -> cond float32 [B, H, W, 6].

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
    return jnp.concatenate([source, driver], axis=-1).astype(jnp.float32)

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
    grid = volume_grid(*shape)[None]
    # Canonical voxel X reads the source at R_s (X + f_s(X)) + t_s.
    r_s, t_s = rotation_matrix(m_s[:, :3]), m_s[:, 3:6]
    flow_s = self.warp_to_canonical(identity, m_s[:, 6:], shape)
    coords = jnp.einsum('bdhwj,bij->bdhwi', grid + flow_s, r_s)
    canonical = trilinear_sample(vol, coords + t_s[:, None, None, None], self.warp_padding)
    for block in self.g3d:
      canonical = block(canonical)
    # Driver voxel Y reads the canonical volume at R_d^T (Y - t_d) + f_d(Y).
    r_d, t_d = rotation_matrix(m_d[:, :3]), m_d[:, 3:6]
    coords = jnp.einsum('bdhwj,bji->bdhwi', grid - t_d[:, None, None, None], r_d)
    return trilinear_sample(canonical,
                            coords + self.warp_to_driver(identity, m_d[:, 6:], shape),
                            self.warp_padding)

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
# From a config (the lead's factory.make_generator can dispatch here on backbone.name).


def make_generator(config: ml_collections.ConfigDict) -> ReenactGenerator:
  """The ReenactGenerator of config.backbone (name 'reenact')."""
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
      head_norm=b.get('head_norm', True))


def make_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
  b = config.backbone
  return PatchDiscriminator(tuple(b.d_widths), b.spectral_norm)


def _abstract_images(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
  h, w = config.data.resolution
  return jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)


def g2d_param_count(params: dict) -> int:
  """Parameters of G2D (1x1 reduction, blocks, head) in generator params."""
  return sum(flops.param_count(v) for k, v in params.items() if k.startswith('g2d'))


def reenact_stats(config: ml_collections.ConfigDict) -> dict:
  """Costs of the reenactment generator at batch 1, from XLA's cost analysis.

  Returns:
    {'params': int, 'gflops': float, 'g2d_params': int, 'g2d_gflops': float}: the whole
    generator (source, driver -> image) and G2D alone (projected volume -> image, the part
    exits replace). Multiply-add = 2 FLOPs.
  """
  g = make_generator(config)
  img = _abstract_images(config)
  variables = jax.eval_shape(g.init, jax.random.key(0), img, img)
  gf = flops.gflops(lambda v, s, d: g.apply(v, s, d), variables, img, img)
  h, w = g.latent_size(config.data.resolution)
  feats = jax.ShapeDtypeStruct((1, h, w, g.volume_depth * g.volume_channels), jnp.float32)
  g2d_gf = flops.gflops(lambda v, f, s: g.apply(v, f, s, method='g2d'), variables, feats, img)
  return {'params': flops.param_count(variables['params']), 'gflops': gf,
          'g2d_params': g2d_param_count(variables['params']), 'g2d_gflops': g2d_gf}
