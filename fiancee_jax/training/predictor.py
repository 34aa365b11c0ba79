"""Stage `predictor`: measures every exit's distance to the backbone, fits the predictor,
and calibrates the routing margins on the validation split.

Targets are distances measured in one jitted batched pass over all exits, on training
inputs with a fixed z per dataset index (so the numbers are reproducible).
"""
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fiancee_jax import checkpoint
from fiancee_jax import metric_logging
from fiancee_jax import tasks
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
  z_dim = tasks.get_task(config).noise_dim
  if not z_dim:
    return None
  key = jax.random.fold_in(jax.random.key(config.seed), _SPLIT_STREAM[split])
  return np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(
      jnp.asarray(indices)))


def load_inputs(config: ml_collections.ConfigDict, split: str, n: int) -> tuple[np.ndarray, ...]:
  """Exit-path inputs of the first n examples of `split`: the data plus a fixed z per index."""
  data = tasks.load_data(config, split, n)
  z = fixed_z(config, split, np.arange(len(data[0])))
  return tasks.with_noise(tasks.get_task(config), data, z)


def measure_distances(config: ml_collections.ConfigDict, model: exits_lib.ExitModel,
                      params: dict, inputs: tuple[np.ndarray, ...], batch: int,
                      reference: np.ndarray | None = None) -> np.ndarray:
  """Distance of every exit's output to the backbone's: float32 [N, E - 1].

  With `reference` (float32 [N, H, W, 3], e.g. the ground truth), the distance of every exit
  and of the backbone to it instead: float32 [N, E].
  """
  dist = exits_training.get_distance(config)

  @jax.jit
  def f(ref, *inputs):
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
    out.append(np.asarray(f(ref, *(chunk(x, s) for x in inputs)))[:min(batch, n - s)])
  return np.concatenate(out).astype(np.float32)


def trained_exit_params(config, workdir, variant: str) -> dict:
  """{'backbone', 'exits', 'database'} params of the trained `variant` exits."""
  bb, _ = backbone_training.load_backbone(config, workdir)
  ex = exits_training.load_exits(config, workdir)
  if variant not in ex:
    raise ValueError(f'exit variant {variant!r} was not trained (config.exits)')
  db = database_build.load(config, workdir) if variant == 'guided' else None
  return {'backbone': bb, 'exits': ex[variant], 'database': db}


def split_distances(config, workdir, split: str, n: int, variant: str | None = None):
  """(inputs, distances float32 [n, E - 1]) of a split's first n examples, cached on disk.

  inputs: the exit paths' inputs (load_inputs), e.g. (labels [n, H, W], z [n, z_dim]).
  """
  variant = variant or exits_training.variants(config)[0]
  inputs = load_inputs(config, split, n)
  n = len(inputs[0])
  cache = os.path.join(workdir, 'checkpoints', STAGE, f'distances_{split}_{variant}.npz')
  if os.path.exists(cache):
    with np.load(cache) as f:
      if f['distances'].shape[0] == n:
        return inputs, f['distances']
  model = factory.make_exit_model(config, guided=(variant == 'guided'))
  params = trained_exit_params(config, workdir, variant)
  d = measure_distances(config, model, params, inputs, config.predictor.measure_batch)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + '.tmp.npz'
    np.savez(tmp, distances=d)
    os.replace(tmp, cache)
  return inputs, d


def make_train_step(config, data: tuple[jax.Array, ...], targets: jax.Array):
  """step(state) -> (state, measurements): a random minibatch per step (key = step)."""
  p = config.predictor
  model = factory.make_predictor(config)
  tx = optimizers.adam(p.lr, 0.9, 0.999)
  key = jax.random.fold_in(jax.random.key(config.seed), 4)

  def step(state: PredictorState):
    idx = jax.random.randint(jax.random.fold_in(key, state.step), (p.batch_size,), 0,
                             targets.shape[0])

    def loss_fn(params):
      pred = model.apply(params, *(x[idx] for x in data))
      err = pred - targets[idx]
      return jnp.mean(jnp.abs(err)) if p.loss == 'l1' else jnp.mean(err ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    upd, opt = tx.update(grads, state.opt, state.params)
    return PredictorState(state.step + 1, optax.apply_updates(state.params, upd), opt), {
        'predictor/loss': loss}

  return step, tx


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the predictor stage; returns {'params', 'margins'}."""
  p = config.predictor
  if p.loss not in ('l1', 'mse'):
    raise ValueError(f"config.predictor.loss={p.loss!r}: use 'l1' or 'mse'")
  directory = os.path.join(workdir, 'checkpoints', STAGE)
  inputs, targets = split_distances(config, workdir, 'train', p.num_train)
  data = tuple(jnp.asarray(x) for x in tasks.data_of(tasks.get_task(config), inputs))
  targets = jnp.asarray(targets)
  model = factory.make_predictor(config)
  step_fn, tx = make_train_step(config, data, targets)
  params = model.init(jax.random.fold_in(jax.random.key(config.seed), 5),
                      *(x[:1] for x in data))
  state = PredictorState(jnp.zeros((), jnp.int32), params, tx.init(params))
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2,
                                 save_every=max(1, p.num_steps // 3))
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    if meta.get('finished'):
      return {'params': state.params, 'margins': np.asarray(meta['margins'], np.float32)}
  step_fn = jax.jit(step_fn, donate_argnums=0)
  with metric_logging.MetricWriter(workdir, stage=STAGE, total_steps=p.num_steps) as writer:
    for step in range(int(state.step), p.num_steps):
      state, m = step_fn(state)
      if (step + 1) % config.exits.log_every == 0 or step + 1 == p.num_steps:
        writer.write_scalars(step + 1, metric_logging.check_finite(jax.device_get(m), step + 1))
      if ckpt.should_save(step + 1) and step + 1 < p.num_steps:
        ckpt.save(step + 1, state)
  margins = calibrate(config, workdir, state.params)
  ckpt.save(p.num_steps, state, force=True,
            metadata={'finished': True, 'margins': [float(m) for m in margins],
                      'distance': exits_training.get_distance(config).name})
  ckpt.close()
  return {'params': state.params, 'margins': margins}


def calibrate(config, workdir, params) -> np.ndarray:
  """Routing margins [E - 1] from the validation split (routing/calibration.py)."""
  num_branches = len(config.exits.attach_after)
  if config.router.calibration == 'none':
    return np.zeros(num_branches, np.float32)
  inputs, true = split_distances(config, workdir, 'validation', config.data.num_validation)
  data = tasks.data_of(tasks.get_task(config), inputs)
  pred = np.asarray(jax.jit(factory.make_predictor(config).apply)(params, *data))
  margins = calibration.calibrate(pred, true, target=config.router.target_met,
                                  method=config.router.calibration)
  logging.info('predictor: calibration margins %s', margins)
  return np.asarray(margins, np.float32)


def load_predictor(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, np.ndarray]:
  """(predictor variables, calibration margins [E - 1]) of `workdir`."""
  model = factory.make_predictor(config)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          *tasks.get_task(config).data_specs(1))
  tx = optimizers.adam(config.predictor.lr, 0.9, 0.999)
  target = jax.eval_shape(lambda p: PredictorState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                          params)
  state, meta = checkpoint.restore_finished(os.path.join(workdir, 'checkpoints', STAGE), target,
                                            stage=STAGE, total_steps=config.predictor.num_steps)
  return state.params, np.asarray(meta['margins'], np.float32)
