"""Stage `backbone`: trains OASIS (generator + U-Net discriminator) data-parallel.

One jitted step over the mesh (batch sharded on `data`, state replicated): a generator
update against the current discriminator, then a discriminator update on the same fake
images (N+1 cross-entropy + LabelMix), then the generator EMA. Resumable: the state
(including the RNG and the step, which is also the data position) is checkpointed.
"""
import functools
import json
import os
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
from fiancee_jax import parallel
from fiancee_jax.data import sources
from fiancee_jax.data import visualize
from fiancee_jax.losses import oasis as oasis_losses
from fiancee_jax.models import factory
from fiancee_jax.training import optimizers

STAGE = 'backbone'


class BackboneState(NamedTuple):
  step: jax.Array  # int32 [], number of completed steps (= data position)
  rng: jax.Array  # typed PRNG key [], per-step keys are fold_in(rng, step)
  g_params: Any  # generator params
  g_stats: Any  # generator batch_stats: BN running mean/var, SN u/sigma
  d_params: Any  # discriminator params
  d_stats: Any  # discriminator batch_stats (SN u/sigma)
  g_opt: optax.OptState
  d_opt: optax.OptState
  ema_params: Any  # EMA of g_params (what later stages use)
  ema_stats: Any  # batch_stats recomputed for ema_params when training ends


def data_source(config: ml_collections.ConfigDict, split: str):
  """The dataset split named by config.data, at config.data.resolution."""
  return sources.data_source(config, split)


def init_state(config: ml_collections.ConfigDict, key: jax.Array) -> BackboneState:
  """Fresh state; `key` is the init stream, the training stream is derived from it."""
  g, d = factory.make_generator(config), factory.make_discriminator(config)
  h, w = config.data.resolution
  labels = jnp.zeros((1, h, w), jnp.int32)
  z = jnp.zeros((1, config.backbone.z_dim))
  kg, kd, krng = jax.random.split(key, 3)
  gv = g.init(kg, labels, z)
  dv = d.init(kd, jnp.zeros((1, h, w, 3)))
  tx_g, tx_d = optimizers.gan_optimizers(config.train)
  return BackboneState(
      step=jnp.zeros((), jnp.int32), rng=krng,
      g_params=gv['params'], g_stats=gv['batch_stats'],
      d_params=dv['params'], d_stats=dv['batch_stats'],
      g_opt=tx_g.init(gv['params']), d_opt=tx_d.init(dv['params']),
      ema_params=gv['params'], ema_stats=gv['batch_stats'])


def make_train_step(config: ml_collections.ConfigDict):
  """Returns step(state, batch) -> (state, measurements), pure, for jit."""
  g, d = factory.make_generator(config), factory.make_discriminator(config)
  tx_g, tx_d = optimizers.gan_optimizers(config.train)
  num_classes, z_dim = config.data.num_classes, config.backbone.z_dim
  lm_weight, ema_decay = config.train.labelmix_weight, config.train.ema_decay

  def step(state: BackboneState, batch: dict[str, jax.Array]):
    labels, real = batch['labels'], batch['image']
    kz, kmix = jax.random.split(jax.random.fold_in(state.rng, state.step))
    z = jax.random.normal(kz, (labels.shape[0], z_dim))

    def g_loss_fn(gp):
      fake, upd = g.apply({'params': gp, 'batch_stats': state.g_stats}, labels, z,
                          train=True, mutable=['batch_stats'])
      logits = d.apply({'params': state.d_params, 'batch_stats': state.d_stats}, fake)
      loss = oasis_losses.n1_cross_entropy(logits, labels, for_real=True,
                                           num_classes=num_classes)
      return loss, (fake, upd['batch_stats'])

    (g_loss, (fake, g_stats)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
        state.g_params)
    g_upd, g_opt = tx_g.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_upd)

    fake = jax.lax.stop_gradient(fake)
    mixed, mask = oasis_losses.labelmix(kmix, labels, fake, real, num_classes)

    def d_loss_fn(dp):
      logits, upd = d.apply({'params': dp, 'batch_stats': state.d_stats},
                            jnp.concatenate([fake, real, mixed]), train=True,
                            mutable=['batch_stats'])
      d_fake, d_real, d_mixed = jnp.split(logits, 3)
      l_fake = oasis_losses.n1_cross_entropy(d_fake, labels, for_real=False,
                                             num_classes=num_classes)
      l_real = oasis_losses.n1_cross_entropy(d_real, labels, for_real=True,
                                             num_classes=num_classes)
      l_lm = oasis_losses.labelmix_consistency(d_mixed, d_fake, d_real, mask)
      loss = l_fake + l_real + lm_weight * l_lm
      return loss, (upd['batch_stats'], dict(fake=l_fake, real=l_real, labelmix=l_lm))

    (d_loss, (d_stats, parts)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state.d_params)
    d_upd, d_opt = tx_d.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_upd)

    # EMA warm-up (as in TF's ExponentialMovingAverage with num_updates): short CPU runs
    # would otherwise keep mostly the initial weights.
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    ema = optax.incremental_update(g_params, state.ema_params, 1.0 - decay)
    new_state = state._replace(
        step=state.step + 1, g_params=g_params, g_stats=g_stats, d_params=d_params,
        d_stats=d_stats, g_opt=g_opt, d_opt=d_opt, ema_params=ema)
    measurements = {'g/loss': g_loss, 'd/loss': d_loss, 'd/fake': parts['fake'],
                    'd/real': parts['real'], 'd/labelmix': parts['labelmix'],
                    'g/grad_norm': optax.global_norm(g_grads)}
    return new_state, measurements

  return step


def make_stats_step(config: ml_collections.ConfigDict):
  """Returns f(params, stats, batch, z, i) -> stats: batch i's statistics averaged in.

  Recomputes BN statistics (and spectral-norm sigmas) for the EMA weights, as OASIS
  does, with momentum i / (i + 1) so that after n batches they are the plain mean.
  """
  g = factory.make_generator(config)

  def f(params, stats, labels, z, i):
    momentum = i / (i + 1.0)
    _, upd = g.apply({'params': params, 'batch_stats': stats}, labels, z, train=True,
                     momentum=momentum, mutable=['batch_stats'])
    return upd['batch_stats']

  return f


def generate(config: ml_collections.ConfigDict, params: Any, stats: Any,
             labels: jax.Array, z: jax.Array) -> jax.Array:
  """Backbone inference: labels int32 [B, H, W], z [B, z_dim] -> images [B, H, W, 3]."""
  g = factory.make_generator(config)
  return g.apply({'params': params, 'batch_stats': stats}, labels, z)


def train(config: ml_collections.ConfigDict, workdir: str) -> BackboneState:
  """Runs (or resumes) the backbone stage; returns the final state.

  The reenactment backbone has its own trainer (training/reenact.py) with the same
  checkpoint, resume and logging conventions.
  """
  if config.backbone.name == 'reenact':
    from fiancee_jax.training import reenact  # pylint: disable=g-import-not-at-top
    return reenact.train(config, workdir)
  tc = config.train
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(tc.batch_size, mesh, 'config.train.batch_size')
  train_src = data_source(config, 'train')
  val_src = data_source(config, 'validation')

  repl, data_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  key_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  state = jax.jit(lambda k: init_state(config, k), out_shardings=repl)(key_init)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints', STAGE),
                                 max_to_keep=tc.keep_checkpoints,
                                 save_every=tc.checkpoint_every,
                                 allow_restart=config.checkpoint.allow_restart)
  # Resume order: this stage's latest valid checkpoint in the workdir, else scratch.
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    logging.info('backbone: resumed at step %d', int(state.step))
    if meta.get('finished'):
      _export_artifact(config, workdir, state)
      return state
  start = int(state.step)

  step_fn = jax.jit(make_train_step(config), in_shardings=(repl, data_sh),
                    out_shardings=(repl, repl), donate_argnums=0)
  samples = _sample_batch(config, val_src)
  batches = sources.train_batches(config, train_src, batch_size=tc.batch_size,
                                  seed=config.seed, start_step=start)
  with metric_logging.MetricWriter(workdir, stage=STAGE, total_steps=tc.num_steps) as writer:
    for step in range(start, tc.num_steps):
      batch = next(batches)
      if step == start:
        sources.check_batch(config, batch)
      batch = parallel.shard_batch({k: batch[k] for k in ('labels', 'image')}, mesh)
      state, m = step_fn(state, batch)
      m = jax.device_get(m)
      # Raises NonFiniteMetricError on NaN/inf before anything of this step is saved.
      metric_logging.check_finite(m, step + 1)
      if (step + 1) % tc.log_every == 0 or step + 1 == tc.num_steps:
        writer.write_scalars(step + 1, m)
      writer.update_progress(step + 1, m)
      if (step + 1) % tc.sample_every == 0:
        _write_samples(config, workdir, state.ema_params, state.g_stats, samples, step + 1,
                       writer)
      if ckpt.should_save(step + 1) and step + 1 < tc.num_steps:
        ckpt.save(step + 1, state, metadata={'data_position': step + 1})
    batches.close() if hasattr(batches, 'close') else None

    state = _recompute_ema_stats(config, state, train_src, mesh)
    _write_samples(config, workdir, state.ema_params, state.ema_stats, samples,
                   tc.num_steps, writer)
  ckpt.save(int(state.step), state, metadata={'data_position': int(state.step),
                                              'finished': True}, force=True)
  ckpt.close()
  _export_artifact(config, workdir, state)
  return state


def _export_artifact(config, workdir: str, state) -> None:
  """WORKDIR/artifacts/backbone: the EMA generator variables (artifacts.py), once."""
  if not artifacts.exists(workdir, 'backbone'):
    artifacts.save(workdir, 'backbone',
                   {'params': state.ema_params, 'batch_stats': state.ema_stats},
                   config=config, metadata={'steps': int(state.step)})


def _recompute_ema_stats(config, state: BackboneState, source, mesh) -> BackboneState:
  """BN statistics of the EMA generator from `config.train.ema_stats_batches` batches."""
  tc = config.train
  repl, data_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  f = jax.jit(make_stats_step(config), in_shardings=(repl, repl, data_sh, data_sh, None),
              out_shardings=repl)
  stats = state.g_stats
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  it = sources.train_batches(config, source, batch_size=tc.batch_size, seed=config.seed + 1,
                             prefetch=1)
  for i in range(tc.ema_stats_batches):
    b = parallel.shard_batch({'labels': next(it)['labels']}, mesh)
    z = jax.random.normal(jax.random.fold_in(key, i),
                          (tc.batch_size, config.backbone.z_dim))
    stats = f(state.ema_params, stats, b['labels'], jax.device_put(z, data_sh), float(i))
  it.close() if hasattr(it, 'close') else None
  return state._replace(ema_stats=stats)


def _sample_batch(config, source) -> dict[str, np.ndarray]:
  n = min(config.train.num_sample_images, len(source))
  ex = [source[i] for i in range(n)]
  z = jax.random.normal(jax.random.key(config.seed + 7), (n, config.backbone.z_dim))
  return {'labels': np.stack([e['labels'] for e in ex]).astype(np.int32),
          'image': np.stack([e['image'] for e in ex]), 'z': np.asarray(z)}


@functools.lru_cache(maxsize=4)
def _jitted_generate(config_json: str):
  """One compiled sampler per config (so periodic sample grids do not recompile)."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  return jax.jit(lambda p, s, l, z: generate(config, p, s, l, z))


def _write_samples(config, workdir, params, stats, samples, step, writer) -> None:
  """samples/backbone_{step}.png: label map | generated | real."""
  if jax.process_index() != 0:
    return
  fake = _jitted_generate(config.to_json_best_effort())(
      params, stats, samples['labels'], samples['z'])
  fake = np.asarray((np.asarray(fake) + 1) * 127.5).clip(0, 255).astype(np.uint8)
  cols = [visualize.label_map_to_rgb(samples['labels']), fake, samples['image']]
  os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  path = os.path.join(workdir, 'samples', f'{STAGE}_{step:06d}.png')
  visualize.save_grid(cols, path)
  writer.write_images(step, {'samples': visualize.grid(cols)})


def load_backbone(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict]:
  """The trained backbone of `workdir`: (EMA generator variables, discriminator variables).

  Raises:
    checkpoint.CheckpointError: no finished backbone checkpoint (names the directory).
  """
  if config.backbone.name == 'reenact':
    from fiancee_jax.training import reenact  # pylint: disable=g-import-not-at-top
    return reenact.load_backbone(config, workdir)
  target = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
  state, _ = checkpoint.restore_finished(os.path.join(workdir, 'checkpoints', STAGE), target,
                                         stage=STAGE, total_steps=config.train.num_steps)
  return ({'params': state.ema_params, 'batch_stats': state.ema_stats},
          {'params': state.d_params, 'batch_stats': state.d_stats})
