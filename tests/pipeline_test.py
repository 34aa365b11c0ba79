"""The whole job on the tiny config: every stage, the workdir contract, report/bench keys."""
import json
import os

import numpy as np
import pytest

from fiancee_jax import metric_logging
from fiancee_jax import pipeline

# Tests that use the shared `tiny_run` job run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('tiny_run')


@pytest.fixture(scope='module')
def workdir(tiny_run):
  return tiny_run


def test_workdir_contract(workdir):
  wd, _ = workdir
  for name in ('config.json', 'metrics.jsonl', 'report/report.json', 'report/bench.json',
               'report/bench.md', 'report/distance_vs_gflops.png', 'report/exit_histogram.png',
               'report/predicted_vs_true.png', 'report/samples.png'):
    assert os.path.exists(os.path.join(wd, name)), name
  for stage in ('backbone', 'database', 'exits', 'predictor'):
    assert os.path.isdir(os.path.join(wd, 'checkpoints', stage)), stage
  samples = os.listdir(os.path.join(wd, 'samples'))
  assert any(s.startswith('backbone_') for s in samples)
  assert any(s.startswith('exits_') for s in samples)
  assert os.listdir(os.path.join(wd, 'tensorboard'))
  stages = {m['stage'] for m in metric_logging.read_metrics(wd)}
  assert {'backbone', 'exits', 'predictor'} <= stages


def test_report_schema(workdir):
  wd, config = workdir
  with open(os.path.join(wd, 'report', 'report.json')) as f:
    r = json.load(f)
  assert r['distance'] == '1-msssim'
  assert r['num_eval'] == 32 and r['resolution'] == [16, 16]
  assert set(r['backbone']) >= {'gflops', 'params'}
  assert len(r['exits']) == 2
  for e in r['exits']:
    assert set(e) >= {'exit', 'attach_after', 'gflops', 'params', 'mean_distance',
                      'mean_distance_no_guidance'}
    assert 0 < e['gflops'] < r['backbone']['gflops']
    assert np.isfinite(e['mean_distance']) and np.isfinite(e['mean_distance_no_guidance'])
  assert set(r['predictor']) >= {'gflops', 'mae', 'spearman'}
  assert set(r['database']) >= {'entries', 'bytes', 'lookup_gflops'}
  assert r['database']['entries'] == config.database.num_entries
  for row in r['routing']:
    assert set(row) >= {'threshold', 'mean_gflops', 'saved_fraction', 'met_fraction',
                        'oracle_saved_fraction', 'best_static_saved_fraction',
                        'exit_histogram'}
    assert sum(row['exit_histogram']) == 32
    assert 0.0 <= row['met_fraction'] <= 1.0
    assert row['saved_fraction'] <= 1.0


def test_bench_schema(workdir):
  wd, _ = workdir
  with open(os.path.join(wd, 'report', 'bench.json')) as f:
    b = json.load(f)
  text = json.dumps(b)
  for key in ('matmul', 'switch', 'vmap'):
    assert key in text, key


def test_rerun_resumes_every_stage_without_retraining(workdir):
  wd, config = workdir
  before = os.path.getmtime(os.path.join(wd, 'report', 'report.json'))
  results = pipeline.run(config, wd, 'backbone,database,exits,predictor')
  assert int(results['backbone'].step) == config.train.num_steps
  assert int(results['exits'].step) == config.exits.num_steps
  assert os.path.getmtime(os.path.join(wd, 'report', 'report.json')) == before


def test_workdir_with_another_config_is_refused(workdir):
  wd, config = workdir
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.backbone.ch = 3
  with pytest.raises(ValueError, match='different config'):
    pipeline.run(other, wd, 'backbone')
