"""`python -m fiancee_jax.stats`: flags in, costs.compute_stats out as JSON."""
import json
import types

import pytest
from absl import app

from configs import landscapes
from fiancee_jax import stats
from fiancee_jax.metrics import costs


def test_extra_arguments_are_a_usage_error():
  with pytest.raises(app.UsageError, match=r"unexpected arguments \['tiny'\]"):
    stats.main(['stats', 'tiny'])


def test_prints_the_costs_as_json(monkeypatch, capsys):
  # _CONFIG is defined only when the module runs as a script.
  monkeypatch.setattr(stats, '_CONFIG', types.SimpleNamespace(value=None), raising=False)
  with pytest.raises(app.UsageError, match='--config is required'):
    stats.main(['stats'])
  config = landscapes.get_config('tiny')
  with config.unlocked():
    # One branch: fewer paths to compile.
    config.exits.update(attach_after=(2,), branch_width_mults=(), branch_hidden_mults=())
  monkeypatch.setattr(stats, '_CONFIG', types.SimpleNamespace(value=config))
  stats.main(['stats'])
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {'backbone', 'exits', 'predictor', 'database'}
  assert [e['attach_after'] for e in printed['exits']] == [2, 3]
  assert printed['backbone']['gflops'] == costs.backbone_stats(config)['gflops']
