"""conv2d_same: its matmul lowering is the same conv (values, gradients, XLA FLOPs) as lax.conv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fiancee_jax.metrics import flops
from fiancee_jax.models import conv

# (x shape, kernel shape, lowering 'auto' picks on the CPU)
CASES = [
    ((5, 2, 2, 6), (3, 3, 6, 5), 'toeplitz'),  # OASIS's stem / first block
    ((4, 1, 2, 4), (3, 3, 4, 3), 'toeplitz'),  # rectangular
    ((4, 1, 1, 4), (3, 3, 4, 7), 'toeplitz'),  # one pixel: only the centre tap
    ((4, 2, 2, 3), (5, 5, 3, 2), 'toeplitz'),
    ((3, 2, 2, 6), (3, 3, 6, 5), 'xla'),  # batch < 4: not faster, slower inside lax.switch
    ((2, 9, 7, 15), (3, 3, 15, 24), 'even'),  # guided exits: 12 labels + 3 guide channels
    ((2, 8, 8, 19), (1, 1, 19, 8), 'even'),
    ((2, 3, 2, 8), (3, 3, 8, 4), 'xla'),  # 3 rows: a 3x3 kernel does not reach across
    ((2, 3, 3, 1), (3, 3, 1, 4), 'xla'),  # one channel: nothing to pad for
    ((2, 64, 64, 8), (3, 3, 8, 4), 'xla'),
    ((2, 2, 2, 8), (1, 1, 8, 8), 'xla'),  # 1x1 is a matmul already
    ((2, 2, 2, 8), (2, 2, 8, 8), 'xla'),  # even kernels: 'SAME' pads unevenly
]


def _inputs(x_shape, k_shape, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)


@pytest.mark.parametrize('x_shape,k_shape,expected', CASES)
def test_auto_picks_the_lowering_by_shape_on_the_cpu(x_shape, k_shape, expected):
  assert conv.lowering_for(x_shape, k_shape, backend='cpu') == expected
  for backend in ('gpu', 'tpu'):
    assert conv.lowering_for(x_shape, k_shape, backend=backend) == 'xla'


@pytest.mark.parametrize('x_shape,k_shape,lowering',
                         [c for c in CASES if c[2] != 'xla'])
def test_lowering_matches_lax_conv_values_and_gradients(x_shape, k_shape, lowering):
  x, k = _inputs(x_shape, k_shape)
  ref = conv.xla_conv(x, k)
  out = jax.jit(lambda x, k: conv.conv2d_same(x, k, lowering))(x, k)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  probe = jax.random.normal(jax.random.key(7), ref.shape)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * probe)
  g_ref = jax.grad(loss(conv.xla_conv), argnums=(0, 1))(x, k)
  g = jax.jit(jax.grad(loss(lambda x, k: conv.conv2d_same(x, k, lowering)),
                       argnums=(0, 1)))(x, k)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('x_shape,k_shape',
                         [(c[0], c[1]) for c in CASES if c[2] == 'even'])
def test_even_counts_the_zero_channel(x_shape, k_shape):
  x, k = _inputs(x_shape, k_shape)
  c = x_shape[-1]
  got = flops.gflops(lambda x, k: conv.conv2d_same(x, k, 'even'), x, k)
  assert got == pytest.approx(flops.gflops(conv.xla_conv, x, k) * (c + 1) / c, rel=0.01)
  # Even widths are left alone.
  x2, k2 = x[..., 1:], k[:, :, 1:]
  assert flops.gflops(lambda x, k: conv.conv2d_same(x, k, 'even'), x2, k2) == pytest.approx(
      flops.gflops(conv.xla_conv, x2, k2))


@pytest.mark.parametrize('x_shape,k_shape,lowering',
                         [c for c in CASES if c[2] == 'toeplitz'])
def test_toeplitz_counts_the_flops_xla_counts_for_the_conv(x_shape, k_shape, lowering):
  # XLA counts the MACs of taps that land inside the map; on these maps every input pixel
  # reaches every output pixel, which is what the Toeplitz matmul multiplies.
  x, k = _inputs(x_shape, k_shape)
  ref = flops.gflops(conv.xla_conv, x, k)
  assert flops.gflops(lambda x, k: conv.conv2d_same(x, k, lowering), x, k) == pytest.approx(
      ref, rel=0.01)


def test_conv_module_has_nn_conv_parameters_and_output():
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 6))  # a toeplitz shape on the CPU
  ours, ref = conv.Conv(5), nn.Conv(5, (3, 3))
  v = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
  v = jax.tree.map(lambda a: a + 0.1, v)  # a non-zero bias too
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)


def test_bad_calls_name_the_problem():
  x, k = _inputs((2, 8, 8, 4), (3, 3, 4, 3))
  with pytest.raises(ValueError, match='unknown conv lowering'):
    conv.conv2d_same(x, k, 'winograd')
  with pytest.raises(ValueError, match=r'kernel \[kh, kw, C, F\]'):
    conv.conv2d_same(x, k[:, :, :3])
  with pytest.raises(ValueError, match='at most 2x2 pixels'):
    conv.conv2d_same(x, k, 'toeplitz')
  with pytest.raises(ValueError, match='odd kernel'):
    conv.conv2d_same(x[:, :2, :2], jnp.zeros((2, 2, 4, 3)), 'toeplitz')


def test_cpu_lowerings_switch_off_inside_the_block_only():
  x, k = _inputs((2, 8, 8, 15), (3, 3, 15, 24))
  on = flops.gflops(lambda x, k: conv.conv2d_same(x, k), x, k)
  with conv.cpu_lowerings(False):
    assert conv.lowering_for((4, 2, 2, 6), (3, 3, 6, 5), backend='cpu') == 'xla'
    off = flops.gflops(lambda x, k: conv.conv2d_same(x, k), x, k)  # a new function: traced here
  assert conv.lowering_for((4, 2, 2, 6), (3, 3, 6, 5), backend='cpu') == 'toeplitz'
  assert off == pytest.approx(flops.gflops(conv.xla_conv, x, k))
  assert on == pytest.approx(off * 16 / 15, rel=0.01)  # the zero channel, on
