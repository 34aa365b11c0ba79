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

from fiancee_jax.data import visualize

Data = tuple[np.ndarray, ...]


def as_tuple(data: Any) -> tuple[Any, ...]:
  return tuple(data) if isinstance(data, (tuple, list)) else (data,)


# -- Value checks that treat device arrays as NumPy arrays: same rules, same messages. A
# device array is summarised on its device by one jitted reduction, so only a few scalars
# cross to the host, never the data.


def _array(x: Any) -> np.ndarray | jax.Array:
  """x itself if it is a device array, else as a NumPy array (shape and dtype readable)."""
  return x if isinstance(x, jax.Array) else np.asarray(x)


@jax.jit
def _device_int_range(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.min(x), jnp.max(x)


@jax.jit
def _device_float_summary(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  finite = jnp.isfinite(x)
  return (jnp.sum(~finite), jnp.min(jnp.where(finite, x, jnp.inf)),
          jnp.max(jnp.where(finite, x, -jnp.inf)))


def _int_range(x: np.ndarray | jax.Array) -> tuple[int, int]:
  """(min, max) of a non-empty integer array."""
  if isinstance(x, jax.Array):
    lo, hi = jax.device_get(_device_int_range(x))
  else:
    lo, hi = x.min(), x.max()
  return int(lo), int(hi)


def _float_summary(x: np.ndarray | jax.Array) -> tuple[int, float, float]:
  """(number of non-finite values, min and max of the finite ones) of a non-empty array."""
  if isinstance(x, jax.Array):
    bad, lo, hi = jax.device_get(_device_float_summary(x))
  else:
    finite = np.isfinite(x)
    bad = int(x.size - finite.sum())
    lo = x[finite].min() if bad < x.size else np.inf
    hi = x[finite].max() if bad < x.size else -np.inf
  return int(bad), float(lo), float(hi)


def _as_dtype(x: np.ndarray | jax.Array, dtype: Any) -> np.ndarray | jax.Array:
  """x in `dtype`, on the device for a device array (no host copy)."""
  if x.dtype == dtype:
    return x
  return x.astype(dtype)


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

  def check_data(self, data: Any) -> tuple[np.ndarray | jax.Array, ...]:
    """Validates label maps before any compute; returns (int32 [B, H, W],).

    Accepts the array itself or a 1-tuple; NumPy (or array-like) data comes back as NumPy, a
    device array stays on its device (its class ids are checked there).
    """
    data = as_tuple(data)
    if len(data) != 1:
      raise ValueError(f'label-map synthesis takes one array (labels int32 [B, H, W]), got '
                       f'{len(data)} arrays')
    arr = _array(data[0])
    if arr.ndim == 2:
      raise ValueError(f'labels must be int32 [B, H, W], got a single map of shape '
                       f'{arr.shape}; add a batch axis (labels[None])')
    if arr.ndim != 3:
      raise ValueError(f'labels must be int32 [B, H, W], got shape {arr.shape}')
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f'labels must be an integer array (class ids), got dtype {arr.dtype}; '
                       'convert with labels.astype(int32) if the values are whole class ids')
    if tuple(arr.shape[1:]) != tuple(self.resolution):
      raise ValueError(f'labels are {arr.shape[1]}x{arr.shape[2]} but the model was trained '
                       f'at {self.resolution[0]}x{self.resolution[1]} (config.data.resolution)')
    if arr.size:
      lo, hi = _int_range(arr)
      if lo < 0 or hi >= self.num_classes:
        bad = hi if hi >= self.num_classes else lo
        raise ValueError(f'labels has class id {bad} but the config has {self.num_classes} '
                         'classes (config.data.num_classes)')
    return (_as_dtype(arr, np.int32),)

  def columns(self, data: Data) -> list[np.ndarray]:
    """uint8 [B, H, W, 3] pictures of the data, for sample grids."""
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

  def check_data(self, data: Any) -> tuple[np.ndarray | jax.Array, ...]:
    """Validates (source, driver) before any compute; float32 [B, H, W, 3] in [-1, 1].

    NumPy (or array-like) data comes back as NumPy, device arrays stay on their device (their
    values are checked there).
    """
    data = as_tuple(data)
    if len(data) != 2:
      raise ValueError(f'reenactment takes (source, driver), two float32 [B, H, W, 3] '
                       f'arrays in [-1, 1], got {len(data)} arrays')
    out = []
    for name, x in zip(self.data_keys, data):
      arr = _array(x)
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
      if arr.size:
        bad, lo, hi = _float_summary(arr)
        if bad:
          raise ValueError(f'{name} has {bad} non-finite values (NaN or inf); images must be '
                           'finite, in [-1, 1]')
        if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
          raise ValueError(f'{name} must be in [-1, 1], got [{lo:.3f}, {hi:.3f}]; convert '
                           'uint8 images with x / 127.5 - 1')
      out.append(_as_dtype(arr, np.float32))
    if out[0].shape != out[1].shape:
      raise ValueError(f'source {out[0].shape} and driver {out[1].shape} must have the same '
                       'shape')
    return tuple(out)

  def columns(self, data: Data) -> list[np.ndarray]:
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


def check_inputs(task: Task, inputs: Any) -> tuple[np.ndarray | jax.Array, ...]:
  """Validates exit-path inputs before any compute: the data (`task.check_data`), then z.

  z: float [B, noise_dim], finite. NumPy inputs come back as NumPy (z float32), device
  arrays stay on their device and are checked there (a few scalars reach the host).
  """
  inputs = as_tuple(inputs)
  n = num_data(task) + (1 if task.noise_dim else 0)
  if len(inputs) != n:
    what = ', '.join(task.data_keys + (('z',) if task.noise_dim else ()))
    raise ValueError(f'inputs must be the tuple ({what}), got {len(inputs)} arrays; build '
                     'them with model.make_inputs(data, key)')
  data = task.check_data(inputs[:num_data(task)])
  if not task.noise_dim:
    return data
  z = _array(inputs[-1])
  b = data[0].shape[0]
  if tuple(z.shape) != (b, task.noise_dim):
    raise ValueError(f'z must be float32 [B, z_dim] = [{b}, {task.noise_dim}], got shape '
                     f'{z.shape}; build inputs with model.make_inputs(data, key)')
  if not np.issubdtype(z.dtype, np.floating):
    raise ValueError(f'z must be float32 [B, z_dim] (Gaussian noise), got dtype {z.dtype}; '
                     'build inputs with model.make_inputs(data, key)')
  if z.size:
    bad, _, _ = _float_summary(z)
    if bad:
      raise ValueError(f'z has {bad} non-finite values (NaN or inf); z must be finite '
                       'Gaussian noise, e.g. from model.make_inputs(data, key)')
  return data + (_as_dtype(z, np.float32),)

