"""The report: FID wiring, weight checks, and every DESIGN.md section 3 key built from arrays."""
import json
import os

import numpy as np
import pytest

from configs import landscapes
from fiancee_jax import config_checks
from fiancee_jax.evaluation import report
from fiancee_jax.evaluation import results_md


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


# --- The report built from arrays ------------------------------------------------------------

# DESIGN.md section 3: the keys every report.json holds.
TOP_KEYS = {'distance', 'distance_anchors', 'num_eval', 'resolution', 'seeds', 'backbone', 'exits',
            'predictor', 'database', 'routing', 't_star', 'at_t_star', 'at_lpips_0.1',
            'curve_efficiency', 'curve_efficiency_uncalibrated'}
EXIT_KEYS = {'exit', 'attach_after', 'gflops', 'params', 'mean_distance', 'p95_distance',
             'mean_distance_no_guidance', 'guidance_gain'}
ROW_KEYS = {'threshold', 'mean_gflops', 'saved_fraction', 'met_fraction', 'early_exit_miss_rate',
            'p95_distance', 'oracle_saved_fraction', 'best_static_saved_fraction',
            'random_mix_saved_fraction', 'exit_histogram'}
POINT_KEYS = {'threshold', 'saved_fraction', 'met_fraction', 'early_exit_miss_rate',
              'oracle_saved_fraction', 'best_static_saved_fraction', 'random_mix_saved_fraction'}


def _arrays(n=200, seed=0):
  rng = np.random.default_rng(seed)
  hard = rng.uniform(0, 1, n)
  true = np.stack([0.03 + 0.1 * hard, 0.02 + 0.05 * hard], 1) * rng.uniform(0.9, 1.1, (n, 2))
  pred = true + rng.normal(0, 0.005, true.shape)
  return pred, true, true * 1.1


def _built(distance='lpips-alex', t_star=0.06, seed=0):
  pred, true, unguided = _arrays(seed=seed)
  costs = [{'exit': 0, 'attach_after': 3, 'gflops': 0.2, 'params': 10},
           {'exit': 1, 'attach_after': 4, 'gflops': 0.5, 'params': 20},
           {'exit': 2, 'attach_after': 5, 'gflops': 1.0, 'params': 100}]
  t = {'value': t_star, 'definition': 'test', 'distance': distance, 'num_samples': 8}
  return report.build_report(
      distance=distance, pred=pred, true=true, true_unguided=unguided, second=true * 0.5,
      margins_at=lambda th: np.full(2, 0.01, np.float32), exit_costs=costs,
      exit_gflops_unguided=[0.19, 0.49], predictor_gflops=0.01, t_star=t,
      distance_anchors={'blur_sigma1': t_star, 'shift_1px': 0.01, 'noise_sigma0.03': 0.08,
                        'another_z': 0.09, 'z_average_8': 0.05},
      target_met=0.9,
      thresholds=report.report_thresholds(t_star, distance, multiples=(0.5, 1.0, 2.0)),
      resamples=100, bootstrap_seed=0, num_z_average=8)


def _full(body, seed=0):
  return {'num_eval': 200, 'resolution': [64, 64], 'seeds': [seed],
          'backbone': {'gflops': 1.0, 'params': 100, 'broadcast_z_share': 0.1},
          'predictor': {'gflops': 0.01, 'mae': 0.004, 'spearman': 0.9,
                        'per_exit': [{'exit': 0, 'mae': 0.004, 'spearman': 0.9}] * 2},
          'database': {'entries': 64, 'bytes': 1000, 'lookup_gflops': 0.001},
          **body, 'calibration': {'method': 'risk_control', 'target_met': 0.9, 'margins': None,
                                  **body['calibration']}}


def test_build_report_holds_every_design_key():
  r = _full(_built())
  assert set(r) >= TOP_KEYS
  for e in r['exits']:
    assert set(e) >= EXIT_KEYS
    assert set(e['guidance_gain']) == {'mean', 'ci95'}
    assert e['guidance_gain']['mean'] == pytest.approx(1 - 1 / 1.1)
    lo, hi = e['mean_distance_ci95']
    assert lo < e['mean_distance'] < hi
  assert r['exits'][0]['difference_to_previous'] is None
  assert r['exits'][1]['difference_to_previous']['mean'] < 0
  for row in r['routing']:
    assert set(row) >= ROW_KEYS
  thresholds = [row['threshold'] for row in r['routing']]
  assert thresholds == pytest.approx(sorted({0.03, 0.06, 0.12, 0.1}))  # t* multiples + 0.1
  assert set(r['at_t_star']) >= POINT_KEYS and r['at_t_star']['threshold'] == pytest.approx(0.06)
  lo, hi = r['at_t_star']['saved_fraction_ci95']
  assert lo <= r['at_t_star']['saved_fraction'] <= hi
  assert set(r['at_lpips_0.1']) >= POINT_KEYS
  assert r['at_lpips_0.1']['threshold'] == pytest.approx(0.1)
  assert 0.0 < r['curve_efficiency'] <= 1.05
  # Constant margins only shift the thresholds: the same curve, hence the same efficiency.
  assert r['curve_efficiency_uncalibrated'] == pytest.approx(r['curve_efficiency'], abs=0.02)
  assert r['exits'][0]['mean_distance_msssim'] == pytest.approx(r['exits'][0]['mean_distance'] / 2)
  assert 'headline' not in r


def test_no_lpips_no_lpips_operating_point():
  r = _built(distance='1-msssim')
  assert r['at_lpips_0.1'] is None and 'not an LPIPS' in r['at_lpips_0.1_note']
  assert 0.1 not in [row['threshold'] for row in r['routing']]


def test_configured_thresholds_keep_t_star_and_lpips():
  got = report.report_thresholds(0.05, 'lpips-vgg', multiples=(2.0,), configured=(0.2, 0.3))
  np.testing.assert_allclose(got, [0.05, 0.1, 0.2, 0.3])


def test_anchor_thresholds_join_the_table_and_are_named():
  from fiancee_jax.evaluation import results_md  # pylint: disable=g-import-not-at-top
  got = report.report_thresholds(0.2, 'lpips-alex', multiples=(0.5,),
                                 anchor_values=(0.2, 0.03, None, float('nan'), 0.0))
  np.testing.assert_allclose(got, [0.03, 0.1, 0.2])
  r = {'distance': 'lpips-alex', 't_star': {'value': 0.2},
       'distance_anchors': {'blur_sigma1': 0.2, 'another_z': 0.03}}
  assert results_md.threshold_label(r, 0.2) == 't*, blur sigma 1'
  assert results_md.threshold_label(r, 0.03) == 'another z'
  assert results_md.threshold_label(r, 0.1) == '0.5 t*, LPIPS 0.1'
  assert results_md.threshold_label(r, 0.123) == '-'


def test_results_markdown_and_plots_render_a_built_report(tmp_path):
  from fiancee_jax.evaluation import intervals  # pylint: disable=g-import-not-at-top
  from fiancee_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  from fiancee_jax.evaluation import results_md  # pylint: disable=g-import-not-at-top
  r = _full(_built())
  text = '\n'.join(results_md.render_report(r))
  assert '**At t\\***' in text and 'At the paper\'s LPIPS 0.1' in text
  assert text.count('Anchors (lpips-alex from the backbone\'s output to): blur sigma 1 0.060') == 2
  assert 'mean over 8 z 0.050' in text and 'Curve efficiency' in text
  assert 'random mixture saved' in text and 'early-exit miss rate' in text
  assert 'paired bootstrap' in text
  agg = intervals.aggregate_seed_reports([_full(_built(seed=s), seed=s) for s in range(3)])
  text = '\n'.join(results_md.render_report(agg))
  assert 'means over 3 seeds (0, 1, 2) with 95 % t-intervals' in text
  lo, hi = agg['seed_intervals']['exits/0/mean_distance']['ci95']
  assert f'({lo:.3f} to {hi:.3f})' in text
  path = tmp_path / 'q.png'
  plots.distance_vs_gflops(str(path), agg)
  assert path.stat().st_size > 0
  plots.distance_vs_gflops(str(path), _full(_built(distance='1-msssim')))


def test_plots_do_not_import_the_report_module():
  import ast  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top

  from fiancee_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  names = {a.name for node in ast.walk(ast.parse(inspect.getsource(plots)))
           if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
  assert 'report' not in names


@pytest.mark.parametrize('section,key,value,match', [
    ('distance', 'name', 'auto', r"Unknown distance 'auto'; known: lpips-alex, lpips-vgg, "
                                 r'1-msssim, 1-ssim, l1'),
    ('evaluate', 't_star', -0.1, r'config\.evaluate\.t_star=-0\.1 must be a positive finite'),
    ('evaluate', 't_star', float('inf'), r'config\.evaluate\.t_star=inf must be a positive'),
    ('evaluate', 'seeds', 0, r'config\.evaluate\.seeds=0 must be an integer >= 1'),
    ('evaluate', 'bootstrap_resamples', 2, r'bootstrap_resamples=2 must be an integer >= 10'),
])
def test_bad_evidence_settings_are_refused_before_any_stage(section, key, value, match,
                                                            tmp_path):
  from fiancee_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config[section][key] = value
  with pytest.raises(ValueError, match=match):
    pipeline.run(config, str(tmp_path), 'backbone')
  assert not os.listdir(tmp_path)


def test_defaults_are_the_papers_metric_and_three_seeds():
  config = landscapes.get_config()
  assert config.distance.name == 'lpips-alex' and config.distance.lpips_weights == ''
  assert config.evaluate.t_star is None and config.evaluate.seeds == 3
  config_checks.check_config(config)
  with config.unlocked():
    config.evaluate.t_star = 0.05  # a placeholder: settable from the command line
  config_checks.check_config(config)


def test_write_table_writes_the_figures_and_a_newline_terminated_table(tmp_path, capsys):
  out = tmp_path / 'new' / 'dir'
  results_md.write_table(str(out), 'probe', {'rows': [1.5, None]}, '| a |\n|---|')
  assert json.loads((out / 'probe.json').read_text()) == {'rows': [1.5, None]}
  assert (out / 'probe.md').read_text() == '| a |\n|---|\n'
  results_md.write_table(str(out), 'probe', {}, 'x\n')  # already terminated: one newline
  assert (out / 'probe.md').read_text() == 'x\n'
  assert capsys.readouterr().out == '| a |\n|---|\nx\n'


def test_a_best_static_exit_that_differs_across_seeds_is_named_per_seed():
  from fiancee_jax.evaluation import intervals  # pylint: disable=g-import-not-at-top
  seeds = [_full(_built(seed=s), seed=s) for s in range(3)]
  for r, e in zip(seeds, (0, 0, 1)):
    r['at_t_star']['best_static_exit'] = e
  text = '\n'.join(results_md.render_report(intervals.aggregate_seed_reports(seeds)))
  assert '(exits 0, 0, 1 by seed)' in text and 'exit 0.33' not in text
  for r in seeds:
    r['at_t_star']['best_static_exit'] = 1
  text = '\n'.join(results_md.render_report(intervals.aggregate_seed_reports(seeds)))
  assert '(exit 1)' in text
