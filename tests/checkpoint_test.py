"""Tests for fiancee_jax.checkpoint: roundtrips, retention, mismatch errors, corruption, kills."""

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fiancee_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TinyNet(nn.Module):
  width: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), name='conv_0')(x)
    return nn.Dense(2, name='head')(x)


def _state(width: int = 4, seed: int = 0):
  params = _TinyNet(width).init(jax.random.key(seed), jnp.ones((1, 4, 4, 3)))
  opt_state = optax.adam(1e-3).init(params)
  # Make the optimizer state non-trivial so a roundtrip is not trivially zeros.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = optax.adam(1e-3).update(grads, opt_state, params)
  return {
      'params': params,
      'opt_state': opt_state,
      'step': 7,
      'rng': jax.random.key(seed + 1),
      'ema': np.arange(5, dtype=np.float32),
  }


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
    if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert x.dtype == y.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _files(step_dir):
  """Files of a saved state, largest (the array data) first."""
  out = []
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    out += [os.path.join(root, n) for n in names if n != checkpoint._MANIFEST]
  return sorted(out, key=lambda p: -os.path.getsize(p))


def _corrupt(step_dir, mode):
  path = _files(step_dir)[0]
  if mode == 'delete':
    os.remove(path)
  elif mode == 'garbage':  # same size: only the checksum can tell
    with open(path, 'r+b') as f:
      f.write(os.urandom(os.path.getsize(path)))
  elif mode == 'truncate':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  return path


def test_roundtrip_flax_optax_int_and_prng_key(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(str(tmp_path / 'ck'), save_every=10) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, metadata={'data_position': 123, 'config_hash': 'ab'})
    target = _state(seed=5)  # same structure, different values
    restored, meta = ckpt.restore(target)
  _assert_same(restored, state)
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  assert restored['rng'].dtype == jax.random.key(0).dtype
  assert isinstance(restored['step'], int) and restored['step'] == 7
  assert isinstance(restored['ema'], np.ndarray)
  assert meta == {'data_position': 123, 'config_hash': 'ab'}
  # A freshly opened Checkpointer sees the same step.
  with checkpoint.Checkpointer(str(tmp_path / 'ck')) as ckpt:
    assert ckpt.latest_step() == 10
    restored, _ = ckpt.restore(jax.tree.map(lambda x: x, target), step=10)
    assert ckpt.restored_step == 10
  _assert_same(restored, state)


def test_async_saves_finalise_one_at_a_time(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(str(tmp_path / 'ck'), save_every=10, async_save=True) as ckpt:
    assert ckpt.save(10, state, metadata={'data_position': 10})
    # Written in the background: no step directory until it is finalised, only staging.
    assert ckpt.all_steps() == []
    assert any('staging' in name for name in os.listdir(tmp_path / 'ck'))
    assert ckpt.save(20, _state(seed=3), metadata={'data_position': 20})
    assert ckpt.all_steps() == [10]  # the next save finalised the previous one first
    assert ckpt.latest_step() == 20  # which waits for the write in flight
    assert ckpt.all_steps() == [10, 20]
    assert ckpt.save(30, state)
  # Leaving the block finalised step 30, file list included.
  assert sorted(os.listdir(tmp_path / 'ck')) == ['10', '20', '30']
  for step in (10, 20, 30):
    assert os.path.exists(tmp_path / 'ck' / str(step) / checkpoint._MANIFEST)
  with checkpoint.Checkpointer(str(tmp_path / 'ck')) as ckpt:
    restored, meta = ckpt.restore(_state(seed=5), step=10)
  _assert_same(restored, state)
  assert meta == {'data_position': 10}


def test_restore_onto_abstract_target_and_casts_dtype(tmp_path):
  state = {'w': jnp.arange(6.0).reshape(2, 3), 'rng': jax.random.key(3)}
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, force=True)
    target = {'w': jax.ShapeDtypeStruct((2, 3), jnp.bfloat16),
              'rng': jax.eval_shape(lambda: jax.random.key(0))}
    restored, meta = ckpt.restore(target)
  assert meta == {}
  assert restored['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(restored['w'].astype(jnp.float32), state['w'])
  np.testing.assert_array_equal(jax.random.key_data(restored['rng']),
                                jax.random.key_data(state['rng']))


def test_should_save_force_and_existing_step(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), save_every=5) as ckpt:
    assert [s for s in range(12) if ckpt.should_save(s)] == [0, 5, 10]
    assert not ckpt.save(3, {'x': jnp.ones(2)})
    assert ckpt.all_steps() == []
    assert ckpt.save(3, {'x': jnp.ones(2)}, force=True)
    assert ckpt.save(5, {'x': jnp.ones(2)})
    # The same step again (a resumed run): intact, so not rewritten.
    assert not ckpt.save(5, {'x': jnp.zeros(2)})
    assert ckpt.all_steps() == [3, 5]
    restored, _ = ckpt.restore({'x': jnp.zeros(2)})
  np.testing.assert_array_equal(restored['x'], jnp.ones(2))


def test_keeps_last_n(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_every=1) as ckpt:
    for step in range(1, 5):
      assert ckpt.save(step, {'x': jnp.full((3,), step)})
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.latest_step() == 4
  assert sorted(os.listdir(tmp_path)) == ['3', '4']


def test_non_json_metadata_is_rejected_before_writing(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(TypeError, match='JSON-serialisable'):
      ckpt.save(1, {'x': jnp.ones(2)}, metadata={'a': np.ones(2)}, force=True)
    assert ckpt.all_steps() == []


def test_shape_mismatch_names_checkpoint_and_leaf(tmp_path):
  directory = str(tmp_path / 'runs/x/checkpoints/backbone')
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(200, _state(width=4), force=True)
    with pytest.raises(checkpoint.CheckpointError) as e:
      ckpt.restore(_state(width=8))
  message = str(e.value)
  assert f'checkpoint {directory}/200 does not match the model' in message
  # Leaves are visited in pytree order, so the first mismatch is in 'opt_state'.
  assert re.search(r': opt_state/0/mu/params/conv_0/bias has shape \(4,\) in the checkpoint but '
                   r'\(8,\) in the model;', message), message
  assert 'another config' in message


def test_structure_mismatch_names_missing_leaf(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, {'a': jnp.ones(2)}, force=True)
    with pytest.raises(checkpoint.CheckpointError, match='b .*in the model but not in the'):
      ckpt.restore({'a': jnp.ones(2), 'b': jnp.ones(3)})
    with pytest.raises(checkpoint.CheckpointError, match='a .*in the checkpoint but not in'):
      ckpt.restore({})


def _two_steps(directory):
  with checkpoint.Checkpointer(directory, save_every=100) as ckpt:
    ckpt.save(100, {'x': jnp.full((64,), 1.0)})
    # Incompressible, so the array data is the largest file and the one corrupted.
    ckpt.save(200, {'x': jax.random.normal(jax.random.key(0), (64,))})


def _damage(step_dir, mode):
  """Damages a step as a disk, a user or a kill might; returns the file named in errors."""
  if mode == 'no_manifest':
    os.remove(os.path.join(step_dir, checkpoint._MANIFEST))
    return checkpoint._MANIFEST
  return os.path.relpath(_corrupt(step_dir, mode), step_dir)


_MODES = ['delete', 'garbage', 'truncate', 'no_manifest']


@pytest.mark.parametrize('mode', _MODES)
def test_damaged_latest_is_refused_whatever_the_damage(tmp_path, mode):
  directory = str(tmp_path / 'ck')
  _two_steps(directory)
  bad = _damage(os.path.join(directory, '200'), mode)
  with checkpoint.Checkpointer(directory, save_every=100) as ckpt:
    assert ckpt.latest_step() == 200  # no silent fallback, whatever the damage
    for step in (None, 200):
      with pytest.raises(checkpoint.CheckpointError) as e:
        ckpt.restore({'x': jnp.zeros((64,))}, step=step)
      message = str(e.value)
      assert f'checkpoint {directory}/200 is corrupt' in message
      assert bad in message
      assert (f'delete {directory}/200 and rerun (the stage then resumes from step 100)'
              in message)
      assert '--config.checkpoint.allow_restart=True' in message
    # The older, intact step is still readable when asked for.
    restored, _ = ckpt.restore({'x': jnp.zeros((64,))}, step=100)
    np.testing.assert_array_equal(restored['x'], 1.0)


@pytest.mark.parametrize('mode', _MODES)
def test_allow_restart_falls_back_with_warning_and_replaces(tmp_path, caplog, mode):
  directory = str(tmp_path / 'ck')
  _two_steps(directory)
  bad = _damage(os.path.join(directory, '200'), mode)
  with checkpoint.Checkpointer(directory, save_every=100, allow_restart=True) as ckpt:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert ckpt.latest_step() == 100
      restored, _ = ckpt.restore({'x': jnp.zeros((64,))})
    assert ckpt.restored_step == 100
    np.testing.assert_array_equal(restored['x'], 1.0)
    warnings = ' '.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f'{directory}/200' in warnings and bad in warnings
    # Training continues from 100 and reaches 200 again: the damaged step is replaced.
    assert ckpt.save(200, {'x': jnp.full((64,), 3.0)})
    restored, _ = ckpt.restore({'x': jnp.zeros((64,))})
    assert ckpt.restored_step == 200
    np.testing.assert_array_equal(restored['x'], 3.0)
  assert os.path.exists(os.path.join(directory, '200', checkpoint._MANIFEST))


def test_every_step_damaged(tmp_path, caplog):
  directory = str(tmp_path / 'ck')
  with checkpoint.Checkpointer(directory, save_every=1) as ckpt:
    ckpt.save(1, {'x': jax.random.normal(jax.random.key(1), (16,))})
    ckpt.save(2, {'x': jax.random.normal(jax.random.key(2), (16,))})
  _corrupt(os.path.join(directory, '1'), 'truncate')
  _corrupt(os.path.join(directory, '2'), 'truncate')
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.CheckpointError,
                       match=f'delete {directory}/2 and the damaged older steps {directory}/1 '
                             r'and rerun \(no intact step is left, so the stage then starts '
                             'from scratch'):
      ckpt.restore({'x': jnp.ones(16)})
  with checkpoint.Checkpointer(directory, allow_restart=True) as ckpt:
    with caplog.at_level(logging.WARNING):
      assert ckpt.latest_step() is None  # explicitly allowed: the stage starts from scratch
    assert 'every checkpoint in' in caplog.text and 'starts from scratch' in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match='every checkpoint .* is damaged') as e:
      ckpt.restore({'x': jnp.ones(16)})
  assert f'{directory}/1' in str(e.value) and f'{directory}/2' in str(e.value)


def test_only_step_damaged_says_scratch(tmp_path):
  directory = str(tmp_path)
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(4, {'x': jax.random.normal(jax.random.key(1), (16,))}, force=True)
  _corrupt(os.path.join(directory, '4'), 'garbage')
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.CheckpointError,
                       match='no intact step is left, so the stage then starts from scratch'):
      ckpt.restore({'x': jnp.ones(16)})


def test_no_checkpoint_raises(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in'):
      ckpt.restore({'x': jnp.ones(2)})


def test_every_saved_step_has_its_file_list_and_leftovers_are_removed(tmp_path):
  directory = str(tmp_path)
  with checkpoint.Checkpointer(directory, save_every=1, max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, {'x': jnp.full((4,), float(step))})
  assert sorted(os.listdir(directory)) == ['2', '3']
  for step in ('2', '3'):
    assert os.path.exists(os.path.join(directory, step, checkpoint._MANIFEST))
  # What kills leave behind: a step being written (orbax's and ours), a step being deleted.
  for name in ('4.orbax-checkpoint-tmp-1700000000', '4.staging-0123abcd',
               '4.staging-0123abcd.orbax-checkpoint-tmp-17', '1.deleting-89abcdef'):
    os.makedirs(os.path.join(directory, name, 'state'))
    with open(os.path.join(directory, name, 'state', '_METADATA'), 'w') as f:
      f.write('{"trunc')
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    restored, _ = ckpt.restore({'x': jnp.zeros(4)})
  np.testing.assert_array_equal(restored['x'], 3.0)
  assert sorted(os.listdir(directory)) == ['2', '3']


def test_save_and_load_pytree(tmp_path):
  path = str(tmp_path / 'db')
  tree = {'keys': jnp.arange(12.0).reshape(3, 4), 'values': np.ones((3, 2), np.uint8),
          'pair': (jnp.zeros(2, jnp.int32), jax.random.key(1))}
  checkpoint.save_pytree(path, tree, {'patch_size': 4})
  loaded, meta = checkpoint.load_pytree(path)
  assert meta == {'patch_size': 4}
  assert isinstance(loaded['keys'], np.ndarray) and loaded['keys'].dtype == np.float32
  np.testing.assert_array_equal(loaded['keys'], tree['keys'])
  np.testing.assert_array_equal(loaded['pair'][0], np.zeros(2, np.int32))
  assert loaded['pair'][1].dtype == jax.random.key(0).dtype
  loaded, _ = checkpoint.load_pytree(path, target=tree)
  _assert_same(loaded, tree)
  # Replacing is atomic and leaves no staging directories behind.
  checkpoint.save_pytree(path, {'keys': jnp.ones(2)})
  loaded, meta = checkpoint.load_pytree(path)
  assert meta == {} and list(loaded) == ['keys']
  assert os.listdir(tmp_path) == ['db']
  with pytest.raises(checkpoint.CheckpointError, match='keys has shape'):
    checkpoint.load_pytree(path, target={'keys': jnp.ones(3)})


def test_load_pytree_missing_or_corrupt(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='nothing_here does not exist'):
    checkpoint.load_pytree(str(tmp_path / 'nothing_here'))
  path = str(tmp_path / 'db')
  checkpoint.save_pytree(path, {'x': jax.random.normal(jax.random.key(0), (100,))})
  _corrupt(path, 'garbage')
  with pytest.raises(checkpoint.CheckpointError, match=f'{path} is corrupt'):
    checkpoint.load_pytree(path)
  os.remove(os.path.join(path, checkpoint._MANIFEST))
  with pytest.raises(checkpoint.CheckpointError, match=f'{path} is corrupt: it has no file list'):
    checkpoint.load_pytree(path)


def _run_python(code: str, env_extra: dict[str, str] | None = None, stderr=subprocess.PIPE):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', **(env_extra or {}))
  return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], env=env,
                          stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_sharded_save_restore_on_8_devices(tmp_path):
  code = f"""
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fiancee_jax import checkpoint
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharded = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    x = jax.device_put(jnp.arange(64.0).reshape(16, 4), sharded)
    keys = jax.device_put(jax.random.split(jax.random.key(0), 8), sharded)
    with checkpoint.Checkpointer({str(tmp_path)!r}) as ckpt:
      ckpt.save(1, {{'x': x, 'keys': keys}}, force=True)
      # Concrete replicated target.
      target = {{'x': jax.device_put(jnp.zeros((16, 4)), replicated),
                 'keys': jax.device_put(jax.random.split(jax.random.key(1), 8), replicated)}}
      out, _ = ckpt.restore(target)
      assert out['x'].sharding.is_equivalent_to(replicated, 2), out['x'].sharding
      assert out['keys'].sharding.is_equivalent_to(replicated, 1), out['keys'].sharding
      np.testing.assert_array_equal(out['x'], np.arange(64.0).reshape(16, 4))
      np.testing.assert_array_equal(jax.random.key_data(out['keys']),
                                    jax.random.key_data(keys))
      # Abstract target with a different partitioning.
      cols = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 4), ('a', 'b')), P(None, 'b'))
      out, _ = ckpt.restore({{'x': jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=cols),
                              'keys': jax.ShapeDtypeStruct((8,), keys.dtype, sharding=sharded)}})
      assert out['x'].sharding == cols, out['x'].sharding
      assert out['keys'].sharding.is_equivalent_to(sharded, 1), out['keys'].sharding
      np.testing.assert_array_equal(out['x'], np.arange(64.0).reshape(16, 4))
      assert out['keys'].dtype == keys.dtype
    print('OK')
  """
  proc = _run_python(code, {'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')
                                       + ' --xla_force_host_platform_device_count=8'})
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0 and 'OK' in stdout, stderr[-3000:]


def test_sigkill_mid_save_leaves_latest_finalised_step_intact(tmp_path):
  directory = str(tmp_path / 'ck')
  code = f"""
    import jax.numpy as jnp
    from fiancee_jax import checkpoint
    with checkpoint.Checkpointer({directory!r}, save_every=1, max_to_keep=3) as ckpt:
      for step in range(1, 10_000):
        print('saving', step, flush=True)
        ckpt.save(step, {{'w': jnp.full((512, 1024), float(step)), 'step': step}})
        print('saved', step, flush=True)
  """
  log_path = tmp_path / 'child.log'
  with open(log_path, 'w') as log:  # a file, not a pipe: a full pipe would stall the child
    proc = _run_python(code, stderr=log)
  last_saved = 0
  deadline = time.time() + 90
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    if line.startswith('saved'):
      last_saved = int(line.split()[1])
    if line.startswith('saving') and last_saved >= 3:
      break
  assert last_saved >= 3, log_path.read_text()[-3000:]
  time.sleep(0.02)  # a save of this 2 MB state takes ~50-100 ms: kill inside it
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  with checkpoint.Checkpointer(directory, save_every=1, max_to_keep=3) as ckpt:
    latest = ckpt.latest_step()
    assert latest is not None and latest >= last_saved
    # Only complete steps, each with its file list: a kill never leaves a damaged step.
    assert set(os.listdir(directory)) == {str(s) for s in ckpt.all_steps()}
    for step in ckpt.all_steps():
      assert os.path.exists(os.path.join(directory, str(step), checkpoint._MANIFEST))
    restored, _ = ckpt.restore({'w': jnp.zeros((512, 1024)), 'step': 0})
    assert ckpt.restored_step == latest
  assert restored['step'] == latest
  np.testing.assert_array_equal(restored['w'], float(latest))
