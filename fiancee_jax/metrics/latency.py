"""The latency protocol (STYLE.md rule 8): compile ahead of time, read cost and memory, warm up,
time with `time.perf_counter()` around `jax.block_until_ready`, report median and p90, and fail
on recompiles.

  compiled = compile_aot(path, params, labels, z)     # args may be arrays or ShapeDtypeStructs
  cost = cost_and_memory(compiled)                    # XLA flops, bytes, buffer sizes
  stats = time_compiled(compiled, params, labels, z, warmup=3, iters=20)

Every timed loop runs inside a `RecompileGuard`, so a measurement that silently includes a
compile raises instead of being reported.
"""
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from scipy import stats as scipy_stats

from fiancee_jax.metrics import flops as flops_lib

# jax.monitoring events (JAX 0.10): a trace to a jaxpr, and an XLA backend compile. Both are
# recorded for `jax.jit` calls and for `.lower(...).compile()`; a persistent-cache hit skips
# the backend compile but still traces, so counting both catches every recompile.
TRACE_EVENT = '/jax/core/compile/jaxpr_trace_duration'
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def compile_aot(fn: Callable[..., Any], *args: Any) -> jax.stages.Compiled:
  """Compiles `fn(*args)` ahead of time; nothing is executed.

  Args:
    fn: a pure function of arrays (pytrees allowed).
    *args: example arguments: arrays or `jax.ShapeDtypeStruct`s (only shapes and dtypes are
      used; `None` leaves stay `None`).

  Returns:
    The XLA executable. Call it with arguments of exactly these shapes and dtypes.
  """
  return jax.jit(fn).lower(*flops_lib.abstract(args)).compile()


def cost_and_memory(compiled: jax.stages.Compiled) -> dict[str, float]:
  """XLA's cost and memory analysis of one executable.

  Returns:
    {'gflops': float (a multiply-add counts 2), 'bytes_accessed': float,
     'argument_bytes', 'output_bytes', 'temp_bytes', 'alias_bytes', 'generated_code_bytes':
     int buffer sizes from `memory_analysis()` (0 where the backend reports none),
     'hlo_text_bytes': int size of the optimized HLO text}.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0] if cost else {}
  cost = cost or {}
  out = {'gflops': float(cost.get('flops', 0.0)) / 1e9,
         'bytes_accessed': float(cost.get('bytes accessed', 0.0))}
  mem = compiled.memory_analysis()
  for name, attr in [('argument_bytes', 'argument_size_in_bytes'),
                     ('output_bytes', 'output_size_in_bytes'),
                     ('temp_bytes', 'temp_size_in_bytes'),
                     ('alias_bytes', 'alias_size_in_bytes'),
                     ('generated_code_bytes', 'generated_code_size_in_bytes')]:
    out[name] = int(getattr(mem, attr, 0) or 0) if mem is not None else 0
  out['hlo_text_bytes'] = len(compiled.as_text() or '')
  return out


class CompileCounter:
  """Counts traces and XLA compiles (any function, any thread) while the context is open.

  The count is process-wide (it listens to `jax.monitoring` events), so eager `jnp` ops on new
  shapes and other threads' compiles count too: build inputs before entering the context.

  Optionally also watches jitted functions' own caches (`f._cache_size()`), which catches a
  retrace of that function even when another listener-invisible path is used.

  Usage:
    with CompileCounter() as c:
      f(x)
    c.compiles, c.traces
  """

  def __init__(self, *jitted: Any):
    self._jitted = jitted
    self.traces = 0
    self.compiles = 0
    self.cache_growth = 0
    self._sizes: list[int] = []
    self._active = False

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if not self._active:
      return
    if event == TRACE_EVENT:
      self.traces += 1
    elif event == COMPILE_EVENT:
      self.compiles += 1

  def __enter__(self) -> 'CompileCounter':
    self._sizes = [f._cache_size() for f in self._jitted]
    self._active = True
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    self._active = False
    jax.monitoring.unregister_event_duration_listener(self._listener)
    self.cache_growth = sum(f._cache_size() - s for f, s in zip(self._jitted, self._sizes))

  @property
  def total(self) -> int:
    """Traces + compiles + growth of the watched jit caches."""
    return self.traces + self.compiles + self.cache_growth


class RecompileGuard(CompileCounter):
  """A `CompileCounter` that raises RuntimeError on exit if anything was traced or compiled.

  Usage (after warm-up):
    with RecompileGuard(what='routed batch'):
      router(labels, z, threshold)
  """

  def __init__(self, *jitted: Any, what: str = 'the guarded code'):
    super().__init__(*jitted)
    self.what = what

  def __exit__(self, exc_type, *exc) -> None:
    super().__exit__(exc_type, *exc)
    if exc_type is None and self.total:
      raise RuntimeError(
          f'{self.what} recompiled after warm-up ({self.traces} traces, {self.compiles} XLA '
          f'compiles, jit caches grew by {self.cache_growth}); a shape, dtype or static '
          'argument changed between calls, so the timing would include compilation')


def _percentile(values: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(values), q))


def _time_call(fn: Callable[..., Any], args: tuple) -> float:
  """Milliseconds of one `fn(*args)`, waited for with `block_until_ready`."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) * 1e3


def _summary(times: list[float]) -> dict[str, float]:
  return {'median_ms': float(statistics.median(times)), 'p90_ms': _percentile(times, 90),
          'mean_ms': float(statistics.fmean(times)), 'min_ms': float(min(times)),
          'iters': len(times)}


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 3,
            iters: int = 20) -> dict[str, float]:
  """Times `fn(*args)`: `warmup` untimed calls, then exactly `iters` timed calls.

  Each timed call is `perf_counter()` -> fn -> `jax.block_until_ready(out)` -> `perf_counter()`,
  so asynchronous dispatch cannot hide work. The timed loop runs in a `RecompileGuard`.

  Returns:
    {'median_ms', 'p90_ms', 'mean_ms', 'min_ms': float milliseconds per call, 'iters': int
     (the number of timed calls, equal to `iters`)}.

  Raises:
    ValueError: if iters < 1 or warmup < 0.
    RuntimeError: if anything compiles during the timed loop.
  """
  if int(iters) < 1:
    raise ValueError(f'iters must be >= 1 timed calls, got {iters}')
  if int(warmup) < 0:
    raise ValueError(f'warmup must be >= 0 calls, got {warmup}')
  for _ in range(int(warmup)):
    jax.block_until_ready(fn(*args))
  times = []
  with RecompileGuard(what=f'timed function {getattr(fn, "__name__", fn)!r}'):
    for _ in range(int(iters)):
      times.append(_time_call(fn, args))
  assert len(times) == int(iters)
  return _summary(times)


def time_compiled(compiled: jax.stages.Compiled, *args: Any, warmup: int = 3,
                  iters: int = 20) -> dict[str, float]:
  """`time_fn` for an AOT executable (see `compile_aot`); same return value.

  Raises:
    TypeError: if `compiled` is not a `jax.stages.Compiled` (time a jitted function through
      `compile_aot` first, so the compile is outside the measurement by construction).
  """
  if not isinstance(compiled, jax.stages.Compiled):
    raise TypeError(f'time_compiled needs a jax.stages.Compiled, got {type(compiled).__name__}; '
                    'use compile_aot(fn, *args) first, or time_fn for arbitrary callables')
  return time_fn(compiled, *args, warmup=warmup, iters=iters)


def median_ci(values: Any, level: float = 0.95) -> tuple[float, float]:
  """Distribution-free confidence interval of the median of `values` (order statistics).

  The interval [x_(l), x_(u)] of the sorted sample covers the population median with
  probability >= `level` (binomial(n, 1/2) tails); for 8 or fewer values (95 %) it is the range.
  """
  x = np.sort(np.asarray(values, np.float64).ravel())
  n = x.size
  if n == 0:
    raise ValueError('median_ci needs at least one value')
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must be in (0, 1), got {level}')
  # 1-based x_(k), x_(n-k+1) with P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2.
  k = int(scipy_stats.binom.ppf((1.0 - level) / 2.0, n, 0.5))
  lo = min(max(k - 1, 0), n - 1)
  hi = n - 1 - lo
  return float(x[lo]), float(x[hi])


def time_paired(fn_a: Callable[..., Any], args_a: tuple, fn_b: Callable[..., Any],
                args_b: tuple, *, warmup: int = 3, rounds: int = 100) -> dict[str, Any]:
  """Times two functions interleaved (a, b, b, a, a, b, ...) and compares them round by round.

  For small overheads (a few %) on a shared machine, drift between two separate timing loops is
  larger than the effect; alternating the order each round and taking the median of the
  per-round ratios a/b cancels it. Each call is timed as in `time_fn`, inside a
  `RecompileGuard`.

  Returns:
    {'a': stats of fn_a, 'b': stats of fn_b (as `time_fn`), 'ratio': median over rounds of
     time_a / time_b, 'ratio_ci95': (low, high) distribution-free 95 % interval of that median,
     'ratio_of_medians': median(a) / median(b), 'rounds': int}.
  """
  if int(rounds) < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}')
  if int(warmup) < 0:
    raise ValueError(f'warmup must be >= 0 calls, got {warmup}')
  for _ in range(int(warmup)):
    jax.block_until_ready(fn_a(*args_a))
    jax.block_until_ready(fn_b(*args_b))

  ta, tb = [], []
  with RecompileGuard(what='paired timing'):
    for r in range(int(rounds)):
      if r % 2 == 0:
        ta.append(_time_call(fn_a, args_a))
        tb.append(_time_call(fn_b, args_b))
      else:
        tb.append(_time_call(fn_b, args_b))
        ta.append(_time_call(fn_a, args_a))

  ratios = np.asarray(ta) / np.asarray(tb)
  sa, sb = _summary(ta), _summary(tb)
  return {'a': sa, 'b': sb, 'ratio': float(np.median(ratios)),
          'ratio_ci95': median_ci(ratios, 0.95),
          'ratio_of_medians': sa['median_ms'] / sb['median_ms'], 'rounds': int(rounds)}


def matmul_gflops(n: int = 2048, iters: int = 10, warmup: int = 2,
                  dtype: str = 'float32') -> float:
  """Measured matmul throughput of the default device in `dtype`, in GFLOP/s.

  Times an AOT-compiled `jnp.dot` of two [n, n] matrices (2 n^3 FLOPs per call) and divides by
  the median time, so that latencies from the same run can be read against the machine's peak.
  """
  if n < 1:
    raise ValueError(f'matmul size n must be >= 1, got {n}')
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  compiled = compile_aot(jnp.dot, a, b)
  stats = time_compiled(compiled, a, b, warmup=warmup, iters=iters)
  return 2.0 * n ** 3 / (stats['median_ms'] * 1e-3) / 1e9


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
  """Device kind, platform and counts, library versions and CPU resources of this process."""
  dev = jax.devices()[0]
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    usable = os.cpu_count() or 0
  return {
      'device_kind': dev.device_kind,
      'platform': dev.platform,
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'process_count': jax.process_count(),
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count() or 0,
      'cpu_count_usable': usable,
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'numpy': np.__version__,
      'python': sys.version.split()[0],
  }


def hardware_string(info: dict[str, Any] | None = None) -> str:
  """One line naming the hardware, e.g. 'cpu: 1 x cpu (AMD EPYC, 2 usable cores)'."""
  info = info or device_info()
  return (f"{info['platform']}: {info['device_count']} x {info['device_kind']} "
          f"({info['cpu_model']}, {info['cpu_count_usable']} usable cores)")
