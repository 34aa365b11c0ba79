"""A trained FIANCEE model: backbone + exits + database + predictor, and their costs.

This is the object that routing, evaluation, the benchmark, the CLI and the Colabs share.
Exit paths take a tuple of inputs (`(labels, z)` for OASIS, `(source, driver)` for the
reenactment backbone); `make_inputs` builds them from the data (tasks.py).
"""
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from fiancee_jax import tasks
from fiancee_jax.models import exits as exits_lib

# () -> (GFLOPs per exit path at batch 1, the backbone last; GFLOPs of the predictor).
CostFn = Callable[[], tuple[Sequence[float], float]]


class FianceeModel:
  """Everything inference needs.

  Attributes:
    exit_model: static description of backbone + exits (see models/exits.py).
    params: {'backbone': variables, 'exits': [variables], 'database': arrays or None}.
    predictor: linen module, predictor.apply(predictor_params, *inputs) -> [B, E - 1].
    predictor_params: its variables.
    margins: float32 [E - 1] calibration margins added to predictions before routing.
    exit_gflops: GFLOPs per exit path at batch 1 (database lookup included), E values,
      the last being the backbone. Given, or computed by `costs` on first use (compiling
      every exit path once) and then kept on this object.
    predictor_gflops: GFLOPs of the predictor at batch 1 (given, or from `costs`).
    task: what the backbone consumes (tasks.Synthesis or tasks.Reenactment): the data a
      user passes, and the inputs of the exit paths (data, plus z if the generator has noise).
    distance: name of the distance the predictor predicts (e.g. '1-msssim').
    risk_control: a routing.calibration.RiskControl when the margins depend on the
      threshold (config.router.calibration = 'risk_control'); then `margins` is unused.
    fingerprints: {artifact kind: fingerprint} of the artifacts the model was loaded from
      (artifacts.py); empty for a model built in memory.
    routers: routers built for this model by `generate` ({'switch' | 'bucketed': router});
      they hold its compiled executables and live as long as the model.
  """

  def __init__(self, exit_model: exits_lib.ExitModel, params: dict,
               predictor: nn.Module | None, predictor_params: Any, margins: np.ndarray,
               exit_gflops: Sequence[float] | None = None,
               predictor_gflops: float | None = None, task: tasks.Task | None = None,
               distance: str = '', risk_control: Any = None, *,
               costs: CostFn | None = None, fingerprints: dict[str, str] | None = None):
    if (exit_gflops is None or predictor_gflops is None) and costs is None:
      raise ValueError('FianceeModel needs exit_gflops and predictor_gflops, or costs= '
                       'to compute them on first use')
    self.exit_model = exit_model
    self.params = params
    self.predictor = predictor
    self.predictor_params = predictor_params
    self.margins = margins
    self.task = task
    self.distance = distance
    self.risk_control = risk_control
    self.fingerprints = dict(fingerprints or {})
    self.routers: dict[str, Any] = {}
    self._exit_gflops = None if exit_gflops is None else tuple(float(g) for g in exit_gflops)
    self._predictor_gflops = None if predictor_gflops is None else float(predictor_gflops)
    self._costs = costs

  def replace(self, **changes: Any) -> 'FianceeModel':
    """A new model with some constructor arguments changed (and no routers yet)."""
    args = dict(exit_model=self.exit_model, params=self.params, predictor=self.predictor,
                predictor_params=self.predictor_params, margins=self.margins,
                exit_gflops=self._exit_gflops, predictor_gflops=self._predictor_gflops,
                task=self.task, distance=self.distance, risk_control=self.risk_control,
                costs=self._costs, fingerprints=self.fingerprints)
    unknown = set(changes) - set(args)
    if unknown:
      raise TypeError(f'FianceeModel has no argument(s) {sorted(unknown)}')
    return FianceeModel(**{**args, **changes})

  def __repr__(self) -> str:
    fps = {k: v[:12] for k, v in self.fingerprints.items()}
    return (f'FianceeModel(num_exits={self.num_exits}, task={self.task!r}, '
            f'distance={self.distance!r}, fingerprints={fps})')

  def _compute_costs(self) -> None:
    exit_gflops, predictor_gflops = self._costs()
    if self._exit_gflops is None:
      self._exit_gflops = tuple(float(g) for g in exit_gflops)
    if self._predictor_gflops is None:
      self._predictor_gflops = float(predictor_gflops)

  @property
  def exit_gflops(self) -> tuple[float, ...]:
    if self._exit_gflops is None:
      self._compute_costs()
    return self._exit_gflops

  @property
  def predictor_gflops(self) -> float:
    if self._predictor_gflops is None:
      self._compute_costs()
    return self._predictor_gflops

  def margins_at(self, threshold: float) -> np.ndarray:
    """float32 [E - 1] margins the router adds to predictions at this threshold."""
    if self.risk_control is not None:
      return self.risk_control.margins(threshold)
    return np.asarray(self.margins, np.float32)

  @property
  def num_exits(self) -> int:
    return self.exit_model.num_exits

  @property
  def backbone_gflops(self) -> float:
    return self.exit_gflops[-1]

  @property
  def resolution(self) -> tuple[int, int]:
    return tuple(self.task.resolution)

  def make_inputs(self, data: Any, key: jax.Array) -> tuple[jax.Array, ...]:
    """Exit-path inputs from data: (labels, z) with one z per image from `key` for
    label-map synthesis; (source, driver) unchanged for reenactment."""
    return tasks.make_inputs(self.task, tasks.as_tuple(data), key)

  def check_data(self, data: Any) -> tuple[np.ndarray | jax.Array, ...]:
    """Validates a batch of data before any compute (see tasks.py); device arrays are checked
    on their device and stay there."""
    return self.task.check_data(data)

  def check_inputs(self, inputs: Any) -> tuple[np.ndarray | jax.Array, ...]:
    """Validates exit-path inputs (data, then z if any) before any compute, NumPy or device
    arrays alike (see tasks.check_inputs)."""
    return tasks.check_inputs(self.task, inputs)

  def paths(self) -> list[Callable[..., jax.Array]]:
    """[path_0, ..., path_{E-1}], each path_k(params, *inputs) -> images [B, H, W, 3]."""
    return [self.exit_model.exit_path(k) for k in range(self.num_exits)]

  def predict_fn(self) -> Callable[..., jax.Array]:
    """predict(predictor_params, *inputs) -> predicted distances float32 [B, E - 1]."""
    return self.predictor.apply


def check_threshold(threshold: Any, name: str = 'threshold') -> float:
  """A real, finite, non-negative number (int, float, NumPy scalar) as a float, else ValueError.

  Strings and bools are refused, not converted: '0.2' or True as a distance budget is a bug
  in the caller, not a threshold of 0.2 or 1.0.
  """
  value = threshold
  if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
    value = np.asarray(value)[()]  # a 0-d array: its scalar
  if (not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_))
      or not np.isfinite(float(value)) or float(value) < 0):
    raise ValueError(f'{name} must be a finite non-negative number (a distance budget such '
                     f'as 0.1; int, float or a NumPy scalar), got {threshold!r} '
                     f'({type(threshold).__name__})')
  return float(value)


def check_seed(seed: Any, name: str = 'seed') -> int:
  """An integer seed (int or NumPy integer, in int64) as an int, else ValueError."""
  value = seed
  if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
    value = np.asarray(value)[()]  # a 0-d array: its scalar
  if (not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_))
      or not -2**63 <= int(value) < 2**63):
    raise ValueError(f'{name} must be an integer (e.g. 0; int or a NumPy integer in int64), '
                     f'got {seed!r} ({type(seed).__name__})')
  return int(value)
