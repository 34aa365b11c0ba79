"""scripts/distance_sources.py, guidance_probe.py and feature_predictor_probe.py: their
estimators on known data."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from fiancee_jax.guidance import database

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


distance_sources = _script('distance_sources')
guidance_probe = _script('guidance_probe')
feature_predictor_probe = _script('feature_predictor_probe')


@pytest.mark.parametrize('map_sd,noise_sd', [(1.0, 1.0), (2.0, 1.0), (1.0, 0.0)])
def test_icc_is_the_between_map_share_of_the_variance(map_sd, noise_sd):
  rng = np.random.default_rng(0)
  x = rng.normal(0, map_sd, (1, 20000)) + rng.normal(0, noise_sd, (4, 20000))
  want = map_sd ** 2 / (map_sd ** 2 + noise_sd ** 2)
  assert distance_sources.icc1(x) == pytest.approx(want, abs=0.02)


def test_patches_tile_back_into_their_images():
  spec = database.DatabaseSpec(resolution=(8, 12), grid=(2, 3), key_block=0, feature_width=1,
                               key_dim=1, num_entries=1, num_classes=2)
  images = np.random.default_rng(0).normal(size=(5, 8, 12, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      guidance_probe._image(spec, np.asarray(database.patches_of(spec, images)), 5), images)


def test_keys_are_standardised_with_the_database_statistics_and_weigh_z_like_the_features():
  rng = np.random.default_rng(0)
  pooled, z = rng.normal(3, 2, (50, 4, 16)), rng.normal(0, 5, (50, 2))
  keys, stats = guidance_probe._keys(pooled, z, 'features+z')
  assert keys.shape == (200, 18)
  np.testing.assert_allclose(keys[:, :16].mean(0), 0, atol=1e-5)
  # The z part carries the features' total variance (16 dims) in its 2 dims.
  assert keys[:, 16:].var(0).sum() == pytest.approx(keys[:, :16].var(0).sum(), rel=1e-3)
  # Queries use the database's statistics, not their own.
  q, _ = guidance_probe._keys(pooled + 1.0, z, 'features+z', stats)
  np.testing.assert_allclose(q[:, :16].mean(0), 1.0 / stats[0][1], rtol=1e-4)
  assert guidance_probe._keys(pooled, z, 'features')[0].shape == (200, 16)


def test_map_only_efficiency_is_one_without_z_noise_and_falls_with_it():
  rng = np.random.default_rng(0)
  hard = rng.uniform(0, 1, 300)
  maps = np.stack([0.02 + 0.2 * hard, 0.01 + 0.1 * hard], 1)  # [maps, E - 1]
  g = np.array([0.3, 0.6, 1.0])
  exact = distance_sources.map_only_efficiency(np.stack([maps] * 3), g, 0.0)
  assert exact == pytest.approx(1.0)
  noisy = np.stack([maps * rng.uniform(0.5, 1.5, maps.shape) for _ in range(3)])
  assert 0.0 < distance_sources.map_only_efficiency(noisy, g, 0.0) < 0.95


def test_a_predictor_with_features_learns_what_only_the_features_carry():
  from configs import landscapes  # pylint: disable=g-import-not-at-top
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.predictor.update(num_steps=300, lr=1e-2, batch_size=16)
  rng = np.random.default_rng(0)
  n = 96
  labels = rng.integers(0, 12, (n, 16, 16)).astype(np.int32)
  z = rng.normal(size=(n, 8)).astype(np.float32)
  feats = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
  d = np.stack([feats[..., 0].mean((1, 2)), -feats[..., 1].mean((1, 2))], 1)  # features only
  split = {'inputs': (labels, z), 'd': d, 'feats': feats}
  module = feature_predictor_probe.FeaturePredictor(num_classes=12, num_outputs=2, width=8,
                                                    pool=4)
  err = {}
  for use in (False, True):
    params = feature_predictor_probe._fit(config, module, split, use, seed=0)
    pred = feature_predictor_probe._predict(module, params, split, use)
    assert pred.shape == (n, 2)
    err[use] = float(np.abs(pred - d).mean())
  assert err[True] < 0.5 * err[False], err
  with pytest.raises(ValueError, match='cannot be pooled'):
    module.init(jax.random.key(0), labels[:1], z[:1], feats[:1, :6])


def test_feature_probe_summary_pairs_variants_by_seed():
  seeds = [{'seed': s, 'feature_shape': [8, 8, 3], 'variants': {
      'map+z': {'gflops_share': 0.01, 'efficiency_calibrated': 0.3 + s / 10,
                'efficiency_zero_margins': 0.5, 'spearman': [0.7, 0.6]},
      'map+z+features': {'gflops_share': 0.02, 'efficiency_calibrated': 0.4 + s / 10,
                         'efficiency_zero_margins': 0.5, 'spearman': [0.8, 0.6]}}}
           for s in range(3)]
  rows = feature_predictor_probe.summarise('w', seeds)['rows']
  row = next(r for r in rows if r['variant'] == 'map+z+features'
             and r['figure'] == 'curve efficiency, calibrated')
  assert row['change'] == pytest.approx(0.1)
  assert row['change_ci95'] == pytest.approx([0.1, 0.1])  # paired: no seed-to-seed spread
  text = feature_predictor_probe.render({'workdir': 'w', 'seeds': seeds, 'rows': rows})
  assert '| map+z+features | Spearman, exit 0 | 0.8000' in text


def test_lookup_cost_counts_the_distance_matmul_per_entry():
  spec = database.DatabaseSpec(resolution=(8, 12), grid=(2, 3), key_block=0, feature_width=1,
                               key_dim=1, num_entries=1, num_classes=2)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(6, 4)).astype(np.float32)
  cost = {n: guidance_probe.lookup_gflops(spec, q, rng.normal(size=(n, 4)).astype(np.float32),
                                          rng.normal(size=(n, 48)).astype(np.float32), 2)
          for n in (1000, 2000)}
  assert cost[1000] >= 2 * 6 * 1000 * 4 / 1e9
  assert cost[2000] / cost[1000] == pytest.approx(2.0, rel=0.15)


def test_guidance_render_adds_the_equal_compute_column():
  row = {'keys': 'features', 'top_k': 4, 'mae_retrieved': 0.08, 'mae_random': 0.1,
         'mae_zero': 0.1, 'gains': [1.0], 'guided': 0.055, 'change': -0.003,
         'change_ci95': [-0.004, -0.002], 'change_at_gain_1': -0.003, 'lookup_gflops': 0.01,
         'minus_wide': 0.001, 'minus_wide_ci95': [-0.001, 0.003]}
  result = {'seeds': [{'seed': 0, 'num_entries': 2048}], 'workdir': 'w', 'distance': 'l1',
            'grid': [8, 8], 'num_images': 8, 'entries': 2048, 'num_test': 4,
            'exit0': {'mean': 0.058}, 'exit0_gflops': 0.1, 'perfect_patch_mean': {'mean': 0.05},
            'rows': [row]}
  assert 'minus the equal-compute' not in guidance_probe.render(result)
  assert '| 0.0100 (10%) |' in guidance_probe.render(result)
  result.update(wide_exit0={'mean': 0.054, 'ci95': [0.05, 0.058]}, wide_exit0_gflops=0.116,
                equal_compute_workdir='wide')
  text = guidance_probe.render(result)
  assert 'costs 0.1160 GFLOPs' in text and 'scores 0.0540 (0.0500 to 0.0580)' in text
  assert text.rstrip().endswith('| +0.0010 (-0.0010 to +0.0030) |')
