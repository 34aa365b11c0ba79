"""What a careless or hostile user can do to the pipeline: every case a clear error before
compute, or the exact right result.

Cases: bad settings of every stage (refused before any stage runs and before config.json is
written, by `pipeline.run` and `python -m fiancee_jax.stats` alike), empty --stages, bad
workdirs, a config.json that must not lock a workdir after a failed run, damaged checkpoints,
artifacts and caches, artifacts of another run, bad inputs for device arrays as for NumPy ones,
thresholds and seeds of the wrong type, nothing printed at interpreter exit; then a same-seed
rerun of the whole tiny job from damaged backbone checkpoints (allow_restart), with the exits
stage killed (SIGKILL) between two checkpoints and the predictor stage preempted (SIGTERM),
each resumed in a new process, compared bit for bit with the session's `tiny_run`.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import config_checks
from fiancee_jax import model as model_lib
from fiancee_jax import pipeline
from fiancee_jax import stats
from fiancee_jax import tasks
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import report
from fiancee_jax.inference import generate as generate_lib
from fiancee_jax.inference import loading
from fiancee_jax.metrics import costs
from fiancee_jax.metrics import exit_distances
from fiancee_jax.models import factory
from fiancee_jax.routing import router as router_lib
from fiancee_jax.training import predictor as predictor_training

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

# Tests that read the shared `tiny_run` job run on its xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('tiny_run')


def _variant(config, **overrides):
  """A copy of `config` with `section__key=value` (or top-level `key=value`) overrides."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      if '__' in key:
        section, name = key.split('__')
        config[section][name] = value
      else:
        config[key] = value
  return config


def _subprocess_env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')


# -- Settings: refused before any stage, before config.json. --


@pytest.mark.parametrize('key, value, match', [
    # A negative step count ended the exits stage "finished" at step 0.
    ('exits__num_steps', -5, r'config.exits.num_steps must be an integer >= 1, got -5'),
    ('exits__attach_after', (1, 9), r'attach_after=\(1, 9\) must be block indices in \[0, 2\]'),
    ('exits__attach_after', (2, 1), r'attach_after=\(2, 1\) must be strictly increasing'),
    ('exits__attach_after', (), r'attach_after must be a tuple of integers >= 0, got \(\)'),
    ('database__key_block', 3, r'key_block=3 must be <= the earliest attach point 1'),
    ('database__key_block', 4, r'key_block=4 is not a block index \(0..3\)'),
    ('exits__batch_size', 0, r'config.exits.batch_size must be an integer >= 1, got 0'),
    ('predictor__num_steps', 0, r'config.predictor.num_steps must be an integer >= 1, got 0'),
    ('database__num_entries', 0, r'config.database.num_entries must be an integer >= 1, got 0'),
    ('database__num_entries', 2, r'num_entries=2 must be >= config.database.top_k=4'),
    ('database__num_entries', 200, r'num_entries=200 exceeds the 128 patches of its 8 images'),
    ('database__key_dim', 9, r'key_dim=9 exceeds the 8 channels of block 1'),
    ('database__grid', (16, 16), r'grid=\(16, 16\) must divide block 1 features 8x8'),
    ('exits__checkpoint_every', 0, r'config.exits.checkpoint_every must be an integer >= 1'),
    ('predictor__members', 0, r'config.predictor.members must be an integer >= 1, got 0'),
    ('predictor__pool', 3, r'config.predictor.pool=3 must divide the resolution 16x16'),
    ('train__lr_g', float('nan'), r'config.train.lr_g must be a finite number > 0, got nan'),
    ('router__thresholds', ('0.2',), r"thresholds=\('0.2',\): threshold must be a finite "
                                     r"non-negative number .* got '0.2' \(str\)"),
    ('router__thresholds', (True,), r'thresholds=\(True,\): threshold must be a finite '
                                    r'non-negative number .* got True \(bool\)'),
    ('benchmark__batch_size', 64, r'batch_size=64 exceeds the 32 test inputs'),
    ('seed', True, r'config.seed must be an integer \(e.g. 0'),
    ('data__seed', None, r'config.data.seed must be an integer \(e.g. 0'),
    ('data__workers', -1, r'config.data.workers must be an integer >= 0, got -1'),
    ('data__name', 'landscape', r"config.data.name='landscape' is not a known dataset; use one "
                                r"of 'ade20k', 'avatars', 'cityscapes', 'landscapes'"),
    ('checkpoint__allow_restart', None, r'config.checkpoint.allow_restart must be True or False'),
])
def test_bad_setting_is_refused_before_any_stage(tiny_config, tmp_path, key, value, match):
  config = _variant(tiny_config, **{key: value})
  with pytest.raises(config_checks.ConfigError, match=match):
    pipeline.run(config, str(tmp_path / 'wd'), 'backbone')
  assert not os.path.exists(tmp_path / 'wd')  # no config.json, nothing at all
  with pytest.raises(config_checks.ConfigError, match=match):
    costs.compute_stats(config)  # python -m fiancee_jax.stats runs the same checks


def test_batch_sizes_must_divide_the_devices(tiny_config):
  config = _variant(tiny_config, exits__batch_size=6)
  config_checks.check_devices(config, 2)
  with pytest.raises(config_checks.ConfigError,
                     match=r'config.exits.batch_size=6 is not divisible by the 4 devices'):
    config_checks.check_devices(config, 4)


@pytest.mark.parametrize('stages', ['', ',', ' , '])
def test_empty_stages_are_refused(tiny_config, tmp_path, stages):
  with pytest.raises(config_checks.ConfigError, match=f'--stages={stages!r} names no stage'):
    pipeline.run(tiny_config, str(tmp_path), stages)
  assert not os.listdir(tmp_path)  # no config.json


def test_stats_cli_refuses_extra_arguments():
  with pytest.raises(app.UsageError, match=r"unexpected arguments \['extra_positional'\]: this "
                                           'command takes only flags'):
    stats.main(['stats', 'extra_positional'])


# -- The workdir. --


def test_empty_workdir_is_refused(tiny_config):
  with pytest.raises(config_checks.ConfigError, match=r"--workdir='' is empty; pass the "):
    pipeline.run(tiny_config, '', 'backbone')


def test_workdir_that_is_a_file(tiny_config, tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(config_checks.ConfigError, match='is a file, not a directory'):
    pipeline.run(tiny_config, str(path), 'backbone')
  assert path.read_text() == 'x'
  (tmp_path / 'wd').mkdir()
  (tmp_path / 'wd' / 'checkpoints').write_text('x')
  with pytest.raises(config_checks.ConfigError, match='checkpoints is a file where'):
    pipeline.run(tiny_config, str(tmp_path / 'wd'), 'backbone')


def _read_only_dir(tmp_path):
  """A directory this process cannot write (root ignores permissions: a sysfs one then)."""
  path = tmp_path / 'ro'
  path.mkdir()
  path.chmod(0o555)
  try:
    (path / 'probe').write_text('x')
  except OSError:
    return str(path)
  (path / 'probe').unlink()
  for candidate in ('/sys/kernel', '/sys'):
    try:
      with open(os.path.join(candidate, 'probe'), 'w'):
        pass
    except OSError:
      return candidate
  pytest.skip('no read-only directory available')


def test_read_only_workdir_is_refused_before_compute(tiny_config, tmp_path, monkeypatch):
  ro = _read_only_dir(tmp_path)

  def evaluate(*args, **kwargs):
    raise AssertionError('the evaluate stage ran on a read-only workdir')

  monkeypatch.setattr(report, 'evaluate', evaluate)
  with pytest.raises(config_checks.ConfigError, match=f'{ro} is not writable'):
    pipeline.run(tiny_config, ro, 'evaluate')


# -- config.json: binding once a checkpoint exists, never locked by a failed run. --


def _fake_checkpoint(workdir, step=2):
  with checkpoint.Checkpointer(workdir_lib.checkpoints(workdir, 'backbone')) as ckpt:
    ckpt.save(step, {'x': np.ones(3, np.float32)}, force=True)


def test_truncated_config_json(tiny_config, tmp_path):
  wd = str(tmp_path)
  path = workdir_lib.config_path(wd)
  text = tiny_config.to_json_best_effort()
  (tmp_path / 'config.json').write_text(text[:40])
  config_checks.write_config(tiny_config, wd)  # nothing made under it: replaced
  with open(path) as f:
    assert json.load(f) == json.loads(text)
  _fake_checkpoint(wd)
  (tmp_path / 'config.json').write_text(text[:40])
  with pytest.raises(config_checks.ConfigError,
                     match=f'{path} is unreadable .* restore it from a copy'):
    config_checks.write_config(tiny_config, wd)
  # Readers name the file too (load_model without a config reads it).
  with pytest.raises(ValueError, match=f'{path} is not valid JSON .* it may be truncated'):
    workdir_lib.read_config(wd)


def test_another_config_is_accepted_until_a_checkpoint_binds_the_workdir(tiny_config, tmp_path):
  wd = str(tmp_path)
  a, b = tiny_config, _variant(tiny_config, backbone__ch=4)
  config_checks.write_config(a, wd)
  config_checks.write_config(b, wd)  # no checkpoint yet: a failed run locks nothing
  _fake_checkpoint(wd)
  with pytest.raises(config_checks.ConfigError, match=r"different config .*\['backbone'\]"):
    config_checks.write_config(a, wd)
  config_checks.write_config(_variant(b, checkpoint__allow_restart=True), wd)  # replaceable


def test_a_workdir_from_before_added_keys_resumes_at_their_defaults(tiny_config, tmp_path):
  wd = str(tmp_path)
  old = json.loads(tiny_config.to_json_best_effort())
  for (section, key) in config_checks.ADDED_KEYS:
    del old[section][key]
  (tmp_path / 'config.json').write_text(json.dumps(old))
  _fake_checkpoint(wd)
  config_checks.write_config(tiny_config, wd)  # the defaults reproduce what it did
  with pytest.raises(config_checks.ConfigError, match=r"different config .*\['train'\]"):
    config_checks.write_config(_variant(tiny_config, train__dtype='bfloat16'), wd)


def _copy_checkpoints(src, dst, *stages):
  for stage in stages:
    shutil.copytree(workdir_lib.checkpoints(src, stage), workdir_lib.checkpoints(dst, stage))


def test_failed_run_does_not_lock_the_workdir(tiny_run, tmp_path):
  """A workdir without config.json: a run with the wrong widths writes config.json, fails on
  the checkpoint's shapes, and the right config is still accepted afterwards."""
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_checkpoints(ref, wd, 'backbone')
  shutil.copy(os.path.join(ref, 't_star.json'), wd)
  with pytest.raises(checkpoint.CheckpointError, match='does not match the model'):
    pipeline.run(_variant(config, backbone__ch=4), wd, 'backbone')
  results = pipeline.run(config, wd, 'backbone')
  assert results['backbone'].fingerprint == artifacts.read_manifest(ref, 'backbone')[
      'fingerprint']
  assert workdir_lib.read_config(wd).backbone.ch == config.backbone.ch


# -- Damaged checkpoints, artifacts and caches. --


def _final(workdir, stage):
  """(tree, metadata) of a stage's newest checkpoint step, as NumPy."""
  directory = workdir_lib.checkpoints(workdir, stage)
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  return checkpoint.load_pytree(os.path.join(directory, str(step)))


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert leaves_a
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(getattr(x, 'dtype', np.float32), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(root):
  files = [os.path.join(r, n) for r, _, ns in os.walk(root) for n in ns
           if n != checkpoint._MANIFEST]
  return max(files, key=os.path.getsize)


def _damage(root, mode):
  """Damages a checkpoint directory: 'truncate' or 'garbage' (same size: only the checksum
  can tell) its largest file, 'no_manifest' removes its file list, and 'no_manifest+X' both."""
  if mode.startswith('no_manifest'):
    os.remove(os.path.join(root, checkpoint._MANIFEST))
    mode = mode[len('no_manifest+'):]
  if not mode:
    return
  path = _largest_file(root)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    if mode == 'truncate':
      f.truncate(size // 2)
    else:
      f.write(os.urandom(size))


@pytest.mark.parametrize('mode', ['truncate', 'garbage', 'no_manifest', 'no_manifest+truncate',
                                  'no_manifest+garbage'])
def test_damaged_backbone_checkpoint_is_refused_whatever_the_damage(tiny_run, tmp_path, mode):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_checkpoints(ref, wd, 'backbone')
  ckpts = workdir_lib.checkpoints(wd, 'backbone')
  _damage(os.path.join(ckpts, '4'), mode)
  with pytest.raises(checkpoint.CheckpointError) as e:
    pipeline.run(config, wd, 'backbone')
  message = str(e.value)
  assert f'checkpoint {ckpts}/4 is corrupt' in message
  assert f'delete {ckpts}/4 and rerun (the stage then resumes from step 2)' in message
  assert '--config.checkpoint.allow_restart=True' in message
  assert sorted(os.listdir(ckpts)) == ['2', '4']  # nothing overwritten, nothing trained
  assert not artifacts.exists(wd, 'backbone')


def test_every_backbone_checkpoint_truncated_is_refused(tiny_run, tmp_path):
  """The rerun fixture below then resumes such a workdir with allow_restart."""
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_checkpoints(ref, wd, 'backbone')
  ckpts = workdir_lib.checkpoints(wd, 'backbone')
  for step in ('2', '4'):
    _damage(os.path.join(ckpts, step), 'truncate')
  sizes = {p: os.path.getsize(p) for p in (_largest_file(os.path.join(ckpts, s))
                                           for s in ('2', '4'))}
  with pytest.raises(checkpoint.CheckpointError,
                     match=f'delete {ckpts}/4 and the damaged older steps {ckpts}/2 and rerun '
                           r'\(no intact step is left, so the stage then starts from scratch'):
    pipeline.run(config, wd, 'backbone')
  assert {p: os.path.getsize(p) for p in sizes} == sizes  # the damage is left as it was


def _copy_artifacts(src, dst, *kinds):
  for kind in kinds:
    shutil.copytree(artifacts.path(src, kind), artifacts.path(dst, kind))


@pytest.mark.parametrize('mode', ['garbage', 'no_manifest'])
def test_damaged_database_is_rebuilt_with_a_warning(tiny_run, tmp_path, caplog, mode):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_artifacts(ref, wd, 'backbone', 'database')
  shutil.copy(os.path.join(ref, 't_star.json'), wd)
  path = artifacts.path(wd, 'database')
  _damage(path, mode)
  with caplog.at_level('WARNING'):
    results = pipeline.run(config, wd, 'database')
  assert f'database artifact at {path} is damaged (checkpoint {path} is corrupt' in caplog.text
  assert 'rebuilding it from the backbone artifact' in caplog.text
  # Rebuilt identically: the exits built from the original still belong to it.
  want = artifacts.load(ref, 'database')
  assert results['database'].fingerprint == want.fingerprint
  _assert_trees_equal(artifacts.load(wd, 'database').tree, want.tree)


def test_damaged_exits_artifact_names_the_stage_to_rerun(tiny_run, tmp_path):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_artifacts(ref, wd, *artifacts.KINDS)
  shutil.copy(workdir_lib.config_path(ref), wd)
  path = artifacts.path(wd, 'exits')
  _damage(path, 'garbage')
  with pytest.raises(artifacts.DamagedArtifactError,
                     match=f'exits artifact at {path} is damaged .* does not match its checksum'
                           f'.*; delete {path} and rerun --stages=exits'):
    loading.load_model(wd)


def _copy_run(ref, dst):
  """A workdir with `ref`'s config.json, artifacts and distance caches (no checkpoints)."""
  _copy_artifacts(ref, dst, *artifacts.KINDS)
  shutil.copy(workdir_lib.config_path(ref), dst)
  shutil.copytree(os.path.join(ref, 'cache'), os.path.join(dst, 'cache'))


def test_truncated_distance_cache_is_measured_again(tiny_run, tmp_path):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_run(ref, wd)
  cache = exit_distances.cache_path(wd, 'validation', 'guided')
  with np.load(cache) as f:
    expected = f['distances']
  with open(cache, 'r+b') as f:
    f.truncate(os.path.getsize(cache) // 2)
  with pytest.warns(RuntimeWarning, match=f'distance cache {cache} is damaged .* measuring '
                                          'the distances again and rewriting it'):
    _, got = predictor_training.split_distances(config, wd, 'validation',
                                                config.data.num_validation)
  np.testing.assert_array_equal(got, expected)
  with np.load(cache) as f:  # written again, whole
    np.testing.assert_array_equal(f['distances'], expected)


# -- Artifacts of another run. --


def _resave(wd, kind, change, **manifest):
  """Re-saves artifact `kind` of wd with arrays changed by `change` (as another run would
  write it; `parents=` overrides its parents); returns (old, new) fingerprints."""
  config = workdir_lib.read_config(wd)
  art = artifacts.load(wd, kind)
  tree = jax.tree.map(lambda x: change(np.asarray(x)), art.tree)
  new = artifacts.save(wd, kind, tree, config=config,
                       parents=manifest.get('parents', art.parents), metadata=art.metadata)
  assert new != art.fingerprint
  return art.fingerprint, new


def test_database_of_another_run_is_refused_by_load_model(tiny_run, tmp_path):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_run(ref, wd)
  old, new = _resave(wd, 'database', lambda x: x + np.asarray(0.5, x.dtype))
  match = (f'exits artifact at .* was built from database {old[:12]} but this '
           f"workdir's database is {new[:12]}: it belongs to another run")
  with pytest.raises(artifacts.ArtifactError, match=match):
    loading.load_model(wd)
  # Nor are the cached distances of the exits served beside it.
  with pytest.raises(artifacts.ArtifactError, match=match):
    predictor_training.split_distances(config, wd, 'validation', config.data.num_validation)


def test_distance_cache_of_other_exits_is_not_reused(tiny_run, tmp_path):
  """The cache is keyed by the exits artifact's fingerprint: exits of another run (here, the
  same shapes with other weights) measure their own distances, exactly as without a cache."""
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_run(ref, wd)
  cache = exit_distances.cache_path(wd, 'validation', 'guided')
  with np.load(cache) as f:
    stale = f['distances']
  _resave(wd, 'exits', lambda x: x * np.asarray(0.5, x.dtype) if x.ndim > 1 else x)
  inputs, got = predictor_training.split_distances(config, wd, 'validation',
                                                   config.data.num_validation)
  fresh = exit_distances.measure_distances(
      config, factory.make_exit_model(config, guided=True),
      predictor_training.trained_exit_params(config, wd, 'guided'), inputs,
      config.predictor.measure_batch)
  np.testing.assert_array_equal(got, fresh)
  assert np.abs(got - stale).max() > 1e-3  # the stale numbers were not served


def test_predictor_of_another_run_with_the_same_shapes_is_refused(tiny_run, tmp_path):
  ref, _ = tiny_run
  wd = str(tmp_path)
  _copy_run(ref, wd)
  exits_fp = artifacts.read_manifest(wd, 'exits')['fingerprint']
  _resave(wd, 'predictor', lambda x: x, parents={'exits': 'f' * 64})
  with pytest.raises(artifacts.ArtifactError,
                     match=f'predictor artifact at .* was built from exits ffffffffffff but this '
                           f"workdir's exits is {exits_fp[:12]}"):
    loading.load_model(wd)


# -- Inputs: device arrays are checked like NumPy ones, on the device. --


@pytest.fixture(scope='module')
def model(tiny_run):
  wd, config = tiny_run
  return loading.load_model(wd, config)


def _labels(n, value=0):
  return np.full((n, 16, 16), value, np.int32)


@pytest.mark.parametrize('device', [False, True], ids=['numpy', 'device'])
@pytest.mark.parametrize('batch', [1, 3], ids=['switch', 'bucketed'])
@pytest.mark.parametrize('case, match', [
    ('class_50', 'labels has class id 50 but the config has 12 classes'),
    ('class_-1', 'labels has class id -1 but the config has 12 classes'),
    ('float_labels', r'labels must be an integer array \(class ids\), got dtype float32'),
    ('nan_z', r'z has 1 non-finite values \(NaN or inf\)'),
    ('inf_z', r'z has 2 non-finite values \(NaN or inf\)'),
    ('int_z', r'z must be float32 \[B, z_dim\] \(Gaussian noise\), got dtype int32'),
    ('z_shape', r'z must be float32 \[B, z_dim\] = \[., 8\], got shape \(., 5\)'),
])
def test_bad_inputs_are_refused_by_both_routers(model, device, batch, case, match):
  labels = _labels(batch, 3)
  z = np.zeros((batch, 8), np.float32)
  if case == 'class_50':
    labels[0, 2, 3] = 50
  elif case == 'class_-1':
    labels[-1, 0, 0] = -1
  elif case == 'float_labels':
    labels = labels.astype(np.float32)
  elif case == 'nan_z':
    z[0, 1] = np.nan
  elif case == 'inf_z':
    z[-1, :2] = [np.inf, -np.inf]
  elif case == 'int_z':
    z = z.astype(np.int32)
  elif case == 'z_shape':
    z = z[:, :5]
  inputs = (labels, z)
  if device:
    inputs = tuple(jnp.asarray(x) for x in inputs)
  router = (router_lib.SwitchRouter(model) if batch == 1
            else router_lib.BucketedRouter(model, bucket_sizes=(1, 2)))
  with pytest.raises(ValueError, match=match):
    router(inputs, 0.1)
  assert router.num_compiles == 0  # refused before anything was compiled


@pytest.mark.parametrize('device', [False, True], ids=['numpy', 'device'])
def test_float_labels_are_refused_by_generate(model, device):
  labels = _labels(2, 1).astype(np.float32)
  if device:
    labels = jnp.asarray(labels)
  with pytest.raises(ValueError, match=r'labels must be an integer array \(class ids\), got '
                                       'dtype float32; convert with labels.astype'):
    generate_lib.generate(model, labels, threshold=0.1)


def test_device_inputs_are_checked_on_the_device(model, monkeypatch):
  labels, z = jnp.asarray(_labels(4, 11)), jnp.asarray(np.linspace(-1, 1, 32).reshape(4, 8),
                                                       jnp.float32)
  summaries = []
  for name in ('_device_int_range', '_device_float_summary'):
    fn = getattr(tasks, name)
    monkeypatch.setattr(tasks, name, lambda x, fn=fn, name=name: (
        summaries.append((name, x.shape)), fn(x))[1])
  checked = model.check_inputs((labels, z))
  # Reduced on the device (a few scalars reach the host), and handed back uncopied.
  assert summaries == [('_device_int_range', (4, 16, 16)), ('_device_float_summary', (4, 8))]
  assert checked[0] is labels and checked[1] is z
  with pytest.raises(ValueError, match='labels has class id 12 but the config has 12'):
    model.check_inputs((jnp.asarray(_labels(4, 12)), z))
  router = router_lib.BucketedRouter(model, bucket_sizes=(4,))
  routed = router((labels, z), 0.1)
  expected = router((np.asarray(labels), np.asarray(z)), 0.1)
  np.testing.assert_array_equal(routed.images, expected.images)
  np.testing.assert_array_equal(routed.exit_ids, expected.exit_ids)


@pytest.mark.parametrize('data, match', [
    ((jnp.zeros((1, 32, 32, 3)), jnp.full((1, 32, 32, 3), jnp.nan)),
     r'driver has 3072 non-finite values'),
    ((jnp.full((1, 32, 32, 3), 2.0), jnp.zeros((1, 32, 32, 3))),
     r'source must be in \[-1, 1\], got \[2.000, 2.000\]'),
    ((jnp.zeros((1, 32, 32, 3), jnp.int32), jnp.zeros((1, 32, 32, 3))),
     'source must be float32 .* got dtype int32'),
])
def test_reenactment_device_data_is_checked_like_numpy(data, match):
  task = tasks.Reenactment(resolution=(32, 32))
  with pytest.raises(ValueError, match=match):
    task.check_data(data)
  with pytest.raises(ValueError, match=match):
    task.check_data(tuple(np.asarray(x) for x in data))


_THRESHOLD_ERROR = (r'threshold must be a finite non-negative number \(a distance budget such '
                    r'as 0.1; int, float or a NumPy scalar\), got ')


@pytest.mark.parametrize('threshold', ['0.2', True, np.bool_(True), None, 1 + 2j, [0.1],
                                       float('nan'), -0.1, np.array([0.1])])
def test_threshold_must_be_a_real_non_negative_number(threshold):
  with pytest.raises(ValueError, match=_THRESHOLD_ERROR):
    model_lib.check_threshold(threshold)


def test_thresholds_of_every_real_type_are_accepted():
  for t in (0, 1, 0.2, np.float32(0.25), np.float64(0.2), np.int64(1), np.array(0.5),
            jnp.float32(0.5)):
    assert model_lib.check_threshold(t) == float(t)


@pytest.mark.parametrize('threshold, shown', [('0.2', r"'0.2' \(str\)"), (True, r'True \(bool\)')])
def test_threshold_string_or_bool_is_refused_by_generate(model, threshold, shown):
  with pytest.raises(ValueError, match=_THRESHOLD_ERROR + shown):
    generate_lib.generate(model, _labels(2), threshold=threshold)


@pytest.mark.parametrize('seed', [1.5, 'a', None, True, 2**63, np.float32(1)])
def test_seed_must_be_an_integer(model, seed):
  with pytest.raises(ValueError, match=r'seed must be an integer \(e.g. 0; int or a NumPy '
                                       r'integer in int64\), got '):
    generate_lib.generate(model, _labels(1), threshold=0.1, seed=seed)


def test_integer_seeds_are_accepted():
  assert model_lib.check_seed(np.int64(7)) == 7 and model_lib.check_seed(-3) == -3
  assert model_lib.check_seed(np.array(5, np.int32)) == 5


# -- What the user sees from the command line and at interpreter exit. --

_GENERATE_THEN_EXIT = r'''
import sys
import numpy as np
import fiancee_jax

model = fiancee_jax.load_model(sys.argv[1])
labels = np.zeros((1,) + model.resolution, np.int32)
out = fiancee_jax.generate(model, labels, threshold=0.1, seed=0)  # the batch-of-one router
out = fiancee_jax.generate(model, np.concatenate([labels] * 2), threshold=0.1, seed=0)
print('generated', out['images'].shape, flush=True)
'''


def test_nothing_is_printed_at_interpreter_exit_after_generate(tiny_run):
  wd, _ = tiny_run
  out = subprocess.run([sys.executable, '-c', _GENERATE_THEN_EXIT, wd], env=_subprocess_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'generated (2, 16, 16, 3)' in out.stdout
  assert 'Exception ignored' not in out.stderr and 'NoneType' not in out.stderr


def test_empty_workdir_on_the_command_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'fiancee_jax.main', f'--config={REPO}/configs/landscapes.py:tiny',
       '--workdir=', '--stages=backbone'],
      env=_subprocess_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "FATAL: --workdir='' is empty; pass the directory where checkpoints" in out.stderr
  assert 'Traceback' not in out.stderr
  assert not os.listdir(tmp_path)


# -- kill -9 between checkpoints, resumed; a same-seed rerun of the whole job. --

# Runs `stages` of the tiny job and SIGKILLs itself right after step KILL_STEP of stage
# KILL_STAGE (between two of its checkpoints: checkpoint_every is 2, so 3 is never saved);
# prints the step every Checkpointer.restore reads.
_KILLED_RUN = r'''
import os, signal, sys
from configs import landscapes
from fiancee_jax import checkpoint, main, metric_logging, pipeline
from fiancee_jax.training import loop

workdir, data_dir, stages, kill_stage, kill_step, allow_restart, sig = sys.argv[1:8]
config = landscapes.get_config('tiny')
with config.unlocked():
  config.data.data_dir = data_dir
  config.checkpoint.allow_restart = allow_restart == 'True'
restore = checkpoint.Checkpointer.restore

def recording_restore(self, target, step=None):
  out = restore(self, target, step)
  print('restored', os.path.basename(self.directory), self.restored_step, flush=True)
  return out

update_progress = metric_logging.MetricWriter.update_progress

def progress_then_die(self, step, *args, **kwargs):
  update_progress(self, step, *args, **kwargs)
  if self._stage == kill_stage and step == int(kill_step):
    print('killing', kill_stage, 'at step', step, flush=True)
    # SIGKILL: nothing runs after this. SIGTERM: a preemption notice, which the loop
    # answers by saving the next step and stopping the job as main does.
    os.kill(os.getpid(), getattr(signal, sig))

checkpoint.Checkpointer.restore = recording_restore
metric_logging.MetricWriter.update_progress = progress_then_die
try:
  pipeline.run(config, workdir, stages)
except loop.Preempted as e:
  print(e, flush=True)
  sys.exit(main.PREEMPTED_EXIT_STATUS)
'''
# (signal, step at whose end it arrives) per killed stage; 4 steps, checkpoints every 2.
_PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM, what main exits with (fiancee_jax/main.py)
_KILLS = {'exits': ('SIGKILL', 3), 'predictor': ('SIGTERM', 2)}


def _run_killed(workdir, data_dir, stages, kill_stage, allow_restart=False):
  """Runs `stages` in a subprocess that sends itself _KILLS[kill_stage] inside
  `kill_stage`; returns (stdout, stderr)."""
  sig, step = _KILLS[kill_stage]
  out = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(_KILLED_RUN), workdir, data_dir, stages,
       kill_stage, str(step), str(allow_restart), sig],
      env=_subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
  if sig == 'SIGKILL':
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  else:  # preempted: saved, then stopped with the job's preemption status
    assert out.returncode == _PREEMPTED_EXIT_STATUS, out.stderr[-3000:]
    assert f'its state at step {step + 1} is saved' in out.stdout, out.stdout[-3000:]
  assert f'killing {kill_stage} at step {step}' in out.stdout
  return out.stdout, out.stderr


def _steps(workdir, stage):
  return sorted(int(s) for s in os.listdir(workdir_lib.checkpoints(workdir, stage))
                if s.isdigit())


@pytest.fixture(scope='module')
def rerun(tiny_run, tmp_path_factory, data_dir):
  """The tiny job again, same seed, with every stage's run interrupted or damaged:

  1. the backbone checkpoints of `tiny_run`, every step truncated: with allow_restart the
     backbone stage retrains from scratch and replaces them;
  2. the exits stage killed (SIGKILL) after step 3, between its checkpoints 2 and 4, and
     resumed in a new process, which is sent SIGTERM (a preemption notice) in the predictor
     stage's step 2: it saves step 3 and stops;
  3. the predictor stage resumed and the evaluate stage run, here.

  Returns:
    (workdir, {'backbone_stderr': str, 'on_disk': {stage: steps after its kill},
     'exported': {stage: whether its artifact existed after the kill},
     'restored': {stage: steps the resuming runs read}}).
  """
  _, config = tiny_run
  ref = tiny_run[0]
  wd = str(tmp_path_factory.mktemp('rerun'))
  _copy_checkpoints(ref, wd, 'backbone')
  for step in _steps(wd, 'backbone'):
    _damage(os.path.join(workdir_lib.checkpoints(wd, 'backbone'), str(step)), 'truncate')
  info = {'on_disk': {}, 'restored': {}}
  _, info['backbone_stderr'] = _run_killed(wd, data_dir, 'backbone,database,exits', 'exits',
                                           allow_restart=True)
  info['on_disk']['exits'] = _steps(wd, 'exits')
  info['exported'] = {'exits': artifacts.exists(wd, 'exits')}
  stdout, _ = _run_killed(wd, data_dir, 'exits,predictor', 'predictor')
  info['on_disk']['predictor'] = _steps(wd, 'predictor')
  info['exported']['predictor'] = artifacts.exists(wd, 'predictor')
  info['restored']['exits'] = [int(line.split()[-1]) for line in stdout.splitlines()
                               if line.startswith('restored exits ')]
  restored = []
  original_restore = checkpoint.Checkpointer.restore

  def recording_restore(self, target, step=None):
    out = original_restore(self, target, step)
    if os.path.basename(self.directory) == 'predictor':
      restored.append(self.restored_step)
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoint.Checkpointer, 'restore', recording_restore)
    pipeline.run(config, wd, 'predictor,evaluate')
  info['restored']['predictor'] = restored
  return wd, info


def test_allow_restart_retrains_past_damaged_checkpoints_bit_exact(tiny_run, rerun):
  ref, _ = tiny_run
  wd, info = rerun
  ckpts = workdir_lib.checkpoints(wd, 'backbone')
  assert f'allow_restart: every checkpoint in {ckpts} is damaged (steps [2, 4])' in (
      info['backbone_stderr'])
  assert f'Replacing damaged checkpoint {ckpts}/2' in info['backbone_stderr']
  tree, meta = _final(wd, 'backbone')
  ref_tree, ref_meta = _final(ref, 'backbone')
  assert meta == ref_meta and meta['finished']
  _assert_trees_equal(tree, ref_tree)


@pytest.mark.parametrize('stage,on_disk', [('exits', [2]), ('predictor', [2, 3])])
def test_kill_between_checkpoints_resumes_bit_exact(tiny_run, rerun, stage, on_disk):
  ref, _ = tiny_run
  wd, info = rerun
  # exits: SIGKILL at step 3 of 4, only step 2 on disk, and the resumed run read it.
  # predictor: SIGTERM in step 2, so step 3 was saved on preemption and read back.
  assert info['on_disk'][stage] == on_disk and not info['exported'][stage]
  assert info['restored'][stage] == on_disk[-1:]
  tree, meta = _final(wd, stage)
  ref_tree, ref_meta = _final(ref, stage)
  assert meta == ref_meta and meta['finished']
  _assert_trees_equal(tree, ref_tree)


def _json(path):
  with open(path) as f:
    return json.dumps(json.load(f), sort_keys=True)  # floats as repr: exact


def test_same_seed_rerun_is_bit_exact_end_to_end(tiny_run, rerun):
  ref, _ = tiny_run
  wd, _ = rerun
  for kind in artifacts.KINDS:
    a, b = artifacts.load(wd, kind), artifacts.load(ref, kind)
    assert a.fingerprint == b.fingerprint, kind  # hashes every byte of every array
    _assert_trees_equal(a.tree, b.tree)
    assert a.metadata == b.metadata, kind
  names = sorted(os.listdir(os.path.join(ref, 'cache')))
  assert names == sorted(os.listdir(os.path.join(wd, 'cache'))) and names
  for name in names:
    with np.load(os.path.join(wd, 'cache', name)) as a, \
        np.load(os.path.join(ref, 'cache', name)) as b:
      np.testing.assert_array_equal(a['distances'], b['distances'])
  for name in ('t_star.json', 'report/report.json', 'seeds/0/report/report.json'):
    assert _json(os.path.join(wd, name)) == _json(os.path.join(ref, name)), name
