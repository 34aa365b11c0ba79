"""`load_model`: a trained workdir -> FianceeModel, from its params-only artifacts.

  model = load_model('/tmp/run')                      # config from /tmp/run/config.json
  model = load_model('/tmp/run', variant='unguided')  # the exits trained without the database

Reads WORKDIR/artifacts/{backbone, database, exits, predictor} (artifacts.py) onto templates
from models/factory.py: no optimizer state, no discriminator, no trainer code. Every artifact
is checked against the config and against the chain it was built from: the database from
this backbone, the exits from this backbone (and database), the predictor from these exits;
an artifact of another run is refused with both fingerprints named. Loading compiles nothing:
the per-exit GFLOPs are computed on first use (model.exit_gflops).
"""
import functools

import jax
import ml_collections
import numpy as np

from fiancee_jax import artifacts
from fiancee_jax import model as model_lib
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.metrics import costs
from fiancee_jax.models import factory
from fiancee_jax.routing import calibration


def _costs(config: ml_collections.ConfigDict, guided: bool) -> tuple[list[float], float]:
  """(GFLOPs per exit path at batch 1, the backbone last; predictor GFLOPs): compiles every
  exit path of the config once (abstract inputs, nothing runs)."""
  exit_gflops = [c['gflops'] for c in costs.exit_stats(config, guided=guided)]
  return exit_gflops, costs.predictor_stats(config)['gflops']


def _margins(metadata: dict) -> np.ndarray:
  """float32 [E - 1] from the predictor's metadata; None (never taken) becomes +inf."""
  return np.array([np.inf if m is None else m for m in metadata['margins']], np.float32)


def load_model(workdir: str, config: ml_collections.ConfigDict | None = None, *,
               variant: str | None = None) -> model_lib.FianceeModel:
  """The trained model of `workdir`.

  Args:
    workdir: a run directory after the predictor stage.
    config: the run's config; None reads WORKDIR/config.json.
    variant: 'guided' or 'unguided' exits; None takes the first variant the config trains
      (the guided one when config.exits.guided).

  Returns:
    A FianceeModel on the default device; `model.fingerprints` names its artifacts.

  Raises:
    artifacts.ArtifactError: an artifact is missing (names the stage to run), damaged (names
      the directory), built with another config (names the keys) or from another run (names
      both fingerprints).
    ValueError: a variant the config does not train.
  """
  if config is None:
    config = workdir_lib.read_config(workdir)
  trained = factory.exit_variants(config)
  variant = variant or trained[0]
  if variant not in trained:
    raise ValueError(f'exit variant {variant!r} was not trained by this config (it trains '
                     f'{", ".join(trained)}; see config.exits.guided and train_unguided)')
  guided = variant == 'guided'

  def load(kind, parents=None):
    return artifacts.load(workdir, kind, factory.variable_templates(config, kind),
                          config=config, parents=parents)

  backbone = load('backbone')
  fingerprints = {'backbone': backbone.fingerprint}
  database = None
  residual = factory.residual_guidance(config)  # the database comes after the exits
  if 'guided' in trained and not residual:  # the exits artifact was built from the database
    database = load('database', {'backbone': backbone.fingerprint})
    fingerprints['database'] = database.fingerprint
  exits = load('exits', dict(fingerprints))
  fingerprints['exits'] = exits.fingerprint
  if residual:  # the database holds the residuals of these exits
    database = load('database', {'backbone': backbone.fingerprint,
                                 'exits': exits.fingerprint})
    fingerprints['database'] = database.fingerprint
  parents = {'exits': exits.fingerprint}
  if residual:  # the guided exits' images, the predictor's targets, depend on it too
    parents['database'] = database.fingerprint
  predictor = load('predictor', parents)
  fingerprints['predictor'] = predictor.fingerprint

  meta = predictor.metadata
  rc = meta.get('risk_control')
  params = {'backbone': backbone.tree, 'exits': exits.tree[factory.branch_set(config, variant)],
            'database': database.tree if guided else None}
  return model_lib.FianceeModel(
      exit_model=factory.make_exit_model(config, guided=guided),
      params=jax.device_put(params), predictor=factory.make_predictor(config),
      predictor_params=jax.device_put(predictor.tree), margins=_margins(meta),
      risk_control=None if rc is None else calibration.RiskControl.from_dict(rc),
      task=factory.get_task(config), distance=meta['distance'],
      costs=functools.partial(_costs, config, guided), fingerprints=fingerprints)
