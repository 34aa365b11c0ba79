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


def fixed_z(config: ml_collections.ConfigDict, split: str, indices: np.ndarray) -> jax.Array:
  """One z per dataset index of `split`: float32 [len(indices), z_dim], reproducible."""
  key = jax.random.fold_in(jax.random.key(config.seed), _SPLIT_STREAM[split])
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                              (config.backbone.z_dim,)))(jnp.asarray(indices))


def load_labels(config: ml_collections.ConfigDict, split: str, n: int) -> np.ndarray:
  """The first n label maps of `split`: int32 [n, H, W]."""
  source = backbone_training.data_source(config, split)
  n = min(n, len(source))
  return np.stack([source[i]['labels'] for i in range(n)]).astype(np.int32)


def measure_distances(config: ml_collections.ConfigDict, model: exits_lib.ExitModel,
                      params: dict, labels: np.ndarray, z: jax.Array,
                      batch: int) -> np.ndarray:
  """Distance of every branch's output to the backbone's: float32 [N, E - 1]."""
  dist = exits_training.get_distance(config)

  @jax.jit
  def f(labels, z):
    images, teacher = model.all_exits(params, labels, z)
    return jnp.stack([dist.fn(img, teacher) for img in images], axis=-1)

  out = []
  for s in range(0, len(labels), batch):
    lb, zb = labels[s:s + batch], z[s:s + batch]
    pad = batch - len(lb)
    if pad:  # keep one compiled shape
      lb = np.concatenate([lb, np.repeat(lb[-1:], pad, 0)])
      zb = jnp.concatenate([zb, jnp.repeat(zb[-1:], pad, 0)])
    out.append(np.asarray(f(jnp.asarray(lb), zb))[:batch - pad])
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
  """(labels [n, H, W], z [n, z_dim], distances [n, E - 1]) of a split, cached on disk."""
  variant = variant or exits_training.variants(config)[0]
  labels = load_labels(config, split, n)
  z = fixed_z(config, split, np.arange(len(labels)))
  cache = os.path.join(workdir, 'checkpoints', STAGE, f'distances_{split}_{variant}.npz')
  if os.path.exists(cache):
    with np.load(cache) as f:
      if f['distances'].shape[0] == len(labels):
        return labels, z, f['distances']
  model = factory.make_exit_model(config, guided=(variant == 'guided'))
  params = trained_exit_params(config, workdir, variant)
  d = measure_distances(config, model, params, labels, z, config.predictor.measure_batch)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + '.tmp.npz'
    np.savez(tmp, distances=d)
    os.replace(tmp, cache)
  return labels, z, d


def make_train_step(config, labels: jax.Array, targets: jax.Array):
  """step(state) -> (state, measurements): a random minibatch per step (key = step)."""
  p = config.predictor
  model = factory.make_predictor(config)
  tx = optimizers.adam(p.lr, 0.9, 0.999)
  key = jax.random.fold_in(jax.random.key(config.seed), 4)

  def step(state: PredictorState):
    idx = jax.random.randint(jax.random.fold_in(key, state.step), (p.batch_size,), 0,
                             labels.shape[0])

    def loss_fn(params):
      pred = model.apply(params, labels[idx])
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
  labels, _, targets = split_distances(config, workdir, 'train', p.num_train)
  labels, targets = jnp.asarray(labels), jnp.asarray(targets)
  model = factory.make_predictor(config)
  step_fn, tx = make_train_step(config, labels, targets)
  params = model.init(jax.random.fold_in(jax.random.key(config.seed), 5), labels[:1])
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
  labels, _, true = split_distances(config, workdir, 'validation', config.data.num_validation)
  pred = np.asarray(jax.jit(factory.make_predictor(config).apply)(params, jnp.asarray(labels)))
  margins = calibration.calibrate(pred, true, target=config.router.target_met,
                                  method=config.router.calibration)
  logging.info('predictor: calibration margins %s', margins)
  return np.asarray(margins, np.float32)


def load_predictor(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, np.ndarray]:
  """(predictor variables, calibration margins [E - 1]) of `workdir`."""
  model = factory.make_predictor(config)
  h, w = config.data.resolution
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w), jnp.int32))
  tx = optimizers.adam(config.predictor.lr, 0.9, 0.999)
  target = jax.eval_shape(lambda p: PredictorState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                          params)
  state, meta = checkpoint.restore_finished(os.path.join(workdir, 'checkpoints', STAGE), target,
                                            stage=STAGE, total_steps=config.predictor.num_steps)
  return state.params, np.asarray(meta['margins'], np.float32)
