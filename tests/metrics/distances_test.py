"""Tests of SSIM, MS-SSIM, L1 and the distance factory (LPIPS has lpips_test.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from fiancee_jax.metrics import distances

LOCAL = ('1-ssim', '1-msssim', 'l1')
SHAPES = ((16, 16), (64, 48))
NOISE = (0.05, 0.1, 0.2, 0.4)


def smooth_images(seed: int, batch: int, height: int, width: int) -> np.ndarray:
  """float32 [B, H, W, 3] in [-0.8, 0.8]: coarse random blobs plus a little texture."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-0.6, 0.6, (batch, max(height // 4, 2), max(width // 4, 2), 3))
  images = jax.image.resize(coarse, (batch, height, width, 3), 'bilinear')
  images = np.asarray(images) + 0.1 * rng.normal(size=(batch, height, width, 3))
  return np.clip(images, -0.8, 0.8).astype(np.float32)


def noisy(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
  noise = np.random.default_rng(seed).normal(size=images.shape)
  return (images + sigma * noise).astype(np.float32)


# --- NumPy/SciPy references (float64, written straight from the papers' definitions) ----------

def ssim_reference(x, y, max_val=2.0, filter_size=11, sigma=1.5, k1=0.01, k2=0.03):
  """Returns (ssim, cs) per image and channel, [B, C], with scipy 2-D 'valid' correlation."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  batch, height, width, channels = x.shape
  size = min(filter_size, height, width)
  g = np.exp(-(np.arange(size) - (size - 1) / 2)**2 / (2 * sigma**2))
  window = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (k1 * max_val)**2, (k2 * max_val)**2
  ssim, cs = np.zeros((batch, channels)), np.zeros((batch, channels))
  for b in range(batch):
    for c in range(channels):
      a, o = x[b, :, :, c], y[b, :, :, c]
      filt = lambda im: signal.correlate2d(im, window, mode='valid')
      mu_a, mu_o = filt(a), filt(o)
      var_a, var_o = filt(a * a) - mu_a**2, filt(o * o) - mu_o**2
      cov = filt(a * o) - mu_a * mu_o
      cs_map = (2 * cov + c2) / (var_a + var_o + c2)
      lum = (2 * mu_a * mu_o + c1) / (mu_a**2 + mu_o**2 + c1)
      ssim[b, c], cs[b, c] = (lum * cs_map).mean(), cs_map.mean()
  return ssim, cs


def ms_ssim_reference(x, y, filter_size=11):
  weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
  sides, scales = np.array(x.shape[1:3]), 1
  while scales < 5:
    sides = (sides + 1) // 2
    if sides.min() < filter_size:
      break
    scales += 1
  weights = weights[:scales] / weights[:scales].sum()
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  result = 1.0
  for s in range(scales):
    ssim, cs = ssim_reference(x, y, filter_size=filter_size)
    value = ssim if s == scales - 1 else cs
    result = result * np.maximum(value, 0)**weights[s]
    halve = lambda im: np.pad(im, ((0, 0), (0, im.shape[1] % 2), (0, im.shape[2] % 2), (0, 0)),
                              mode='symmetric')
    x, y = halve(x), halve(y)
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    y = y.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return result.mean(axis=-1)


# --- SSIM / MS-SSIM values -------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(24, 20), (16, 16), (8, 6)])  # (8, 6): window shrinks to 6
def test_ssim_matches_scipy_reference(shape):
  x = np.random.default_rng(0).uniform(-1, 1, (2, *shape, 3)).astype(np.float32)
  y = noisy(x, 0.3)
  y[1] = np.random.default_rng(5).uniform(-1, 1, y[1].shape)  # unrelated image: ssim ~ 0
  expected, _ = ssim_reference(x, y)
  np.testing.assert_allclose(distances.ssim(x, y), expected.mean(-1), atol=1e-4)


def test_ssim_reference_with_other_constants():
  x = smooth_images(0, 2, 20, 24)
  y = noisy(x, 0.2)
  expected, _ = ssim_reference(x, y, max_val=1.0, filter_size=7, sigma=1.0, k1=0.02, k2=0.05)
  got = distances.ssim(x, y, max_val=1.0, filter_size=7, sigma=1.0, k1=0.02, k2=0.05)
  np.testing.assert_allclose(got, expected.mean(-1), atol=1e-4)


@pytest.mark.parametrize('shape', [(50, 44), (16, 16), (64, 48)])
def test_ms_ssim_matches_numpy_reference(shape):
  x = smooth_images(0, 2, *shape)
  y = noisy(x, 0.2)
  np.testing.assert_allclose(distances.ms_ssim(x, y), ms_ssim_reference(x, y), atol=1e-4)


@pytest.mark.parametrize('shape,scales', [
    ((256, 256), 5), ((128, 128), 4), ((64, 64), 3), ((64, 48), 3), ((48, 64), 3),
    ((32, 32), 2), ((21, 40), 2), ((20, 40), 1), ((16, 16), 1), ((8, 8), 1)])
def test_ms_ssim_num_scales(shape, scales):
  assert distances.ms_ssim_num_scales(*shape) == scales


def test_ms_ssim_is_ssim_at_16x16():
  x = smooth_images(0, 2, 16, 16)
  y = noisy(x, 0.1)
  np.testing.assert_allclose(distances.ms_ssim(x, y), distances.ssim(x, y), atol=1e-6)


def test_ms_ssim_negative_cs_is_zero_with_finite_gradient():
  x = smooth_images(0, 2, 32, 32)
  np.testing.assert_allclose(distances.ms_ssim(x, -x), 0.0, atol=1e-7)
  grad = jax.grad(lambda a: jnp.sum(distances.ms_ssim(a, -x)))(x)
  assert np.all(np.isfinite(grad))


# --- Properties shared by every local distance -----------------------------------------------

@pytest.mark.parametrize('name', LOCAL)
@pytest.mark.parametrize('shape', SHAPES)
def test_identical_images_are_at_zero(name, shape):
  x = smooth_images(0, 2, *shape)
  np.testing.assert_allclose(distances.get_distance(name).fn(x, x), 0.0, atol=1e-6)


@pytest.mark.parametrize('name', LOCAL)
def test_symmetric(name):
  x, y = smooth_images(0, 2, 64, 48), smooth_images(1, 2, 64, 48)
  fn = distances.get_distance(name).fn
  np.testing.assert_allclose(fn(x, y), fn(y, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', LOCAL)
@pytest.mark.parametrize('shape', SHAPES)
def test_more_noise_is_farther(name, shape):
  x = smooth_images(0, 2, *shape)
  fn = distances.get_distance(name).fn
  values = np.stack([fn(x, noisy(x, sigma)) for sigma in NOISE])  # [noise levels, B]
  assert np.all(np.diff(values, axis=0) > 0), values


@pytest.mark.parametrize('name,low,high', [('1-ssim', 0, 2), ('1-msssim', 0, 1), ('l1', 0, 2)])
def test_values_in_range(name, low, high):
  x = smooth_images(0, 2, 64, 48)
  fn = distances.get_distance(name).fn
  for y in (noisy(x, 0.1), -x, smooth_images(3, 2, 64, 48), np.clip(noisy(x, 5.0), -1, 1)):
    value = np.asarray(fn(x, y))
    assert value.shape == (2,) and value.dtype == np.float32
    assert np.all((value >= low - 1e-6) & (value <= high + 1e-6)), value
  # A little noise is a small distance; an unrelated image a large one.
  assert np.all(fn(x, noisy(x, 0.02)) < 0.1)
  assert np.all(fn(x, smooth_images(3, 2, 64, 48)) > fn(x, noisy(x, 0.05)))


@pytest.mark.parametrize('name', LOCAL)
def test_jit_and_grad(name):
  distance = distances.get_distance(name)
  x = smooth_images(0, 2, 16, 16)
  y = noisy(x, 0.1)
  np.testing.assert_allclose(jax.jit(distance.fn)(x, y), distance.fn(x, y), rtol=1e-6)
  loss_grad = jax.jit(jax.grad(lambda a, b: distances.perceptual_loss(distance, a, b)))
  for target in (y, x):  # x: the gradient at the minimum (identical images) too
    grad = loss_grad(x, target)
    assert grad.shape == x.shape and np.all(np.isfinite(grad))
  assert np.abs(loss_grad(x, y)).max() > 0


def test_perceptual_loss_is_the_batch_mean():
  distance = distances.get_distance('l1')
  x = smooth_images(0, 3, 16, 16)
  y = noisy(x, 0.1)
  loss = distances.perceptual_loss(distance, x, y)
  assert loss.shape == ()
  np.testing.assert_allclose(loss, np.mean(distance.fn(x, y)), rtol=1e-6)


# --- Factory ---------------------------------------------------------------------------------

@pytest.mark.parametrize('name', LOCAL)
def test_factory_names(name):
  assert distances.get_distance(name).name == name


def test_default_is_lpips_alex():
  assert distances.DEFAULT == 'lpips-alex'
  assert distances.get_distance().name == 'lpips-alex'  # packaged weights: no file needed


@pytest.mark.parametrize('name', ['auto', 'psnr', 'lpips-squeeze'])
def test_unknown_name_lists_known_ones(name):
  with pytest.raises(ValueError, match=f"{name}.*lpips-alex, lpips-vgg, 1-msssim, 1-ssim, l1"):
    distances.get_distance(name)


def test_batched_pads_the_last_chunk_and_keeps_order():
  x = smooth_images(0, 5, 16, 16)
  y = noisy(x, 0.1)
  calls = []

  def fn(a, b):
    calls.append(a.shape)
    return distances.l1(a, b)

  got = distances.batched(fn, x, y, batch=2)
  np.testing.assert_allclose(got, distances.l1(x, y), rtol=1e-6)
  assert calls == [(2, 16, 16, 3)]  # traced once: the 3 chunks (last one padded) share a shape


def test_lpips_with_missing_file_names_it(tmp_path):
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match=r'nope\.npz.*convert_lpips_weights\.py'):
    distances.get_distance('lpips-alex', lpips_weights=missing)


def test_mismatched_shapes_raise():
  with pytest.raises(ValueError, match=r'\(2, 16, 16, 3\) and \(2, 16, 8, 3\)'):
    distances.ssim(np.zeros((2, 16, 16, 3)), np.zeros((2, 16, 8, 3)))
