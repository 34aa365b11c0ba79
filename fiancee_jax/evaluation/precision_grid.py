"""The benchmark's precision grid: every exit path in every compute dtype at every batch size.

  grid = precision_grid(model, data, dtypes=('float32', 'bfloat16'),
                        batch_sizes=(1, 8, 64, 256), warmup=1, iters=3)

The same float32 parameters serve every dtype (`with_dtype`: models/precision.py). Each cell
(dtype, batch, exit) is its own AOT executable, timed with the latency protocol
(metrics/latency.py); a cell that does not compile or run (out of memory at a large batch)
is skipped with its error as the reason. Per cell the grid gives the measured speedup over
the backbone in the same dtype at the same batch, next to the FLOPs-predicted one (the
backbone's counted GFLOPs over the exit's), and the speedup over float32: on a GPU or TPU
the two comparisons a user runs the benchmark for.
"""
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax.metrics import latency
from fiancee_jax.models import precision

# Errors that skip a cell of the precision grid instead of failing the benchmark: XLA's
# compile or run-time failures (out of memory is RESOURCE_EXHAUSTED) and host memory.
GRID_ERRORS = (jax.errors.JaxRuntimeError, MemoryError)


def with_dtype(model: model_lib.FianceeModel, dtype: str) -> model_lib.FianceeModel:
  """The same model (same float32 parameters) computing in `dtype` ('float32' | 'bfloat16').

  Backbone, light blocks and heads compute in `dtype` (models/precision.py); the database
  lookup stays float32 and images come out float32, so the exit paths take the same inputs
  and return the same shapes and dtypes.
  """
  dt = precision.compute_dtype(dtype)
  em = model.exit_model
  return model.replace(exit_model=dataclasses.replace(em, backbone=em.backbone.clone(dtype=dt)))


def model_dtype(model: model_lib.FianceeModel) -> str:
  """The compute dtype of the model's exit paths ('float32' or 'bfloat16')."""
  return precision.name_of(getattr(model.exit_model.backbone, 'dtype', 'float32'))


def _cyclic(x: Any, n: int) -> np.ndarray:
  """The first n rows of x, repeated cyclically when it has fewer."""
  x = np.asarray(x)
  return np.resize(x, (n, *x.shape[1:])) if x.shape[0] < n else x[:n]


def _reason(e: BaseException) -> str:
  """One line (at most 300 characters) naming a skipped cell's error."""
  lines = str(e).strip().splitlines() or ['']
  return f'{type(e).__name__}: {lines[0]}'[:300]


def check_grid(dtypes: Sequence[str], batch_sizes: Sequence[int], warmup: int,
               iters: int) -> tuple[list[str], list[int]]:
  """(dtype names, batch sizes) of a precision grid; ValueError names a bad argument."""
  dtypes = [precision.name_of(precision.compute_dtype(d)) for d in dtypes]
  batch_sizes = [int(b) for b in batch_sizes]
  if (not dtypes or len(set(dtypes)) < len(dtypes) or not batch_sizes
      or min(batch_sizes) < 1 or iters < 1 or warmup < 0):
    raise ValueError(f'the precision grid needs distinct dtypes, batch sizes >= 1, iters >= 1 '
                     f'and warmup >= 0, got dtypes={dtypes}, batch_sizes={batch_sizes}, '
                     f'iters={iters}, warmup={warmup} (config.benchmark)')
  return dtypes, batch_sizes


def precision_grid(model: model_lib.FianceeModel, data: Sequence[Any], *,
                   dtypes: Sequence[str], batch_sizes: Sequence[int], warmup: int, iters: int,
                   seed: int = 0,
                   compiled: Callable[[str, int, int], Any] | None = None) -> dict[str, Any]:
  """Every exit path in every compute dtype at every batch size, on the same parameters.

  Each cell (dtype, batch, exit) is its own AOT executable (`with_dtype`), warmed up and
  timed alone; at each batch the dtypes of one exit are timed one after the other, so that
  the ratio between them sees the least drift.

  Args:
    model: a FianceeModel (float32; its parameters serve every dtype).
    data: checked test data (model.check_data); the first max(batch_sizes) examples are the
      inputs, repeated cyclically when there are fewer (timings do not depend on values).
    dtypes: compute dtypes ('float32', 'bfloat16').
    batch_sizes: batch sizes.
    warmup, iters: untimed and timed calls per cell (latency.time_compiled).
    seed: seed of z.
    compiled: (dtype, exit, batch) -> an executable of that cell already compiled (the
      routers' float32 ones), or None to compile it here.

  Returns:
    {'dtypes', 'batch_sizes', 'warmup', 'iters', 'rows': per measured cell {'dtype',
    'batch', 'exit', 'is_backbone', 'median_ms', 'p90_ms', 'images_per_s', 'xla_gflops'
    (whole batch), 'flops_speedup' (backbone over exit counted GFLOPs), 'measured_speedup'
    (backbone over exit time, same dtype and batch; None if the backbone's cell was skipped),
    'speedup_vs_float32' (the float32 cell's time over this one's; None without it)},
    'skipped': per cell that failed to compile or run {'dtype', 'batch', 'exit', 'reason'}}.
  """
  dtypes, batch_sizes = check_grid(dtypes, batch_sizes, warmup, iters)
  models = {d: (model if d == model_dtype(model) else with_dtype(model, d)) for d in dtypes}
  e = model.num_exits
  big = model.make_inputs(tuple(_cyclic(x, max(batch_sizes)) for x in data),
                          jax.random.key(seed))
  big = tuple(np.asarray(x) for x in big)
  cells, skipped = {}, []
  for b in batch_sizes:
    try:
      inputs = jax.device_put(tuple(x[:b] for x in big))
    except GRID_ERRORS as err:
      skipped += [{'dtype': d, 'batch': b, 'exit': k, 'reason': _reason(err)}
                  for k in range(e) for d in dtypes]
      continue
    for k in range(e):
      for d in dtypes:
        m = models[d]
        try:
          exe = compiled(d, k, b) if compiled is not None else None
          if exe is None:
            exe = latency.compile_aot(m.exit_model.exit_path(k), m.params, *inputs)
          t = latency.time_compiled(exe, m.params, *inputs, warmup=warmup, iters=iters)
          cells[(d, b, k)] = {'median_ms': t['median_ms'], 'p90_ms': t['p90_ms'],
                              'xla_gflops': latency.cost_and_memory(exe)['gflops']}
        except GRID_ERRORS as err:
          skipped.append({'dtype': d, 'batch': b, 'exit': k, 'reason': _reason(err)})
        finally:
          exe = None  # an executable that ran out of memory must not hold its buffers
    del inputs
  gflops = [float(g) for g in model.exit_gflops]
  rows = []
  for (d, b, k), c in cells.items():
    bb, f32 = cells.get((d, b, e - 1)), cells.get(('float32', b, k))
    rows.append({
        'dtype': d, 'batch': b, 'exit': k, 'is_backbone': k == e - 1,
        'median_ms': c['median_ms'], 'p90_ms': c['p90_ms'],
        'images_per_s': b / (c['median_ms'] * 1e-3), 'xla_gflops': c['xla_gflops'],
        'flops_speedup': gflops[-1] / gflops[k],
        'measured_speedup': None if bb is None else bb['median_ms'] / c['median_ms'],
        'speedup_vs_float32': None if f32 is None else f32['median_ms'] / c['median_ms']})
  rows.sort(key=lambda r: (r['batch'], r['exit'], dtypes.index(r['dtype'])))
  return {'dtypes': dtypes, 'batch_sizes': batch_sizes, 'warmup': int(warmup),
          'iters': int(iters), 'rows': rows, 'skipped': skipped}
