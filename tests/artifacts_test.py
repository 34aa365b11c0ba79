"""Params-only artifacts: round trip, fingerprints, foreign and damaged artifacts refused."""
import os

import numpy as np
import pytest

from configs import landscapes
from fiancee_jax import artifacts


@pytest.fixture
def config():
  return landscapes.get_config('tiny')


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {'params': {'w': rng.normal(size=(3, 4)).astype(np.float32)},
          'batch_stats': {'mean': np.zeros(4, np.float32)}}


def test_round_trip_and_manifest(tmp_path, config):
  wd = str(tmp_path)
  fp = artifacts.save(wd, 'backbone', _tree(), config=config, metadata={'steps': 4})
  art = artifacts.load(wd, 'backbone', _tree(1), config=config)
  np.testing.assert_array_equal(art.tree['params']['w'], _tree()['params']['w'])
  assert art.fingerprint == fp and art.metadata == {'steps': 4}
  assert artifacts.read_manifest(wd, 'backbone')['fingerprint'] == fp
  # Same arrays and config: same fingerprint; other arrays: another.
  assert artifacts.save(str(tmp_path / 'b'), 'backbone', _tree(), config=config) == fp
  assert artifacts.save(str(tmp_path / 'c'), 'backbone', _tree(2), config=config) != fp


def test_foreign_parent_refused(tmp_path, config):
  wd = str(tmp_path)
  artifacts.save(wd, 'database', {'keys': np.ones((2, 2), np.float32)}, config=config,
                 parents={'backbone': 'a' * 64})
  art = artifacts.load(wd, 'database', config=config, parents={'backbone': 'a' * 64})
  assert art.parents == {'backbone': 'a' * 64}
  with pytest.raises(artifacts.ArtifactError, match='built from backbone aaaaaaaaaaaa but '
                     "this workdir's backbone is bbbbbbbbbbbb"):
    artifacts.load(wd, 'database', config=config, parents={'backbone': 'b' * 64})


def test_other_config_refused(tmp_path, config):
  wd = str(tmp_path)
  artifacts.save(wd, 'backbone', _tree(), config=config)
  with config.unlocked():
    config.backbone.ch = 3
  with pytest.raises(artifacts.ArtifactError, match=r'config.backbone is'):
    artifacts.load(wd, 'backbone', config=config)


def test_missing_and_damaged(tmp_path, config):
  wd = str(tmp_path)
  with pytest.raises(artifacts.ArtifactError, match='no exits artifact .* --stages=exits'):
    artifacts.load(wd, 'exits')
  artifacts.save(wd, 'backbone', _tree(), config=config)
  root = artifacts.path(wd, 'backbone')
  # Overwrite the largest data file with same-size garbage: refused, never loaded.
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
           if not f.endswith('.json')]
  big = max(files, key=os.path.getsize)
  size = os.path.getsize(big)
  with open(big, 'wb') as f:
    f.write(os.urandom(size))
  with pytest.raises(artifacts.ArtifactError, match='cannot be read|damaged'):
    artifacts.load(wd, 'backbone', _tree())


def test_unknown_kind(tmp_path):
  with pytest.raises(ValueError, match='unknown artifact kind'):
    artifacts.path(str(tmp_path), 'discriminator')
