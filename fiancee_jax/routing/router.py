"""Thresholds -> exit ids, and dispatch of inputs to their exits without wasted compute.

Exits are ordered by cost (exit E - 1 is the backbone). The routing rule picks, per sample,
the cheapest exit predicted to meet the threshold after calibration:

  exit(x) = min{k < E - 1 : pred_k(x) + margin_k <= threshold}, else E - 1.

Two dispatchers, because `jax.lax.switch` behaves differently per batch shape
(DESIGN.md, "JAX facts that shape routing"):

- `SwitchRouter` (batch of one): predictor -> route -> `lax.switch` on a *scalar* index in one
  executable; XLA lowers it to a conditional, so only the taken exit runs.
- `BucketedRouter` (batches): the predictor runs on the device, samples are grouped by exit on
  the host, each group is padded to a fixed bucket size and run by that exit's own AOT-compiled
  path, and results are scattered back in input order. Every (exit, bucket) is compiled once,
  so no call recompiles after `warmup()`.

`vmap_switch_fn` is the counter-example kept for the benchmark: under `vmap` a per-sample
switch becomes a select, so every exit runs for every sample.
"""
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax import tasks
from fiancee_jax.metrics import flops as flops_lib


def route(pred: jax.Array, threshold: float | jax.Array, margins: jax.Array) -> jax.Array:
  """Cheapest exit predicted to meet the threshold.

  Args:
    pred: float [B, E - 1] predicted distance of every early exit to the backbone.
    threshold: scalar distance budget (may be traced, so one executable serves all thresholds).
    margins: float [E - 1] calibration margins added to the predictions.

  Returns:
    int32 [B]: the lowest k with pred[:, k] + margins[k] <= threshold, else E - 1 (the
    backbone). A NaN prediction never meets the threshold, so it falls back to the backbone.
  """
  pred = jnp.asarray(pred)
  if pred.ndim != 2:
    raise ValueError(f'pred must be [B, E - 1] predicted distances, got shape {pred.shape}')
  margins = jnp.asarray(margins, pred.dtype)
  if margins.shape != pred.shape[1:]:
    raise ValueError(f'margins has shape {margins.shape} but pred has {pred.shape[1]} early '
                     f'exits; margins must be [E - 1] = [{pred.shape[1]}]')
  ok = pred + margins[None, :] <= threshold  # [B, E - 1]
  first = jnp.argmax(ok, axis=-1)  # index of the first True (0 when none)
  return jnp.where(ok.any(axis=-1), first, pred.shape[1]).astype(jnp.int32)


class Routed(NamedTuple):
  """What a routed batch returns (unpacks as a 3-tuple)."""
  images: np.ndarray  # float32 [B, H, W, 3] in input order
  exit_ids: np.ndarray  # int32 [B] exit taken by each sample
  gflops: np.ndarray  # float64 [B] GFLOPs spent per sample: exit_gflops[k] + predictor_gflops


def _check_predictor(model: model_lib.FianceeModel) -> None:
  if model.predictor is None:
    raise ValueError('the model has no predictor, so it cannot route; run the predictor stage '
                     '(--stages=predictor) or call an exit path directly (model.paths()[k])')


def _abstract_inputs(model: model_lib.FianceeModel, b: int) -> tuple[Any, ...]:
  return tasks.input_specs(model.task, b)


def _margins(model: model_lib.FianceeModel, threshold: float) -> np.ndarray:
  m = np.asarray(model.margins_at(threshold), np.float32).reshape(-1)
  if m.shape != (model.num_exits - 1,):
    raise ValueError(f'model.margins has {m.size} values but the model has '
                     f'{model.num_exits - 1} early exits; calibrate again '
                     '(routing.calibration.calibrate)')
  return m


def sample_gflops(model: model_lib.FianceeModel, exit_ids: np.ndarray) -> np.ndarray:
  """float64 [B] GFLOPs spent per sample: its exit's path plus the predictor (batch-1 costs)."""
  costs = np.asarray(model.exit_gflops, np.float64)
  return costs[np.asarray(exit_ids)] + float(model.predictor_gflops)


class SwitchRouter:
  """Batch-of-one routing in one executable: predictor -> route -> `lax.switch`.

  Because the exit index is a scalar, XLA lowers the switch to a conditional and only the taken
  exit's path runs. Reads `model.params`, `model.predictor_params` and `model.margins` at every
  call, so new weights of the same shapes take effect without recompiling.
  """

  def __init__(self, model: model_lib.FianceeModel):
    _check_predictor(model)
    self.model = model
    self.num_compiles = 0
    paths = model.paths()
    predict = model.predict_fn()

    def routed(params, pp, margins, threshold, *inputs):
      pred = predict(pp, *inputs)  # [1, E - 1]
      k = route(pred, threshold, margins)[0]  # scalar: a conditional, not a select
      return jax.lax.switch(k, paths, params, *inputs), k

    def dispatch(params, k, *inputs):
      return jax.lax.switch(k, paths, params, *inputs)

    self._routed_fn, self._dispatch_fn, self._paths = routed, dispatch, paths
    self._routed = self._dispatch = None
    self._direct: dict[int, jax.stages.Compiled] = {}

  def _compile(self, fn: Callable[..., Any], *args: Any) -> jax.stages.Compiled:
    self.num_compiles += 1
    return jax.jit(fn).lower(*args).compile()

  def compiled_routed(self) -> jax.stages.Compiled:
    """The executable (params, predictor_params, margins, threshold, *inputs) -> (image, k)."""
    if self._routed is None:
      m = self.model
      self._routed = self._compile(
          self._routed_fn, flops_lib.abstract(m.params), flops_lib.abstract(m.predictor_params),
          jax.ShapeDtypeStruct((m.num_exits - 1,), jnp.float32),
          jax.ShapeDtypeStruct((), jnp.float32), *_abstract_inputs(m, 1))
    return self._routed

  def compiled_dispatch(self) -> jax.stages.Compiled:
    """The switch alone, index given: (params, exit_id int32 [], *inputs) -> image."""
    if self._dispatch is None:
      m = self.model
      self._dispatch = self._compile(self._dispatch_fn, flops_lib.abstract(m.params),
                                     jax.ShapeDtypeStruct((), jnp.int32),
                                     *_abstract_inputs(m, 1))
    return self._dispatch

  def compiled_direct(self, k: int) -> jax.stages.Compiled:
    """Exit k's own path at batch 1: (params, *inputs) -> image."""
    if not 0 <= k < self.model.num_exits:
      raise ValueError(f'exit {k} does not exist (0..{self.model.num_exits - 1})')
    if k not in self._direct:
      self._direct[k] = self._compile(self._paths[k], flops_lib.abstract(self.model.params),
                                      *_abstract_inputs(self.model, 1))
    return self._direct[k]

  def warmup(self) -> int:
    """Compiles the routed and dispatch executables and every direct path; returns compiles."""
    self.compiled_routed()
    self.compiled_dispatch()
    for k in range(self.model.num_exits):
      self.compiled_direct(k)
    return self.num_compiles

  def __call__(self, inputs: Sequence[Any], threshold: float) -> tuple[jax.Array, jax.Array]:
    """Routes one sample.

    Args:
      inputs: the exit paths' inputs at batch 1 (model.make_inputs): (labels int32
        [1, H, W], z float32 [1, z_dim]) or (source, driver) float32 [1, H, W, 3].
      threshold: distance budget.

    Returns:
      (image float32 [1, H, W, 3], exit_id int32 []) as device arrays (not synchronised).
    """
    inputs = self._check_one(inputs)
    threshold = model_lib.check_threshold(threshold)
    m = self.model
    return self.compiled_routed()(m.params, m.predictor_params, _margins(m, threshold),
                                  np.float32(threshold), *inputs)

  def dispatch(self, exit_id: int, inputs: Sequence[Any]) -> jax.Array:
    """Runs exit `exit_id` through the switch executable (index as a runtime scalar)."""
    inputs = self._check_one(inputs)
    return self.compiled_dispatch()(self.model.params, np.int32(exit_id), *inputs)

  def direct(self, k: int) -> Callable[..., jax.Array]:
    """fn(*inputs at batch 1) -> image [1, H, W, 3] running exit k's path only."""
    compiled = self.compiled_direct(k)
    model = self.model

    def run(*inputs):
      return compiled(model.params, *inputs)

    run.__name__ = f'direct_exit_{k}'
    return run

  def _check_one(self, inputs: Any) -> tuple[Any, ...]:
    inputs = tasks.as_tuple(inputs)
    if inputs and np.shape(inputs[0])[:1] != (1,):
      raise ValueError(f'SwitchRouter serves a batch of one ([1, ...] inputs), got a first '
                       f'input of shape {np.shape(inputs[0])}; use BucketedRouter for batches')
    # Device arrays are checked on their device like NumPy ones (tasks.check_inputs): class
    # ids, finiteness and dtypes alike, with no copy of the data to the host.
    return self.model.check_inputs(inputs)


def default_buckets(max_bucket: int = 64) -> tuple[int, ...]:
  """(1, 2, 4, ..., max_bucket); max_bucket itself is included even if not a power of two."""
  if max_bucket < 1:
    raise ValueError(f'max_bucket must be >= 1, got {max_bucket}')
  sizes = []
  b = 1
  while b < max_bucket:
    sizes.append(b)
    b *= 2
  sizes.append(int(max_bucket))
  return tuple(sizes)


class BucketedRouter:
  """Batched routing without vmap-of-switch and without recompiles.

  A call runs the predictor and the routing rule on the device (one executable per bucket
  size), groups samples by exit on the host, covers each group with bucket-sized chunks
  (largest first; a remainder below the smallest bucket is padded up to it), runs each chunk
  through its exit's own AOT-compiled path and scatters the images back in input order.
  Padding repeats a real sample of the chunk; inference-mode normalisation is per sample, so
  padding never changes results.

  Attributes:
    model: the FianceeModel (its params, predictor params and margins are read at each call).
    bucket_sizes: increasing batch sizes that executables exist for.
    num_compiles: executables compiled so far; constant after `warmup()`.
  """

  def __init__(self, model: model_lib.FianceeModel, bucket_sizes: Sequence[int] | None = None):
    _check_predictor(model)
    sizes = tuple(int(b) for b in (bucket_sizes or default_buckets()))
    if not sizes or sizes[0] < 1 or list(sizes) != sorted(set(sizes)):
      raise ValueError(f'bucket_sizes must be strictly increasing positive batch sizes, got '
                       f'{tuple(bucket_sizes or ())}')
    self.model = model
    self.bucket_sizes = sizes
    self.num_compiles = 0
    self._paths = model.paths()
    predict = model.predict_fn()

    def predict_and_route(pp, margins, threshold, *inputs):
      pred = predict(pp, *inputs).astype(jnp.float32)
      return route(pred, threshold, margins), pred

    self._predict_fn = predict_and_route
    self._cache: dict[tuple[str, int, int], jax.stages.Compiled] = {}

  def _compiled(self, kind: str, k: int, b: int) -> jax.stages.Compiled:
    key = (kind, k, b)
    if key not in self._cache:
      m = self.model
      if kind == 'predict':
        lowered = jax.jit(self._predict_fn).lower(
            flops_lib.abstract(m.predictor_params),
            jax.ShapeDtypeStruct((m.num_exits - 1,), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.float32), *_abstract_inputs(m, b))
      else:
        lowered = jax.jit(self._paths[k]).lower(flops_lib.abstract(m.params),
                                                *_abstract_inputs(m, b))
      self._cache[key] = lowered.compile()
      self.num_compiles += 1
    return self._cache[key]

  def compiled_exit(self, k: int, b: int) -> jax.stages.Compiled:
    """Exit k's path at bucket size b: (params, *inputs at batch b) -> images."""
    if not 0 <= k < self.model.num_exits:
      raise ValueError(f'exit {k} does not exist (0..{self.model.num_exits - 1})')
    if b not in self.bucket_sizes:
      raise ValueError(f'batch {b} is not a bucket size {self.bucket_sizes}')
    return self._compiled('exit', k, b)

  def compiled_predict(self, b: int) -> jax.stages.Compiled:
    """(predictor_params, margins, threshold, *inputs at batch b) -> (exit_ids [b], pred)."""
    if b not in self.bucket_sizes:
      raise ValueError(f'batch {b} is not a bucket size {self.bucket_sizes}')
    return self._compiled('predict', -1, b)

  def warmup(self) -> int:
    """Compiles the predictor and every exit at every bucket size; returns `num_compiles`."""
    for b in self.bucket_sizes:
      self.compiled_predict(b)
      for k in range(self.model.num_exits):
        self.compiled_exit(k, b)
    return self.num_compiles

  def _chunks(self, idx: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
    """[(bucket, padded indices, real count)] covering `idx`.

    Greedy: the largest bucket that the remaining samples fill, then the next; only a
    remainder smaller than the smallest bucket is padded (to it). With buckets 1, 2, 4, ...
    nothing is padded: 41 samples run as 32 + 8 + 1, not as 64 with 23 wasted. A per-sample
    cost that barely depends on the batch (CPU) makes that the cheapest cover; where small
    batches are inefficient (GPU), drop the small buckets and the remainder is padded.
    """
    out, start, n = [], 0, len(idx)
    while start < n:
      fits = [b for b in self.bucket_sizes if b <= n - start]
      b = fits[-1] if fits else self.bucket_sizes[0]
      chunk = idx[start:start + b]
      out.append((b, np.concatenate([chunk, np.full(b - len(chunk), chunk[0], chunk.dtype)]),
                  len(chunk)))
      start += len(chunk)
    return out

  def plan(self, exit_ids: np.ndarray) -> list[tuple[int, int, np.ndarray, int]]:
    """The calls a routed batch makes: [(exit, bucket, padded sample indices, real count)]."""
    exit_ids = np.asarray(exit_ids)
    calls = []
    for k in range(self.model.num_exits):
      for b, padded, real in self._chunks(np.flatnonzero(exit_ids == k)):
        calls.append((k, b, padded, real))
    return calls

  def predict_and_route(self, inputs: Sequence[Any],
                        threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Exit ids int32 [B] and predictions float32 [B, E - 1] for a batch of inputs."""
    return self._predict_and_route(self.model.check_inputs(inputs),
                                   model_lib.check_threshold(threshold))

  def _predict_and_route(self, inputs: tuple[np.ndarray, ...],
                         threshold: float) -> tuple[np.ndarray, np.ndarray]:
    m = self.model
    margins = _margins(m, threshold)
    threshold = np.float32(threshold)
    n = inputs[0].shape[0]
    pending = []
    for b, padded, real in self._chunks(np.arange(n)):
      pending.append((padded[:real], self.compiled_predict(b)(
          m.predictor_params, margins, threshold, *(x[padded] for x in inputs))))
    ids = np.empty(n, np.int32)
    pred = np.empty((n, m.num_exits - 1), np.float32)
    for idx, (k, p) in pending:
      ids[idx] = np.asarray(k)[:len(idx)]
      pred[idx] = np.asarray(p)[:len(idx)]
    return ids, pred

  def run_exits(self, exit_ids: Any, inputs: Sequence[Any]) -> np.ndarray:
    """Images float32 [B, H, W, 3] with sample i produced by exit exit_ids[i]."""
    inputs = self.model.check_inputs(inputs)
    exit_ids = np.asarray(exit_ids)
    e, n = self.model.num_exits, inputs[0].shape[0]
    if exit_ids.shape != (n,) or exit_ids.size and (
        exit_ids.min() < 0 or exit_ids.max() >= e):
      raise ValueError(f'exit_ids must be int [B] = [{n}] with values in '
                       f'[0, {e}), got shape {exit_ids.shape} with values '
                       f'{np.unique(exit_ids)[:8].tolist()}')
    return self._run_exits(exit_ids, inputs)

  def _run_exits(self, exit_ids: np.ndarray, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    params = self.model.params
    # Dispatch every chunk before reading any result, so the device works while the host
    # slices the next chunk (JAX dispatch is asynchronous).
    pending = [(padded[:n], self.compiled_exit(k, b)(params, *(x[padded] for x in inputs)))
               for k, b, padded, n in self.plan(exit_ids)]
    h, w = self.model.resolution
    images = np.empty((inputs[0].shape[0], h, w, 3), np.float32)
    for idx, out in pending:
      images[idx] = np.asarray(out)[:len(idx)]
    return images

  def __call__(self, inputs: Sequence[Any], threshold: float) -> Routed:
    """Routes a batch.

    Args:
      inputs: the exit paths' inputs (model.make_inputs): (labels int32 [B, H, W], z float32
        [B, z_dim]) or (source, driver) float32 [B, H, W, 3].
      threshold: distance budget.

    Returns:
      Routed(images float32 [B, H, W, 3], exit_ids int32 [B], gflops float64 [B]).
    """
    threshold = model_lib.check_threshold(threshold)
    inputs = self.model.check_inputs(inputs)
    exit_ids, _ = self._predict_and_route(inputs, threshold)
    images = self._run_exits(exit_ids, inputs)
    return Routed(images, exit_ids, sample_gflops(self.model, exit_ids))


def vmap_switch_fn(model: model_lib.FianceeModel) -> Callable[..., jax.Array]:
  """The counter-example: `vmap` of a per-sample `lax.switch` (benchmark only).

  Under `vmap` the batched index turns the switch into a select, so every exit runs for every
  sample and the cost is the sum of all exits, whatever the routing. Do not route this way.

  Returns:
    fn(params, exit_ids int32 [B], *inputs at batch B) -> images float32 [B, H, W, 3].
  """
  paths = model.paths()

  def one(params, k, *inputs):
    return jax.lax.switch(k, paths, params, *(x[None] for x in inputs))[0]

  def fn(params, exit_ids, *inputs):
    return jax.vmap(one, in_axes=(None, 0) + (0,) * len(inputs))(params, exit_ids, *inputs)

  return fn
