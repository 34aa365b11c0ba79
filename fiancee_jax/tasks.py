"""What a backbone consumes: the one place that knows label maps from face pairs.

The exit machinery (exits, database, predictor, router, report, benchmark) is generic over
two kinds of tuples:

- *data*: what a dataset or a user supplies.
- *inputs*: what every exit path and the predictor take, `path_k(params, *inputs)`: the
  data plus the generator's noise when it has one.

Tasks:

- `Synthesis` (OASIS): data `(labels int32 [B, H, W],)`, inputs `(labels, z float32
  [B, z_dim])`.
- `Reenactment` (MegaPortraits-style): data = inputs = `(source, driver)`, float32
  [B, H, W, 3] in [-1, 1]. Cross pairs of the avatars test split also carry the ground
  truth (identity of the source, motion of the driver) as `target`.

`models.factory.get_task(config)` gives the task of a config; `data.sources` gives the
data.
"""
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Data = tuple[np.ndarray, ...]


def as_tuple(data: Any) -> tuple[Any, ...]:
  return tuple(data) if isinstance(data, (tuple, list)) else (data,)


@dataclasses.dataclass(frozen=True)
class Synthesis:
  """Label map (+ noise z) -> image."""
  num_classes: int
  resolution: tuple[int, int]
  z_dim: int
  name: ClassVar[str] = 'synthesis'
  data_keys: ClassVar[tuple[str, ...]] = ('labels',)

  @property
  def noise_dim(self) -> int:
    return self.z_dim

  def data_specs(self, b: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return (jax.ShapeDtypeStruct((b, *self.resolution), jnp.int32),)

  def check_data(self, data: Any) -> Data:
    """Validates label maps on the host, before any compute; returns (int32 [B, H, W],).

    Accepts the array itself or a 1-tuple.
    """
    data = as_tuple(data)
    if len(data) != 1:
      raise ValueError(f'label-map synthesis takes one array (labels int32 [B, H, W]), got '
                       f'{len(data)} arrays')
    arr = np.asarray(data[0])
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
    return (arr.astype(np.int32),)

  def columns(self, data: Data) -> list[np.ndarray]:
    """uint8 [B, H, W, 3] pictures of the data, for sample grids."""
    from fiancee_jax.data import visualize  # pylint: disable=g-import-not-at-top
    return [visualize.label_map_to_rgb(np.asarray(data[0]), self.num_classes)]


@dataclasses.dataclass(frozen=True)
class Reenactment:
  """Source face + driver face -> the source's identity with the driver's motion."""
  resolution: tuple[int, int]
  name: ClassVar[str] = 'reenactment'
  data_keys: ClassVar[tuple[str, ...]] = ('source', 'driver')

  @property
  def noise_dim(self) -> int:
    return 0

  def data_specs(self, b: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    s = jax.ShapeDtypeStruct((b, *self.resolution, 3), jnp.float32)
    return (s, s)

  def check_data(self, data: Any) -> Data:
    """Validates (source, driver) on the host, before any compute; float32 [B, H, W, 3]."""
    data = as_tuple(data)
    if len(data) != 2:
      raise ValueError(f'reenactment takes (source, driver), two float32 [B, H, W, 3] '
                       f'arrays in [-1, 1], got {len(data)} arrays')
    out = []
    for name, x in zip(self.data_keys, data):
      arr = np.asarray(x)
      if arr.ndim == 3:
        raise ValueError(f'{name} must be float32 [B, H, W, 3], got a single image of shape '
                         f'{arr.shape}; add a batch axis ({name}[None])')
      if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f'{name} must be float32 [B, H, W, 3] in [-1, 1], got shape '
                         f'{arr.shape}')
      if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f'{name} must be float32 [B, H, W, 3] in [-1, 1], got dtype '
                         f'{arr.dtype}; convert uint8 images with x / 127.5 - 1')
      if tuple(arr.shape[1:3]) != tuple(self.resolution):
        raise ValueError(f'{name} is {arr.shape[1]}x{arr.shape[2]} but the model was trained '
                         f'at {self.resolution[0]}x{self.resolution[1]} '
                         '(config.data.resolution)')
      if not np.isfinite(arr).all():
        raise ValueError(f'{name} has {int((~np.isfinite(arr)).sum())} non-finite values')
      if arr.size and (arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6):
        raise ValueError(f'{name} must be in [-1, 1], got [{arr.min():.3f}, '
                         f'{arr.max():.3f}]; convert uint8 images with x / 127.5 - 1')
      out.append(arr.astype(np.float32))
    if out[0].shape != out[1].shape:
      raise ValueError(f'source {out[0].shape} and driver {out[1].shape} must have the same '
                       'shape')
    return tuple(out)

  def columns(self, data: Data) -> list[np.ndarray]:
    from fiancee_jax.data import visualize  # pylint: disable=g-import-not-at-top
    return [visualize.images_to_uint8(np.asarray(x)) for x in data]


Task = Synthesis | Reenactment


# -- Inputs: data plus noise. --


def num_data(task: Task) -> int:
  return len(task.data_keys)


def input_specs(task: Task, b: int) -> tuple[jax.ShapeDtypeStruct, ...]:
  """ShapeDtypeStructs of the exit paths' inputs at batch b."""
  noise = (jax.ShapeDtypeStruct((b, task.noise_dim), jnp.float32),) if task.noise_dim else ()
  return task.data_specs(b) + noise


def with_noise(task: Task, data: Sequence[Any], z: Any | None) -> tuple[Any, ...]:
  """The exit paths' inputs: data, plus z [B, noise_dim] when the generator takes noise."""
  data = tuple(data)
  return data + (z,) if task.noise_dim else data


def make_inputs(task: Task, data: Sequence[Any], key: jax.Array) -> tuple[Any, ...]:
  """Inputs with one z per sample drawn from `key` (data unchanged when noise-free)."""
  data = tuple(data)
  b = np.shape(data[0])[0]
  z = jax.random.normal(key, (b, task.noise_dim)) if task.noise_dim else None
  return with_noise(task, data, z)


def check_inputs(task: Task, inputs: Any) -> tuple[np.ndarray, ...]:
  """Validates exit-path inputs on the host: the data, then z [B, noise_dim]."""
  inputs = as_tuple(inputs)
  n = num_data(task) + (1 if task.noise_dim else 0)
  if len(inputs) != n:
    what = ', '.join(task.data_keys + (('z',) if task.noise_dim else ()))
    raise ValueError(f'inputs must be the tuple ({what}), got {len(inputs)} arrays; build '
                     'them with model.make_inputs(data, key)')
  data = task.check_data(inputs[:num_data(task)])
  if not task.noise_dim:
    return data
  z = np.asarray(inputs[-1], np.float32)
  if z.shape != (data[0].shape[0], task.noise_dim):
    raise ValueError(f'z must be float32 [B, z_dim] = [{data[0].shape[0]}, {task.noise_dim}], '
                     f'got shape {z.shape}; build inputs with model.make_inputs(data, key)')
  return data + (z,)

