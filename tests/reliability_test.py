"""What a careless or hostile user can do to the pipeline: every case a clear error before
compute, or the exact right result.

Cases: bad settings of every stage (refused before any stage runs and before config.json is
written), empty --stages, bad workdirs, a config.json that must not lock a workdir after a
failed run, damaged checkpoints and artifacts, bad inputs for device arrays as for NumPy
ones, thresholds and seeds of the wrong type; then kill -9 between checkpoints of the exits
and predictor stages, resumed, and a same-seed rerun of the whole tiny job, compared bit for
bit with the session's `tiny_run`.
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

from configs import landscapes
from fiancee_jax import checkpoint
from fiancee_jax import config_checks
from fiancee_jax import model as model_lib
from fiancee_jax import pipeline
from fiancee_jax import stats
from fiancee_jax import tasks
from fiancee_jax.metrics import costs
from fiancee_jax.routing import router as router_lib
from fiancee_jax.training import predictor as predictor_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests that read the shared `tiny_run` job run on its xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('tiny_run')


def _config(**overrides):
  """The tiny config with `section.key=value` overrides (a fresh, locked copy)."""
  config = landscapes.get_config('tiny')
  with config.unlocked():
    for key, value in overrides.items():
      section, name = key.split('.') if '.' in key else (None, key)
      if section is None:
        config[name] = value
      else:
        config[section][name] = value
  return config


def _variant(config, **overrides):
  """A copy of `config` with `section__key=value` overrides."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      section, name = key.split('__')
      config[section][name] = value
  return config


# -- Settings: refused before any stage, before config.json. --


@pytest.mark.parametrize('key, value, match', [
    ('exits.num_steps', -5, r'config.exits.num_steps must be an integer >= 1, got -5'),
    ('exits.attach_after', (1, 9), r'attach_after=\(1, 9\) must be block indices in \[0, 2\]'),
    ('exits.attach_after', (2, 1), r'attach_after=\(2, 1\) must be strictly increasing'),
    ('exits.attach_after', (), r'attach_after must be a tuple of integers >= 0, got \(\)'),
    ('database.key_block', 3, r'key_block=3 must be <= the earliest attach point 1'),
    ('database.key_block', 4, r'key_block=4 is not a block index \(0..3\)'),
    ('exits.batch_size', 0, r'config.exits.batch_size must be an integer >= 1, got 0'),
    ('predictor.num_steps', 0, r'config.predictor.num_steps must be an integer >= 1'),
    ('database.num_entries', 0, r'config.database.num_entries must be an integer >= 1'),
    ('database.num_entries', 2, r'num_entries=2 must be >= config.database.top_k=4'),
    ('database.num_entries', 200, r'num_entries=200 exceeds the 128 patches of its 8 images'),
    ('database.key_dim', 9, r'key_dim=9 exceeds the 8 channels of block 1'),
    ('database.grid', (16, 16), r'grid=\(16, 16\) must divide block 1 features 8x8'),
    ('exits.checkpoint_every', 0, r'config.exits.checkpoint_every must be an integer >= 1'),
    ('predictor.members', 0, r'config.predictor.members must be an integer >= 1'),
    ('predictor.pool', 3, r'config.predictor.pool=3 must divide the resolution 16x16'),
    ('train.lr_g', float('nan'), r'config.train.lr_g must be a finite number > 0, got nan'),
    ('router.thresholds', ('0.2',), r"thresholds=\('0.2',\): threshold must be a finite "),
    ('router.thresholds', (True,), r'thresholds=\(True,\): threshold must be a finite'),
    ('benchmark.batch_size', 64, r'batch_size=64 exceeds the 32 test inputs'),
    ('seed', True, r'config.seed must be an integer \(e.g. 0'),
    ('data.seed', None, r'config.data.seed must be an integer'),
    ('checkpoint.allow_restart', None, r'config.checkpoint.allow_restart must be True or False'),
])
def test_bad_setting_is_refused_before_any_stage(tmp_path, key, value, match):
  config = _config(**{key: value})
  with pytest.raises(config_checks.ConfigError, match=match):
    pipeline.run(config, str(tmp_path / 'wd'), 'backbone')
  assert not os.path.exists(tmp_path / 'wd')  # no config.json, nothing at all
  with pytest.raises(config_checks.ConfigError, match=match):
    costs.compute_stats(config)  # python -m fiancee_jax.stats runs the same checks


def test_batch_sizes_must_divide_the_devices():
  config = _config(**{'exits.batch_size': 6})
  config_checks.check_devices(config, 2)
  with pytest.raises(config_checks.ConfigError,
                     match=r'config.exits.batch_size=6 is not divisible by the 4 devices'):
    config_checks.check_devices(config, 4)


@pytest.mark.parametrize('stages', ['', ',', ' , '])
def test_empty_stages_are_refused(tmp_path, stages):
  with pytest.raises(config_checks.ConfigError, match='names no stage'):
    pipeline.run(_config(), str(tmp_path), stages)
  assert not os.listdir(tmp_path)


def test_stats_cli_refuses_extra_arguments():
  with pytest.raises(app.UsageError, match=r"unexpected arguments: \['extra_positional'\]"):
    stats.main(['stats', 'extra_positional'])


# -- The workdir. --


def test_empty_workdir_on_the_command_line():
  out = subprocess.run(
      [sys.executable, '-m', 'fiancee_jax.main', f'--config={REPO}/configs/landscapes.py:tiny',
       '--workdir=', '--stages=backbone'],
      env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 1
  assert "FATAL: --workdir='' is empty" in out.stderr
  assert 'Traceback' not in out.stderr


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(config_checks.ConfigError, match='is a file, not a directory'):
    pipeline.run(_config(), str(path), 'backbone')
  (tmp_path / 'wd').mkdir()
  (tmp_path / 'wd' / 'checkpoints').write_text('x')
  with pytest.raises(config_checks.ConfigError, match='checkpoints is a file where'):
    config_checks.check_workdir(str(tmp_path / 'wd'))


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
  if os.path.isdir('/sys/kernel') and not os.access('/sys/kernel', os.W_OK | os.X_OK):
    return '/sys/kernel'
  for candidate in ('/sys/kernel', '/sys'):
    try:
      with open(os.path.join(candidate, 'probe'), 'w'):
        pass
    except OSError:
      return candidate
  pytest.skip('no read-only directory available')


def test_read_only_workdir_is_refused_before_compute(tmp_path):
  ro = _read_only_dir(tmp_path)
  with pytest.raises(config_checks.ConfigError, match=f'{ro} is not writable'):
    pipeline.run(_config(), ro, 'evaluate')


# -- config.json: binding once a checkpoint exists, never locked by a failed run. --


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


def _fake_checkpoint(workdir, step=2):
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints', 'backbone')) as ckpt:
    ckpt.save(step, {'x': np.ones(3, np.float32)}, force=True)


def test_truncated_config_json(tmp_path):
  wd = str(tmp_path)
  config = _config()
  path = os.path.join(wd, 'config.json')
  _write(path, config.to_json_best_effort()[:40])
  config_checks.write_config(config, wd)  # nothing made under it: replaced
  with open(path) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())
  _fake_checkpoint(wd)
  _write(path, config.to_json_best_effort()[:40])
  with pytest.raises(config_checks.ConfigError, match=f'{path} is unreadable .*restore it'):
    config_checks.write_config(config, wd)


def test_another_config_is_accepted_until_a_checkpoint_binds_the_workdir(tmp_path):
  wd = str(tmp_path)
  a, b = _config(), _config(**{'backbone.ch': 4})
  config_checks.write_config(a, wd)
  config_checks.write_config(b, wd)  # no checkpoint yet: a failed run locks nothing
  _fake_checkpoint(wd)
  with pytest.raises(config_checks.ConfigError, match=r"different config .*\['backbone'\]"):
    config_checks.write_config(a, wd)
  config_checks.write_config(_variant(b, checkpoint__allow_restart=True), wd)  # replaceable


# -- Damaged checkpoints and artifacts, in the pipeline. --


def _copy_stages(src, dst, *stages):
  for stage in stages:
    shutil.copytree(os.path.join(src, 'checkpoints', stage),
                    os.path.join(dst, 'checkpoints', stage))


def _final(workdir, stage):
  """(tree, metadata) of a stage's newest step, as NumPy."""
  directory = os.path.join(workdir, 'checkpoints', stage)
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  return checkpoint.load_pytree(os.path.join(directory, str(step)))


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(getattr(x, 'dtype', np.float32), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns
           if n != checkpoint._MANIFEST]
  return max(files, key=os.path.getsize)


def _damage(step_dir, mode):
  if mode == 'no_manifest':
    os.remove(os.path.join(step_dir, checkpoint._MANIFEST))
    return
  path = _largest_file(step_dir)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    if mode == 'truncate':
      f.truncate(size // 2)
    else:  # same-size garbage: only the checksum can tell
      f.write(os.urandom(size))


def test_failed_run_does_not_lock_the_workdir(tiny_run, tmp_path):
  """A workdir without config.json: a run with the wrong widths fails on the checkpoint's
  shapes, and the right config is still accepted afterwards."""
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_stages(ref, wd, 'backbone')
  with pytest.raises(checkpoint.CheckpointError, match='does not match the model'):
    pipeline.run(_variant(config, backbone__ch=4), wd, 'backbone')
  results = pipeline.run(config, wd, 'backbone')
  assert int(results['backbone'].step) == config.train.num_steps


@pytest.mark.parametrize('mode', ['truncate', 'garbage', 'no_manifest'])
def test_damaged_backbone_checkpoint_is_refused_whatever_the_damage(tiny_run, tmp_path, mode):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_stages(ref, wd, 'backbone')
  ckpts = os.path.join(wd, 'checkpoints', 'backbone')
  _damage(os.path.join(ckpts, '4'), mode)
  with pytest.raises(checkpoint.CheckpointError) as e:
    pipeline.run(config, wd, 'backbone')
  message = str(e.value)
  assert f'checkpoint {ckpts}/4 is corrupt' in message
  assert f'delete {ckpts}/4 and rerun (the stage then resumes from step 2)' in message
  assert '--config.checkpoint.allow_restart=True' in message
  assert sorted(os.listdir(ckpts)) == ['2', '4']  # nothing overwritten


def test_every_backbone_checkpoint_truncated_then_allow_restart(tiny_run, tmp_path):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_stages(ref, wd, 'backbone')
  ckpts = os.path.join(wd, 'checkpoints', 'backbone')
  for step in ('2', '4'):
    _damage(os.path.join(ckpts, step), 'truncate')
  with pytest.raises(checkpoint.CheckpointError,
                     match=f'delete {ckpts}/4 and the damaged older steps {ckpts}/2 and rerun '
                           r'\(no intact step is left, so the stage then starts from scratch'):
    pipeline.run(config, wd, 'backbone')
  # Asked for explicitly: retrains from scratch, and lands exactly where the first run did.
  pipeline.run(_variant(config, checkpoint__allow_restart=True), wd, 'backbone')
  _assert_trees_equal(_final(wd, 'backbone')[0], _final(ref, 'backbone')[0])


def test_damaged_database_is_rebuilt_with_a_warning(tiny_run, tmp_path, caplog):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_stages(ref, wd, 'backbone', 'database')
  path = os.path.join(wd, 'checkpoints', 'database', 'database')
  _damage(path, 'garbage')
  with caplog.at_level('WARNING'):
    pipeline.run(config, wd, 'database')
  assert f'checkpoint {path} is corrupt' in caplog.text and 'rebuilding it' in caplog.text
  _assert_trees_equal(checkpoint.load_pytree(path)[0],
                      checkpoint.load_pytree(os.path.join(ref, 'checkpoints', 'database',
                                                          'database'))[0])


def test_truncated_distance_cache_is_measured_again(tiny_run, tmp_path, caplog):
  ref, config = tiny_run
  wd = str(tmp_path)
  _copy_stages(ref, wd, 'backbone', 'database', 'exits', 'predictor')
  cache = os.path.join(wd, 'checkpoints', 'predictor', 'distances_validation_guided.npz')
  with np.load(cache) as f:
    expected = f['distances']
  with open(cache, 'r+b') as f:
    f.truncate(os.path.getsize(cache) // 2)
  with caplog.at_level('WARNING'):
    _, got = predictor_training.split_distances(config, wd, 'validation',
                                                config.data.num_validation)
  assert f'cached distances {cache} are damaged' in caplog.text
  np.testing.assert_array_equal(got, expected)
  with np.load(cache) as f:  # written again, whole
    np.testing.assert_array_equal(f['distances'], expected)


# -- Inputs: device arrays are checked like NumPy ones, on the device. --


@pytest.fixture(scope='module')
def model(tiny_run):
  from fiancee_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd, config = tiny_run
  return workdir_lib.load_model(config, wd)


def _labels(n, value=0):
  return np.full((n, 16, 16), value, np.int32)


@pytest.mark.parametrize('device', [False, True], ids=['numpy', 'device'])
@pytest.mark.parametrize('batch', [1, 3], ids=['switch', 'bucketed'])
@pytest.mark.parametrize('case, match', [
    ('class_50', 'labels has class id 50 but the config has 12 classes'),
    ('class_-1', 'labels has class id -1'),
    ('float_labels', 'labels must be an integer array .* got dtype float32'),
    ('nan_z', r'z has 1 non-finite values \(NaN or inf\)'),
    ('inf_z', r'z has 2 non-finite values'),
    ('int_z', r'z must be float32 \[B, z_dim\] \(Gaussian noise\), got dtype int32'),
    ('z_shape', r'z must be float32 \[B, z_dim\] = \[.*, 8\], got shape'),
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


def test_device_inputs_are_checked_on_the_device(model, monkeypatch):
  labels, z = jnp.asarray(_labels(4, 11)), jnp.zeros((4, 8))
  summaries = []
  for name in ('_device_int_range', '_device_float_summary'):
    fn = getattr(tasks, name)
    monkeypatch.setattr(tasks, name, lambda x, fn=fn, name=name: (
        summaries.append((name, x.shape)), fn(x))[1])
  checked = model.check_inputs((labels, z))
  # Reduced on the device (a few scalars reach the host), and handed back uncopied.
  assert summaries == [('_device_int_range', (4, 16, 16)), ('_device_float_summary', (4, 8))]
  assert checked[0] is labels and checked[1] is z
  with pytest.raises(ValueError, match='class id 12'):
    model.check_inputs((jnp.asarray(_labels(4, 12)), z))
  routed = router_lib.BucketedRouter(model, bucket_sizes=(4,))((labels, z), 0.1)
  expected = router_lib.BucketedRouter(model, bucket_sizes=(4,))(
      (np.asarray(labels), np.asarray(z)), 0.1)
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


@pytest.mark.parametrize('threshold', ['0.2', True, np.bool_(True), None, 1 + 2j, [0.1],
                                       float('nan'), -0.1, np.array([0.1])])
def test_threshold_must_be_a_real_non_negative_number(threshold):
  with pytest.raises(ValueError, match=r'threshold must be a finite non-negative number '
                                       r'\(a distance budget such as 0.1; int, float or a '
                                       'NumPy scalar\\), got'):
    model_lib.check_threshold(threshold)


def test_thresholds_of_every_real_type_are_accepted():
  for t in (0, 1, 0.2, np.float32(0.25), np.float64(0.2), np.int64(1), np.array(0.5),
            jnp.float32(0.5)):
    assert model_lib.check_threshold(t) == float(t)


@pytest.mark.parametrize('seed', [1.5, 'a', None, True, 2**63, np.float32(1)])
def test_seed_must_be_an_integer(model, seed):
  from fiancee_jax import inference  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'seed must be an integer \(e.g. 0'):
    inference.generate(model, _labels(1), threshold=0.1, seed=seed)
  assert model_lib.check_seed(np.int64(7)) == 7 and model_lib.check_seed(-3) == -3


def test_threshold_string_is_refused_by_generate(model):
  from fiancee_jax import inference  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="got '0.2' \\(str\\)"):
    inference.generate(model, _labels(2), threshold='0.2')


# -- kill -9 between checkpoints, resumed; a same-seed rerun of the whole job. --

_KILLED_STAGE = """
import os, signal, sys
from configs import landscapes
from fiancee_jax import checkpoint, pipeline

workdir, data_dir, stage, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = landscapes.get_config('tiny')
with config.unlocked():
  config.data.data_dir = data_dir
save = checkpoint.Checkpointer.save

def save_then_die(self, step, *args, **kwargs):
  saved = save(self, step, *args, **kwargs)
  if saved and step == kill_after and self.directory.endswith(os.sep + stage):
    print('killing after step', step, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9: nothing runs after this
  return saved

checkpoint.Checkpointer.save = save_then_die
pipeline.run(config, workdir, stage)
"""


def _run_killed(workdir, data_dir, stage, kill_after):
  """Runs `stage` in a subprocess that SIGKILLs itself right after saving `kill_after`."""
  out = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(_KILLED_STAGE), workdir, data_dir, stage,
       str(kill_after)],
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'), cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert f'killing after step {kill_after}' in out.stdout


@pytest.fixture(scope='module')
def rerun(tiny_run, tmp_path_factory, data_dir):
  """The tiny job again from nothing, same seed, with the exits and the predictor stages each
  killed (SIGKILL) right after their step-2 checkpoint and then resumed.

  Returns:
    (workdir, {stage: steps on disk after the kill}, {stage: steps the resumed run restored}).
  """
  _, config = tiny_run
  wd = str(tmp_path_factory.mktemp('rerun'))
  pipeline.run(config, wd, 'backbone,database')
  on_disk, restored = {}, {}
  original_restore = checkpoint.Checkpointer.restore

  def recording_restore(self, target, step=None):
    out = original_restore(self, target, step)
    restored.setdefault(os.path.basename(self.directory), []).append(self.restored_step)
    return out

  for stage in ('exits', 'predictor'):
    _run_killed(wd, data_dir, stage, kill_after=2)
    directory = os.path.join(wd, 'checkpoints', stage)
    on_disk[stage] = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(checkpoint.Checkpointer, 'restore', recording_restore)
      pipeline.run(config, wd, stage)
  pipeline.run(config, wd, 'evaluate')
  return wd, on_disk, restored


@pytest.mark.parametrize('stage', ['exits', 'predictor'])
def test_kill_between_checkpoints_resumes_bit_exact(tiny_run, rerun, stage):
  ref, config = tiny_run
  wd, on_disk, restored = rerun
  # Killed after step 2 of 4: step 2 on disk, not the final one; the resumed run read step 2.
  assert on_disk[stage][-1] == 2
  assert restored[stage] and set(restored[stage]) == {2}
  tree, meta = _final(wd, stage)
  ref_tree, ref_meta = _final(ref, stage)
  assert meta == ref_meta and meta['finished']
  _assert_trees_equal(tree, ref_tree)


def test_same_seed_rerun_is_bit_exact_end_to_end(tiny_run, rerun):
  ref, _ = tiny_run
  wd, _, _ = rerun
  for stage in ('backbone', 'exits', 'predictor'):
    _assert_trees_equal(_final(wd, stage)[0], _final(ref, stage)[0])
  db = os.path.join('checkpoints', 'database', 'database')
  _assert_trees_equal(checkpoint.load_pytree(os.path.join(wd, db))[0],
                      checkpoint.load_pytree(os.path.join(ref, db))[0])
  for split in ('train', 'validation', 'test'):
    name = os.path.join('checkpoints', 'predictor', f'distances_{split}_guided.npz')
    if os.path.exists(os.path.join(ref, name)):
      with np.load(os.path.join(wd, name)) as a, np.load(os.path.join(ref, name)) as b:
        np.testing.assert_array_equal(a['distances'], b['distances'])
  with open(os.path.join(wd, 'report', 'report.json')) as a, \
      open(os.path.join(ref, 'report', 'report.json')) as b:
    assert json.load(a) == json.load(b)
