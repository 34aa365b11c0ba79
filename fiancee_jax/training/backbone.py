"""Stage `backbone` for OASIS: trains the generator + U-Net discriminator data-parallel.

One jitted step over the mesh (batch sharded on `data`, state replicated): a generator
update against the current discriminator, then a discriminator update on the same fake
images (N+1 cross-entropy + LabelMix), then the generator EMA. Generator and discriminator
compute in config.train.dtype (models/precision.py); parameters, optimizer state, batch
statistics and losses are float32. The loop (training/loop.py)
resumes, checks, logs, draws samples and checkpoints; at the end the EMA generator's batch
statistics are recomputed and it is exported as the `backbone` artifact. With
`config.train.pretrained` set, the shipped backbone is installed instead
(training/pretrained.py).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import parallel
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.data import input_pipeline
from fiancee_jax.data import sources
from fiancee_jax.data import visualize
from fiancee_jax.losses import oasis as oasis_losses
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io
from fiancee_jax.training import loop
from fiancee_jax.training import optimizers
from fiancee_jax.training import pretrained

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
      d_params=dv['params'], d_stats=dv.get('batch_stats', {}),
      g_opt=tx_g.init(gv['params']), d_opt=tx_d.init(dv['params']),
      ema_params=gv['params'], ema_stats=gv['batch_stats'])


def make_train_step(config: ml_collections.ConfigDict):
  """Returns step(state, batch) -> (state, measurements), pure, for jit; the models compute
  in config.train.dtype."""
  dtype = factory.train_dtype(config)
  g = factory.make_generator(config, dtype=dtype)
  d = factory.make_discriminator(config, dtype=dtype)
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
      return loss, (upd.get('batch_stats', {}), dict(fake=l_fake, real=l_real, labelmix=l_lm))

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


def train(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact:
  """Runs the backbone stage; returns the `backbone` artifact (EMA generator variables).

  Order: with `config.train.pretrained` the shipped backbone is installed; else a backbone
  artifact the workdir already holds is returned (checked); else the loop trains (or
  resumes, or reads back a finished checkpoint) and the EMA generator is exported.
  """
  ready = pretrained.ready_backbone(config, workdir)
  if ready is not None:
    return ready
  tc = config.train
  mesh = parallel.data_mesh(tc.batch_size, 'config.train.batch_size')
  train_src = sources.data_source(config, 'train')
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  result = loop.train(
      stage=STAGE, workdir=workdir, mesh=mesh, allow_restart=config.checkpoint.allow_restart,
      async_save=config.checkpoint.async_save,
      schedule=loop.Schedule.of(tc),
      init=lambda: init_state(config, key),
      make_step=lambda: make_train_step(config),
      **loop.data_feed(config, train_src, batch_size=tc.batch_size, seed=config.seed),
      write_samples=_sample_writer(
          config, workdir, _sample_batch(config, sources.data_source(config, 'validation'))),
      finish=lambda state, writer: (_recompute_ema_stats(config, state, train_src, mesh), {}))
  return artifact_io.export_backbone(config, workdir, result.state.ema_params,
                                     result.state.ema_stats)


def load_discriminator(config: ml_collections.ConfigDict, workdir: str,
                       backbone: artifacts.Artifact) -> dict:
  """The discriminator variables trained with `backbone` (for an adversarial exit loss).

  The discriminator is no part of any artifact: it is read from the backbone stage's
  finished checkpoint, which must be the one `backbone` was exported from.

  Raises:
    ValueError: the backbone was installed from a shipped one (it has no discriminator).
    checkpoint.CheckpointError: no finished backbone checkpoint in the workdir.
    artifacts.ArtifactError: the checkpoint is not the one the artifact came from.
  """
  if config.train.pretrained:
    raise ValueError(
        'config.exits.adversarial_weight > 0 needs the discriminator trained with the '
        f'backbone, and the shipped backbone {config.train.pretrained!r} has none; set '
        "--config.exits.adversarial_weight=0, or --config.train.pretrained='' to train the "
        'backbone in this workdir')
  target = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
  state, _ = checkpoint.restore_finished(workdir_lib.checkpoints(workdir, STAGE), target,
                                         stage=STAGE, total_steps=config.train.num_steps)
  fp = artifacts.fingerprint(STAGE, {'params': state.ema_params, 'batch_stats': state.ema_stats},
                             artifacts.config_values(config, STAGE), {})
  if fp != backbone.fingerprint:
    raise artifacts.ArtifactError(
        f'the backbone checkpoint in {workdir_lib.checkpoints(workdir, STAGE)} holds another '
        f'generator ({fp[:12]}) than the backbone artifact ({backbone.fingerprint[:12]}); '
        'rerun --stages=backbone in a new workdir')
  return {'params': state.d_params, 'batch_stats': state.d_stats}


def _recompute_ema_stats(config, state: BackboneState, source, mesh) -> BackboneState:
  """BN statistics of the EMA generator from `config.train.ema_stats_batches` batches."""
  tc = config.train
  repl, data_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  f = jax.jit(make_stats_step(config), in_shardings=(repl, repl, data_sh, data_sh, None),
              out_shardings=repl)
  stats = state.g_stats
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  it = input_pipeline.batches(source, batch_size=tc.batch_size, seed=config.seed + 1,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), prefetch=1)
  try:
    for i in range(tc.ema_stats_batches):
      b = parallel.shard_batch({'labels': next(it)['labels']}, mesh)
      z = jax.random.normal(jax.random.fold_in(key, i),
                            (tc.batch_size, config.backbone.z_dim))
      stats = f(state.ema_params, stats, b['labels'], jax.device_put(z, data_sh), float(i))
  finally:
    it.close()
  return state._replace(ema_stats=stats)


def _sample_writer(config: ml_collections.ConfigDict, workdir: str,
                   samples: dict[str, np.ndarray]) -> loop.SampleFn:
  """write(state, step, writer): samples/backbone_{step}.png, label map | generated | real.

  The generator is compiled at the first grid and reused for every later one of the run.
  Before the end the EMA weights are drawn with the live generator's statistics; the last
  grid (step = num_steps, after the loop's `finish`) with the recomputed EMA statistics.
  """
  generate = jax.jit(factory.make_generator(config).apply)

  def write(state: BackboneState, step: int, writer) -> None:
    # Every process computes (the state spans all of them), process 0 draws.
    stats = state.ema_stats if step == config.train.num_steps else state.g_stats
    fake = generate({'params': state.ema_params, 'batch_stats': stats}, samples['labels'],
                    samples['z'])
    if jax.process_index() != 0:
      return
    cols = [visualize.label_map_to_rgb(samples['labels']),
            visualize.images_to_uint8(np.asarray(fake)), samples['image']]
    visualize.save_grid(cols, workdir_lib.sample_path(workdir, STAGE, step))
    writer.write_images(step, {'samples': visualize.grid(cols)})

  return write


def _sample_batch(config, source) -> dict[str, np.ndarray]:
  n = min(config.train.num_sample_images, len(source))
  ex = [source[i] for i in range(n)]
  z = jax.random.normal(jax.random.key(config.seed + 7), (n, config.backbone.z_dim))
  return {'labels': np.stack([e['labels'] for e in ex]).astype(np.int32),
          'image': np.stack([e['image'] for e in ex]),  # uint8 [n, H, W, 3]
          'z': np.asarray(z)}
