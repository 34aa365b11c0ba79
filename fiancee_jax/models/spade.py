"""SPADE (Park et al. 2019) as used by OASIS: parameter-free batch norm modulated by the label map.

The convolutions that read the same tensor run as one convolution: the three SPADE hidden
convs of a residual block (they all read the label map at the block's resolution) and each
SPADE's gamma and beta convs (they read the same hidden activation). The parameters keep
nn.Conv's layout, names and initialisation, so checkpoints are unchanged; only the
number of (small, badly vectorised) conv calls drops. XLA:CPU runs 3x3 convs with few output
channels far below the speed of wider ones, so the thin light blocks of the exits gain most.
Every conv runs through ops/conv.py with the implementation named by `conv_impl`.
`SpadeResBlock` computes in its `dtype` (models/precision.py); the parts it calls compute in
the dtype of their inputs, batch-norm statistics in float32.
"""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fiancee_jax.models import layers
from fiancee_jax.models import precision
from fiancee_jax.ops import conv


class ParamFreeBatchNorm(nn.Module):
  """Batch norm without scale and bias, statistics over the global batch.

  Under `jit` with the batch sharded over a mesh, `mean` over axis 0 is a global
  reduction, which is what OASIS's SyncBatchNorm computes. Running statistics live in
  `batch_stats`; `momentum` is a call argument so that statistics can be recomputed
  exactly for EMA weights (momentum = i / (i + 1) gives the running mean of batches).
  Statistics are computed and stored in float32 whatever x's dtype (a bfloat16 mean of a
  large map would lose most of its digits); the output has x's dtype.
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, momentum: float = 0.9) -> jax.Array:
    c = x.shape[-1]
    mean_var = self.variable('batch_stats', 'mean', jnp.zeros, (c,))
    var_var = self.variable('batch_stats', 'var', jnp.ones, (c,))
    if train:
      x32 = x.astype(jnp.float32)
      mean = x32.mean(axis=(0, 1, 2))
      var = jnp.maximum((x32 * x32).mean(axis=(0, 1, 2)) - mean * mean, 0.0)
      if not self.is_initializing():
        mean_var.value = momentum * mean_var.value + (1 - momentum) * mean
        var_var.value = momentum * var_var.value + (1 - momentum) * var
    else:
      mean, var = mean_var.value, var_var.value
    # Normalised in float32 (XLA fuses the casts), returned in x's dtype.
    return ((x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


class ConvParams(nn.Module):
  """A conv's kernel [kh, kw, in, out] and bias [out], laid out and initialised as
  nn.Conv's (same names, same initialisers), for convs that run fused with others."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, in_features, self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return kernel, bias


def fused_conv(x: jax.Array, convs: Sequence[tuple[jax.Array, jax.Array]],
               conv_impl: str = 'xla') -> list[jax.Array]:
  """Runs 'SAME' stride-1 convs that share their input as one conv, in x's dtype.

  Args:
    x: [B, H, W, C].
    convs: (kernel [kh, kw, C, F_i], bias [F_i]) per conv (float32 parameters).
    conv_impl: the conv implementation (ops/conv.py).
  Returns:
    [B, H, W, F_i] per conv, in order, in x's dtype.
  """
  kernel = jnp.concatenate([k for k, _ in convs], axis=-1)
  bias = jnp.concatenate([b for _, b in convs])
  y = precision.broadcast_add(conv.conv2d_same(x, kernel, conv_impl), bias)
  return jnp.split(y, np.cumsum([b.shape[0] for _, b in convs])[:-1].tolist(), axis=-1)


class SPADE(nn.Module):
  """out = norm(x) * (1 + gamma(actv)) + beta(actv), actv = relu(shared(seg)).

  `hidden_params` gives the shared conv's parameters so that the residual block computes
  actv for all its SPADEs in one conv; `__call__` takes that actv and computes in its dtype.
  """
  hidden: int
  features: int  # channels of the normalised input x
  conv_impl: str = 'xla'

  def setup(self):
    self.norm = ParamFreeBatchNorm()
    self.shared = ConvParams(self.hidden)
    self.gamma = ConvParams(self.features)
    self.beta = ConvParams(self.features)

  def hidden_params(self, seg_channels: int) -> tuple[jax.Array, jax.Array]:
    """(kernel [3, 3, S, hidden], bias [hidden]) of the shared conv."""
    return self.shared(seg_channels)

  def __call__(self, x: jax.Array, actv: jax.Array, *, train: bool,
               momentum: float = 0.9) -> jax.Array:
    """x: [B, h, w, features]; actv: [B, h, w, hidden] -> [B, h, w, features]."""
    normalized = self.norm(x, train=train, momentum=momentum)
    h = actv.shape[-1]
    gamma, beta = fused_conv(actv, [self.gamma(h), self.beta(h)], self.conv_impl)
    return normalized * (1 + gamma) + beta


class SpadeResBlock(nn.Module):
  """OASIS ResBlock: SPADE-LReLU-conv3x3 twice, learned 1x1 shortcut when widths differ.

  Computes in `dtype` (x, seg and z are cast to it); parameters stay float32.
  """
  features: int
  spade_hidden: int
  spectral_norm: bool = True
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, seg: jax.Array, *, z: jax.Array | None = None,
               train: bool, momentum: float = 0.9) -> jax.Array:
    """x: [B, h, w, Cin], seg: float32 [B, H, W, S] (one-hot labels ++ noise) ->
    [B, h, w, features].

    z: float32 [B, Z] or None. When given, a Dense(z) per SPADE (parameters `z_hidden`) is
    added to its shared hidden pre-activation: what a 3x3 conv over Z broadcast z channels
    computes away from the borders, for Z x hidden MACs per image instead of 9 x Z x hidden
    per pixel. Light blocks of exit branches take z this way; the backbone's blocks get z
    as broadcast channels of `seg` (as OASIS does) and pass None. Its kernel starts at zero,
    so a z-aware block starts as the z-blind one and learns what z adds: a random start puts
    per-image offsets of about unit scale on activations the label map moves by ~0.3, and
    such exits trained far slower than z-blind ones.
    """
    fin, fout = x.shape[-1], self.features
    fmid = min(fin, fout)
    x, seg = x.astype(self.dtype), seg.astype(self.dtype)
    kw = dict(train=train, momentum=momentum)
    impl = dict(conv_impl=self.conv_impl)
    sn = dict(spectral_norm=self.spectral_norm, dtype=self.dtype, **impl)
    norms = {}
    if fin != fout:
      norms['s'] = SPADE(self.spade_hidden, fin, name='norm_s', **impl)
    norms['0'] = SPADE(self.spade_hidden, fin, name='norm_0', **impl)
    norms['1'] = SPADE(self.spade_hidden, fmid, name='norm_1', **impl)
    seg = layers.resize_nearest(seg, x.shape[1:3])
    actv = fused_conv(seg, [n.hidden_params(seg.shape[-1]) for n in norms.values()],
                      self.conv_impl)
    if z is not None:
      offsets = layers.Dense(len(norms) * self.spade_hidden,
                             kernel_init=nn.initializers.zeros, dtype=self.dtype,
                             name='z_hidden')(z)
      actv = [precision.broadcast_add(a, o[:, None, None, :])
              for a, o in zip(actv, jnp.split(offsets, len(norms), -1))]
    actv = dict(zip(norms, (nn.relu(a) for a in actv)))
    if fin != fout:
      xs = norms['s'](x, actv['s'], **kw)
      xs = layers.SNConv(fout, 1, use_bias=False, name='conv_s', **sn)(xs, train=train)
    else:
      xs = x
    dx = norms['0'](x, actv['0'], **kw)
    dx = layers.SNConv(fmid, name='conv_0', **sn)(
        nn.leaky_relu(dx, 0.2), train=train)
    dx = norms['1'](dx, actv['1'], **kw)
    dx = layers.SNConv(fout, name='conv_1', **sn)(
        nn.leaky_relu(dx, 0.2), train=train)
    return xs + dx
