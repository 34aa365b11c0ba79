"""A backbone run killed with SIGKILL between checkpoints and resumed ends bit for bit where an
uninterrupted run does."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from configs import landscapes
from fiancee_jax.training import backbone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ['--config.train.num_steps=24', '--config.train.checkpoint_every=4',
             '--config.train.sample_every=100', '--config.train.log_every=4']


def _cmd(workdir, data_dir):
  return [sys.executable, '-m', 'fiancee_jax.main',
          f'--config={REPO}/configs/landscapes.py:tiny', f'--workdir={workdir}',
          '--stages=backbone', f'--config.data.data_dir={data_dir}', *OVERRIDES]


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')


def _final(workdir, data_dir):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
    config.train.update(num_steps=24, checkpoint_every=4, sample_every=100, log_every=4)
  g, d = backbone.load_backbone(config, str(workdir))
  return jax.device_get((g, d))


def test_sigkill_and_resume_matches_uninterrupted(tmp_path, data_dir):
  full, killed = tmp_path / 'full', tmp_path / 'killed'
  a = subprocess.Popen(_cmd(full, data_dir), env=_env(), cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, err = a.communicate(timeout=600)
  assert a.returncode == 0, err[-3000:]

  b = subprocess.Popen(_cmd(killed, data_dir), env=_env(), cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = killed / 'checkpoints' / 'backbone'
  deadline = time.time() + 600
  while time.time() < deadline and b.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.05)
  assert b.poll() is None, 'run finished before it could be killed'
  b.send_signal(signal.SIGKILL)
  b.wait()
  steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
  assert steps and max(steps) < 24

  c = subprocess.run(_cmd(killed, data_dir), env=_env(), cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert c.returncode == 0, c.stderr[-3000:]
  assert 'resumed at step' in c.stderr
  ga, gb = _final(full, data_dir), _final(killed, data_dir)
  # Resume is exact: same data position, same per-step keys, same compiled step.
  assert jax.tree_util.tree_structure(ga) == jax.tree_util.tree_structure(gb)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(x, y)
