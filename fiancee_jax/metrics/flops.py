"""Compute costs from XLA: FLOPs of a compiled function, parameter counts."""
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def abstract(tree: Any) -> Any:
  """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs, so nothing is computed."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def cost_analysis(fn: Callable[..., Any], *args: Any) -> dict[str, float]:
  """Compiles `fn(*args)` (args may be abstract) and returns XLA's cost analysis.

  Returns:
    {'gflops': float, 'bytes_accessed': float}; `flops` counts a multiply-add as 2.
  """
  compiled = jax.jit(fn).lower(*abstract(args)).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0]
  return {'gflops': float(cost.get('flops', 0.0)) / 1e9,
          'bytes_accessed': float(cost.get('bytes accessed', 0.0))}


def gflops(fn: Callable[..., Any], *args: Any) -> float:
  """GFLOPs of one call of `fn(*args)` as compiled by XLA."""
  return cost_analysis(fn, *args)['gflops']


def param_count(params: Any) -> int:
  """Number of scalars in a params pytree (batch_stats excluded by the caller)."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
