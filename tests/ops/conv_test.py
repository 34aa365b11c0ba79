"""conv2d_same: every implementation is the same conv (values, gradients) as lax.conv, chosen
by name only; the Toeplitz matmul counts the FLOPs XLA counts for the conv."""
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fiancee_jax.metrics import flops
from fiancee_jax.models import layers
from fiancee_jax.ops import conv

# (x shape, kernel shape, what 'toeplitz_even' runs: 'toeplitz', 'pad' (a zero channel) or
# 'xla' (the plain conv))
CASES = [
    ((5, 2, 2, 6), (3, 3, 6, 5), 'toeplitz'),  # OASIS's stem / first block
    ((4, 1, 2, 4), (3, 3, 4, 3), 'toeplitz'),  # rectangular
    ((4, 1, 1, 4), (3, 3, 4, 7), 'toeplitz'),  # one pixel: only the centre tap
    ((4, 2, 2, 3), (5, 5, 3, 2), 'toeplitz'),
    ((3, 2, 2, 6), (3, 3, 6, 5), 'xla'),  # batch < 4: not faster, slower inside lax.switch
    ((2, 9, 7, 15), (3, 3, 15, 24), 'pad'),  # guided exits: 12 labels + 3 guide channels
    ((2, 8, 8, 19), (1, 1, 19, 8), 'pad'),
    ((3, 2, 2, 5), (3, 3, 5, 4), 'pad'),  # batch < 4 on a spanned map: odd width still padded
    ((2, 3, 2, 8), (3, 3, 8, 4), 'xla'),  # 3 rows: a 3x3 kernel does not reach across
    ((2, 3, 3, 1), (3, 3, 1, 4), 'xla'),  # one channel: nothing to pad for
    ((2, 64, 64, 8), (3, 3, 8, 4), 'xla'),
    ((4, 2, 2, 8), (1, 1, 8, 8), 'xla'),  # 1x1 is a matmul already
    ((4, 2, 2, 8), (2, 2, 8, 8), 'xla'),  # even kernels: 'SAME' pads unevenly
]


def _inputs(x_shape, k_shape, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)


def _primitives(fn, *args) -> set[str]:
  """Names of the primitives fn(*args) runs, inside nested jits too."""
  def walk(jaxpr):
    for e in jaxpr.eqns:
      yield e.primitive.name
      for sub in jax_core.jaxprs_in_params(e.params):
        yield from walk(sub)
  return set(walk(jax.make_jaxpr(fn)(*args).jaxpr)) - {'jit', 'pjit'}


@pytest.mark.parametrize('x_shape,k_shape,runs', CASES)
def test_toeplitz_even_picks_its_form_by_shape(x_shape, k_shape, runs):
  x, k = _inputs(x_shape, k_shape)
  prims = _primitives(lambda x, k: conv.conv2d_same(x, k, 'toeplitz_even'), x, k)
  assert ('dot_general' in prims) == (runs == 'toeplitz')
  assert ('conv_general_dilated' in prims) == (runs != 'toeplitz')
  assert ('pad' in prims) == (runs == 'pad')
  assert conv.form_for(x_shape, k_shape, 'toeplitz_even') == (
      'toeplitz' if runs == 'toeplitz' else 'even')
  # The other names run what they say, whatever the shapes.
  for impl in ('xla', 'even'):
    assert conv.form_for(x_shape, k_shape, impl) == impl
  assert _primitives(lambda x, k: conv.conv2d_same(x, k, 'xla'), x, k) == {
      'conv_general_dilated'}


@pytest.mark.parametrize('impl', ['toeplitz_even', 'even'])
@pytest.mark.parametrize('x_shape,k_shape,runs', CASES)
def test_implementations_match_lax_conv_values_and_gradients(x_shape, k_shape, runs, impl):
  del runs
  x, k = _inputs(x_shape, k_shape)
  ref = conv.xla_conv(x, k)
  out = jax.jit(lambda x, k: conv.conv2d_same(x, k, impl))(x, k)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  probe = jax.random.normal(jax.random.key(7), ref.shape)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * probe)
  g_ref = jax.grad(loss(conv.xla_conv), argnums=(0, 1))(x, k)
  g = jax.jit(jax.grad(loss(lambda x, k: conv.conv2d_same(x, k, impl)), argnums=(0, 1)))(x, k)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('x_shape,k_shape',
                         [(c[0], c[1]) for c in CASES if c[2] == 'pad'])
def test_even_counts_the_zero_channel(x_shape, k_shape):
  x, k = _inputs(x_shape, k_shape)
  c = x_shape[-1]
  got = flops.gflops(lambda x, k: conv.conv2d_same(x, k, 'even'), x, k)
  assert got == pytest.approx(flops.gflops(conv.xla_conv, x, k) * (c + 1) / c, rel=0.01)
  # Even widths are left alone.
  x2, k2 = x[..., 1:], k[:, :, 1:]
  assert flops.gflops(lambda x, k: conv.conv2d_same(x, k, 'even'), x2, k2) == pytest.approx(
      flops.gflops(conv.xla_conv, x2, k2))


@pytest.mark.parametrize('x_shape,k_shape',
                         [(c[0], c[1]) for c in CASES if c[2] == 'toeplitz'])
def test_toeplitz_counts_the_flops_xla_counts_for_the_conv(x_shape, k_shape):
  # XLA counts the MACs of taps that land inside the map; on these maps every input pixel
  # reaches every output pixel, which is what the Toeplitz matmul multiplies.
  x, k = _inputs(x_shape, k_shape)
  ref = flops.gflops(conv.xla_conv, x, k)
  assert flops.gflops(lambda x, k: conv.conv2d_same(x, k, 'toeplitz'), x, k) == pytest.approx(
      ref, rel=0.01)


@pytest.mark.parametrize('impl', conv.CONV_IMPLS)
def test_conv_module_has_nn_conv_parameters_and_output(impl):
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 6))  # a Toeplitz shape
  ours, ref = conv.Conv(5, conv_impl=impl), nn.Conv(5, (3, 3))
  v = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
  v = jax.tree.map(lambda a: a + 0.1, v)  # a non-zero bias too
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)


def test_modules_run_the_implementation_they_are_given():
  # The field alone decides, on any backend: no global state, no backend check.
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 5))
  for impl, want in (('xla', 'conv_general_dilated'), ('toeplitz_even', 'dot_general')):
    m = layers.SNConv(4, conv_impl=impl)
    v = m.init(jax.random.key(1), x)
    prims = _primitives(lambda v, x, m=m: m.apply(v, x), v, x)
    assert want in prims and ('dot_general' in prims) == (impl != 'xla'), (impl, prims)


def test_bad_calls_name_the_problem():
  x, k = _inputs((2, 8, 8, 4), (3, 3, 4, 3))
  with pytest.raises(ValueError, match='unknown conv implementation'):
    conv.conv2d_same(x, k, 'winograd')
  with pytest.raises(ValueError, match=r'kernel \[kh, kw, C, F\]'):
    conv.conv2d_same(x, k[:, :, :3])
  with pytest.raises(ValueError, match='at most 2x2 pixels'):
    conv.conv2d_same(x, k, 'toeplitz')
  with pytest.raises(ValueError, match='odd kernel'):
    conv.conv2d_same(x[:, :2, :2], jnp.zeros((2, 2, 4, 3)), 'toeplitz')
