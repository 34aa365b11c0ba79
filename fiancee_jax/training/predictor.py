"""Stage `predictor`: measures every exit's distance to the backbone, fits the predictor,
and calibrates the routing margins on the validation split.

Targets are distances measured in one jitted batched pass over all exits, on training
inputs with a fixed z per dataset index (so the numbers are reproducible).
"""
import hashlib
import os
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import metric_logging
from fiancee_jax import tasks
from fiancee_jax.data import sources
from fiancee_jax.guidance import build as database_build
from fiancee_jax.models import exits as exits_lib
from fiancee_jax.models import factory
from fiancee_jax.routing import calibration
from fiancee_jax.training import backbone as backbone_training
from fiancee_jax.training import exits as exits_training
from fiancee_jax.training import optimizers

STAGE = 'predictor'
_SPLIT_STREAM = {'train': 10, 'validation': 11, 'test': 12}


class PredictorState(NamedTuple):
  step: jax.Array  # int32 []
  params: Any  # predictor variables
  opt: optax.OptState


def fixed_z(config: ml_collections.ConfigDict, split: str,
            indices: np.ndarray) -> np.ndarray | None:
  """One z per dataset index of `split`: float32 [len(indices), z_dim], reproducible; None
  for a noise-free backbone."""
  z_dim = factory.get_task(config).noise_dim
  if not z_dim:
    return None
  key = jax.random.fold_in(jax.random.key(config.seed), _SPLIT_STREAM[split])
  return np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(
      jnp.asarray(indices)))


def load_inputs(config: ml_collections.ConfigDict, split: str, n: int,
                draws: int = 1) -> tuple[np.ndarray, ...]:
  """Exit-path inputs of the first n examples of `split`: the data plus a fixed z per index.

  With `draws` > 1 (and a generator with noise) the n examples are repeated `draws` times,
  each repetition with its own z: [draws * n, ...], example i of draw d at d * n + i.
  """
  data = sources.load_data(config, split, n)
  task = factory.get_task(config)
  if draws > 1 and task.noise_dim:
    data = tuple(np.concatenate([x] * draws) for x in data)
  z = fixed_z(config, split, np.arange(len(data[0])))
  return tasks.with_noise(task, data, z)


def measure_distances(config: ml_collections.ConfigDict, model: exits_lib.ExitModel,
                      params: dict, inputs: tuple[np.ndarray, ...], batch: int,
                      reference: np.ndarray | None = None) -> np.ndarray:
  """Distance of every exit's output to the backbone's: float32 [N, E - 1].

  With `reference` (float32 [N, H, W, 3], e.g. the ground truth), the distance of every exit
  and of the backbone to it instead: float32 [N, E].
  """
  dist = exits_training.get_distance(config)

  @jax.jit
  def f(params, ref, *inputs):  # params an argument: closed over, XLA would fold them in
    images, teacher = model.all_exits(params, *inputs)
    if ref is None:
      return jnp.stack([dist.fn(img, teacher) for img in images], axis=-1)
    return jnp.stack([dist.fn(img, ref) for img in images + [teacher]], axis=-1)

  def chunk(x, s):
    x = np.asarray(x[s:s + batch])
    pad = batch - len(x)
    return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x  # one compiled shape

  n = len(inputs[0])
  out = []
  for s in range(0, n, batch):
    ref = None if reference is None else chunk(reference, s)
    out.append(np.asarray(f(params, ref, *(chunk(x, s) for x in inputs)))[:min(batch, n - s)])
  return np.concatenate(out).astype(np.float32)


def trained_exit_params(config, workdir, variant: str) -> dict:
  """{'backbone', 'exits', 'database'} params of the trained `variant` exits."""
  bb, _ = backbone_training.load_backbone(config, workdir)
  ex = exits_training.load_exits(config, workdir)
  if variant not in ex:
    raise ValueError(f'exit variant {variant!r} was not trained (config.exits)')
  db = database_build.load(config, workdir) if variant == 'guided' else None
  return {'backbone': bb, 'exits': ex[variant], 'database': db}


def split_distances(config, workdir, split: str, n: int, variant: str | None = None,
                    draws: int = 1):
  """(inputs, distances float32 [N, E - 1]) of a split's first n examples, cached on disk.

  inputs: the exit paths' inputs (load_inputs), e.g. (labels [N, H, W], z [N, z_dim]);
  N = draws * n with a z per draw for generators with noise, else n.
  """
  variant = variant or exits_training.variants(config)[0]
  inputs = load_inputs(config, split, n, draws)
  key = _inputs_key(config, variant, inputs)
  cache = os.path.join(workdir, 'checkpoints', STAGE, f'distances_{split}_{variant}.npz')
  if os.path.exists(cache):
    try:
      with np.load(cache) as f:
        # Same count is not enough: (maps, draws) = (4096, 8) and (2048, 16) differ.
        if 'key' in f and str(f['key']) == key:
          return inputs, f['distances']
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      # A cache: measured again, never trusted half-read.
      logging.warning('predictor: cached distances %s are damaged (%s: %s); measuring them '
                      'again.', cache, type(e).__name__, e)
  model = factory.make_exit_model(config, guided=(variant == 'guided'))
  params = trained_exit_params(config, workdir, variant)
  d = measure_distances(config, model, params, inputs, config.predictor.measure_batch)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + '.tmp.npz'
    np.savez(tmp, distances=d, key=np.array(key))
    os.replace(tmp, cache)
  return inputs, d


def _inputs_key(config, variant: str, inputs: tuple[np.ndarray, ...]) -> str:
  """What cached distances were measured on: the distance, the exits and the inputs' bytes."""
  h = hashlib.sha256(f'{exits_training.get_distance(config).name}/{variant}'.encode())
  for x in inputs:
    x = np.ascontiguousarray(x)
    h.update(f'{x.dtype}{x.shape}'.encode())
    h.update(memoryview(x).cast('B'))
  return h.hexdigest()


def _optimizer(config) -> optax.GradientTransformation:
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


def make_train_step(config, inputs: tuple[jax.Array, ...], targets: jax.Array):
  """step(state) -> (state, measurements): a random minibatch per step (key = step).

  targets: standardised distances [N, E - 1]; every ensemble member gets its own loss.
  """
  p = config.predictor
  model = factory.make_predictor(config)
  tx = _optimizer(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 4)

  def step(state: PredictorState):
    idx = jax.random.randint(jax.random.fold_in(key, state.step), (p.batch_size,), 0,
                             targets.shape[0])

    def loss_fn(params):
      pred = model.apply(params, *(x[idx] for x in inputs), per_member=True)  # [M, B, E-1]
      err = pred - targets[idx][None]
      return jnp.mean(jnp.abs(err)) if p.loss == 'l1' else jnp.mean(err ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    upd, opt = tx.update(grads, state.opt, state.params)
    return PredictorState(state.step + 1, optax.apply_updates(state.params, upd), opt), {
        'predictor/loss': loss}

  return step, tx


def _state_template(config: ml_collections.ConfigDict) -> PredictorState:
  """Abstract PredictorState of this config (for restoring without data)."""
  model = factory.make_predictor(config)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          *tasks.input_specs(factory.get_task(config), 1))
  tx = _optimizer(config)
  return jax.eval_shape(lambda p: PredictorState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                        params)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the predictor stage; returns {'params', 'margins', 'risk_control'}."""
  p = config.predictor
  if p.loss not in ('l1', 'mse'):
    raise ValueError(f"config.predictor.loss={p.loss!r}: use 'l1' or 'mse'")
  directory = os.path.join(workdir, 'checkpoints', STAGE)
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2,
                                 save_every=max(1, p.num_steps // 3),
                                 allow_restart=config.checkpoint.allow_restart)
  if ckpt.latest_step() is not None:
    # A finished stage is not measured again (its targets can take most of the stage).
    state, meta = ckpt.restore(_state_template(config))
    if meta.get('finished'):  # its params are already folded
      ckpt.close()
      _export_artifact(config, workdir, state.params, meta)
      return {'params': state.params, **_calibration_of(meta)}
  inputs, targets = split_distances(config, workdir, 'train', p.num_train,
                                    draws=p.get('z_draws', 1))
  inputs = tuple(jnp.asarray(x) for x in inputs)
  mean, std = target_stats(targets)
  model = factory.make_predictor(config)
  step_fn, tx = make_train_step(config, inputs, jnp.asarray((targets - mean) / std))
  # Jitted: eager init dispatches (and compiles) every initialiser op by op.
  params = jax.jit(model.init)(jax.random.fold_in(jax.random.key(config.seed), 5),
                               *(x[:1] for x in inputs))
  state = PredictorState(jnp.zeros((), jnp.int32), params, tx.init(params))
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state)
  step_fn = jax.jit(step_fn, donate_argnums=0)
  with metric_logging.MetricWriter(workdir, stage=STAGE, total_steps=p.num_steps) as writer:
    for step in range(int(state.step), p.num_steps):
      state, m = step_fn(state)
      if (step + 1) % config.exits.log_every == 0 or step + 1 == p.num_steps:
        writer.write_scalars(step + 1, metric_logging.check_finite(jax.device_get(m), step + 1))
      if ckpt.should_save(step + 1) and step + 1 < p.num_steps:
        ckpt.save(step + 1, state)
  state = state._replace(params=fold_target_stats(state.params, mean, std))
  margins, risk_control = calibrate(config, workdir, state.params)
  meta = {'finished': True,
          # +inf (an exit never taken) is stored as None: metadata is JSON.
          'margins': [float(m) if np.isfinite(m) else None for m in margins],
          'calibration': config.router.calibration,
          'risk_control': None if risk_control is None else risk_control.to_dict(),
          'distance': exits_training.get_distance(config).name}
  ckpt.save(p.num_steps, state, force=True, metadata=meta)
  ckpt.close()
  _export_artifact(config, workdir, state.params, meta)
  return {'params': state.params, 'margins': margins, 'risk_control': risk_control}


def _export_artifact(config, workdir: str, params: Any, meta: dict) -> None:
  """WORKDIR/artifacts/predictor: folded variables + calibration (artifacts.py), once."""
  if not artifacts.exists(workdir, STAGE):
    parent = artifacts.read_manifest(workdir, 'exits')['fingerprint']
    artifacts.save(workdir, STAGE, params, config=config, parents={'exits': parent},
                   metadata={k: meta[k] for k in ('margins', 'calibration', 'risk_control',
                                                  'distance')})


def _calibration_of(meta: dict) -> dict:
  """{'margins': float32 [E - 1], 'risk_control': RiskControl or None} from checkpoint metadata."""
  margins = np.array([np.inf if m is None else m for m in meta['margins']], np.float32)
  rc = meta.get('risk_control')
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
  pred = np.asarray(jax.jit(factory.make_predictor(config).apply)(params, *inputs))
  if method == 'risk_control':
    rc = calibration.fit_risk_control(pred, true, target=config.router.target_met)
    logging.info('predictor: risk-control calibration on %d samples', len(pred))
    return np.zeros(num_branches, np.float32), rc
  margins = calibration.calibrate(pred, true, target=config.router.target_met, method=method)
  logging.info('predictor: calibration margins %s', margins)
  return np.asarray(margins, np.float32), None


def load_predictor(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, dict]:
  """(predictor variables, {'margins': float32 [E - 1], 'risk_control': RiskControl or
  None}) of `workdir`."""
  state, meta = checkpoint.restore_finished(os.path.join(workdir, 'checkpoints', STAGE),
                                            _state_template(config), stage=STAGE,
                                            total_steps=config.predictor.num_steps)
  return state.params, _calibration_of(meta)

