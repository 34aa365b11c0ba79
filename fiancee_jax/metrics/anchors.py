"""Anchors beside every distance, and t*, the headline quality bar fixed from the backbone alone.

A distance means little without a scale: 1 - MS-SSIM barely moves for a slight blur yet puts
two equally valid backbone samples far apart, and an absolute LPIPS 0.1 can be looser than
re-sampling z at 64x64. The report therefore prints, in its own distance, how far a few
harmless changes take the backbone's output y (images float [N, H, W, 3] in [-1, 1]):

  name               the distance from y to
  'blur_sigma1'      y blurred by a Gaussian of sigma 1 px (7x7, borders reflected)
  'shift_1px'        y shifted one pixel to the right (its first column repeated)
  'noise_sigma0.03'  y + N(0, 0.03^2) per pixel and channel (units of the [-1, 1] range),
                     clipped to [-1, 1]
  'another_z'        the backbone's output for the same input with another z
  'z_average_{K}'    the pixel mean of the backbone's outputs over K other z (K = 8 by default)

The last two need a generator with noise; for a noise-free one they are None.

t* (DESIGN.md section 3) is the mean distance between the backbone's output and its sigma-1
blur on the validation split: "an exit may be as far from the backbone as a slight blur". It
depends on the backbone, the validation inputs (with their fixed z) and the distance only, so
it is fixed before any exit is trained: `fix_t_star` measures it once and records it in
WORKDIR/t_star.json ({"value", "definition", "distance", "num_samples"}); every later stage
reads that record. `config.evaluate.t_star`, a positive finite number, replaces the measured
value (None measures it).
"""
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax import parallel
from fiancee_jax.metrics import distances

DistanceFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, y) [B, H, W, 3] -> f32 [B]

BLUR_SIGMA = 1.0  # px
SHIFT_PIXELS = 1
NOISE_SIGMA = 0.03  # in units of the [-1, 1] image range
NUM_Z_AVERAGE = 8
T_STAR_FILE = 't_star.json'
T_STAR_KEYS = ('value', 'definition', 'distance', 'num_samples')
CONFIGURED_DEFINITION = 'set by config.evaluate.t_star'


def anchor_definitions(num_z_average: int = NUM_Z_AVERAGE) -> dict[str, str]:
  """{anchor name: what the backbone's output is compared with}, in report order."""
  return {
      'blur_sigma1': f'Gaussian blur, sigma {BLUR_SIGMA:g} px (7x7, borders reflected)',
      'shift_1px': f'shifted {SHIFT_PIXELS} px to the right (first column repeated)',
      'noise_sigma0.03': (f'Gaussian noise, sigma {NOISE_SIGMA:g} (images in [-1, 1]), '
                          'clipped to [-1, 1]'),
      'another_z': 'the backbone with another z for the same input',
      f'z_average_{num_z_average}': (f'the pixel mean of the backbone over {num_z_average} '
                                     'other z for the same input'),
  }


# ----------------------------------------------------------------------------------------------
# Image transformations (pure, jittable).

def gaussian_blur(images: jax.Array, sigma: float = BLUR_SIGMA) -> jax.Array:
  """Separable Gaussian blur, same size: [B, H, W, C] -> [B, H, W, C].

  Window: 2 ceil(3 sigma) + 1 taps, normalised; borders reflected (no edge darkening).
  """
  radius = max(1, math.ceil(3 * sigma))
  window = jnp.asarray(distances.gaussian_window(2 * radius + 1, sigma))
  x = jnp.asarray(images, jnp.float32)
  h, w = x.shape[1], x.shape[2]
  if min(h, w) <= radius:
    raise ValueError(f'gaussian_blur(sigma={sigma}) needs images larger than {radius} px; got '
                     f'{h}x{w}.')
  x = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode='reflect')
  # A weighted sum of shifted copies (rows, then columns): exact float32, no conv precision
  # question, and cheap for a 7-tap window.
  x = sum(window[i] * x[:, i:i + h] for i in range(2 * radius + 1))
  return sum(window[j] * x[:, :, j:j + w] for j in range(2 * radius + 1))


def shift_pixels(images: jax.Array, dx: int = SHIFT_PIXELS) -> jax.Array:
  """Shifts [B, H, W, C] images dx > 0 pixels to the right, repeating the first column."""
  if dx < 1:
    raise ValueError(f'shift_pixels needs dx >= 1, got {dx}.')
  x = jnp.asarray(images)
  return jnp.concatenate([jnp.repeat(x[:, :, :1], dx, axis=2), x[:, :, :-dx]], axis=2)


def add_noise(images: jax.Array, key: jax.Array, sigma: float = NOISE_SIGMA) -> jax.Array:
  """images + N(0, sigma^2) per pixel and channel, clipped to [-1, 1]."""
  x = jnp.asarray(images, jnp.float32)
  return jnp.clip(x + sigma * jax.random.normal(key, x.shape), -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Anchor distances.

def image_anchors(distance_fn: DistanceFn, images: np.ndarray, key: jax.Array, *,
                  batch: int = 32) -> dict[str, np.ndarray]:
  """Per-sample distances from `images` to their blur, shift and noisy copy.

  Args:
    distance_fn: (x, y) [B, H, W, 3] -> float32 [B].
    images: float32 [N, H, W, 3] in [-1, 1], the backbone's outputs.
    key: PRNG key of the added noise.
    batch: images per distance call.

  Returns:
    {'blur_sigma1', 'shift_1px', 'noise_sigma0.03'}: float32 [N] each.
  """
  images = np.asarray(images, np.float32)
  blurred = np.asarray(jax.jit(gaussian_blur)(images))
  shifted = np.asarray(jax.jit(shift_pixels)(images))
  noisy = np.asarray(jax.jit(add_noise)(images, key))
  return {name: distances.batched(distance_fn, images, other, batch)
          for name, other in (('blur_sigma1', blurred), ('shift_1px', shifted),
                              ('noise_sigma0.03', noisy))}


def z_anchors(distance_fn: DistanceFn, images: np.ndarray,
              generate_fn: Callable[[np.ndarray], np.ndarray],
              z_sampler: Callable[[jax.Array, int], np.ndarray], key: jax.Array, *,
              num_average: int = NUM_Z_AVERAGE, batch: int = 32) -> dict[str, np.ndarray]:
  """Per-sample distances from `images` to the backbone with other z.

  Args:
    distance_fn: (x, y) [B, H, W, 3] -> float32 [B].
    images: float32 [N, H, W, 3], the backbone's outputs for N inputs with their own z.
    generate_fn: z float32 [N, z_dim] -> the backbone's outputs float32 [N, H, W, 3] for the
      same N inputs with these z.
    z_sampler: (key, n) -> z float32 [n, z_dim], the backbone's noise distribution.
    key: PRNG key of the z draws; draw i uses fold_in(key, i).
    num_average: K, the number of z averaged for 'z_average_{K}' (>= 1).
    batch: images per distance call.

  Returns:
    {'another_z', 'z_average_{K}'}: float32 [N] each. 'another_z' uses the first of the K draws.
  """
  if num_average < 1:
    raise ValueError(f'num_average must be >= 1, got {num_average}.')
  n = len(images)
  total = None
  first = None
  for i in range(num_average):
    out = np.asarray(generate_fn(np.asarray(z_sampler(jax.random.fold_in(key, i), n))),
                     np.float32)
    if out.shape != images.shape:
      raise ValueError(f'generate_fn returned {out.shape}, expected {images.shape}.')
    first = out if first is None else first
    total = out.astype(np.float64) if total is None else total + out
  mean = (total / num_average).astype(np.float32)
  return {'another_z': distances.batched(distance_fn, images, first, batch),
          f'z_average_{num_average}': distances.batched(distance_fn, images, mean, batch)}


def anchor_distances(distance_fn: DistanceFn, images: np.ndarray, key: jax.Array, *,
                     generate_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                     z_sampler: Callable[[jax.Array, int], np.ndarray] | None = None,
                     num_average: int = NUM_Z_AVERAGE, batch: int = 32
                     ) -> dict[str, float | None]:
  """Mean distance of every anchor (module docstring), in `anchor_definitions` order.

  Args: as `image_anchors` and `z_anchors`; without `generate_fn` (a noise-free backbone)
  the z anchors are None.

  Returns:
    {name: mean distance over the N images, or None}.
  """
  k_image, k_z = jax.random.split(key)
  per_sample: dict[str, np.ndarray | None] = dict(image_anchors(distance_fn, images, k_image,
                                                                batch=batch))
  if generate_fn is not None and z_sampler is not None:
    per_sample.update(z_anchors(distance_fn, images, generate_fn, z_sampler, k_z,
                                num_average=num_average, batch=batch))
  return {name: (float(np.mean(per_sample[name])) if per_sample.get(name) is not None
                 else None) for name in anchor_definitions(num_average)}


# ----------------------------------------------------------------------------------------------
# t*.

def check_t_star(value: Any) -> float | None:
  """None (measure t*), or a positive finite float; anything else raises ValueError."""
  if value is None:
    return None
  if isinstance(value, bool):
    value = 'a bool'
  try:
    t = float(value)
  except (TypeError, ValueError):
    t = math.nan
  if not (math.isfinite(t) and t > 0):
    raise ValueError(f'config.evaluate.t_star={value!r} must be a positive finite number (a '
                     'distance, e.g. 0.05 for LPIPS), or None to measure it as the mean '
                     "distance between the backbone's output and its sigma-1 blur.")
  return t


def measure_t_star(distance_fn: DistanceFn, images: np.ndarray, *, batch: int = 32) -> float:
  """Mean distance between `images` (float32 [N, H, W, 3], the backbone's outputs on the
  validation split) and their Gaussian blur of sigma 1 px."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or not len(images):
    raise ValueError(f'measure_t_star needs images [N, H, W, 3] with N >= 1; got {images.shape}.')
  blurred = np.asarray(jax.jit(gaussian_blur)(images))
  return float(np.mean(distances.batched(distance_fn, images, blurred, batch)))


def measured_definition(distance: str, num_samples: int) -> str:
  return (f"mean {distance} between the backbone's output and its Gaussian blur (sigma "
          f'{BLUR_SIGMA:g} px) on the first {num_samples} validation inputs')


def t_star_path(workdir: str) -> str:
  return os.path.join(workdir, T_STAR_FILE)


def write_t_star(workdir: str, record: dict) -> None:
  """Writes the record to WORKDIR/t_star.json (atomically; process 0 writes, and every
  process waits for it, so that all read the same record next)."""
  missing = [k for k in T_STAR_KEYS if k not in record]
  if missing:
    raise ValueError(f't* record lacks {missing}; it needs {list(T_STAR_KEYS)}.')
  check_t_star(record['value'])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = t_star_path(workdir) + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({k: record[k] for k in T_STAR_KEYS}, f, indent=2)
    os.replace(tmp, t_star_path(workdir))
  parallel.barrier('fiancee_t_star')


def read_t_star(workdir: str) -> dict | None:
  """The record of WORKDIR/t_star.json, or None if there is none.

  Raises:
    ValueError: the file exists but is not a t* record (it names the file and the fix).
  """
  path = t_star_path(workdir)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    check_t_star(record['value'])
    if not all(k in record for k in T_STAR_KEYS):
      raise KeyError([k for k in T_STAR_KEYS if k not in record])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path} is not a t* record ({e!r}); delete it and run the pipeline again '
                     'to measure t*.') from None
  return record


def fix_t_star(config: ml_collections.ConfigDict, workdir: str,
               backbone_images: np.ndarray | Callable[[], np.ndarray], *,
               distance: distances.Distance | None = None) -> dict:
  """Fixes t* for this workdir: the recorded value, else the configured one, else measured.

  Call it right after the backbone stage (before any exit is trained); later stages call it
  again and get the record back unchanged.

  Args:
    config: reads config.evaluate.t_star, config.distance and config.data.num_validation.
    workdir: where t_star.json lives.
    backbone_images: the backbone's outputs float32 [N, H, W, 3] on the first
      N = config.data.num_validation validation inputs (each with its fixed z), or a function
      returning them, called only when t* must be measured.
    distance: the distance to measure with (default: `distances.from_config(config)`).

  Returns:
    The record {'value', 'definition', 'distance', 'num_samples'} (also in t_star.json).

  Raises:
    ValueError: a configured t* that is not a positive finite number; a damaged record.
  """
  configured = check_t_star(config.evaluate.t_star)
  name = distances.check_name(config.distance.name)
  n = int(config.data.num_validation)
  if configured is not None:
    wanted = {'value': configured, 'definition': CONFIGURED_DEFINITION, 'distance': name,
              'num_samples': 0}
  else:
    wanted = {'definition': measured_definition(name, n), 'distance': name, 'num_samples': n}
  record = read_t_star(workdir)
  if record is not None and all(record[k] == v for k, v in wanted.items()):
    return record
  if configured is None:
    images = backbone_images() if callable(backbone_images) else backbone_images
    images = np.asarray(images, np.float32)
    if len(images) != n:
      raise ValueError(f'fix_t_star needs the backbone on {n} validation inputs '
                       f'(config.data.num_validation), got {len(images)} images.')
    distance = distance or distances.from_config(config)
    wanted['value'] = measure_t_star(distance.fn, images)
  write_t_star(workdir, wanted)
  return {k: wanted[k] for k in T_STAR_KEYS}
