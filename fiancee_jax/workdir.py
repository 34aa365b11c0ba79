"""What a workdir holds about itself: the config it was made with (config.json)."""
import json
import os

import ml_collections


def config_path(workdir: str) -> str:
  """WORKDIR/config.json, written by the pipeline before any stage runs."""
  return os.path.join(workdir, 'config.json')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `workdir` was made with (locked; sequences come back as lists).

  Raises:
    FileNotFoundError: no config.json (names the path and the way on).
    ValueError: config.json is not a JSON object (names the path).
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir!r} is not a fiancee-jax workdir (run '
        'python -m fiancee_jax.main --workdir=... first), or pass the config explicitly')
  with open(path) as f:
    text = f.read()
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); it may be truncated: restore it, or '
                     'pass the config explicitly') from None
  if not isinstance(values, dict):
    raise ValueError(f'{path} holds a JSON {type(values).__name__}, not a config object')
  return ml_collections.ConfigDict(values).lock()
