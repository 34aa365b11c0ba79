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
