"""Loads what a workdir holds into a FianceeModel (after the predictor stage)."""
import jax
import ml_collections
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax import stats
from fiancee_jax.models import factory
from fiancee_jax.training import exits as exits_training
from fiancee_jax.training import predictor as predictor_training


def load_model(config: ml_collections.ConfigDict, workdir: str,
               variant: str | None = None) -> model_lib.FianceeModel:
  """The trained model of `workdir` (the guided exits unless `variant='unguided'`).

  Raises:
    checkpoint.CheckpointError naming the missing stage, ValueError if the database or a
    checkpoint does not belong to this config.
  """
  variant = variant or exits_training.variants(config)[0]
  guided = variant == 'guided'
  params = predictor_training.trained_exit_params(config, workdir, variant)
  pp, cal = predictor_training.load_predictor(config, workdir)
  costs = stats.exit_stats(config, guided=guided)
  return model_lib.FianceeModel(
      exit_model=factory.make_exit_model(config, guided=guided),
      params=jax.device_put(params), predictor=factory.make_predictor(config),
      predictor_params=pp, margins=cal['margins'], risk_control=cal['risk_control'],
      exit_gflops=tuple(c['gflops'] for c in costs),
      predictor_gflops=stats.predictor_stats(config)['gflops'],
      task=factory.get_task(config), distance=exits_training.get_distance(config).name)
