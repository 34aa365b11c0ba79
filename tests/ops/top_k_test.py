"""exact_top_k: every implementation returns lax.top_k's values and indices, ties included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.ops import top_k


@pytest.mark.parametrize('impl', top_k.TOP_K_IMPLS)
@pytest.mark.parametrize('n,k', [(2048, 4), (1000, 4), (257, 1), (300, 3), (64, 4)])
def test_exact_top_k_equals_lax_top_k_with_ties(n, k, impl):
  # Coarse values make many ties, and 1000 / 257 / 300 are not multiples of the group size.
  s = jnp.round(jax.random.normal(jax.random.key(n), (37, n)) * 4) / 4
  s = s.at[0].set(0.0)  # a row of ties only
  s = s.at[1, -1].set(100.0)  # the best in the padded last group
  values, idx = jax.jit(top_k.exact_top_k, static_argnums=(1, 2))(s, k, impl)
  ref_v, ref_i = jax.lax.top_k(s, k)
  np.testing.assert_array_equal(values, ref_v)
  np.testing.assert_array_equal(idx, ref_i)
  assert idx.dtype == jnp.int32


def test_the_name_alone_decides_the_program():
  s = jax.random.normal(jax.random.key(0), (8, 2048))

  def count(impl, n=2048):
    return str(jax.make_jaxpr(lambda s: top_k.exact_top_k(s, 4, impl))(s[:, :n])).count('top_k')

  assert count('two_stage') == 2  # groups, then candidates
  assert count('xla') == 1
  assert count('two_stage', n=4 * 4 * top_k.GROUP - 1) == 1  # too few entries to group


def test_bad_calls_name_the_problem():
  s = jnp.zeros((3, 10))
  with pytest.raises(ValueError, match='unknown top-k implementation'):
    top_k.exact_top_k(s, 2, 'approx')
  with pytest.raises(ValueError, match='1 <= k <= N'):
    top_k.exact_top_k(s, 11)
