"""Prepares the dataset of a config (TFDS, array_record) and prints its split sizes.

  python -m fiancee_jax.data.prepare --config=configs/oasis_ade20k.py \
      --config.data.manual_dir=/data/ADEChallengeData2016 [--config.data.data_dir=DIR]

Real datasets are read from `config.data.manual_dir` (ADE20K: `fiancee_jax/data/ade20k.py`,
Cityscapes: `fiancee_jax/data/cityscapes.py` say where each file goes); the procedural ones
are generated. Every stage prepares a missing dataset by itself; this command does it
ahead of a run (on one machine, then copy data_dir) and checks the layout and the splits.
"""
import json
from collections.abc import Sequence

import ml_collections
from absl import app
from ml_collections import config_flags

from fiancee_jax.data import sources

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')


def prepare(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Prepares config.data's dataset if needed; returns {split: examples}."""
  return {split: len(sources.data_source(config, split))
          for split in ('train', 'validation', 'test')}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/oasis_ade20k.py')
  sizes = prepare(_CONFIG.value)
  print(json.dumps({'dataset': _CONFIG.value.data.name, 'splits': sizes}))


if __name__ == '__main__':
  app.run(main)
