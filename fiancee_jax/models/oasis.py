"""OASIS (Schonfeld et al. 2021): SPADE generator split into stages, U-Net discriminator.

The generator exposes `conditioning`, `stem`, `block(i)` and `head` so that the path to
any exit is a composition of pure functions (`Module.apply(..., method=...)`).
Block i maps widths[i] -> widths[i + 1] and is followed by x2 nearest upsampling except
for the last block; the stem works at resolution / 2**(K - 1). Every module takes the conv
implementation (ops/conv.py) as its `conv_impl` field and the compute dtype as its `dtype`
field (models/precision.py); neither changes a parameter. Images and logits leave the
modules in float32 whatever the compute dtype.
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from fiancee_jax.models import layers
from fiancee_jax.models import precision
from fiancee_jax.models import spade
from fiancee_jax.ops import conv


def block_widths(ch: int, width_ratios: Sequence[int]) -> tuple[int, ...]:
  """Channel widths [stem out, block 0 out, ..., block K-1 out]."""
  return tuple(ch * r for r in width_ratios)


def lowest_resolution(resolution: Sequence[int], num_blocks: int) -> tuple[int, int]:
  """Resolution at which the stem works; ValueError if the blocks cannot reach `resolution`."""
  factor = 2 ** (num_blocks - 1)
  h, w = resolution
  if h % factor or w % factor:
    raise ValueError(
        f'resolution {tuple(resolution)} cannot be reached by {num_blocks} generator '
        f'blocks (x2 upsampling between blocks needs H and W divisible by {factor}); '
        'change config.data.resolution or config.backbone.width_ratios')
  return h // factor, w // factor


class LightSpadeBlock(nn.Module):
  """Lightweight OASIS block for exit branches: fewer channels, same SPADE structure."""
  features: int
  spade_hidden: int
  upsample: bool
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, seg: jax.Array, *, z: jax.Array | None = None,
               train: bool = False, momentum: float = 0.9) -> jax.Array:
    """h: [B, h, w, C]; seg: [B, H, W, S]; z: [B, Z] or None (z-blind) -> [B, h', w', features]."""
    h = spade.SpadeResBlock(self.features, self.spade_hidden, self.spectral_norm,
                            conv_impl=self.conv_impl, dtype=self.dtype, name='res')(
                                h, seg, z=z, train=train, momentum=momentum)
    return layers.upsample2x(h) if self.upsample else h


class ImageHead(nn.Module):
  """LeakyReLU(0.2) -> 3x3 conv to RGB -> tanh: [B, H, W, C] -> float32 [B, H, W, 3]."""
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return precision.to_output(jnp.tanh(conv.Conv(
        3, conv_impl=self.conv_impl, dtype=self.dtype, name='conv_img')(
            nn.leaky_relu(h.astype(self.dtype), 0.2))))


@dataclasses.dataclass(frozen=True)
class OasisLightFactory:
  """Builds the lightweight versions of OASIS blocks that exit branches are made of."""
  widths: tuple[int, ...]
  spade_hidden: int
  spectral_norm: bool = True
  num_classes: int | None = None  # when set, light blocks see only the label channels
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32  # the light blocks' and heads' compute dtype

  @property
  def num_blocks(self) -> int:
    return len(self.widths) - 1

  def condition(self, cond: jax.Array) -> jax.Array:
    """The spatial conditioning light blocks see: the one-hot labels without the z channels.

    Their SPADEs take z through `latent` instead: as broadcast channels it would make
    SPADE's shared conv (most of a light block's FLOPs) several times dearer for what a
    per-image offset computes.
    """
    return cond if self.num_classes is None else cond[..., :self.num_classes]

  def latent(self, cond: jax.Array) -> jax.Array | None:
    """The per-image z [B, Z] that z-aware light blocks see (the broadcast channels of
    `cond` [B, H, W, C + Z] at one pixel); None when the factory does not know the classes."""
    if self.num_classes is None or cond.shape[-1] == self.num_classes:
      return None
    return cond[:, 0, 0, self.num_classes:]

  def block_width(self, j: int, width_mult: float) -> int:
    """Output width of light block j."""
    return max(1, round(self.widths[j + 1] * width_mult))

  def hidden_width(self, hidden_mult: float) -> int:
    """SPADE hidden width of a light block."""
    return max(1, round(self.spade_hidden * hidden_mult))

  def block(self, j: int, width_mult: float, name: str,
            hidden_mult: float | None = None) -> nn.Module:
    """Light block j: widths x width_mult, SPADE hidden x hidden_mult (None: width_mult)."""
    return LightSpadeBlock(
        self.block_width(j, width_mult),
        self.hidden_width(width_mult if hidden_mult is None else hidden_mult),
        upsample=j < self.num_blocks - 1, spectral_norm=self.spectral_norm,
        conv_impl=self.conv_impl, dtype=self.dtype, name=name)

  def head(self, name: str) -> nn.Module:
    return ImageHead(self.conv_impl, self.dtype, name=name)


class OasisGenerator(nn.Module):
  """Label map (+ one z per image) -> image in [-1, 1].

  Computes in `dtype` from the conditioning on (its light factory's blocks too); the image
  is float32.
  """
  num_classes: int
  ch: int
  width_ratios: tuple[int, ...]
  spade_hidden: int
  z_dim: int
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @property
  def num_blocks(self) -> int:
    return len(self.width_ratios) - 1

  @property
  def widths(self) -> tuple[int, ...]:
    return block_widths(self.ch, self.width_ratios)

  @property
  def light_factory(self) -> OasisLightFactory:
    return OasisLightFactory(self.widths, self.spade_hidden, self.spectral_norm,
                             self.num_classes, self.conv_impl, self.dtype)

  def setup(self):
    widths = self.widths
    self.fc = conv.Conv(widths[0], conv_impl=self.conv_impl, dtype=self.dtype)
    self.blocks = [
        spade.SpadeResBlock(widths[i + 1], self.spade_hidden, self.spectral_norm,
                            conv_impl=self.conv_impl, dtype=self.dtype)
        for i in range(self.num_blocks)
    ]
    self.conv_img = conv.Conv(3, conv_impl=self.conv_impl, dtype=self.dtype)

  def conditioning(self, labels: jax.Array, z: jax.Array) -> jax.Array:
    """labels: int32 [B, H, W], z: float32 [B, z_dim] -> [B, H, W, C + z_dim] in `dtype`."""
    chex.assert_rank(labels, 3)
    chex.assert_shape(z, (labels.shape[0], self.z_dim))
    onehot = jax.nn.one_hot(labels, self.num_classes, dtype=self.dtype)
    zmap = jnp.broadcast_to(z[:, None, None, :].astype(self.dtype),
                            labels.shape + (self.z_dim,))
    return jnp.concatenate([onehot, zmap], axis=-1)

  def stem(self, seg: jax.Array) -> jax.Array:
    """seg: [B, H, W, S] -> features [B, H / 2**(K-1), W / 2**(K-1), widths[0]]."""
    low = lowest_resolution(seg.shape[1:3], self.num_blocks)
    return self.fc(layers.resize_nearest(seg, low))

  def block(self, i: int, h: jax.Array, seg: jax.Array, *, train: bool = False,
            momentum: float = 0.9) -> jax.Array:
    """Block i (static): [B, h, w, widths[i]] -> [B, 2h, 2w, widths[i + 1]] (no x2 after the
    last)."""
    h = self.blocks[i](h, seg, train=train, momentum=momentum)
    if i < self.num_blocks - 1:
      h = layers.upsample2x(h)
    return h

  def head(self, h: jax.Array) -> jax.Array:
    """[B, H, W, widths[-1]] -> image float32 [B, H, W, 3] in [-1, 1]."""
    return precision.to_output(jnp.tanh(self.conv_img(nn.leaky_relu(h, 0.2))))

  def __call__(self, labels: jax.Array, z: jax.Array, *, train: bool = False,
               momentum: float = 0.9) -> jax.Array:
    """Full backbone: labels int32 [B, H, W], z [B, z_dim] -> image [B, H, W, 3]."""
    seg = self.conditioning(labels, z)
    h = self.stem(seg)
    for i in range(self.num_blocks):
      h = self.block(i, h, seg, train=train, momentum=momentum)
    return self.head(h)


class DiscriminatorBlock(nn.Module):
  """OASIS `residual_block_D`: conv-conv residual block that goes down (-1), up (+1) or stays."""
  features: int
  up_or_down: int
  first: bool = False
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    fin, fout = x.shape[-1], self.features
    x = x.astype(self.dtype)
    sn = dict(spectral_norm=self.spectral_norm, conv_impl=self.conv_impl, dtype=self.dtype)
    # Shortcut.
    xs = x
    if self.first:
      if self.up_or_down < 0:
        xs = layers.avgpool2x(xs)
      if fin != fout:
        xs = layers.SNConv(fout, 1, name='conv_s', **sn)(xs, train=train)
    else:
      if self.up_or_down > 0:
        xs = layers.upsample2x(xs)
      if fin != fout:
        xs = layers.SNConv(fout, 1, name='conv_s', **sn)(xs, train=train)
      if self.up_or_down < 0:
        xs = layers.avgpool2x(xs)
    # Residual.
    dx = x
    if not self.first:
      dx = nn.leaky_relu(dx, 0.2)
      if self.up_or_down > 0:
        dx = layers.upsample2x(dx)
    dx = layers.SNConv(fout, name='conv1', **sn)(dx, train=train)
    dx = layers.SNConv(fout, name='conv2', **sn)(nn.leaky_relu(dx, 0.2), train=train)
    if self.up_or_down < 0:
      dx = layers.avgpool2x(dx)
    return xs + dx


class OasisDiscriminator(nn.Module):
  """U-Net discriminator with C + 1 per-pixel logits (index 0 = 'fake', 1 + c = class c).

  Computes in `dtype`; the logits are float32.
  """
  num_classes: int
  widths: tuple[int, ...]  # encoder widths, e.g. 2 * ch * (1, 1, 2, 2, 4, 4)
  out_width: int  # width of the last decoder block (ch in OASIS)
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """image: float32 [B, H, W, 3] -> logits float32 [B, H, W, num_classes + 1]."""
    chex.assert_rank(image, 4)
    n = len(self.widths)
    sn = dict(spectral_norm=self.spectral_norm, conv_impl=self.conv_impl, dtype=self.dtype)
    x, skips = image, []
    for i, w in enumerate(self.widths):
      x = DiscriminatorBlock(w, -1, first=(i == 0), name=f'down_{i}', **sn)(x, train=train)
      skips.append(x)
    x = DiscriminatorBlock(self.widths[-2] if n > 1 else self.out_width, 1,
                           name='up_0', **sn)(x, train=train)
    for i in range(1, n):
      out = self.widths[-2 - i] if i < n - 1 else self.out_width
      x = DiscriminatorBlock(out, 1, name=f'up_{i}', **sn)(
          jnp.concatenate([skips[-i - 1], x], axis=-1), train=train)
    return precision.to_output(
        layers.Conv(self.num_classes + 1, (1, 1), dtype=self.dtype, name='out')(x))
