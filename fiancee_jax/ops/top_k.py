"""Exact top-k over the last axis in one of two implementations, chosen by name.

Both return exactly what `lax.top_k` returns (values and indices, ties to the lowest index).
The database lookup receives the name from `config.kernels.top_k` through models/factory.py
(ops/kernels.py resolves 'auto'); nothing here looks at the backend.

- 'xla': `lax.top_k`.
- 'two_stage': when N >= 4 * k * 16, in two exact stages: the k groups of 16 with the largest
  maxima hold the top k (a group holding one of them has a maximum >= the k-th value), so the
  top k of those k * 16 candidates is the answer; groups are taken in index order, so ties
  resolve as in `lax.top_k`. XLA:CPU's TopK sorts every row; the two stages replace most of
  that by a max-reduction over groups, which XLA counts as FLOPs (TopK counts none).
  Smaller rows go to `lax.top_k`.

Reported GFLOPs never depend on this choice: metrics/costs.py counts every model on 'xla'.
"""
import jax
import jax.numpy as jnp

TOP_K_IMPLS = ('xla', 'two_stage')
GROUP = 16  # row entries per group in 'two_stage'


def exact_top_k(s: jax.Array, k: int, impl: str = 'xla') -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis of s [M, N]: (values [M, k], int32 indices [M, k]).

  Raises:
    ValueError: an unknown implementation, s not [M, N], or k not in [1, N].
  """
  if impl not in TOP_K_IMPLS:
    raise ValueError(f'unknown top-k implementation {impl!r}; known: {TOP_K_IMPLS}')
  if s.ndim != 2 or not 1 <= k <= s.shape[1]:
    raise ValueError(f'exact_top_k needs scores [M, N] and 1 <= k <= N, got {s.shape} and '
                     f'k={k}')
  m, n = s.shape
  g = GROUP
  if impl == 'xla' or n < 4 * k * g:
    return jax.lax.top_k(s, k)
  grouped = jnp.pad(s, ((0, 0), (0, -n % g)), constant_values=-jnp.inf).reshape(m, -1, g)
  groups = jnp.sort(jax.lax.top_k(grouped.max(axis=-1), k)[1], axis=-1)  # [M, k]
  cand = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(m, k * g)
  values, j = jax.lax.top_k(cand, k)
  return values, jnp.take_along_axis(groups, j // g, axis=1) * g + j % g
