"""SPADE (Park et al. 2019) as used by OASIS: parameter-free batch norm modulated by the label map."""
import jax
import jax.numpy as jnp
from flax import linen as nn

from fiancee_jax.models import layers


class ParamFreeBatchNorm(nn.Module):
  """Batch norm without scale and bias, statistics over the global batch.

  Under `jit` with the batch sharded over a mesh, `mean` over axis 0 is a global
  reduction, which is what OASIS's SyncBatchNorm computes. Running statistics live in
  `batch_stats`; `momentum` is a call argument so that statistics can be recomputed
  exactly for EMA weights (momentum = i / (i + 1) gives the running mean of batches).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, momentum: float = 0.9) -> jax.Array:
    c = x.shape[-1]
    mean_var = self.variable('batch_stats', 'mean', jnp.zeros, (c,))
    var_var = self.variable('batch_stats', 'var', jnp.ones, (c,))
    if train:
      mean = x.mean(axis=(0, 1, 2))
      var = jnp.maximum((x * x).mean(axis=(0, 1, 2)) - mean * mean, 0.0)
      if not self.is_initializing():
        mean_var.value = momentum * mean_var.value + (1 - momentum) * mean
        var_var.value = momentum * var_var.value + (1 - momentum) * var
    else:
      mean, var = mean_var.value, var_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.eps)


class SPADE(nn.Module):
  """out = norm(x) * (1 + gamma(seg)) + beta(seg); seg resized to x by nearest neighbour."""
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array, seg: jax.Array, *, train: bool,
               momentum: float = 0.9) -> jax.Array:
    """x: [B, h, w, C]; seg: float32 [B, H, W, S] (one-hot labels ++ noise)."""
    c = x.shape[-1]
    normalized = ParamFreeBatchNorm(name='norm')(x, train=train, momentum=momentum)
    seg = layers.resize_nearest(seg, x.shape[1:3])
    actv = nn.relu(nn.Conv(self.hidden, (3, 3), name='shared')(seg))
    gamma = nn.Conv(c, (3, 3), name='gamma')(actv)
    beta = nn.Conv(c, (3, 3), name='beta')(actv)
    return normalized * (1 + gamma) + beta


class SpadeResBlock(nn.Module):
  """OASIS ResBlock: SPADE-LReLU-conv3x3 twice, learned 1x1 shortcut when widths differ."""
  features: int
  spade_hidden: int
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, seg: jax.Array, *, train: bool,
               momentum: float = 0.9) -> jax.Array:
    """x: [B, h, w, Cin], seg: [B, H, W, S] -> [B, h, w, features]."""
    fin, fout = x.shape[-1], self.features
    fmid = min(fin, fout)
    kw = dict(train=train, momentum=momentum)
    if fin != fout:
      xs = SPADE(self.spade_hidden, name='norm_s')(x, seg, **kw)
      xs = layers.SNConv(fout, 1, use_bias=False, spectral_norm=self.spectral_norm,
                         name='conv_s')(xs, train=train)
    else:
      xs = x
    dx = SPADE(self.spade_hidden, name='norm_0')(x, seg, **kw)
    dx = layers.SNConv(fmid, spectral_norm=self.spectral_norm, name='conv_0')(
        nn.leaky_relu(dx, 0.2), train=train)
    dx = SPADE(self.spade_hidden, name='norm_1')(dx, seg, **kw)
    dx = layers.SNConv(fout, spectral_norm=self.spectral_norm, name='conv_1')(
        nn.leaky_relu(dx, 0.2), train=train)
    return xs + dx
