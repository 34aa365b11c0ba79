"""Stage `predictor`: measures every exit's distance to the backbone, fits the predictor,
and calibrates the routing margins on the validation split.

Targets are distances measured in one jitted batched pass over all exits (the exits
artifact), on training inputs with a fixed z per dataset index (so the numbers are
reproducible). The loop (training/loop.py) fits the predictor on standardised targets in
minibatches drawn like training batches (a reshuffle per epoch, resumable from the step);
at the end the target statistics are folded into its output layers and the margins are
calibrated. The result is the `predictor` artifact (outputs in distance units, the
calibration in its metadata).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fiancee_jax import artifacts
from fiancee_jax import parallel
from fiancee_jax import tasks
from fiancee_jax.data import input_pipeline
from fiancee_jax.metrics import exit_distances
from fiancee_jax.models import factory
from fiancee_jax.routing import calibration
from fiancee_jax.training import artifact_io
from fiancee_jax.training import exits as exits_training
from fiancee_jax.training import loop
from fiancee_jax.training import optimizers

STAGE = 'predictor'
_SPLIT_STREAM = {'train': 10, 'validation': 11, 'test': 12}


class PredictorState(NamedTuple):
  params: Any  # predictor variables
  opt: optax.OptState


def upstream(config: ml_collections.ConfigDict, workdir: str) -> dict[str, artifacts.Artifact]:
  """The artifacts the predictor is trained on: backbone, exits and (guided) database."""
  return artifact_io.load_lineage(config, workdir,
                                  upto=artifact_io.stage_order(config)[-2])


def _variant_params(config, arts: dict, variant: str) -> tuple[dict, str]:
  """({'backbone', 'exits', 'database'} params of exit `variant`, the fingerprint of what
  its images are a function of: the exits artifact, and a residual database)."""
  if variant not in factory.exit_variants(config):
    raise ValueError(f'exit variant {variant!r} was not trained (config.exits)')
  guided = variant == 'guided'
  params = {'backbone': arts['backbone'].tree,
            'exits': arts['exits'].tree[factory.branch_set(config, variant)],
            'database': arts['database'].tree if guided else None}
  fp = arts['exits'].fingerprint
  if guided and factory.residual_guidance(config):
    fp = exit_distances.with_database(fp, arts['database'].fingerprint)
  return params, fp


def trained_exit_params(config, workdir, variant: str) -> dict:
  """{'backbone', 'exits', 'database'} params of the trained `variant` exits (artifacts)."""
  return _variant_params(config, upstream(config, workdir), variant)[0]


def split_distances(config, workdir, split: str, n: int, variant: str | None = None,
                    draws: int = 1):
  """(inputs, distances float32 [N, E - 1]) of a split's first n examples under the workdir's
  exits artifact (metrics/exit_distances.py: cached, keyed by the artifact's fingerprint)."""
  variant = variant or factory.exit_variants(config)[0]
  params, fp = _variant_params(config, upstream(config, workdir), variant)
  return exit_distances.split_distances(
      config, workdir, split, n,
      exit_model=factory.make_exit_model(config, guided=(variant == 'guided')),
      params=params, exits_fingerprint=fp, draws=draws)


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam, cosine decay from config.predictor.lr to 0 over num_steps."""
  p = config.predictor
  return optimizers.adam(optax.cosine_decay_schedule(p.lr, p.num_steps), 0.9, 0.999)


def target_stats(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-exit mean and standard deviation of the training targets [N, E - 1]."""
  t = np.asarray(targets, np.float64)
  return t.mean(0).astype(np.float32), np.maximum(t.std(0), 1e-6).astype(np.float32)


def fold_target_stats(params: Any, mean: np.ndarray, std: np.ndarray) -> Any:
  """Predictor variables that output distances, from ones trained on standardised
  targets: every output layer's kernel and bias are scaled by std and shifted by mean."""

  def fold(tree):
    if 'out' in tree and set(tree['out']) == {'kernel', 'bias'}:
      out = tree['out']
      tree = {**tree, 'out': {'kernel': out['kernel'] * std[None],
                              'bias': out['bias'] * std + mean}}
    return {k: fold(v) if isinstance(v, dict) and k != 'out' else v for k, v in tree.items()}

  return {**params, 'params': fold(dict(params['params']))}


LOSSES = ('l1', 'mse', 'quantile')


def pinball(err: jax.Array, quantile: float) -> jax.Array:
  """Pinball loss of err = target - prediction (any shape, elementwise): its minimiser over
  predictions is the `quantile` of the targets (0.5: half the L1 loss, the median)."""
  return jnp.maximum(quantile * err, (quantile - 1.0) * err)


def prediction_loss(config: ml_collections.ConfigDict, pred: jax.Array,
                    targets: jax.Array) -> jax.Array:
  """Mean loss of predictions against targets (same shapes) under config.predictor.loss.

  'quantile' fits the config.predictor.quantile-quantile of an exit's distance given the
  input, so that `predicted <= t` reads `P(distance <= t) >= quantile`: the routing decision
  itself, where 'l1' (the median) and 'mse' (the mean) fit a central value.
  """
  p = config.predictor
  if p.loss == 'quantile':
    return jnp.mean(pinball(targets - pred, p.quantile))
  err = pred - targets
  return jnp.mean(jnp.abs(err)) if p.loss == 'l1' else jnp.mean(err ** 2)


def make_train_step(config, inputs: tuple[jax.Array, ...], targets: jax.Array):
  """step(state, batch) -> (state, measurements) on the minibatch batch['index'] (int32 [B]).

  targets: standardised distances [N, E - 1]; every ensemble member gets its own loss. The
  predictor computes in config.train.dtype; the loss and the updates are float32.
  """
  model = factory.make_predictor(config, dtype=factory.train_dtype(config))
  tx = optimizer(config)

  def step(state: PredictorState, batch):
    idx = batch['index']

    def loss_fn(params):
      pred = model.apply(params, *(x[idx] for x in inputs), per_member=True)  # [M, B, E-1]
      return prediction_loss(config, pred, jnp.broadcast_to(targets[idx][None], pred.shape))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    upd, opt = tx.update(grads, state.opt, state.params)
    return PredictorState(optax.apply_updates(state.params, upd), opt), {
        'predictor/loss': loss}

  return step


def init_state(config: ml_collections.ConfigDict, key: jax.Array) -> PredictorState:
  """Fresh predictor variables and optimizer state (shapes from the task's inputs)."""
  model = factory.make_predictor(config)
  inputs = [jnp.zeros(s.shape, s.dtype) for s in tasks.input_specs(factory.get_task(config), 1)]
  params = model.init(key, *inputs)
  return PredictorState(params, optimizer(config).init(params))


def train(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact:
  """Runs the predictor stage; returns the `predictor` artifact (trained once per workdir).

  A finished stage whose artifact is missing is exported again from its checkpoint, without
  measuring the targets again (they can take most of the stage).
  """
  p = config.predictor
  if p.loss not in LOSSES:
    raise ValueError(f'config.predictor.loss={p.loss!r}: use one of {LOSSES}')
  arts = upstream(config, workdir)
  exits = arts['exits']
  parents = artifact_io.predictor_parents(config, exits, arts.get('database'))
  if artifacts.exists(workdir, STAGE):
    return artifact_io.load_predictor(config, workdir, exits, arts.get('database'))
  mesh = parallel.data_mesh(p.batch_size, 'config.predictor.batch_size')
  measured = {}

  def targets() -> dict[str, Any]:
    """The training targets, measured (or read from the cache) at most once per run."""
    if not measured:
      inputs, d = split_distances(config, workdir, 'train', p.num_train,
                                  draws=p.get('z_draws', 1))
      mean, std = target_stats(d)
      measured.update(inputs=inputs, distances=d, mean=mean, std=std)
    return measured

  def make_step():
    t = targets()
    return make_train_step(config, tuple(jnp.asarray(x) for x in t['inputs']),
                           jnp.asarray((t['distances'] - t['mean']) / t['std']))

  def batches(start: int):
    n = len(targets()['distances'])
    if n < p.batch_size:
      raise ValueError(f'config.predictor.batch_size={p.batch_size} exceeds the {n} measured '
                       'targets; lower it or raise config.predictor.num_train')
    return input_pipeline.batches(
        range(n), batch_size=p.batch_size, seed=config.seed + 4,
        start_step=start, process_index=jax.process_index(),
        process_count=jax.process_count(), prefetch=0,
        load_fn=lambda _, idx: {'index': np.asarray(idx, np.int32)})

  def finish(state: PredictorState, writer) -> tuple[PredictorState, dict]:
    del writer
    t = targets()
    state = state._replace(params=fold_target_stats(state.params, t['mean'], t['std']))
    margins, risk_control = calibrate(config, workdir, state.params)
    return state, {
        # +inf (an exit never taken) is stored as None: metadata is JSON.
        'margins': [float(m) if np.isfinite(m) else None for m in margins],
        'calibration': config.router.calibration,
        'risk_control': None if risk_control is None else risk_control.to_dict(),
        'distance': exits_training.get_distance(config).name}

  key = jax.random.fold_in(jax.random.key(config.seed), 5)
  result = loop.train(
      stage=STAGE, workdir=workdir, mesh=mesh, allow_restart=config.checkpoint.allow_restart,
      async_save=config.checkpoint.async_save,
      schedule=loop.Schedule.of(p),
      init=lambda: init_state(config, key), make_step=make_step, batches=batches,
      finish=finish)
  metadata = {k: result.metadata[k] for k in ('margins', 'calibration', 'risk_control',
                                              'distance')}
  fp = artifacts.save(workdir, STAGE, result.state.params, config=config, parents=parents,
                      metadata=metadata)
  return artifacts.Artifact(tree=result.state.params, fingerprint=fp, parents=parents,
                            metadata=metadata)


def calibration_of(metadata: dict) -> dict:
  """{'margins': float32 [E - 1], 'risk_control': RiskControl or None} from the predictor
  artifact's metadata."""
  margins = np.array([np.inf if m is None else m for m in metadata['margins']], np.float32)
  rc = metadata.get('risk_control')
  return {'margins': margins,
          'risk_control': None if rc is None else calibration.RiskControl.from_dict(rc)}


def calibrate(config, workdir, params) -> tuple[np.ndarray, calibration.RiskControl | None]:
  """(margins float32 [E - 1], RiskControl or None) from the validation split.

  With config.router.calibration = 'risk_control' the margins depend on the threshold and
  live in the RiskControl (the returned vector is then zeros and unused).
  """
  num_branches = len(config.exits.attach_after)
  method = config.router.calibration
  if method == 'none':
    return np.zeros(num_branches, np.float32), None
  inputs, true = split_distances(config, workdir, 'validation', config.data.num_validation)
  pred = parallel.map_rows(factory.make_predictor(config).apply, inputs,
                          config.predictor.measure_batch, consts=params)
  if method == 'risk_control':
    rc = calibration.fit_risk_control(pred, true, target=config.router.target_met)
    logging.info('predictor: risk-control calibration on %d samples', len(pred))
    return np.zeros(num_branches, np.float32), rc
  margins = calibration.calibrate(pred, true, target=config.router.target_met, method=method)
  logging.info('predictor: calibration margins %s', margins)
  return np.asarray(margins, np.float32), None


def load_predictor(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, dict]:
  """(predictor variables, {'margins': float32 [E - 1], 'risk_control': RiskControl or
  None}) of `workdir`, from its artifacts."""
  art = artifact_io.load_lineage(config, workdir, upto='predictor')['predictor']
  return art.tree, calibration_of(art.metadata)
