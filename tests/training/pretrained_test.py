"""Shipped pretrained backbones: shipped from a workdir, installed by the backbone stage,
refused when damaged or built for another config (with the way out in the message)."""
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import pytest

from fiancee_jax import artifacts
from fiancee_jax import tasks
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io
from fiancee_jax.training import backbone
from fiancee_jax.training import pretrained

NAME = 'tiny_test'


@pytest.fixture
def shipped(tmp_path, tiny_config, monkeypatch):
  """(config naming the shipped backbone, its directory, the artifact it was shipped from)."""
  config = tiny_config
  specs = tasks.input_specs(factory.get_task(config), 1)
  g = factory.make_generator(config)
  # An untrained generator is as good as a trained one for the mechanism.
  variables = jax.jit(lambda: g.init(jax.random.key(0),
                                     *[jnp.zeros(s.shape, s.dtype) for s in specs]))()
  trained = str(tmp_path / 'trained')
  art = artifact_io.export_backbone(config, trained, variables['params'],
                                    variables['batch_stats'])
  assets = tmp_path / 'assets'
  root = pretrained.ship(trained, NAME, str(assets))
  monkeypatch.setattr(pretrained, 'ASSETS_DIR', str(assets))
  with config.unlocked():
    config.train.pretrained = NAME
  return config, root, art


def test_the_backbone_stage_installs_the_shipped_backbone(shipped, tmp_path):
  config, root, art = shipped
  assert pretrained.available() == [NAME]
  wd = str(tmp_path / 'job')
  installed = backbone.train(config, wd)
  assert installed.fingerprint == art.fingerprint
  assert installed.metadata == {'steps': config.train.num_steps}
  assert not os.path.exists(os.path.join(wd, 'checkpoints'))  # nothing was trained
  assert artifact_io.load_backbone(config, wd).fingerprint == art.fingerprint
  assert backbone.train(config, wd).fingerprint == art.fingerprint  # a rerun keeps it
  if shutil.which('sha256sum'):  # the sha256 file is in sha256sum's format
    out = subprocess.run(['sha256sum', '--check', '--quiet', 'sha256'], cwd=root,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
  with pytest.raises(FileExistsError, match='--overwrite'):
    pretrained.ship(str(tmp_path / 'trained'), NAME)


def test_damaged_files_are_refused(shipped, tmp_path):
  config, root, _ = shipped
  victim = max((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, 'backbone'))
                for f in fs), key=os.path.getsize)
  with open(victim, 'r+b') as f:
    byte = f.read(1)
    f.seek(0)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(ValueError, match=r"does not match its sha256.*pretrained=''"):
    backbone.train(config, str(tmp_path / 'job'))
  assert not artifacts.exists(str(tmp_path / 'job'), 'backbone')
  os.remove(victim)
  with pytest.raises(ValueError, match=r"is missing.*pretrained=''"):
    backbone.train(config, str(tmp_path / 'job'))


def test_a_backbone_of_another_config_is_refused(shipped, tmp_path):
  config, _, _ = shipped
  with config.unlocked():
    config.backbone.ch = 3
  with pytest.raises(ValueError, match=r"another config \(config.backbone is .*pretrained=''"):
    backbone.train(config, str(tmp_path / 'job'))
  with config.unlocked():
    config.backbone.ch = 2
    config.train.pretrained = 'nope'
  with pytest.raises(ValueError, match=r"no shipped backbone .*nope.*'tiny_test'.*pretrained=''"):
    backbone.train(config, str(tmp_path / 'job'))


def test_an_adversarial_exit_loss_needs_a_trained_discriminator(shipped, tmp_path):
  config, _, _ = shipped
  art = backbone.train(config, str(tmp_path / 'job'))
  with pytest.raises(ValueError, match="adversarial_weight=0, or --config.train.pretrained=''"):
    backbone.load_discriminator(config, str(tmp_path / 'job'), art)
