"""Writes a PNG grid of a split: coloured label map | image, one row each.

  python -m fiancee_jax.data.show --config=configs/landscapes.py --out=grid.png \
      [--split=train] [--num=16] [--config.data.resolution='(128, 128)']

Builds the dataset first if it is missing (landscapes: a few seconds at 64x64).
"""
from typing import Sequence

import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from fiancee_jax.data import sources
from fiancee_jax.data import visualize

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_OUT = flags.DEFINE_string('out', 'grid.png', 'Output PNG path.')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'validation', 'test'],
                           'Split to show.')
_NUM = flags.DEFINE_integer('num', 16, 'Number of examples (rows).')


def show(config: ml_collections.ConfigDict, *, split: str, num: int,
         out: str) -> np.ndarray:
  """Writes the first `num` examples of `split` as a grid; returns the rows.

  Args:
    config: a label-map config (config.data names the dataset).
    split: 'train', 'validation' or 'test'.
    num: examples to draw (fewer if the split is smaller).
    out: PNG path.

  Returns:
    labels uint8 [N, H, W] of the drawn examples.
  """
  if num < 1:
    raise ValueError(f'--num must be >= 1, got {num}')
  source = sources.data_source(config, split)
  examples = [source[i] for i in range(min(num, len(source)))]
  labels = np.stack([ex['labels'] for ex in examples])
  images = np.stack([ex['image'] for ex in examples])
  visualize.save_grid(
      [visualize.label_map_to_rgb(labels, config.data.num_classes), images], out)
  return labels


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. '
                         '--config=configs/landscapes.py')
  show(_CONFIG.value, split=_SPLIT.value, num=_NUM.value, out=_OUT.value)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
