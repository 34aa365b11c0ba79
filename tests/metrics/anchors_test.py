"""Anchors and t*: the image transformations, the distances to them, and the t* record."""
import json
import os

import jax
import numpy as np
import pytest
from scipy import ndimage

from configs import landscapes
from fiancee_jax.metrics import anchors
from fiancee_jax.metrics import distances

L1 = distances.get_distance('l1').fn


def _images(n=4, h=16, w=20, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-0.7, 0.7, (n, h // 4, w // 4, 3))
  return np.asarray(jax.image.resize(coarse, (n, h, w, 3), 'bilinear'), np.float32)


def test_blur_is_scipys_gaussian_filter():
  x = _images()
  got = np.asarray(anchors.gaussian_blur(x, 1.0))
  # jnp.pad 'reflect' (d c b | a b c d) is scipy's 'mirror'; truncate 3 sigma = a 7x7 window.
  want = ndimage.gaussian_filter(x, sigma=(0, 1, 1, 0), mode='mirror', truncate=3.0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(anchors.gaussian_blur(np.full((1, 8, 8, 3), 0.3), 1.0), 0.3,
                             atol=1e-6)
  with pytest.raises(ValueError, match='larger than 3 px'):
    anchors.gaussian_blur(np.zeros((1, 3, 8, 3)), 1.0)


def test_shift_and_noise():
  x = _images()
  shifted = np.asarray(anchors.shift_pixels(x))
  np.testing.assert_array_equal(shifted[:, :, 1:], x[:, :, :-1])
  np.testing.assert_array_equal(shifted[:, :, 0], x[:, :, 0])
  noisy = np.asarray(anchors.add_noise(x, jax.random.key(0)))
  assert np.std(noisy - x) == pytest.approx(0.03, rel=0.1)
  assert noisy.min() >= -1 and noisy.max() <= 1


def _generator(images):
  """A fake backbone: the images plus a z-dependent tint, z [N, 2]."""
  return lambda z: np.clip(images + 0.2 * np.tanh(z[:, None, None, :1]), -1, 1)


def test_anchor_distances():
  x = _images(8)
  sampler = lambda key, n: np.asarray(jax.random.normal(key, (n, 2)))
  got = anchors.anchor_distances(L1, x, jax.random.key(0), generate_fn=_generator(x),
                                 z_sampler=sampler, num_average=8, batch=3)
  assert list(got) == list(anchors.anchor_definitions(8))
  assert all(v > 0 for v in got.values())
  np.testing.assert_allclose(got['blur_sigma1'],
                             np.mean(L1(x, anchors.gaussian_blur(x))), rtol=1e-5)
  # Averaging over z removes most of the tint: closer than a single other z.
  assert got['z_average_8'] < got['another_z']
  blind = anchors.anchor_distances(L1, x, jax.random.key(0))  # a noise-free backbone
  assert blind['another_z'] is None and blind['z_average_8'] is None
  assert blind['shift_1px'] == pytest.approx(got['shift_1px'])


def test_measure_t_star_is_the_mean_distance_to_the_blur():
  x = _images(5)
  assert anchors.measure_t_star(L1, x, batch=2) == pytest.approx(
      float(np.mean(L1(x, anchors.gaussian_blur(x)))), rel=1e-5)


@pytest.mark.parametrize('bad', [0, -0.1, float('inf'), float('nan'), 'abc', True])
def test_configured_t_star_must_be_positive_and_finite(bad):
  with pytest.raises(ValueError, match=r'config\.evaluate\.t_star=.*positive finite'):
    anchors.check_t_star(bad)


def _config(**evaluate):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.distance.name = 'l1'
    config.data.num_validation = 5
    config.evaluate.update(evaluate)
  return config


def test_fix_t_star_measures_once_and_records(tmp_path):
  config = _config()
  x = _images(5)
  calls = []

  def images():
    calls.append(1)
    return x

  record = anchors.fix_t_star(config, str(tmp_path), images)
  assert calls == [1]
  assert record['value'] == pytest.approx(anchors.measure_t_star(L1, x))
  assert record['distance'] == 'l1' and record['num_samples'] == 5
  assert 'blur' in record['definition'] and '5 validation inputs' in record['definition']
  with open(tmp_path / 't_star.json') as f:
    assert json.load(f) == record

  def never():
    raise AssertionError('t* was measured again')

  assert anchors.fix_t_star(config, str(tmp_path), never) == record  # fixed: read back
  with pytest.raises(ValueError, match='5 validation inputs.*got 4'):
    anchors.fix_t_star(config, str(tmp_path / 'other'), x[:4])


def test_configured_t_star_overrides_the_measurement(tmp_path):
  config = _config(t_star=0.07)

  def never():
    raise AssertionError('a configured t* needs no measurement')

  record = anchors.fix_t_star(config, str(tmp_path), never)
  assert record == {'value': 0.07, 'definition': anchors.CONFIGURED_DEFINITION,
                    'distance': 'l1', 'num_samples': 0}
  assert anchors.read_t_star(str(tmp_path)) == record


def test_a_damaged_record_names_the_file(tmp_path):
  (tmp_path / 't_star.json').write_text('{"value": -1}')
  with pytest.raises(ValueError, match=r't_star\.json is not a t\* record.*delete it'):
    anchors.read_t_star(str(tmp_path))
  assert anchors.read_t_star(os.path.join(str(tmp_path), 'nothing')) is None
