"""The unchanged exit machinery on the second backbone: the tiny avatars (reenactment) job."""
import json
import os

import jax
import numpy as np
import pytest

from configs import avatars
from fiancee_jax.data import sources

pytestmark = [pytest.mark.xdist_group('tiny_avatars_run'), pytest.mark.slow]


@pytest.fixture(scope='module')
def workdir(tiny_avatars_run):
  return tiny_avatars_run


def test_every_stage_writes_its_contract(workdir):
  wd, config = workdir
  with open(os.path.join(wd, 'report', 'report.json')) as f:
    report = json.load(f)
  num_exits = len(config.exits.attach_after) + 1
  for key in ('distance', 'num_eval', 'resolution', 'backbone', 'exits', 'predictor', 'database',
              'routing', 'distance_anchors', 't_star', 'at_t_star', 'at_lpips_0.1',
              'curve_efficiency'):
    assert key in report
  assert report['resolution'] == list(config.data.resolution)
  assert len(report['exits']) == num_exits - 1
  for e in report['exits']:
    assert 0 < e['gflops'] < report['backbone']['gflops']
    assert e['mean_distance'] >= 0 and e['mean_distance_no_guidance'] >= 0
  for row in report['routing']:
    assert len(row['exit_histogram']) == num_exits
    assert sum(row['exit_histogram']) == report['num_eval']
  # Cross pairs carry the truth: every exit, the backbone and both baselines are scored.
  gt = report['ground_truth']
  assert gt['num_eval'] == report['num_eval']
  assert len(gt['exits']) == num_exits
  assert len(gt['routed']) == len(report['routing'])
  for name in ('copy_source', 'copy_driver'):
    assert 0 < gt[name]['distance'] <= 2 and 0 < gt[name]['l1'] <= 2
  assert 0 <= gt['backbone_better_than_copy_source_fraction'] <= 1
  with open(os.path.join(wd, 'report', 'bench.json')) as f:
    bench = json.load(f)
  assert len(bench['exits']) == num_exits and bench['routing'] and bench['vmap_switch']
  for name in ('distance_vs_gflops', 'exit_histogram', 'predicted_vs_true', 'samples'):
    assert os.path.getsize(os.path.join(wd, 'report', f'{name}.png')) > 0
  assert any(n.startswith('exits_') for n in os.listdir(os.path.join(wd, 'samples')))


def test_ground_truth_baselines_are_the_copies(workdir):
  wd, config = workdir
  with open(os.path.join(wd, 'report', 'report.json')) as f:
    gt = json.load(f)['ground_truth']
  split = sources.load_split(config, 'test', gt['num_eval'])
  l1 = np.abs(split['source'] - split['target']).mean()
  np.testing.assert_allclose(gt['copy_source']['l1'], l1, rtol=1e-5)
  l1 = np.abs(split['driver'] - split['target']).mean()
  np.testing.assert_allclose(gt['copy_driver']['l1'], l1, rtol=1e-5)


def test_generate_routes_face_pairs(workdir):
  import fiancee_jax  # pylint: disable=g-import-not-at-top
  wd, config = workdir
  model = fiancee_jax.load_model(wd, config)
  assert model.task.name == 'reenactment'
  source, driver = sources.load_data(config, 'test', 5)
  strict = fiancee_jax.generate(model, (source, driver), threshold=0.0)
  assert strict['images'].shape == (5, *config.data.resolution, 3)
  pred = np.asarray(jax.jit(model.predict_fn())(model.predictor_params, source, driver))
  ok = pred + model.margins_at(0.0)[None] <= 0.0
  np.testing.assert_array_equal(strict['exit_ids'],
                                np.where(ok.any(1), ok.argmax(1), model.num_exits - 1))
  loose = fiancee_jax.generate(model, (source, driver), threshold=1e6)
  if np.isfinite(model.margins_at(1e6)[0]):
    assert np.all(loose['exit_ids'] == 0) and loose['saved_fraction'] > 0
  # The routed images are exactly each chosen exit's own path.
  direct = np.asarray(jax.jit(model.paths()[int(loose['exit_ids'][0])])(
      model.params, source, driver))
  np.testing.assert_allclose(loose['images'], direct, atol=1e-5)
  one = fiancee_jax.generate(model, (source[:1], driver[:1]), threshold=1e6)  # switch router
  np.testing.assert_allclose(one['images'][0], loose['images'][0], atol=1e-5)
  with pytest.raises(ValueError, match=r'takes \(source, driver\)'):
    fiancee_jax.generate(model, source, threshold=0.1)
  with pytest.raises(ValueError, match='convert uint8'):
    fiancee_jax.generate(model, ((source * 127).astype(np.uint8), driver), threshold=0.1)


def test_costs_of_the_reenactment_exits(workdir):
  # The evaluate stage reads them from costs.exit_stats / backbone_stats / lookup_gflops, the
  # functions behind `python -m fiancee_jax.stats`.
  wd, _ = workdir
  with open(os.path.join(wd, 'report', 'report.json')) as f:
    report = json.load(f)
  gflops = [e['gflops'] for e in report['exits']] + [report['backbone']['gflops']]
  assert gflops == sorted(gflops) and len(set(gflops)) == len(gflops)
  assert report['predictor']['gflops'] < 0.05 * report['backbone']['gflops']
  assert report['database']['lookup_gflops'] > 0


def test_unknown_backbone_is_refused_before_compute():
  from fiancee_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = avatars.get_config('tiny')
  with config.unlocked():
    config.backbone.name = 'stylegan'
  with pytest.raises(ValueError, match="known backbones are 'oasis'"):
    config_checks.check_config(config)
  config = avatars.get_config('tiny')
  with config.unlocked():
    config.exits.adversarial_weight = 0.1
  with pytest.raises(ValueError, match='adversarial_weight must be 0'):
    config_checks.check_config(config)
