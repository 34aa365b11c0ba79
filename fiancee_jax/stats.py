"""Prints parameter counts and GFLOPs of a config's models as JSON, without training.

  python -m fiancee_jax.stats --config=configs/oasis_ade20k.py

GFLOPs are XLA's cost analysis of each compiled forward at batch 1 (multiply-add = 2).
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import app
from ml_collections import config_flags

from fiancee_jax import config_checks
from fiancee_jax.metrics import flops
from fiancee_jax.models import factory

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)


def backbone_stats(config: ml_collections.ConfigDict) -> dict:
  """{'params': int, 'gflops': float} of the generator forward at batch 1."""
  g = factory.make_generator(config)
  h, w = config.data.resolution
  labels = jax.ShapeDtypeStruct((1, h, w), jnp.int32)
  z = jax.ShapeDtypeStruct((1, config.backbone.z_dim), jnp.float32)
  variables = jax.eval_shape(g.init, jax.random.key(0), labels, z)
  gf = flops.gflops(lambda v, l, z: g.apply(v, l, z), variables, labels, z)
  return {'params': flops.param_count(variables['params']), 'gflops': gf}


def compute_stats(config: ml_collections.ConfigDict) -> dict:
  """All costs that exist for this config."""
  config_checks.check_config(config)
  return {'backbone': backbone_stats(config)}


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  print(json.dumps(compute_stats(_CONFIG.value), indent=2))


if __name__ == '__main__':
  app.run(main)
