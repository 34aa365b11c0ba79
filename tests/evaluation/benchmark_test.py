"""The benchmark stage on the tiny model: every key, finite values, consistent counts."""
import copy
import json
import math
import os

import jax
import numpy as np
import pytest

from fiancee_jax import config_checks
from fiancee_jax.evaluation import bench_markdown
from fiancee_jax.evaluation import benchmark
from fiancee_jax.evaluation import precision_grid
from fiancee_jax.evaluation import profiling
from tests.routing.router_test import bucketed
from tests.routing.router_test import switch
from tests.routing.router_test import tiny_labels
from tests.routing.router_test import tiny_model

# One worker runs the module: its compiled fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group('bench')

BATCH = 4
# The precision grid's batches: bucket sizes, so that its float32 cells reuse the routers'
# executables and only the bfloat16 ones compile.
GRID_BATCHES = (1, BATCH)


def _finite_numbers(tree, path=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _finite_numbers(v, f'{path}/{k}')
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _finite_numbers(v, f'{path}/{i}')
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench_profile')
  model = tiny_model()
  labels = tiny_labels(6, seed=7)
  inputs = model.make_inputs(labels[:BATCH], jax.random.key(0))
  pred = np.asarray(model.predict_fn()(model.predictor_params, *inputs))
  thresholds = [0.0, float(np.median(pred)), 1.0]
  return benchmark.run_benchmark(model, labels, batch_size=BATCH, thresholds=thresholds,
                                 warmup=1, iters=2, seed=0, matmul_n=128, switch_rounds=3,
                                 lowering_rounds=3, bucketed=bucketed(), switch=switch(),
                                 hlo_dir=str(out / 'hlo'), trace_dir=str(out / 'trace'),
                                 dtypes=('float32', 'bfloat16'), batch_sizes=GRID_BATCHES,
                                 grid_warmup=1, grid_iters=2)


def test_bench_has_every_key_with_finite_values(bench):
  for key in ('hardware', 'device', 'protocol', 'batch_size', 'resolution', 'matmul_gflops_per_s',
              'predictor', 'exits', 'profile', 'exit_parts', 'backbone', 'routing', 'switch',
              'vmap_switch', 'kernels', 'router_compiles', 'precision', 'dtype'):
    assert key in bench, key
  for path, value in _finite_numbers(bench):
    assert math.isfinite(value), path
  assert bench['device']['jax'] and bench['device']['flax'] and bench['hardware']
  dev = jax.devices()[0]
  assert (bench['device']['device_kind'], bench['device']['platform']) == (dev.device_kind,
                                                                            dev.platform)
  assert bench['matmul_gflops_per_s'] > 0 and bench['dtype'] == 'float32'
  by_dtype = bench['matmul_gflops_per_s_by_dtype']
  assert set(by_dtype) == {'float32', 'bfloat16'} and min(by_dtype.values()) > 0
  assert by_dtype['float32'] == bench['matmul_gflops_per_s']


def test_precision_grid_times_every_exit_in_both_dtypes_at_every_batch(bench):
  m = tiny_model()
  e, grid = m.num_exits, bench['precision']
  assert grid['dtypes'] == ['float32', 'bfloat16'] and grid['batch_sizes'] == list(GRID_BATCHES)
  assert grid['skipped'] == [] and grid['iters'] == 2
  cells = {(r['dtype'], r['batch'], r['exit']): r for r in grid['rows']}
  assert len(grid['rows']) == len(cells) == 2 * len(GRID_BATCHES) * e
  for (d, b, k), r in cells.items():
    assert 0 < r['median_ms'] <= r['p90_ms'] and r['is_backbone'] == (k == e - 1)
    assert r['images_per_s'] == pytest.approx(b / (r['median_ms'] * 1e-3))
    assert r['flops_speedup'] == pytest.approx(m.exit_gflops[-1] / m.exit_gflops[k])
    assert r['measured_speedup'] == pytest.approx(
        cells[(d, b, e - 1)]['median_ms'] / r['median_ms'])
    assert r['speedup_vs_float32'] == pytest.approx(
        cells[('float32', b, k)]['median_ms'] / r['median_ms'])
    # XLA's FLOPs of the cell grow with its batch: the batch really was b (within the few %
    # that the conv forms add, which change with the batch: ops/conv.py).
    assert r['xla_gflops'] == pytest.approx(b * cells[(d, 1, k)]['xla_gflops'], rel=0.15)
  # Exits are ordered by cost in either dtype.
  for d in grid['dtypes']:
    xla = [cells[(d, BATCH, k)]['xla_gflops'] for k in range(e)]
    assert xla == sorted(xla)
  md = bench_markdown.render_markdown(bench)
  assert '## Precision: every exit in float32, bfloat16' in md
  assert 'bfloat16 / float32' in md and 'FLOPs-predicted vs backbone' in md
  assert md.count(f'\n| {BATCH} | ') == e and 'skipped' not in md.split('## Precision')[1]


def test_bfloat16_exit_paths_compute_in_bfloat16():
  m = tiny_model()
  b16 = precision_grid.with_dtype(m, 'bfloat16')
  assert precision_grid.model_dtype(b16) == 'bfloat16' and b16.params is m.params
  assert precision_grid.model_dtype(m) == 'float32'
  inputs = m.make_inputs(tiny_labels(2), jax.random.key(0))
  for k in range(m.num_exits):
    text = {name: jax.jit(x.exit_model.exit_path(k)).lower(x.params, *inputs).as_text()
            for name, x in (('f32', m), ('bf16', b16))}
    convs = {name: [line for line in t.splitlines() if 'stablehlo.convolution' in line]
             for name, t in text.items()}
    assert convs['bf16'] and all('bf16' in line for line in convs['bf16'])
    assert not any('bf16' in line for line in convs['f32'])
    # Same inputs and parameters (float32), float32 images out.
    out = {name: jax.eval_shape(x.exit_model.exit_path(k), x.params, *inputs)
           for name, x in (('f32', m), ('bf16', b16))}
    assert out['bf16'] == out['f32'] == jax.ShapeDtypeStruct((2, 16, 16, 3), np.float32)


def test_precision_grid_skips_a_cell_that_fails_with_its_reason():
  m = tiny_model()
  oom = jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate')

  def compiled(d, k, b):
    if (b, k) == (BATCH, m.num_exits - 1):
      raise oom
    return bucketed().compiled_exit(k, b)  # no compile: the routers' executables

  # 3 examples for batches of 4: the inputs are repeated cyclically.
  grid = precision_grid.precision_grid(m, (tiny_labels(3),), dtypes=('float32',),
                                       batch_sizes=(1, BATCH), warmup=0, iters=1,
                                       compiled=compiled)
  assert grid['skipped'] == [{'dtype': 'float32', 'batch': BATCH, 'exit': m.num_exits - 1,
                              'reason': f'JaxRuntimeError: {oom}'}]
  rows = {(r['batch'], r['exit']): r for r in grid['rows']}
  assert set(rows) == {(1, k) for k in range(m.num_exits)} | {
      (BATCH, k) for k in range(m.num_exits - 1)}
  # Without the backbone's cell nothing is measured against it at that batch.
  assert all(rows[(BATCH, k)]['measured_speedup'] is None for k in range(m.num_exits - 1))
  assert rows[(1, 0)]['measured_speedup'] > 0
  bench = {'num_exits': m.num_exits, 'precision': grid}
  md = '\n'.join(bench_markdown._precision_markdown(bench))
  assert f'- float32, batch {BATCH}, exit {m.num_exits - 1}: JaxRuntimeError' in md
  for dtypes, match in ((('float16',), 'not one of'), (('float32', 'float32'), 'distinct')):
    with pytest.raises(ValueError, match=match):
      precision_grid.precision_grid(m, (tiny_labels(1),), dtypes=dtypes, batch_sizes=(1,),
                                    warmup=0, iters=1)


def test_bench_counts_and_ratios(bench):
  m = tiny_model()
  e = m.num_exits
  assert [x['exit'] for x in bench['exits']] == list(range(e))
  for x in bench['exits']:
    for b in ('batch1', 'batch'):
      assert x[b]['iters'] == 2
      assert 0 < x[b]['median_ms'] <= x[b]['p90_ms']
    assert x['cost_batch']['gflops'] > x['cost_batch1']['gflops'] > 0
  # XLA FLOPs grow with the exit's depth (exits are ordered by cost).
  xla = [x['cost_batch1']['gflops'] for x in bench['exits']]
  assert xla == sorted(xla)
  assert len(bench['routing']) == 3
  hists = [r['exit_histogram'] for r in bench['routing']]
  for r, h in zip(bench['routing'], hists):
    assert len(h) == e and sum(h) == BATCH
    mean = (np.dot(h, m.exit_gflops) / BATCH) + m.predictor_gflops
    assert r['mean_gflops'] == pytest.approx(mean)
    assert r['flops_speedup'] == pytest.approx(m.backbone_gflops / mean)
    assert r['measured_speedup'] == pytest.approx(r['images_per_s'] / r['backbone_images_per_s'])
    # The latency model sums the timed executables the routed batch calls, predictor included.
    assert r['latency_model_ms'] > bench['predictor']['batch']['median_ms']
    assert r['latency_speedup'] == pytest.approx(
        bench['backbone']['batch_median_ms'] / r['latency_model_ms'])
  assert hists[0] == [0, 0, BATCH]  # threshold 0: nothing certified -> backbone
  assert hists[-1] == [BATCH, 0, 0]  # threshold 1 > any sigmoid output: cheapest exit
  assert len(bench['switch']['per_exit']) == e and len(bench['switch']['routed']) == 3
  assert bench['switch']['routed'][0]['exit'] == e - 1
  for s in bench['switch']['per_exit']:
    assert s['rounds'] == 3 and s['overhead_ratio_ci95'][0] <= s['overhead_ratio'] <= s[
        'overhead_ratio_ci95'][1]
  for s in bench['switch']['routed']:
    assert s['rounds'] == 3 and s['ratio_ci95'][0] <= s['ratio'] <= s['ratio_ci95'][1]
  assert bench['vmap_switch']['gflops'] > bench['vmap_switch']['backbone_gflops']
  assert bench['router_compiles']['after_warmup'] == 0
  # Per exit, its parts: prefix (+ lookup when guided) + branch, or prefix + head (backbone).
  parts = bench['exit_parts']
  assert [x['exit'] for x in parts] == list(range(e))
  guided = m.exit_model.guided
  for x in parts[:-1]:
    assert [p['part'] for p in x['parts']] == ['prefix'] + ['lookup'] * guided + ['branch']
  assert [p['part'] for p in parts[-1]['parts']] == ['prefix', 'head']
  for x in parts:
    assert x['sum_ms'] == pytest.approx(sum(p['ms'] for p in x['parts']))
    for p in x['parts']:
      assert p['ms'] > 0 and p['gflops'] > 0
      assert p['gflop_per_s'] == pytest.approx(p['gflops'] / (p['ms'] * 1e-3))
  # The parts add up to the exit's own XLA FLOPs: the same ops, except that in one executable
  # XLA recomputes cheap elementwise producers (the one-hot conditioning) inside several
  # fusions, which it counts (~2 % in this tiny model).
  for x, ex in zip(parts, bench['exits']):
    assert sum(p['gflops'] for p in x['parts']) == pytest.approx(ex['cost_batch']['gflops'],
                                                                 rel=0.05)
  prefix = [x['parts'][0]['gflops'] for x in parts]
  assert prefix == sorted(prefix)  # later exits run more of the backbone
  # The kernels every figure ran with are the model's own (config.kernels, resolved).
  assert bench['kernels']['model'] == benchmark.model_kernels(m)
  assert bench['kernels']['reference'] == {'conv': 'xla', 'top_k': None}  # unguided: no top-k


def _check_ab(ab, num_exits, rounds):
  assert [r['exit'] for r in ab] == list(range(num_exits))
  for r in ab:
    assert r['rounds'] == rounds and r['speedup_ci95'][0] <= r['speedup'] <= r['speedup_ci95'][1]
    assert r['reference_gflops'] > 0 and r['gflops'] > 0
    for pre in ('reference_', ''):
      assert r[f'{pre}efficiency'] == pytest.approx(
          (r[f'{pre}gflops'] / ab[-1][f'{pre}gflops']) / (r[f'{pre}ms'] / ab[-1][f'{pre}ms']))
  assert ab[-1]['efficiency'] == pytest.approx(1.0)


@pytest.mark.cpu_only
def test_bench_times_the_auto_kernels_against_plain_xla(bench, tmp_path):
  # On the CPU 'auto' resolves to other kernels than XLA: the benchmark times both.
  assert bench['kernels']['model']['conv'] == 'toeplitz_even'
  _check_ab(bench['kernels']['ab'], len(bench['exits']), rounds=3)
  for r, ex in zip(bench['kernels']['ab'], bench['exits']):
    assert r['gflops'] == pytest.approx(ex['cost_batch']['gflops'])  # the benchmarked form
  _, md_path = benchmark.write_bench(bench, str(tmp_path))
  md = open(md_path).read()
  assert 'Against conv xla' in md and 'efficiency vs backbone' in md


def test_kernel_ab_builds_a_second_model_on_other_kernels():
  # Explicit kernels: the same on every backend.
  fast = benchmark.with_kernels(tiny_model(), {'conv': 'toeplitz_even', 'top_k': 'two_stage'})
  plain = benchmark.with_kernels(fast, {'conv': 'xla', 'top_k': 'xla'})
  assert benchmark.model_kernels(fast) == {'conv': 'toeplitz_even', 'top_k': None}
  assert benchmark.model_kernels(plain) == {'conv': 'xla', 'top_k': None}
  assert plain.params is fast.params and plain.exit_model.attach_after == (1, 2)
  inputs = jax.device_put(fast.make_inputs(tiny_labels(BATCH), jax.random.key(0)))
  out = benchmark.kernel_ab(fast, inputs, warmup=1, rounds=2)
  assert out['model'] == benchmark.model_kernels(fast)
  assert out['reference'] == benchmark.model_kernels(plain)
  _check_ab(out['ab'], fast.num_exits, rounds=2)
  # The Toeplitz stem (2x2 map, batch 4) multiplies the MACs XLA counts for the conv.
  assert [r['gflops'] for r in out['ab']] == pytest.approx(
      [r['reference_gflops'] for r in out['ab']], rel=0.05)
  # Nothing to compare: the model already runs the reference kernels, or no rounds.
  assert benchmark.kernel_ab(plain, inputs, warmup=1, rounds=2)['ab'] == []
  assert benchmark.kernel_ab(fast, inputs, warmup=1, rounds=0)['ab'] == []
  with pytest.raises(ValueError, match='exactly the ops'):
    benchmark.with_kernels(fast, {'conv': 'xla'})


def test_bench_writes_hlo_memory_and_a_trace_per_exit(bench):
  profile = bench['profile']
  h, w = tiny_model().resolution
  assert profile['top_ops_source'] == 'trace'
  assert [x['exit'] for x in profile['exits']] == list(range(tiny_model().num_exits))
  for x in profile['exits']:
    k = x['exit']
    for record, b in ((x['batch1'], 1), (x['batch'], BATCH)):
      assert record['hlo_file'] == f'exit{k}_b{b}.hlo.txt'
      with open(os.path.join(profile['hlo_dir'], record['hlo_file'])) as f:
        text = f.read()
      assert text.startswith('HloModule') and 'ENTRY' in text
      with open(os.path.join(profile['hlo_dir'], record['memory_file'])) as f:
        memory = json.load(f)
      assert memory == record['memory']
      assert memory['output_size_in_bytes'] == b * h * w * 3 * 4  # float32 images
      assert memory['argument_size_in_bytes'] > 0
    assert x['batch1']['trace'] is None  # only the benchmark batch is traced
    assert profiling.trace_files(os.path.join(profile['trace_dir'], x['batch']['trace']))
    ops = x['batch']['top_ops']
    assert ops, 'the trace holds no op of this exit'
    # Every traced op is an instruction of this exit's own HLO, longest first.
    assert all(o['opcode'] != '?' and o['ms'] > 0 for o in ops)
    assert [o['ms'] for o in ops] == sorted((o['ms'] for o in ops), reverse=True)
    assert 0 < sum(o['share'] for o in ops) <= 1 + 1e-9
  md = bench_markdown.render_markdown(bench)
  assert '### Inside each exit' in md and 'Top ops by time' in md
  assert ops[0]['op'] in md


def test_write_bench(bench, tmp_path):
  out = os.path.join(tmp_path, 'bench')
  json_path, md_path = benchmark.write_bench(bench, out)
  with open(json_path) as f:
    assert json.load(f)['batch_size'] == BATCH
  md = open(md_path).read()
  assert md.startswith('# Benchmark')
  for heading in ('## Exits', '## Routing', 'latency-model speedup', '## lax.switch', 'vmap'):
    assert heading in md
  assert md.count('\n| ') >= 2 * tiny_model().num_exits
  assert "Where each exit's time goes" in md and 'interleaved over 3 rounds' in md
  assert '## Kernels' in md and f"conv {bench['kernels']['model']['conv']}" in md
  # A bench.json written before interleaved timing, the parts and the kernels still
  # renders, and says so.
  old = copy.deepcopy(bench)
  del old['protocol']['switch_rounds'], old['exit_parts'], old['kernels'], old['profile']
  for s in old['switch']['per_exit']:
    del s['overhead_ratio_ci95']
  md = bench_markdown.render_markdown(old)
  assert 'separate loops of 2 calls' in md and "Where each exit's time goes" not in md
  assert '## Kernels' not in md and 'Inside each exit' not in md


def test_trace_dir_is_checked(tiny_config):
  config_checks.check_benchmark(tiny_config)  # the default: 'trace'
  for value, match in ((None, 'must be a directory name'), ('hlo', 'would mix traces'),
                       ('./', 'would mix traces')):
    with tiny_config.unlocked():
      tiny_config.benchmark.trace_dir = value
    with pytest.raises(config_checks.ConfigError, match=match):
      config_checks.check_benchmark(tiny_config)
  with tiny_config.unlocked():
    tiny_config.benchmark.trace_dir = ''  # not traced
  config_checks.check_benchmark(tiny_config)


def test_precision_grid_settings_are_checked(tiny_config):
  config_checks.check_benchmark(tiny_config)
  for key, value, match in (('dtypes', ('float32', 'float16'), "'float16' is not a compute"),
                            ('dtypes', (), 'distinct compute dtypes'),
                            ('dtypes', ('bfloat16', 'bfloat16'), 'distinct compute dtypes'),
                            ('batch_sizes', (8, 1), 'must be increasing'),
                            ('batch_sizes', (0, 8), 'integers >= 1'),
                            ('grid_iters', 0, 'grid_iters must be an integer >= 1')):
    config = tiny_config.copy_and_resolve_references()
    with config.unlocked():
      config.benchmark[key] = value
    with pytest.raises(config_checks.ConfigError, match=match):
      config_checks.check_benchmark(config)
  with tiny_config.unlocked():
    tiny_config.benchmark.batch_sizes = ()  # no grid
  config_checks.check_benchmark(tiny_config)


def test_run_benchmark_validates_before_compiling():
  m = tiny_model()
  with pytest.raises(ValueError, match='batch_size=8'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=8, thresholds=[0.1])
  with pytest.raises(ValueError, match='threshold'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=2, thresholds=[-1.0])
  with pytest.raises(ValueError, match='lowering_rounds=-1'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=2, thresholds=[0.1],
                            lowering_rounds=-1)
  with pytest.raises(ValueError, match='thresholds is empty'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=2, thresholds=[])
  with pytest.raises(ValueError, match='bucket sizes'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=3, thresholds=[0.1],
                            bucketed=bucketed())
  with pytest.raises(ValueError, match='compute dtype'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=2, thresholds=[0.1],
                            dtypes=('float16',), batch_sizes=(1,))
  with pytest.raises(ValueError, match='batch sizes >= 1'):
    benchmark.run_benchmark(m, tiny_labels(4), batch_size=2, thresholds=[0.1],
                            batch_sizes=(0,))
