"""The fused SPADE block is the textbook one, with the same parameters."""
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


@pytest.mark.parametrize('fout', [12, 5])  # same width (no shortcut) and a learned shortcut
def test_fused_block_has_reference_params_and_outputs(fout):
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 12))
  seg = jax.random.normal(jax.random.key(2), (3, 16, 16, 7))
  ref, fused = _ReferenceBlock(fout, 6), spade.SpadeResBlock(fout, 6)
  v_ref = ref.init(jax.random.key(0), x, seg, train=False)
  v = fused.init(jax.random.key(0), x, seg, train=False)
  # Same tree, same initial values: checkpoints of either form load into the other.
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v_ref)
  jax.tree_util.tree_map(np.testing.assert_array_equal, v, v_ref)
  # Perturb every parameter so that zero biases do not hide a mix-up of gamma and beta.
  leaves, tree = jax.tree_util.tree_flatten(v)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  v = jax.tree_util.tree_unflatten(
      tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  v = {'params': v['params'], 'batch_stats': jax.tree_util.tree_map(jnp.abs, v['batch_stats'])}
  np.testing.assert_allclose(fused.apply(v, x, seg, train=False),
                             ref.apply(v, x, seg, train=False), atol=2e-5)
  y, upd = fused.apply(v, x, seg, train=True, momentum=0.5, mutable=['batch_stats'])
  y_ref, upd_ref = ref.apply(v, x, seg, train=True, momentum=0.5, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_ref, atol=2e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), upd, upd_ref)


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
