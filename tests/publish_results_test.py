"""scripts/publish_results.py: command.txt names every setting a run changed."""
import importlib.util
import json
import os

import pytest

from configs import landscapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'publish_results', os.path.join(REPO, 'scripts', 'publish_results.py'))
publish_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(publish_results)


def _workdir(tmp_path, config):
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config.to_json())
  return str(tmp_path)


def test_overrides_are_the_settings_that_differ_from_the_config(tmp_path):
  config = landscapes.get_config()
  with config.unlocked():
    config.exits.update(z_aware=False, branch_width_mults=(0.25, 0.5))
    config.database.metric = 'l2'
  assert publish_results.config_overrides('configs/landscapes.py',
                                          _workdir(tmp_path, config)) == [
      "--config.database.metric='l2'", '--config.exits.branch_width_mults=(0.25,0.5)',
      '--config.exits.z_aware=False']
  # Against its own variant, a variant's run changes nothing.
  assert publish_results.config_overrides(
      'configs/landscapes.py:guided',
      _workdir(tmp_path, landscapes.get_config('guided'))) == []


def test_a_key_the_config_lacks_is_refused(tmp_path):
  wd = _workdir(tmp_path, landscapes.get_config())
  with open(os.path.join(wd, 'config.json')) as f:
    config = json.load(f)
  config['exits']['width_multiplier'] = 2
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump(config, f)
  with pytest.raises(SystemExit, match=r"keys that configs/landscapes.py lacks: "
                                       r"\['exits.width_multiplier'\]"):
    publish_results.config_overrides('configs/landscapes.py', wd)
