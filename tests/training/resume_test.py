"""A backbone run stopped part-way (SIGKILL, or SIGTERM as a preemption notice) and resumed
ends with the parameters of an uninterrupted run, bit for bit."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax.training import backbone

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 40
OVERRIDES = [f'--config.train.num_steps={NUM_STEPS}', '--config.train.checkpoint_every=4',
             '--config.train.sample_every=100', '--config.train.log_every=4']
PREEMPTED_STATUS = 143


def _cmd(workdir, data_dir):
  return [sys.executable, '-m', 'fiancee_jax.main',
          f'--config={REPO}/configs/landscapes.py:tiny', f'--workdir={workdir}',
          '--stages=backbone', f'--config.data.data_dir={data_dir}', *OVERRIDES]


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')


def _config(data_dir):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
    config.train.update(num_steps=NUM_STEPS, checkpoint_every=4, sample_every=100,
                        log_every=4)
  return config


def _final(workdir, data_dir):
  """(fingerprint of the backbone artifact, whole finished training state on the host)."""
  config = _config(data_dir)
  target = jax.eval_shape(lambda: backbone.init_state(config, jax.random.key(0)))
  state, _ = checkpoint.restore_finished(str(workdir / 'checkpoints' / 'backbone'), target,
                                         stage='backbone', total_steps=NUM_STEPS)
  state = state._replace(rng=jax.random.key_data(state.rng))
  return artifacts.read_manifest(str(workdir), 'backbone')['fingerprint'], jax.device_get(state)


def _assert_same_run(a, b):
  assert a[0] == b[0]  # the fingerprint hashes every byte of the EMA generator
  leaves_a, leaves_b = jax.tree.leaves(a[1]), jax.tree.leaves(b[1])
  assert len(leaves_a) == len(leaves_b) > 20
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def _steps(ckpt_dir):
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if (
      ckpt_dir.exists()) else []


def _start_and_wait_for_a_checkpoint(workdir, data_dir):
  proc = subprocess.Popen(_cmd(workdir, data_dir), env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpt_dir = workdir / 'checkpoints' / 'backbone'
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None and not _steps(ckpt_dir):
    time.sleep(0.02)
  assert proc.poll() is None, 'the run finished (or died) before it could be stopped'
  return proc, ckpt_dir


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  wd = tmp_path_factory.mktemp('full')
  out = subprocess.run(_cmd(wd, data_dir), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return _final(wd, data_dir)


def _resume(workdir, data_dir):
  out = subprocess.run(_cmd(workdir, data_dir), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed at step' in out.stderr


def test_sigterm_saves_exits_and_resumes_bit_exact(uninterrupted, tmp_path, data_dir):
  proc, ckpt_dir = _start_and_wait_for_a_checkpoint(tmp_path, data_dir)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == PREEMPTED_STATUS, err[-3000:]
  assert 'preempted' in err and 'Traceback' not in err
  stopped = _steps(ckpt_dir)[-1]
  assert 4 < stopped < NUM_STEPS  # saved at the step boundary after the signal, not at 4
  assert not os.path.exists(tmp_path / 'artifacts' / 'backbone')
  _resume(tmp_path, data_dir)
  _assert_same_run(_final(tmp_path, data_dir), uninterrupted)


def test_sigkill_and_resume_matches_uninterrupted(uninterrupted, tmp_path, data_dir):
  proc, ckpt_dir = _start_and_wait_for_a_checkpoint(tmp_path, data_dir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _steps(ckpt_dir) and max(_steps(ckpt_dir)) < NUM_STEPS
  _resume(tmp_path, data_dir)
  _assert_same_run(_final(tmp_path, data_dir), uninterrupted)
