"""A trained FIANCEE model: backbone + exits + database + predictor, and their costs.

This is the object that routing, evaluation, the benchmark, the CLI and the Colabs share.
Inputs are a tuple of arrays (`(labels, z)` for OASIS); `make_inputs` builds them.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fiancee_jax.models import exits as exits_lib


@dataclasses.dataclass
class FianceeModel:
  """Everything inference needs.

  Attributes:
    exit_model: static description of backbone + exits (see models/exits.py).
    params: {'backbone': variables, 'exits': [variables], 'database': arrays or None}.
    predictor: linen module, predictor.apply(predictor_params, labels) -> [B, E - 1].
    predictor_params: its variables.
    margins: float32 [E - 1] calibration margins added to predictions before routing.
    exit_gflops: GFLOPs per exit path at batch 1 (database lookup included), E values,
      the last being the backbone.
    predictor_gflops: GFLOPs of the predictor at batch 1.
    num_classes: label ids must be in [0, num_classes).
    resolution: (H, W) of label maps.
    z_dim: noise width.
    distance: name of the distance the predictor predicts (e.g. '1-msssim').
  """
  exit_model: exits_lib.ExitModel
  params: dict
  predictor: nn.Module | None
  predictor_params: Any
  margins: np.ndarray
  exit_gflops: tuple[float, ...]
  predictor_gflops: float
  num_classes: int
  resolution: tuple[int, int]
  z_dim: int
  distance: str = ''

  @property
  def num_exits(self) -> int:
    return self.exit_model.num_exits

  @property
  def backbone_gflops(self) -> float:
    return self.exit_gflops[-1]

  def make_inputs(self, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(labels int32 [B, H, W], z float32 [B, z_dim]) with one z per image from `key`."""
    z = jax.random.normal(key, (labels.shape[0], self.z_dim))
    return labels, z

  def paths(self) -> list[Callable[..., jax.Array]]:
    """[path_0, ..., path_{E-1}], each path_k(params, *inputs) -> images [B, H, W, 3]."""
    return [self.exit_model.exit_path(k) for k in range(self.num_exits)]

  def predict_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
    """predict(predictor_params, labels) -> predicted distances float32 [B, E - 1]."""
    predictor = self.predictor

    def predict(pp, labels):
      return predictor.apply(pp, labels)

    return predict

  def check_labels(self, labels: Any) -> np.ndarray:
    """Validates a label batch on the host before any compute; returns int32 [B, H, W]."""
    arr = np.asarray(labels)
    if arr.ndim == 2:
      raise ValueError(f'labels must be int32 [B, H, W], got a single map of shape '
                       f'{arr.shape}; add a batch axis (labels[None])')
    if arr.ndim != 3:
      raise ValueError(f'labels must be int32 [B, H, W], got shape {arr.shape}')
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f'labels must be an integer array (class ids), got dtype {arr.dtype}')
    if tuple(arr.shape[1:]) != tuple(self.resolution):
      raise ValueError(f'labels are {arr.shape[1]}x{arr.shape[2]} but the model was trained '
                       f'at {self.resolution[0]}x{self.resolution[1]} (config.data.resolution)')
    if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
      bad = int(arr.max()) if arr.max() >= self.num_classes else int(arr.min())
      raise ValueError(f'labels has class id {bad} but the config has {self.num_classes} '
                       'classes (config.data.num_classes)')
    return arr.astype(np.int32)


def check_threshold(threshold: Any) -> float:
  """A finite, non-negative float, else ValueError."""
  try:
    t = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f'threshold must be a finite non-negative number, got {threshold!r}') from None
  if not np.isfinite(t) or t < 0:
    raise ValueError(f'threshold must be a finite non-negative number, got {threshold!r}')
  return t
