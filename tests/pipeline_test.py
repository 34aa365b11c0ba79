"""The whole job on the tiny config: every stage, the workdir contract, report/bench keys."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from fiancee_jax import artifacts
from fiancee_jax import config_checks
from fiancee_jax import metric_logging
from fiancee_jax import pipeline
from fiancee_jax.data import sources
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io
from tests.evaluation import report_test

# Tests that use the shared `tiny_run` job run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('tiny_run')


@pytest.fixture(scope='module')
def workdir(tiny_run):
  return tiny_run


def test_workdir_contract(workdir):
  wd, _ = workdir
  for name in ('config.json', 'metrics.jsonl', 't_star.json', 'seeds/0/report/report.json',
               'report/report.json', 'report/bench.json',
               'report/bench.md', 'report/distance_vs_gflops.png', 'report/exit_histogram.png',
               'report/predicted_vs_true.png', 'report/samples.png'):
    assert os.path.exists(os.path.join(wd, name)), name
  for stage in ('backbone', 'exits', 'predictor'):
    assert os.path.isdir(os.path.join(wd, 'checkpoints', stage)), stage
  for kind in artifacts.KINDS:
    assert artifacts.exists(wd, kind), kind
  # t* is fixed after the backbone stage, before any exit is trained.
  fixed = os.path.getmtime(os.path.join(wd, 't_star.json'))
  assert artifacts.read_manifest(wd, 'backbone') and fixed < os.path.getmtime(
      artifacts.path(wd, 'exits')) and fixed < os.path.getmtime(artifacts.path(wd, 'database'))
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
  assert set(r) >= report_test.TOP_KEYS  # DESIGN.md section 3
  assert r['distance'] == 'lpips-alex'
  assert r['num_eval'] == 32 and r['resolution'] == [16, 16]
  assert set(r['backbone']) >= {'gflops', 'params', 'broadcast_z_share'}
  assert len(r['exits']) == 2
  for e in r['exits']:
    assert set(e) >= report_test.EXIT_KEYS
    assert 0 < e['gflops'] < r['backbone']['gflops']
    assert np.isfinite(e['mean_distance']) and np.isfinite(e['mean_distance_no_guidance'])
    assert 0 <= e['mean_distance_msssim'] <= 1
    lo, hi = e['guidance_gain']['ci95']
    assert lo <= e['guidance_gain']['mean'] <= hi
  # t* was measured on the validation split and recorded before the report used it.
  with open(os.path.join(wd, 't_star.json')) as f:
    assert json.load(f) == r['t_star']
  assert r['t_star']['value'] > 0 and r['t_star']['num_samples'] == config.data.num_validation
  assert set(r['at_t_star']) >= report_test.POINT_KEYS
  assert r['at_t_star']['threshold'] == pytest.approx(r['t_star']['value'])
  assert r['at_lpips_0.1']['threshold'] == pytest.approx(0.1)
  assert set(r['distance_anchors']) == {'blur_sigma1', 'shift_1px', 'noise_sigma0.03',
                                        'another_z', 'z_average_2'}
  assert r['distance_anchors']['blur_sigma1'] > 0
  assert 'headline' not in r
  assert set(r['predictor']) >= {'gflops', 'mae', 'spearman'}
  assert set(r['database']) >= {'entries', 'bytes', 'lookup_gflops'}
  assert r['database']['entries'] == config.database.num_entries
  for row in r['routing']:
    assert set(row) >= report_test.ROW_KEYS
    assert sum(row['exit_histogram']) == 32
    assert 0.0 <= row['met_fraction'] <= 1.0
    assert row['saved_fraction'] <= 1.0
  c = r['calibration']
  assert c['method'] == 'risk_control' and c['margins'] is None
  # The stored calibration gives each threshold its margin (one per early exit).
  from fiancee_jax.training import predictor as predictor_training  # pylint: disable=g-import-not-at-top
  rc = predictor_training.load_predictor(config, wd)[1]['risk_control']
  assert len(c['margins_per_threshold']) == len(r['routing'])
  for row, m in zip(r['routing'], c['margins_per_threshold']):
    expect = rc.margins(row['threshold'])
    assert [None if not np.isfinite(x) else pytest.approx(float(x)) for x in expect] == m


def test_bench_schema(workdir):
  wd, config = workdir
  with open(os.path.join(wd, 'report', 'bench.json')) as f:
    b = json.load(f)
  text = json.dumps(b)
  for key in ('matmul', 'switch', 'vmap'):
    assert key in text, key
  with open(os.path.join(wd, 't_star.json')) as f:
    t_star = json.load(f)['value']
  # The benchmark routes at t* and the paper's LPIPS 0.1, nothing picked from the results.
  assert sorted(r['threshold'] for r in b['routing']) == pytest.approx(sorted([t_star, 0.1]))
  # Device, kernels as configured and resolved, and the precision grid as configured.
  dev = jax.devices()[0]
  assert (b['device']['device_kind'], b['device']['platform']) == (dev.device_kind, dev.platform)
  assert b['kernels']['config'] == dict(config.kernels)
  assert b['kernels']['platform'] == jax.default_backend()
  assert b['kernels']['model']['conv'] == factory.kernels(config)['conv']
  grid = b['precision']
  assert grid['dtypes'] == list(config.benchmark.dtypes) == ['float32', 'bfloat16']
  assert grid['batch_sizes'] == list(config.benchmark.batch_sizes) and not grid['skipped']
  assert sorted((r['dtype'], r['batch'], r['exit']) for r in grid['rows']) == sorted(
      (d, n, k) for d in grid['dtypes'] for n in grid['batch_sizes']
      for k in range(b['num_exits']))
  with open(os.path.join(wd, 'report', 'bench.md')) as f:
    assert '## Precision: every exit in float32, bfloat16' in f.read()


def test_artifacts_name_the_artifacts_they_were_built_from(workdir):
  wd, config = workdir
  arts = artifact_io.load_lineage(config, wd, upto='predictor')
  assert arts['backbone'].parents == {} and arts['backbone'].metadata == {'steps': 4}
  assert arts['database'].parents == {'backbone': arts['backbone'].fingerprint}
  assert arts['exits'].parents == {'backbone': arts['backbone'].fingerprint,
                                   'database': arts['database'].fingerprint}
  assert arts['exits'].metadata == {'steps': 4, 'variants': ['guided', 'unguided']}
  assert arts['predictor'].parents == {'exits': arts['exits'].fingerprint}
  assert set(arts['predictor'].metadata) == {'margins', 'calibration', 'risk_control',
                                             'distance'}
  # Params only: no optimizer state, no discriminator, no PRNG key.
  assert set(arts['backbone'].tree) == {'params', 'batch_stats'}
  assert set(arts['exits'].tree) == {'guided', 'unguided'}


def test_rerun_resumes_every_stage_without_retraining(workdir, tmp_path):
  wd, config = workdir
  before = os.path.getmtime(os.path.join(wd, 'report', 'report.json'))
  fingerprints = {k: artifacts.read_manifest(wd, k)['fingerprint'] for k in artifacts.KINDS}
  lines = len(metric_logging.read_metrics(wd))
  # A finished stage whose artifact is missing exports it again from its checkpoint.
  shutil.move(artifacts.path(wd, 'exits'), str(tmp_path / 'exits'))
  results = pipeline.run(config, wd, 'backbone,database,exits,predictor')
  assert {k: results[k].fingerprint for k in artifacts.KINDS} == fingerprints
  assert results['backbone'].metadata['steps'] == config.train.num_steps
  assert results['exits'].metadata['steps'] == config.exits.num_steps
  assert len(metric_logging.read_metrics(wd)) == lines  # not a step was taken
  assert os.path.getmtime(os.path.join(wd, 'report', 'report.json')) == before


@pytest.mark.slow
def test_seeds_repeat_the_seeded_stages_on_one_backbone(workdir, tmp_path):
  wd, config = workdir
  new = str(tmp_path / 'seeds')
  # The first seed is tiny_run's own (its artifacts are found, not retrained).
  shutil.copytree(os.path.join(wd, 'artifacts'), os.path.join(new, 'artifacts'))
  shutil.copyfile(os.path.join(wd, 't_star.json'), os.path.join(new, 't_star.json'))
  # Seed 0's measured distances too (keyed by its exits' fingerprint): not measured again.
  shutil.copytree(os.path.join(wd, 'cache'), os.path.join(new, 'cache'))
  two = config.copy_and_resolve_references()
  with two.unlocked():
    two.evaluate.seeds = 2
  pipeline.run(two, new, 'database,exits,predictor,evaluate')
  fp = {s: {k: artifacts.read_manifest(d, k)['fingerprint'] for k in artifacts.KINDS}
        for s, d in ((0, new), (1, os.path.join(new, 'seeds', '1')))}
  assert fp[0]['backbone'] == fp[1]['backbone']  # one backbone ...
  for kind in ('database', 'exits', 'predictor'):  # ... and per-seed everything else
    assert fp[0][kind] != fp[1][kind], kind
  assert fp[0] == {k: artifacts.read_manifest(wd, k)['fingerprint'] for k in artifacts.KINDS}
  with open(os.path.join(new, 'seeds', '1', 'config.json')) as f:
    assert json.load(f)['seed'] == 1
  with open(os.path.join(new, 't_star.json')) as f, \
      open(os.path.join(new, 'seeds', '1', 't_star.json')) as g:
    assert json.load(f) == json.load(g)  # t* is shared, fixed before the exits
  per_seed = []
  for s in (0, 1):
    with open(os.path.join(new, 'seeds', str(s), 'report', 'report.json')) as f:
      per_seed.append(json.load(f))
  with open(os.path.join(new, 'report', 'report.json')) as f:
    agg = json.load(f)
  assert agg['seeds'] == [0, 1] and agg['num_seeds'] == 2
  assert [r['seeds'] for r in per_seed] == [[0], [1]]
  values = [r['exits'][0]['mean_distance'] for r in per_seed]
  assert agg['exits'][0]['mean_distance'] == pytest.approx(np.mean(values))
  entry = agg['seed_intervals']['exits/0/mean_distance']
  assert entry['values'] == pytest.approx(values)
  lo, hi = entry['ci95']
  assert lo < np.mean(values) < hi
  assert agg['t_star'] == per_seed[0]['t_star'] == per_seed[1]['t_star']
  # Every seed is evaluated on the same test inputs, so the anchors are measured once.
  assert agg['distance_anchors'] == per_seed[0]['distance_anchors'] == per_seed[1][
      'distance_anchors']
  for name in ('distance_vs_gflops.png', 'samples.png'):
    assert os.path.exists(os.path.join(new, 'report', name)), name


def test_workdir_with_another_config_is_refused(workdir):
  wd, config = workdir
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.backbone.ch = 3
  with pytest.raises(ValueError, match=r"different config.*\['backbone'\]"):
    pipeline.run(other, wd, 'backbone')


def test_workdir_accepts_another_benchmark_section(workdir):
  wd, config = workdir
  path = os.path.join(wd, 'config.json')
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.benchmark.switch_rounds = config.benchmark.switch_rounds + 1
  config_checks.write_config(other, wd)
  with open(path) as f:
    assert json.load(f)['benchmark']['switch_rounds'] == config.benchmark.switch_rounds + 1
  config_checks.write_config(config, wd)  # back, so later tests see the fixture's config
  with open(path) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())


def test_generate_routes_by_threshold(workdir):
  import fiancee_jax  # pylint: disable=g-import-not-at-top
  wd, config = workdir
  model = fiancee_jax.load_model(wd, config)
  labels = sources.load_data(config, 'test', 6)[0]
  strict = fiancee_jax.generate(model, labels, threshold=0.0, seed=1)
  assert strict['images'].shape == (6, 16, 16, 3)
  # Each sample takes the cheapest exit whose prediction plus this threshold's margin fits.
  inputs = model.make_inputs(labels, jax.random.key(1))
  pred = np.asarray(jax.jit(model.predict_fn())(model.predictor_params, *inputs))
  ok = pred + model.margins_at(0.0)[None] <= 0.0
  np.testing.assert_array_equal(strict['exit_ids'],
                                np.where(ok.any(1), ok.argmax(1), model.num_exits - 1))
  loose = fiancee_jax.generate(model, labels, threshold=1e6, seed=1)
  if np.isfinite(model.margins_at(1e6)[0]):  # nothing misses 1e6: every sample exits first
    assert np.all(loose['exit_ids'] == 0)
    assert loose['saved_fraction'] > 0
  np.testing.assert_allclose(
      loose['gflops'], np.asarray(model.exit_gflops)[loose['exit_ids']] + model.predictor_gflops,
      rtol=1e-6)
  # Same seed, same routing decisions and images.
  again = fiancee_jax.generate(model, labels, threshold=1e6, seed=1)
  np.testing.assert_array_equal(again['exit_ids'], loose['exit_ids'])
  np.testing.assert_allclose(again['images'], loose['images'], atol=1e-6)
  with pytest.raises(ValueError, match='class id 99'):
    fiancee_jax.generate(model, np.full((1, 16, 16), 99), threshold=0.1)
  with pytest.raises(ValueError, match='finite non-negative'):
    fiancee_jax.generate(model, labels, threshold=-1)


def test_predictor_and_database_of_another_model_are_refused(workdir):
  wd, config = workdir
  backbone = artifact_io.load_backbone(config, wd)
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.database.key_dim = 3
  with pytest.raises(artifacts.ArtifactError, match='config.database is .*key_dim'):
    artifact_io.load_database(other, wd, backbone)
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.predictor.width = 5
  from fiancee_jax.training import predictor as predictor_training  # pylint: disable=g-import-not-at-top
  with pytest.raises(artifacts.ArtifactError, match='built with another config'):
    predictor_training.load_predictor(other, wd)
  # An exits artifact is refused beside a database it was not built from.
  database = artifact_io.load_database(config, wd, backbone)
  with pytest.raises(artifacts.ArtifactError, match="this workdir's database is 222222222222"):
    artifact_io.load_exits(config, wd, backbone, database._replace(fingerprint='2' * 64))


def test_results_markdown_renders_from_the_run(workdir):
  from fiancee_jax.evaluation import results_md  # pylint: disable=g-import-not-at-top
  wd, _ = workdir
  md = results_md.render(wd, None)
  assert '| exit | attach after block |' in md and 'vmap of a per-sample switch' in md
  assert 'interleaved rounds, 95 % interval' in md
  assert 'Wall time per stage' in md


@pytest.mark.cpu_only
def test_results_markdown_has_the_kernel_ab(workdir):
  # On the CPU config.kernels 'auto' is not plain XLA, so the tiny job times the two apart.
  from fiancee_jax.evaluation import results_md  # pylint: disable=g-import-not-at-top
  md = results_md.render(workdir[0], None)
  assert 'Kernels (`ops/kernels.py`)' in md and 'efficiency vs backbone' in md
