"""The latency protocol: AOT compile, cost/memory, timed counts, recompile detection."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.metrics import latency


def test_compile_aot_and_cost_and_memory():
  n = 64
  compiled = latency.compile_aot(jnp.dot, jax.ShapeDtypeStruct((n, n), jnp.float32),
                                 np.zeros((n, n), np.float32))
  assert isinstance(compiled, jax.stages.Compiled)
  cost = latency.cost_and_memory(compiled)
  assert set(cost) >= {'gflops', 'bytes_accessed', 'argument_bytes', 'output_bytes',
                       'temp_bytes', 'alias_bytes', 'generated_code_bytes', 'hlo_text_bytes'}
  assert cost['gflops'] == pytest.approx(2 * n ** 3 / 1e9, rel=0.05)
  assert cost['argument_bytes'] == 2 * n * n * 4
  assert cost['output_bytes'] == n * n * 4
  assert cost['hlo_text_bytes'] > 0
  x = np.ones((n, n), np.float32)
  np.testing.assert_allclose(compiled(x, x), np.full((n, n), n))


def test_time_fn_times_exactly_iters_calls():
  calls = []

  def fn(x):
    calls.append(1)
    return jnp.asarray(x) + 1

  x = jnp.ones(3)
  fn(x)  # compile the add before the guarded loop
  calls.clear()
  stats = latency.time_fn(fn, x, warmup=2, iters=7)
  assert len(calls) == 2 + 7
  assert stats['iters'] == 7
  assert 0 < stats['min_ms'] <= stats['median_ms'] <= stats['p90_ms']
  assert all(math.isfinite(stats[k]) for k in ('median_ms', 'p90_ms', 'mean_ms'))


def test_time_compiled():
  compiled = latency.compile_aot(lambda a: jnp.sin(a) * 2, np.ones(8, np.float32))
  stats = latency.time_compiled(compiled, np.ones(8, np.float32), warmup=1, iters=3)
  assert stats['iters'] == 3
  with pytest.raises(TypeError, match='compile_aot'):
    latency.time_compiled(jax.jit(jnp.sin), np.ones(8, np.float32))
  with pytest.raises(ValueError, match='iters'):
    latency.time_compiled(compiled, np.ones(8, np.float32), iters=0)


def test_time_fn_fails_on_recompiles():
  f = jax.jit(lambda x: x * 2)
  shapes = iter(range(1, 100))
  with pytest.raises(RuntimeError, match='recompiled'):
    # A new shape every call: warm-up cannot help, so the timed loop must fail.
    latency.time_fn(lambda: f(jnp.zeros(next(shapes))), warmup=1, iters=3)


def test_recompile_guard_and_counter():
  f = jax.jit(lambda x: x * 3 + 1)
  f(jnp.ones(4))
  with latency.RecompileGuard(f, what='f'):
    f(jnp.ones(4))
    f(jnp.zeros(4))
  with pytest.raises(RuntimeError, match='f recompiled'):
    with latency.RecompileGuard(f, what='f'):
      f(jnp.ones(5))
  a, b = np.ones(6, np.float32), np.ones(7, np.int32)  # numpy: no jnp op compiles in the block
  with latency.CompileCounter(f) as c:
    f(a)
    f(a)
    f(b)
  assert c.compiles == 2 and c.traces >= 2 and c.cache_growth == 2
  # AOT compiles count too.
  with latency.CompileCounter() as c:
    latency.compile_aot(lambda a: a - 1, np.ones(9, np.float32))
  assert c.compiles == 1
  # Exceptions inside the block pass through unchanged.
  with pytest.raises(KeyError):
    with latency.RecompileGuard():
      jax.jit(lambda x: x / 7)(jnp.ones(11))
      raise KeyError('boom')


def test_matmul_gflops():
  g = latency.matmul_gflops(n=128, iters=3)
  assert math.isfinite(g) and g > 0.01


def test_device_info():
  info = latency.device_info()
  for key in ('device_kind', 'platform', 'device_count', 'cpu_count', 'jax', 'jaxlib', 'flax'):
    assert info[key] not in (None, '')
  assert info['jax'] == jax.__version__
  assert info['platform'] in latency.hardware_string(info)


def test_median_ci_covers_the_median_at_the_stated_rate():
  # Order-statistic interval: for n = 100 the 95 % interval is x_(40) .. x_(61) (1-based).
  x = np.arange(1, 101, dtype=np.float64)
  assert latency.median_ci(x) == (40.0, 61.0)
  assert latency.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values: the range
  assert latency.median_ci(np.arange(8.0)) == (0.0, 7.0)
  assert latency.median_ci(np.arange(9.0)) == (1.0, 7.0)
  rng = np.random.default_rng(0)
  covered = [lo <= 0.0 <= hi for lo, hi in
             (latency.median_ci(rng.standard_normal(50)) for _ in range(400))]
  assert 0.92 <= np.mean(covered) <= 0.995
  with pytest.raises(ValueError, match='at least one'):
    latency.median_ci([])


def test_time_paired_interleaves_and_compares():
  order = []
  slow = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)
  fast = jax.jit(lambda x: x + 1)
  x = jnp.ones((256, 256))

  def a(x):
    order.append('a')
    return slow(x)

  def b(x):
    order.append('b')
    return fast(x)

  a(x), b(x)
  order.clear()
  res = latency.time_paired(a, (x,), b, (x,), warmup=1, rounds=6)
  assert order[2:] == ['a', 'b', 'b', 'a'] * 3  # after one warm-up pair, alternating order
  assert res['a']['iters'] == res['b']['iters'] == res['rounds'] == 6
  assert res['ratio'] > 1.0  # a 256^3 matmul is slower than an add
  lo, hi = res['ratio_ci95']
  assert lo <= res['ratio'] <= hi
  with pytest.raises(ValueError, match='rounds'):
    latency.time_paired(a, (x,), b, (x,), rounds=0)
