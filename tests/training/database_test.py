"""The database stage builds nothing for unguided exits."""
import os

from fiancee_jax import artifacts
from fiancee_jax.training import database


def test_unguided_exits_need_no_database(tiny_config, tmp_path):
  with tiny_config.unlocked():
    tiny_config.exits.guided = False
  # No backbone in this workdir: the stage must not even look for one.
  assert database.build(tiny_config, str(tmp_path)) is None
  assert not artifacts.exists(str(tmp_path), 'database')
  assert not os.listdir(tmp_path)
