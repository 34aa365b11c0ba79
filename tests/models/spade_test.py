"""The fused SPADE block is the textbook one, with the same parameters."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fiancee_jax.models import layers
from fiancee_jax.models import spade


class _ReferenceSpade(nn.Module):
  """SPADE written the plain way: one nn.Conv per conv."""
  hidden: int

  @nn.compact
  def __call__(self, x, seg, *, train, momentum=0.9):
    normalized = spade.ParamFreeBatchNorm(name='norm')(x, train=train, momentum=momentum)
    seg = layers.resize_nearest(seg, x.shape[1:3])
    actv = nn.relu(nn.Conv(self.hidden, (3, 3), name='shared')(seg))
    gamma = nn.Conv(x.shape[-1], (3, 3), name='gamma')(actv)
    beta = nn.Conv(x.shape[-1], (3, 3), name='beta')(actv)
    return normalized * (1 + gamma) + beta


class _ReferenceBlock(nn.Module):
  features: int
  hidden: int

  @nn.compact
  def __call__(self, x, seg, *, train, momentum=0.9):
    fin, fout = x.shape[-1], self.features
    kw = dict(train=train, momentum=momentum)
    xs = x
    if fin != fout:
      xs = _ReferenceSpade(self.hidden, name='norm_s')(x, seg, **kw)
      xs = layers.SNConv(fout, 1, use_bias=False, name='conv_s')(xs, train=train)
    dx = _ReferenceSpade(self.hidden, name='norm_0')(x, seg, **kw)
    dx = layers.SNConv(min(fin, fout), name='conv_0')(nn.leaky_relu(dx, 0.2), train=train)
    dx = _ReferenceSpade(self.hidden, name='norm_1')(dx, seg, **kw)
    dx = layers.SNConv(fout, name='conv_1')(nn.leaky_relu(dx, 0.2), train=train)
    return xs + dx


def test_fused_block_has_reference_params_and_outputs():
  # A learned shortcut (fout != fin): all three SPADEs of a block run.
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 12))
  seg = jax.random.normal(jax.random.key(2), (3, 16, 16, 7))
  ref, fused = _ReferenceBlock(5, 6), spade.SpadeResBlock(5, 6)
  init = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), x, seg, train=False))  # noqa: E731
  shapes = init(fused)
  # Same tree, names and shapes as the plain block: checkpoints of either load into the other.
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(init(ref))
  jax.tree_util.tree_map(lambda a, b: a.shape == b.shape or pytest.fail(f'{a} vs {b}'),
                         shapes, init(ref))
  # Random values everywhere (not the zero-bias init, which would hide a gamma/beta mix-up);
  # positive running variances and spectral norms.
  rng = np.random.default_rng(3)
  v = jax.tree_util.tree_map(lambda a: 0.3 * rng.standard_normal(a.shape, np.float32), shapes)
  v['batch_stats'] = jax.tree_util.tree_map(lambda a: np.abs(a) + 0.5, v['batch_stats'])

  @jax.jit
  def both(v):
    out = [m.apply(v, x, seg, train=False) for m in (fused, ref)]
    out += [m.apply(v, x, seg, train=True, momentum=0.5, mutable=['batch_stats'])
            for m in (fused, ref)]
    return out

  y, y_ref, (yt, upd), (yt_ref, upd_ref) = both(v)
  # Outputs reach ~50 with these values; a mix-up would differ by that much, rounding by 1e-4.
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-3)
  close(y, y_ref)
  close(yt, yt_ref)
  jax.tree_util.tree_map(close, upd, upd_ref)


def test_fused_conv_splits_in_order():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  convs = [(jax.random.normal(jax.random.key(i), (3, 3, 3, f)), jnp.full((f,), float(i)))
           for i, f in enumerate((2, 4, 1))]
  outs = spade.fused_conv(x, convs)
  assert [o.shape for o in outs] == [(2, 5, 5, 2), (2, 5, 5, 4), (2, 5, 5, 1)]
  for (k, b), out in zip(convs, outs):
    expect = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
    np.testing.assert_allclose(out, expect, atol=1e-5)
