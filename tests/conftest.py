"""Shared fixtures: tiny configs and a per-session TFDS data_dir."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import landscapes  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data_dir for the whole session, so the tiny dataset is built once."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def tiny_config(data_dir):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
  return config
