"""Residual guidance end to end: the database of exit residuals, built after the exits."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax import artifacts
from fiancee_jax import config_checks
from fiancee_jax import pipeline
from fiancee_jax.inference import loading
from fiancee_jax.training import artifact_io

# It starts from the shared `tiny_run` job's backbone: on that job's xdist worker.
pytestmark = pytest.mark.xdist_group('tiny_run')


def _residual_config(data_dir):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
    config.database.update(value_type='residual', blend='mean')
  return config


@pytest.fixture(scope='module')
def residual_run(tmp_path_factory, tiny_run):
  """(workdir, config): the tiny job with residual guidance, on the tiny job's backbone."""
  src, base = tiny_run
  config = _residual_config(base.data.data_dir)
  wd = str(tmp_path_factory.mktemp('residual_run'))
  shutil.copytree(os.path.join(src, 'artifacts', 'backbone'),
                  os.path.join(wd, 'artifacts', 'backbone'))
  shutil.copy(os.path.join(src, 't_star.json'), wd)
  pipeline.run(config, wd, 'backbone,database,exits,predictor,evaluate')
  with open(os.path.join(wd, 'timings.jsonl')) as f:
    order = [json.loads(line)['stage'] for line in f]
  assert order == ['backbone', 'exits', 'database', 'predictor', 'evaluate']
  return wd, config


def test_the_database_is_built_from_the_exits_and_the_predictor_from_both(residual_run):
  wd, config = residual_run
  exits = artifacts.read_manifest(wd, 'exits')
  database = artifacts.read_manifest(wd, 'database')
  predictor = artifacts.read_manifest(wd, 'predictor')
  assert set(exits['parents']) == {'backbone'}
  assert database['parents']['exits'] == exits['fingerprint']
  assert predictor['parents'] == {'exits': exits['fingerprint'],
                                  'database': database['fingerprint']}
  # One branch set is trained; both variants load from it.
  arts = artifact_io.load_lineage(config, wd, upto='predictor')
  assert set(arts['exits'].tree) == {'unguided'}
  assert arts['database'].tree['values'].shape[1] == 4 * 4 * 3 * len(config.exits.attach_after)


def test_guided_exits_are_the_unguided_ones_plus_the_retrieved_residual(residual_run):
  wd, config = residual_run
  guided = loading.load_model(wd, config)
  plain = loading.load_model(wd, config, variant='unguided')
  assert guided.exit_model.guided and not plain.exit_model.guided
  labels = jax.random.randint(jax.random.key(0), (4, 16, 16), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(1), (4, config.backbone.z_dim))
  em = guided.exit_model
  outs, _, _, guide = em.backbone_pass(guided.params, labels, z)
  for k in range(len(em.attach_after)):
    a = np.asarray(jax.jit(em.exit_path(k))(guided.params, labels, z))
    b = np.asarray(jax.jit(plain.exit_model.exit_path(k))(plain.params, labels, z))
    np.testing.assert_allclose(a, np.clip(b + np.asarray(guide[..., 3 * k:3 * k + 3]), -1, 1),
                               atol=1e-5)
  # The report compares the two on the same test inputs; the residuals of the training
  # inputs bring the test images of these barely trained exits closer to the backbone.
  with open(os.path.join(wd, 'report', 'report.json')) as f:
    report = json.load(f)
  for e in report['exits'][:-1]:
    assert e['mean_distance'] < e['mean_distance_no_guidance']
    assert e['gflops'] > e['gflops_no_guidance']


def test_a_residual_database_of_other_exits_is_refused(residual_run):
  wd, config = residual_run
  arts = artifact_io.load_lineage(config, wd, upto='exits')
  other = arts['exits']._replace(fingerprint='3' * 64)
  with pytest.raises(artifacts.ArtifactError, match='333333333333'):
    artifact_io.load_database(config, wd, arts['backbone'], other)


def test_the_database_stage_before_any_exits_names_the_exits_stage(residual_run, tmp_path):
  src, config = residual_run
  wd = str(tmp_path / 'fresh')
  shutil.copytree(os.path.join(src, 'artifacts', 'backbone'),
                  os.path.join(wd, 'artifacts', 'backbone'))
  shutil.copy(os.path.join(src, 't_star.json'), wd)
  with pytest.raises(artifacts.ArtifactError, match='no exits artifact.*--stages=exits'):
    pipeline.run(config, wd, 'database')
  assert not artifacts.exists(wd, 'database')


def test_bad_guidance_settings_are_refused(data_dir):
  for key, value in (('value_type', 'features'), ('blend', 'max')):
    config = _residual_config(data_dir)
    with config.unlocked():
      config.database[key] = value
    with pytest.raises(config_checks.ConfigError, match=f'config.database.{key}'):
      config_checks.check_config(config)


def test_residual_exits_export_and_round_trip_to_identical_outputs(residual_run, tmp_path):
  from fiancee_jax import export  # pylint: disable=g-import-not-at-top
  wd, config = residual_run
  model = loading.load_model(wd, config)
  out = str(tmp_path / 'exported')
  export.export_model(model, out, buckets=(2,), thresholds=(0.1,))
  loaded = export.load(out)
  export.check_model(loaded.manifest, model)
  labels = np.random.default_rng(0).integers(0, config.data.num_classes, (2, 16, 16), np.int32)
  inputs = tuple(np.asarray(x) for x in model.make_inputs(labels, jax.random.key(0)))
  for k, path in enumerate(model.paths()):
    np.testing.assert_array_equal(np.asarray(loaded.exits[(k, 2)](*inputs)),
                                  np.asarray(jax.jit(path)(model.params, *inputs)))


def test_the_benchmark_times_the_residual_add_as_its_own_part(residual_run):
  from fiancee_jax.evaluation import benchmark  # pylint: disable=g-import-not-at-top
  from fiancee_jax.metrics import flops  # pylint: disable=g-import-not-at-top
  wd, config = residual_run
  model = loading.load_model(wd, config)
  labels = np.random.default_rng(0).integers(0, config.data.num_classes, (2, 16, 16), np.int32)
  inputs = jax.device_put(tuple(model.make_inputs(labels, jax.random.key(0))))
  parts = benchmark.exit_parts(model, inputs, warmup=0, iters=1)
  for k, x in enumerate(parts[:-1]):
    assert [p['part'] for p in x['parts']] == ['prefix', 'lookup', 'branch', 'residual']
    # The parts are the exit's ops: their FLOPs add up to the whole path's.
    whole = flops.gflops(model.exit_model.exit_path(k), model.params, *inputs)
    assert sum(p['gflops'] for p in x['parts']) == pytest.approx(whole, rel=0.05)
