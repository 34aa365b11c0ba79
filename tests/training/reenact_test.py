"""Tests of the reenactment trainer on the tiny avatars config (one compile shared by all)."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import avatars as avatars_config
from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import config_checks
from fiancee_jax import metric_logging
from fiancee_jax.data import sources
from fiancee_jax.training import artifact_io
from fiancee_jax.training import reenact as reenact_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  config = avatars_config.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = str(tmp_path_factory.mktemp('avatars_tfds'))
    # One batch is the whole training set, so losses of successive steps are comparable.
    config.data.update(num_train=8, num_validation=4, num_test=4)
    config.train.update(num_steps=6, checkpoint_every=2, log_every=1, sample_every=100,
                        num_eval=4, num_sample_images=4)
    # The trainer's mechanics do not depend on the distance; MS-SSIM's gradient would
    # double the compile time of the step.
    config.distance.name = 'l1'
  return config


class _Interrupted(Exception):
  pass


@pytest.fixture(scope='module')
def runs(config, tmp_path_factory):
  """(uninterrupted workdir, interrupted-and-resumed workdir, error before resuming)."""
  full = str(tmp_path_factory.mktemp('full'))
  art = reenact_training.train(config, full)
  assert art.metadata == {'steps': 6}

  killed = str(tmp_path_factory.mktemp('killed'))
  real_batches = sources.train_batches

  def dying_batches(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == 3:  # after the checkpoint of step 2, during step 4
        raise _Interrupted()
      yield batch

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sources, 'train_batches', dying_batches)
    with pytest.raises(_Interrupted):
      reenact_training.train(config, killed)
  assert checkpoint.Checkpointer(os.path.join(killed, 'checkpoints', 'backbone')).all_steps() == [2]
  with pytest.raises(artifacts.ArtifactError, match='no backbone artifact'):
    artifact_io.load_backbone(config, killed)  # nothing is exported before the end
  resumed = reenact_training.train(config, killed)
  assert resumed.metadata == {'steps': 6}
  return full, killed


def test_a_few_steps_lower_the_loss(runs):
  records = [r for r in metric_logging.read_metrics(runs[0], 'backbone') if 'g/l1' in r]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]['g/l1'] < records[0]['g/l1']
  assert records[-1]['g/loss'] < records[0]['g/loss']
  final = [r for r in metric_logging.read_metrics(runs[0], 'backbone') if 'val/l1' in r][-1]
  assert final['step'] == 6
  assert {'val/l1', 'val/copy_source/l1', 'val/copy_driver/l1'} <= set(final)
  assert os.path.exists(os.path.join(runs[0], 'samples', 'backbone_000006.png'))


def test_resume_after_interruption_gives_the_same_parameters(config, runs):
  full, killed = runs
  a = artifact_io.load_backbone(config, full)
  b = artifact_io.load_backbone(config, killed)
  assert a.fingerprint == b.fingerprint  # hashes every byte of the EMA generator
  for x, y in zip(jax.tree.leaves(a.tree), jax.tree.leaves(b.tree)):
    np.testing.assert_array_equal(x, y)
  assert jax.tree.leaves(a.tree['batch_stats'])  # spectral-norm sigmas of the EMA weights


def test_a_finished_stage_is_not_trained_again(config, runs, tmp_path):
  full = runs[0]
  lines = len(metric_logging.read_metrics(full))
  before = artifact_io.load_backbone(config, full).fingerprint
  assert reenact_training.train(config, full).fingerprint == before
  # The artifact lost (e.g. killed between the final checkpoint and the export): exported
  # again from the finished checkpoint, without a step.
  shutil.move(artifacts.path(full, 'backbone'), str(tmp_path / 'moved'))
  assert reenact_training.train(config, full).fingerprint == before
  assert artifact_io.load_backbone(config, full).fingerprint == before
  assert len(metric_logging.read_metrics(full)) == lines


def test_load_backbone_without_a_run_says_what_to_do(config, tmp_path):
  with pytest.raises(artifacts.ArtifactError, match='run --stages=backbone'):
    artifact_io.load_backbone(config, str(tmp_path))


def test_identity_loss_rewards_codes_of_the_motion_only():
  motion = jax.random.normal(jax.random.key(0), (8, 6))
  identity = jax.random.normal(jax.random.key(1), (8, 6))
  fn = jax.jit(reenact_training.identity_loss, static_argnums=2)
  loss = lambda a, b: float(fn(a, b, 0.1))
  # Codes that see only the motion match their swap: the loss is near 0.
  assert loss(motion, motion) < 0.05
  # Codes dominated by identity (the swap has another one) do not: ~log(8).
  assert loss(motion + 5 * identity, motion + 5 * identity[::-1]) > 1.0
  # Codes that ignore everything (a constant) cannot tell the examples apart: log(8).
  const = jnp.ones((8, 6))
  np.testing.assert_allclose(loss(const, const), np.log(8), rtol=1e-5)
  g = jax.grad(lambda x: reenact_training.identity_loss(x, motion, 0.1))(motion + identity)
  assert np.isfinite(np.asarray(g)).all() and np.abs(g).sum() > 0


def test_wrong_dataset_is_refused(config):
  bad = avatars_config.get_config('tiny')
  with bad.unlocked():
    bad.data.name = 'landscapes'
  with pytest.raises(ValueError, match=r"config\.data\.name='landscapes' gives \(labels\) but "
                     r"the 'reenact' backbone takes \(source, driver\)"):
    config_checks.check_config(bad)
  with pytest.raises(ValueError, match='unknown split'):
    sources.data_source(config, 'val')


def test_train_step_rejects_bad_batches(config):
  step = reenact_training.make_train_step(config)
  state = jax.eval_shape(lambda: reenact_training.init_state(config, jax.random.key(0)))
  good = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  for bad, match in ((jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8), '127.5'),
                     (jax.ShapeDtypeStruct((8, 32, 32), jnp.float32), r'\[B, H, W, 3\]')):
    batch = {'source': bad, 'driver': good, 'target': good, 'swap': good}
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(step, state, batch)
