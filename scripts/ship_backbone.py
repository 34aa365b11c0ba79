"""Ships a trained workdir's backbone artifact as a pretrained backbone of the package.

  python scripts/ship_backbone.py --workdir=runs/landscapes --name=landscapes_64

copies WORKDIR/artifacts/backbone to fiancee_jax/assets/backbones/NAME/backbone and writes
NAME/sha256; a config with `--config.train.pretrained=NAME` (and the same backbone and data
values) then installs it instead of training (fiancee_jax/training/pretrained.py).
"""
import os
import sys

from absl import app
from absl import flags

try:
  from fiancee_jax.training import pretrained
except ImportError:  # run as `python scripts/ship_backbone.py` from a source checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from fiancee_jax.training import pretrained

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir whose backbone stage finished.',
                               required=True)
_NAME = flags.DEFINE_string('name', None, 'Name to ship it as (config.train.pretrained).',
                            required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a shipped backbone of that name.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  root = pretrained.ship(_WORKDIR.value, _NAME.value, overwrite=_OVERWRITE.value)
  print(f'shipped {root}; use it with --config.train.pretrained={_NAME.value}')


if __name__ == '__main__':
  app.run(main)
