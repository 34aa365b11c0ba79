"""Bad input fails early with a message naming the problem (DESIGN: errors name the fix)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import config_checks
from fiancee_jax import metric_logging
from fiancee_jax import model as model_lib
from fiancee_jax import pipeline
from fiancee_jax import tasks
from fiancee_jax.training import artifact_io
from fiancee_jax.training import backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_config_key_on_the_command_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'fiancee_jax.main', f'--config={REPO}/configs/landscapes.py:tiny',
       f'--workdir={tmp_path}', '--config.train.nmu_steps=3'],
      env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert out.returncode != 0
  assert 'nmu_steps' in out.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_unknown_variant_and_stage():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    landscapes.get_config('huge')
  with pytest.raises(ValueError, match='unknown stage'):
    config_checks.parse_stages('backbone,trian')


def test_unreachable_resolution_is_refused_before_compute(tmp_path):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.resolution = (20, 20)
  with pytest.raises(ValueError, match='cannot be reached by 4 generator blocks'):
    pipeline.run(config, str(tmp_path), 'backbone')
  assert not os.listdir(tmp_path)


def test_other_config_errors():
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.train.ema_decay = 1.5
  with pytest.raises(ValueError, match='config.train.ema_decay'):
    config_checks.check_config(config)
  for key, value, match in (('calibration', 'conformal', "calibration='conformal'"),
                            ('target_met', 1.0, r'target_met must be a finite number in \(0, 1\)')):
    config = landscapes.get_config('tiny')
    with config.unlocked():
      config.router[key] = value
    with pytest.raises(ValueError, match=match):
      config_checks.check_config(config)


def _model_stub():
  return model_lib.FianceeModel(
      exit_model=None, params={}, predictor=None, predictor_params=None,
      margins=np.zeros(2, np.float32), exit_gflops=(1.0, 2.0, 3.0), predictor_gflops=0.1,
      task=tasks.Synthesis(num_classes=12, resolution=(16, 16), z_dim=8))


@pytest.mark.parametrize('labels, match', [
    (np.zeros((16, 16), np.int32), 'add a batch axis'),
    (np.zeros((1, 1, 16, 16), np.int32), r'int32 \[B, H, W\]'),
    (np.zeros((1, 16, 16), np.float32), 'integer array'),
    (np.zeros((1, 8, 16), np.int32), 'trained at 16x16'),
    (np.full((1, 16, 16), 212, np.int32), 'class id 212 but the config has 12 classes'),
    (np.full((1, 16, 16), -1, np.int32), 'class id -1'),
])
def test_label_errors(labels, match):
  with pytest.raises(ValueError, match=match):
    _model_stub().check_data(labels)


def _reenact_stub():
  return model_lib.FianceeModel(
      exit_model=None, params={}, predictor=None, predictor_params=None,
      margins=np.zeros(2, np.float32), exit_gflops=(1.0, 2.0, 3.0), predictor_gflops=0.1,
      task=tasks.Reenactment(resolution=(32, 32)))


_IMG = np.zeros((2, 32, 32, 3), np.float32)


@pytest.mark.parametrize('data, match', [
    (_IMG, r'takes \(source, driver\)'),
    ((_IMG[0], _IMG[0]), 'add a batch axis'),
    ((_IMG, _IMG[..., :1]), r'driver must be float32 \[B, H, W, 3\]'),
    ((_IMG.astype(np.uint8), _IMG), 'dtype uint8; convert'),
    ((_IMG[:, :16], _IMG[:, :16]), 'trained at 32x32'),
    ((_IMG, _IMG[:1]), 'must have the same shape'),
    ((_IMG, np.full_like(_IMG, np.nan)), 'driver has .* non-finite'),
    ((_IMG + 2.0, _IMG), r'source must be in \[-1, 1\]'),
])
def test_reenactment_data_errors(data, match):
  with pytest.raises(ValueError, match=match):
    _reenact_stub().check_data(data)


def test_reenactment_inputs_have_no_noise():
  m = _reenact_stub()
  inputs = m.make_inputs((_IMG, _IMG), jax.random.key(0))
  assert len(inputs) == 2
  assert len(m.check_inputs(inputs)) == 2
  with pytest.raises(ValueError, match=r'inputs must be the tuple \(source, driver\)'):
    m.check_inputs(inputs + (np.zeros((2, 8)),))


@pytest.mark.parametrize('t', [-0.1, float('nan'), float('inf'), 'abc', None])
def test_threshold_errors(t):
  with pytest.raises(ValueError, match='finite non-negative'):
    model_lib.check_threshold(t)


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path, data_dir,
                                                                monkeypatch):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
    config.train.update(num_steps=8, checkpoint_every=2, sample_every=100)
    config.backbone.update(width_ratios=(4, 2, 1), d_width_ratios=(2,))  # a quicker compile
  make = backbone.make_train_step

  def poisoned(cfg):
    step = make(cfg)

    def f(state, batch):
      new, m = step(state, batch)
      bad = state.step >= 3  # steps 4.. report NaN
      m = dict(m, **{'g/loss': jnp.where(bad, jnp.nan, m['g/loss'])})
      return new, m

    return f

  monkeypatch.setattr(backbone, 'make_train_step', poisoned)
  with pytest.raises(metric_logging.NonFiniteMetricError, match='g/loss'):
    backbone.train(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints' / 'backbone'))
  assert ckpt.latest_step() == 2
  target = jax.eval_shape(lambda: backbone.init_state(config, jax.random.key(0)))
  state, _ = ckpt.restore(target)
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.g_params))
  assert not artifacts.exists(str(tmp_path), 'backbone')  # nothing exported


def test_missing_backbone_artifact_names_the_directory_and_the_stage(tmp_path):
  config = landscapes.get_config('tiny')
  with pytest.raises(artifacts.ArtifactError,
                     match='no backbone artifact at .*artifacts/backbone; run --stages=backbone'):
    artifact_io.load_backbone(config, str(tmp_path))


@pytest.mark.parametrize('key,value,match', [
    ('loss', 'huber', "config.predictor.loss='huber'"),
    ('quantile', 1.0, r'config.predictor.quantile must be a finite number in \(0, 1\)'),
    ('quantile', float('nan'), 'config.predictor.quantile'),
])
def test_predictor_loss_settings_are_checked(key, value, match):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.predictor[key] = value
  with pytest.raises(ValueError, match=match):
    config_checks.check_config(config)
