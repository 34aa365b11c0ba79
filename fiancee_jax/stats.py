"""Prints parameter counts and GFLOPs of a config's models as JSON, without training.

  python -m fiancee_jax.stats --config=configs/oasis_ade20k.py

The numbers are metrics/costs.py's `compute_stats`: XLA's cost analysis of each compiled
forward at batch 1 (multiply-add = 2), on the plain XLA kernels.
"""
import json

from absl import app
from ml_collections import config_flags

from fiancee_jax import config_checks
from fiancee_jax.metrics import costs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: this command takes only flags, '
                         'e.g. --config=configs/landscapes.py')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/landscapes.py')
  try:
    stats = costs.compute_stats(_CONFIG.value)
  except config_checks.ConfigError as e:
    raise SystemExit(f'FATAL: {e}') from None
  print(json.dumps(stats, indent=2))


if __name__ == '__main__':
  # Flags are defined only when run as a script, so importing this module is side-effect free.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  app.run(main)
