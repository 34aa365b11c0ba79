"""Cached exit distances: keyed by the exits artifact, rebuilt when stale or damaged."""
import os

import numpy as np
import pytest

from fiancee_jax.inference import loading
from fiancee_jax.metrics import exit_distances

pytestmark = pytest.mark.xdist_group('tiny_run')


def test_cache_key_tells_apart_artifacts_variants_distances_and_inputs():
  rng = np.random.default_rng(0)
  maps = rng.integers(0, 5, size=(8, 16, 16)).astype(np.int32)
  z = rng.standard_normal((16, 8)).astype(np.float32)
  two_draws = (np.concatenate([maps[:8]] * 2), z)  # 8 maps x 2 draws
  four_draws = (np.concatenate([maps[:4]] * 4), z)  # 4 maps x 4 draws: same count
  key = exit_distances.cache_key('a' * 64, 'guided', '1-msssim', two_draws)
  assert key == exit_distances.cache_key('a' * 64, 'guided', '1-msssim',
                                         tuple(x.copy() for x in two_draws))
  assert key != exit_distances.cache_key('b' * 64, 'guided', '1-msssim', two_draws)
  assert key != exit_distances.cache_key('a' * 64, 'unguided', '1-msssim', two_draws)
  assert key != exit_distances.cache_key('a' * 64, 'guided', 'l1', two_draws)
  assert key != exit_distances.cache_key('a' * 64, 'guided', '1-msssim', four_draws)


@pytest.fixture(scope='module')
def model(tiny_run):
  wd, config = tiny_run
  return loading.load_model(wd, config), config


def _stored_key(path):
  with np.load(path) as f:
    return str(f['key'])


def test_cache_is_reused_rebuilt_when_stale_and_when_truncated(model, tmp_path):
  m, config = model
  wd = str(tmp_path)  # the cache only: the model comes from the tiny run
  inputs, d = exit_distances.of_model(config, wd, m, 'test', 4)
  path = exit_distances.cache_path(wd, 'test', 'guided')
  assert d.shape == (4, m.num_exits - 1) and d.dtype == np.float32 and np.all(np.isfinite(d))
  assert len(inputs[0]) == 4
  # Reused: the stored distances come back, even if they were never measured by this model.
  key = _stored_key(path)
  np.savez(path, distances=d + 1.0, key=np.array(key))
  np.testing.assert_array_equal(exit_distances.of_model(config, wd, m, 'test', 4)[1], d + 1.0)
  # Stale: exits from another artifact (another fingerprint) are measured again.
  other = m.replace(fingerprints={**m.fingerprints, 'exits': 'e' * 64})
  np.testing.assert_allclose(exit_distances.of_model(config, wd, other, 'test', 4)[1], d,
                             rtol=1e-5, atol=1e-6)
  assert _stored_key(path) != key
  # Truncated: a warning naming the file, then measured again and rewritten.
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.warns(RuntimeWarning, match=f'distance cache {path} is damaged'):
    again = exit_distances.of_model(config, wd, m, 'test', 4)[1]
  np.testing.assert_allclose(again, d, rtol=1e-5, atol=1e-6)
  assert _stored_key(path) == key


def test_model_without_an_exits_fingerprint_is_refused(model, tmp_path):
  m, config = model
  with pytest.raises(ValueError, match='no exits fingerprint'):
    exit_distances.of_model(config, str(tmp_path), m.replace(fingerprints={}), 'test', 4)
