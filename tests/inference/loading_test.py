"""load_model on the tiny job's workdir: artifacts only, no trainer code, no compiles, and the
parents chain (database <- backbone, exits <- backbone + database, predictor <- exits)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import fiancee_jax
from fiancee_jax import artifacts
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.inference import loading
from fiancee_jax.metrics import costs
from fiancee_jax.metrics import latency

# Tests that use the shared `tiny_run` job run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('tiny_run')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Loads the workdir in a fresh process, then generates: prints what it imported and compiled.
_SUBPROCESS = r'''
import json, sys
import jax
jax.config.update('jax_enable_compilation_cache', False)  # a cache hit would hide a compile
import numpy as np
import fiancee_jax
from fiancee_jax.metrics import latency

workdir = sys.argv[1]
with latency.CompileCounter() as load:
  model = fiancee_jax.load_model(workdir)  # no config: config.json
training = sorted(m for m in sys.modules if m.startswith('fiancee_jax.training'))
h, w = model.resolution
labels = np.random.default_rng(0).integers(0, model.task.num_classes, (3, h, w))
with latency.CompileCounter() as first:
  out = fiancee_jax.generate(model, labels, threshold=0.05, seed=1)
with latency.CompileCounter() as again:
  fiancee_jax.generate(model, labels, threshold=0.05, seed=1)
  fiancee_jax.generate(model, labels.copy(), threshold=0.05, seed=1)
print(json.dumps({'load': load.compiles, 'first': first.compiles, 'again': again.compiles,
                  'training': training, 'exit_ids': out['exit_ids'].tolist(),
                  'fingerprints': model.fingerprints}))
'''


@pytest.fixture(scope='module')
def workdir(tiny_run):
  return tiny_run


def _copy_run(wd: str, dst: str) -> str:
  """A workdir with the run's config.json and artifacts only (no training checkpoints)."""
  os.makedirs(dst)
  shutil.copy(os.path.join(wd, 'config.json'), dst)
  shutil.copytree(os.path.join(wd, 'artifacts'), os.path.join(dst, 'artifacts'))
  return dst


def _resave(wd: str, kind: str, change) -> tuple[str, str]:
  """Re-saves artifact `kind` of wd with its arrays changed by `change` (same parents and
  metadata, as another run would write it); returns (old, new) fingerprints."""
  config = workdir_lib.read_config(wd)
  art = artifacts.load(wd, kind)
  tree = jax.tree.map(lambda x: change(np.asarray(x)), art.tree)
  new = artifacts.save(wd, kind, tree, config=config, parents=art.parents,
                       metadata=art.metadata)
  assert new != art.fingerprint
  return art.fingerprint, new


def test_loading_imports_no_trainer_and_compiles_nothing_until_generate(workdir):
  wd, _ = workdir
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, '-c', _SUBPROCESS, wd], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got['training'] == []
  assert got['load'] == 0
  assert got['first'] > 0  # the counter sees compiles: the first generate compiles the routers
  # The routers live on the model: calls that take the same exits and buckets compile nothing
  # new (an exit first taken by another input or threshold compiles once, lazily).
  assert got['again'] == 0
  assert len(got['exit_ids']) == 3
  assert set(got['fingerprints']) == {'backbone', 'database', 'exits', 'predictor'}
  # The per-model routers die with the model: nothing is printed at interpreter exit.
  assert 'NoneType' not in proc.stderr and 'Exception ignored' not in proc.stderr


def test_load_model_without_config_reads_config_json(workdir):
  wd, config = workdir
  model = loading.load_model(wd)
  given = loading.load_model(wd, config)
  assert model.fingerprints == given.fingerprints
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(given.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert workdir_lib.read_config(wd).to_dict() == json.loads(config.to_json_best_effort())
  assert model.distance == config.distance.name and model.exit_model.guided
  assert model.fingerprints['exits'] == artifacts.read_manifest(wd, 'exits')['fingerprint']


def test_costs_are_computed_on_first_use_and_kept_on_the_model(workdir):
  wd, config = workdir
  with latency.CompileCounter() as load:
    model = loading.load_model(wd, config)
  assert load.compiles == 0
  exit_gflops = model.exit_gflops  # compiles every exit path (once per process in stats)
  assert exit_gflops == tuple(c['gflops'] for c in costs.exit_stats(config, guided=True))
  assert model.predictor_gflops == costs.predictor_stats(config)['gflops']
  with latency.CompileCounter() as again:
    assert model.exit_gflops == exit_gflops and model.backbone_gflops == exit_gflops[-1]
  assert again.compiles == 0


def test_unguided_variant_and_unknown_variant(workdir):
  wd, config = workdir
  unguided = loading.load_model(wd, config, variant='unguided')
  assert not unguided.exit_model.guided and unguided.params['database'] is None
  assert unguided.fingerprints == loading.load_model(wd, config).fingerprints
  with pytest.raises(ValueError, match="variant 'other' was not trained"):
    loading.load_model(wd, config, variant='other')


def test_missing_or_damaged_config_json_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json does not exist.*not a fiancee-jax '
                     'workdir'):
    fiancee_jax.load_model(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"data": {"name": ')
  with pytest.raises(ValueError, match='config.json is not valid JSON.*truncated'):
    fiancee_jax.load_model(str(tmp_path))


def test_missing_artifact_names_the_stage(workdir, tmp_path):
  wd, _ = workdir
  dst = _copy_run(wd, str(tmp_path / 'run'))
  shutil.rmtree(artifacts.path(dst, 'predictor'))
  with pytest.raises(artifacts.ArtifactError, match='no predictor artifact.*--stages=predictor'):
    loading.load_model(dst)


@pytest.mark.parametrize('kind, child', [('backbone', 'database'), ('database', 'exits'),
                                         ('exits', 'predictor')])
def test_artifact_of_another_run_is_refused_with_both_fingerprints(workdir, tmp_path, kind,
                                                                   child):
  wd, _ = workdir
  dst = _copy_run(wd, str(tmp_path / 'run'))
  # `kind` replaced by another run's: `child`, built from the original, no longer belongs.
  old, new = _resave(dst, kind, lambda x: x + np.asarray(0.5, x.dtype))
  with pytest.raises(artifacts.ArtifactError) as e:
    loading.load_model(dst)
  msg = str(e.value)
  assert f'{child} artifact' in msg and 'another run' in msg
  assert old[:12] in msg and new[:12] in msg


def test_predictor_with_the_same_shapes_from_another_run_is_refused(workdir, tmp_path):
  wd, _ = workdir
  dst = _copy_run(wd, str(tmp_path / 'run'))
  art = artifacts.load(dst, 'predictor')
  artifacts.save(dst, 'predictor', art.tree, config=workdir_lib.read_config(dst),
                 parents={'exits': 'f' * 64}, metadata=art.metadata)
  exits_fp = artifacts.read_manifest(dst, 'exits')['fingerprint']
  with pytest.raises(artifacts.ArtifactError, match=f'predictor artifact .* built from exits '
                     f'ffffffffffff but this workdir.s exits is {exits_fp[:12]}'):
    loading.load_model(dst)


def test_artifacts_of_another_config_are_refused(workdir):
  wd, config = workdir
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.predictor.width = config.predictor.width + 1
  with pytest.raises(artifacts.ArtifactError, match='predictor artifact .* another config '
                     r'\(config.predictor is'):
    loading.load_model(wd, other)
