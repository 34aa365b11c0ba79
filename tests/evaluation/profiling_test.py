"""HLO text parsing, memory files and trace reading of evaluation/profiling.py on a small
function (the tiny model's are checked in benchmark_test.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.evaluation import bench_markdown
from fiancee_jax.evaluation import profiling


def _two_outputs(x, w):
  y = jnp.tanh(x @ w) * 2.0
  return y, jnp.sin(y).sum()


@pytest.fixture(scope='module')
def compiled():
  args = (np.ones((8, 16), np.float32), np.full((16, 16), 0.1, np.float32))
  return jax.jit(_two_outputs).lower(*args).compile(), args


def test_hlo_instructions_names_every_instruction(compiled):
  c, _ = compiled
  text = c.as_text()
  ops = profiling.hlo_instructions(text)
  assert profiling.module_name(text) == 'jit__two_outputs'
  # Every line 'name = type opcode(...)' of the text is one instruction, tuples included.
  lines = [l for l in text.splitlines() if ' = ' in l and '(' in l and not l.startswith('Hlo')
           and '{file_name_id' not in l and 'file_location_id' not in l]
  assert len(ops) == len(lines)
  assert sorted(o['opcode'] for o in ops.values()).count('parameter') >= 2
  entry = [o for o in ops.values() if not o['fused']]
  assert any(o['opcode'] == 'tuple' for o in entry)  # the two outputs
  assert any(o['source'].endswith('tanh') for o in ops.values())
  counts = profiling.op_counts(text, top=50)
  assert counts and all(c['opcode'] not in ('parameter', 'constant', 'tuple') for c in counts)
  assert sum(c['count'] for c in counts) == sum(
      o['opcode'] not in ('parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast')
      for o in entry)


def test_profile_executable_writes_files_and_reads_its_trace(compiled, tmp_path):
  c, args = compiled
  jax.block_until_ready(c(*args))  # warm
  p = profiling.profile_executable(c, args, 'f_b8', hlo_dir=str(tmp_path / 'hlo'),
                                   trace_dir=str(tmp_path / 'trace'), calls=3)
  with open(tmp_path / 'hlo' / 'f_b8.hlo.txt') as f:
    assert f.read() == c.as_text()
  with open(tmp_path / 'hlo' / 'f_b8.memory.json') as f:
    assert json.load(f) == p['memory']
  assert p['memory']['output_size_in_bytes'] >= 8 * 16 * 4
  assert p['trace'] == 'f_b8'
  assert profiling.trace_files(os.path.join(tmp_path, 'trace', 'f_b8'))
  ops = profiling.profile_executable(c, args, 'f_b8', hlo_dir=None, trace_dir=None,
                                     calls=1)
  assert ops['top_ops'] == [] and ops['hlo_file'] is None and ops['op_counts']
  names = profiling.hlo_instructions(c.as_text())
  assert p['top_ops'] and all(o['op'] in names for o in p['top_ops'])
  with pytest.raises(FileNotFoundError, match='no \\*.trace.json.gz'):
    profiling.top_ops_from_trace(str(tmp_path / 'hlo'), c.as_text(), calls=1)


def test_bench_markdown_without_a_trace_lists_op_counts():
  record = {'memory': {'peak_memory_in_bytes': 2**20},
            'op_counts': [{'opcode': 'convolution', 'count': 7}], 'top_ops': []}
  bench = {'batch_size': 4, 'profile': {'hlo_dir': 'hlo', 'trace_dir': None,
                                        'top_ops_source': 'hlo_op_counts',
                                        'exits': [{'exit': 0, 'batch1': record,
                                                   'batch': record}]}}
  md = '\n'.join(bench_markdown._profile_markdown(bench))
  assert '| 0 | convolution | 7 | 1 |' in md and 'Most frequent ops' in md
  assert 'trace_dir is empty' in md
