"""The loader benchmark times real batches with a thread and with worker processes."""
import json
import os

import pytest

from configs import landscapes
from fiancee_jax.evaluation import loader_benchmark

pytestmark = pytest.mark.xdist_group('loader_workers')  # see tests/data/input_pipeline_test.py


def test_loader_benchmark_writes_json_and_table(tmp_path, data_dir):
  config = landscapes.get_config('tiny')
  config.data.data_dir = data_dir
  result = loader_benchmark.run(config, str(tmp_path / 'out'), workers=[0, 1], batches=3,
                                scaling_loop=100_000)
  with open(tmp_path / 'out' / 'loader.json') as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert [r['workers'] for r in result['rows']] == [0, 1]
  for row in result['rows']:
    assert row['batch_size'] == config.train.batch_size and row['batches'] == 3
    assert row['seconds'] > 0
    assert row['examples_per_s'] == row['batch_size'] * 3 / row['seconds']
  assert result['speedup'] == {}  # no 2-worker row to compare with 1
  assert result['cpu_scaling']['vs_1'] > 0
  assert result['dataset'] == 'landscapes' and result['cpu_count_usable'] >= 1
  table = open(os.path.join(tmp_path, 'out', 'loader.md')).read()
  assert '| thread | 8 |' in table and '| 1 | 8 |' in table
