"""scripts/ablation_table.py: per-exit distances over seeds and changes paired by seed."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'ablation_table', os.path.join(REPO, 'scripts', 'ablation_table.py'))
ablation_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation_table)


def _reports(distances, distance='lpips-alex'):
  """{seed: report} with exit k of seed s at distances[s][k]."""
  return {s: {'distance': distance,
              'exits': [{'mean_distance': d, 'gflops_fraction': 0.3 + 0.3 * k}
                        for k, d in enumerate(ds)]}
          for s, ds in enumerate(distances)}


def test_changes_are_paired_by_seed():
  ref = _reports([[0.10, 0.05], [0.20, 0.06], [0.30, 0.07]])
  # Seed-to-seed spread is large, the change is a constant +0.01: the paired interval is tight.
  other = _reports([[0.11, 0.05], [0.21, 0.06], [0.31, 0.07]])
  result = ablation_table.table([('ref', ref), ('other', other)])
  e0 = result['rows'][1]['exits'][0]
  assert e0['difference'] == pytest.approx(0.01)
  assert e0['difference_ci95'] == pytest.approx([0.01, 0.01])
  assert result['rows'][0]['exits'][0]['ci95'][0] < 0.1  # the unpaired spread is wide
  assert result['rows'][1]['exits'][1]['difference'] == pytest.approx(0.0)
  assert 'difference' not in result['rows'][0]['exits'][0]
  assert '| other | 0 | 30% | 0.210' in ablation_table.markdown(result)


def test_mismatched_seeds_or_distance_are_refused():
  ref = _reports([[0.1], [0.2], [0.3]])
  with pytest.raises(ValueError, match='seeds'):
    ablation_table.table([('ref', ref), ('two', _reports([[0.1], [0.2]]))])
  with pytest.raises(ValueError, match='another distance'):
    ablation_table.table([('ref', ref), ('l1', _reports([[0.1], [0.2], [0.3]], 'l1'))])


def _routed(reports, efficiency, predictor_gflops, spearman=0.7):
  """Adds the routing figures to `reports`: curve_efficiency per seed from `efficiency`."""
  for s, r in reports.items():
    r.update(backbone={'gflops': 1.0},
             predictor={'gflops': predictor_gflops,
                        'per_exit': [{'spearman': spearman}] * len(r['exits'])},
             curve_efficiency=efficiency[s], curve_efficiency_uncalibrated=None,
             at_t_star={'saved_fraction': 0.5}, **{'at_lpips_0.1': {'saved_fraction': 0.6}})
  return reports


def test_routing_table_pairs_scalar_figures_by_seed():
  ref = _routed(_reports([[0.1], [0.2], [0.3]]), [0.2, 0.3, 0.4], 0.02)
  other = _routed(_reports([[0.1], [0.2], [0.3]]), [0.25, 0.35, 0.45], 0.005, spearman=0.6)
  rows = ablation_table.routing_table([('ref', ref), ('small', other)])
  got = {f['path']: f for f in rows[1]['figures']}
  assert got['curve_efficiency']['difference'] == pytest.approx(0.05)
  assert got['curve_efficiency']['difference_ci95'] == pytest.approx([0.05, 0.05])
  assert got['predictor_gflops_fraction']['mean'] == pytest.approx(0.005)
  assert got['predictor_spearman/0']['difference'] == pytest.approx(-0.1)
  assert got['curve_efficiency_uncalibrated']['mean'] is None  # absent: n/a, not 0
  assert 'difference' not in {f['path']: f for f in rows[0]['figures']}['curve_efficiency']
  text = ablation_table.markdown({**ablation_table.table([('ref', ref), ('small', other)]),
                                  'routing': rows})
  assert '| small | curve efficiency | 0.3500' in text
  assert '| small | curve efficiency, zero margins | n/a |' in text
