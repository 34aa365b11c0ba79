"""Report helpers that the tiny pipeline runs do not reach: FID wiring and weight checks."""
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax import config_checks
from fiancee_jax.evaluation import report


def _features(images):
  """A cheap stand-in for Inception pool3: 8 pooled colour statistics per image."""
  x = np.asarray(images)
  b = x.shape[0]
  quads = x.reshape(b, 2, x.shape[1] // 2, 2, x.shape[2] // 2, 3).mean(axis=(2, 4))
  return np.concatenate([quads.reshape(b, -1)[:, :6], x.std(axis=(1, 2))[:, :2]], -1)


def test_fid_table_scores_every_exit_against_the_reals():
  rng = np.random.default_rng(0)
  reals = rng.uniform(-1, 1, (64, 8, 8, 3)).astype(np.float32)
  same = rng.uniform(-1, 1, (64, 8, 8, 3)).astype(np.float32)  # same distribution
  shifted = np.clip(same * 0.5 + 0.4, -1, 1)  # another distribution
  table = report.fid_table(_features, [shifted, same], reals, batch=16)
  assert table['num_images'] == 64
  assert [e['exit'] for e in table['exits']] == [0, 1]
  fid_shifted, fid_same = (e['fid'] for e in table['exits'])
  assert 0 <= fid_same < 0.05 < fid_shifted
  # Against itself the distance is zero.
  assert report.fid_table(_features, [reals], reals)['exits'][0]['fid'] == pytest.approx(
      0.0, abs=1e-6)


@pytest.mark.parametrize('key', ['fid_weights', 'lpips_weights'])
def test_missing_weights_file_is_refused_before_compute(key, tmp_path):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.distance[key] = str(tmp_path / 'nope.npz')
  with pytest.raises(ValueError, match=f'config.distance.{key}=.*nope.npz.* is not a file'):
    config_checks.check_config(config)
