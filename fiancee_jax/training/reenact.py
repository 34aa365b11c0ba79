"""Stage `backbone` for `config.backbone.name='reenact'`: trains the reenactment generator.

Self-reenactment (source and driver of one identity, target = driver), data-parallel like
training/backbone.py: one jitted step over the mesh (batch sharded on `data`, state
replicated) makes a generator update against the current patch discriminator, then a
discriminator update (hinge) on the same fakes, then the generator EMA.

Generator loss = l1_weight * L1(fake, target) + perceptual_weight * config.distance(fake,
target) + adversarial_weight * hinge + identity_weight * L_id, where L_id keeps identity out
of the motion code: the avatars give `swap`, the driver's motion rendered with another
identity, and L_id is a contrastive (InfoNCE) loss that makes each driver's motion code
pick out its own swap among the batch's: informative about motion, blind to identity.

The loop (training/loop.py) resumes, checks, logs, draws samples and checkpoints under
workdir/checkpoints/backbone; at the end the EMA generator's spectral-norm sigmas are
refreshed and it is exported as the `backbone` artifact (or, with `config.train.pretrained`,
the shipped one is installed). Validation cross pairs (identity A's source, identity B's
driver, ground truth A with B's motion) are scored at every sample step against
copy-the-source and copy-the-driver.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fiancee_jax import artifacts
from fiancee_jax import parallel
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.data import avatars_tfds
from fiancee_jax.data import sources
from fiancee_jax.data import visualize
from fiancee_jax.metrics import distances
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io
from fiancee_jax.training import loop
from fiancee_jax.training import optimizers
from fiancee_jax.training import pretrained

STAGE = 'backbone'
_TRAIN_KEYS = ('source', 'driver', 'target', 'swap')


class ReenactState(NamedTuple):
  step: jax.Array  # int32 [], number of completed steps (= data position)
  g_params: Any  # generator params
  g_stats: Any  # generator batch_stats: spectral-norm u / sigma of G2D
  d_params: Any  # discriminator params
  d_stats: Any  # discriminator batch_stats (spectral-norm u / sigma)
  g_opt: optax.OptState
  d_opt: optax.OptState
  ema_params: Any  # EMA of g_params (what later stages use)
  ema_stats: Any  # spectral-norm sigmas refreshed for ema_params when training ends


def get_distance(config: ml_collections.ConfigDict) -> distances.Distance:
  return distances.from_config(config)


def init_key(seed: int) -> jax.Array:
  """The init stream of `seed`, as an 'rbg' key.

  Thousands of threefry draws make XLA:CPU compile the init ~3x slower than with
  RngBitGenerator; the init stream is used once, so its implementation is free to choose.
  """
  data = jax.random.bits(jax.random.fold_in(jax.random.key(seed), 0), (4,), jnp.uint32)
  return jax.random.wrap_key_data(data, impl='rbg')


def init_state(config: ml_collections.ConfigDict, key: jax.Array) -> ReenactState:
  """Fresh state from the init stream `key` (any PRNG implementation; see init_key)."""
  g, d = factory.make_generator(config), factory.make_discriminator(config)
  h, w = config.data.resolution
  image = jnp.zeros((1, h, w, 3))
  kg, kd = jax.random.split(key)
  gv = g.init(kg, image, image)
  dv = d.init(kd, image)
  tx_g, tx_d = optimizers.gan_optimizers(config.train)
  return ReenactState(
      step=jnp.zeros((), jnp.int32),
      g_params=gv['params'], g_stats=gv['batch_stats'],
      d_params=dv['params'], d_stats=dv.get('batch_stats', {}),
      g_opt=tx_g.init(gv['params']), d_opt=tx_d.init(dv['params']),
      ema_params=gv['params'], ema_stats=gv['batch_stats'])


def identity_loss(m_driver: jax.Array, m_swap: jax.Array, temperature: float) -> jax.Array:
  """Contrastive motion loss (InfoNCE) on motion codes [B, M] -> [].

  Row i of `m_swap` is the motion of driver i rendered with another identity. Each driver
  code must pick out its own swap code among the batch's by cosine similarity / temperature
  (and vice versa): the code has to describe the motion (negatives are other motions) and
  nothing of the identity (the positive has another one). MegaPortraits' cycle loss has this
  form; the procedural data supplies the positives directly.
  """
  a = m_driver / (jnp.linalg.norm(m_driver, axis=-1, keepdims=True) + 1e-6)
  b = m_swap / (jnp.linalg.norm(m_swap, axis=-1, keepdims=True) + 1e-6)
  logits = a @ b.T / temperature
  labels = jnp.arange(logits.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (jnp.mean(ce(logits, labels)) + jnp.mean(ce(logits.T, labels)))


def make_train_step(config: ml_collections.ConfigDict):
  """Returns step(state, batch) -> (state, measurements), pure, for jit.

  batch: {'source', 'driver', 'target', 'swap': float32 [B, H, W, 3] in [-1, 1]}. The models
  compute in config.train.dtype; losses, parameters and optimizer state are float32.
  """
  dtype = factory.train_dtype(config)
  g = factory.make_generator(config, dtype=dtype)
  d = factory.make_discriminator(config, dtype=dtype)
  tx_g, tx_d = optimizers.gan_optimizers(config.train)
  dist = get_distance(config)
  perceptual = f'perceptual_{dist.name}'
  t = config.train

  def step(state: ReenactState, batch: dict[str, jax.Array]):
    source, driver, target, swap = (batch[k] for k in _TRAIN_KEYS)
    dvars = {'params': state.d_params, 'batch_stats': state.d_stats}

    def g_loss_fn(gp):
      gvars = {'params': gp, 'batch_stats': state.g_stats}
      fake, upd = g.apply(gvars, source, driver, train=True, mutable=['batch_stats'])
      codes = g.apply(gvars, jnp.concatenate([driver, swap]), method='motion_code')
      m_driver, m_swap = jnp.split(codes, 2)
      parts = {
          'l1': jnp.mean(jnp.abs(fake - target)),
          perceptual: jnp.mean(dist.fn(fake, target)),
          'identity': identity_loss(m_driver, m_swap, t.identity_temperature),
      }
      loss = (t.l1_weight * parts['l1'] + t.perceptual_weight * parts[perceptual]
              + t.identity_weight * parts['identity'])
      if t.adversarial_weight > 0:  # hinge, generator side
        parts['adv'] = -jnp.mean(d.apply(dvars, fake))
        loss = loss + t.adversarial_weight * parts['adv']
      return loss, (fake, upd['batch_stats'], parts)

    (g_loss, (fake, g_stats, g_parts)), g_grads = jax.value_and_grad(
        g_loss_fn, has_aux=True)(state.g_params)
    g_upd, g_opt = tx_g.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_upd)

    fake = jax.lax.stop_gradient(fake)

    def d_loss_fn(dp):
      logits, upd = d.apply({'params': dp, 'batch_stats': state.d_stats},
                            jnp.concatenate([fake, target]), train=True,
                            mutable=['batch_stats'])
      d_fake, d_real = jnp.split(logits, 2)
      l_fake, l_real = jnp.mean(jax.nn.relu(1 + d_fake)), jnp.mean(jax.nn.relu(1 - d_real))
      return l_fake + l_real, (upd.get('batch_stats', {}), l_fake, l_real)

    (d_loss, (d_stats, l_fake, l_real)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(state.d_params)
    d_upd, d_opt = tx_d.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_upd)

    # EMA with warm-up (as training/backbone.py): short runs do not keep the initial weights.
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(t.ema_decay, (1.0 + n) / (10.0 + n))
    ema = optax.incremental_update(g_params, state.ema_params, 1.0 - decay)
    new_state = state._replace(
        step=state.step + 1, g_params=g_params, g_stats=g_stats, d_params=d_params,
        d_stats=d_stats, g_opt=g_opt, d_opt=d_opt, ema_params=ema)
    measurements = {'g/loss': g_loss, 'd/loss': d_loss, 'd/fake': l_fake, 'd/real': l_real,
                    'g/grad_norm': optax.tree.norm(g_grads)}
    measurements.update({f'g/{k}': v for k, v in g_parts.items()})
    return new_state, measurements

  return step


def evaluate_cross(config: ml_collections.ConfigDict, variables: dict, source: Any, *,
                   num: int, batch_size: int, generate_fn: Callable | None = None
                   ) -> dict[str, float]:
  """Scores the generator on the first `num` cross pairs of an avatars source.

  Args:
    config: the run's config (model and distance).
    variables: generator variables {'params', 'batch_stats'}.
    source: avatars source of cross pairs (split 'validation' or 'test').
    num: pairs to score (the first `num`).
    batch_size: pairs per forward pass.
    generate_fn: jitted (variables, source, driver) -> images; default: compiled here.

  Returns:
    Means over the pairs of `{distance name}` and 'l1' between the output and the ground
    truth, and the same for the baselines that copy the source ('copy_source/...') or the
    driver ('copy_driver/...'); keys prefixed 'val/'.
  """
  dist = get_distance(config)
  if generate_fn is None:
    g = factory.make_generator(config)
    generate_fn = jax.jit(lambda v, s, d: g.apply(v, s, d))
  sums, count = {}, 0
  for batch in avatars_tfds.eval_batches(source, batch_size=batch_size, prefetch=0):
    if count >= num:
      break
    mask = batch['mask'] & (np.arange(batch_size) + count < num)
    fake = generate_fn(variables, batch['source'], batch['driver'])
    for name, image in (('', fake), ('copy_source/', batch['source']),
                        ('copy_driver/', batch['driver'])):
      metrics = {dist.name: dist.fn, 'l1': distances.l1}  # one entry if dist is l1
      for metric, fn in metrics.items():
        values = fn(image, batch['target'])
        key = f'val/{name}{metric}'
        sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(values) * mask))
    count += int(mask.sum())
  return {k: v / max(count, 1) for k, v in sums.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact:
  """The reenactment backbone stage; returns the `backbone` artifact (EMA generator).

  As training/backbone.py's `train`: a shipped backbone (`config.train.pretrained`) or the
  workdir's own artifact is returned as is; else the loop trains and the EMA generator is
  exported.
  """
  ready = pretrained.ready_backbone(config, workdir)
  if ready is not None:
    return ready
  tc = config.train
  mesh = parallel.data_mesh(tc.batch_size, 'config.train.batch_size')
  train_src = sources.data_source(config, 'train')
  val_src = sources.data_source(config, 'validation')
  samples = _sample_batch(config, val_src)
  g = factory.make_generator(config)
  # Compiled once per stage run, shared by the sample grids, the evaluation and `finish`.
  generate = jax.jit(lambda v, s, d: g.apply(v, s, d))
  refresh = jax.jit(_refresh_fn(g))
  key = init_key(config.seed)

  def ema_stats(state: ReenactState) -> Any:
    return _ema_stats(config, refresh, state, samples, mesh)

  def write_samples(state: ReenactState, step: int, writer) -> None:
    # The last call (step = num_steps) comes after `finish`, which refreshed ema_stats.
    stats = state.ema_stats if step == tc.num_steps else ema_stats(state)
    variables = {'params': state.ema_params, 'batch_stats': stats}
    if jax.process_index() == 0:
      fake = generate(variables, samples['source'], samples['driver'])
      cols = [visualize.images_to_uint8(x) for x in
              (samples['source'], samples['driver'], np.asarray(fake), samples['target'])]
      visualize.save_grid(cols, workdir_lib.sample_path(workdir, STAGE, step))
      writer.write_images(step, {'samples': visualize.grid(cols)})
    n = min(tc.num_eval, len(val_src))
    writer.write_scalars(step, evaluate_cross(
        config, variables, val_src, num=n, generate_fn=generate,
        batch_size=min(tc.num_sample_images, n)))

  result = loop.train(
      stage=STAGE, workdir=workdir, mesh=mesh, allow_restart=config.checkpoint.allow_restart,
      async_save=config.checkpoint.async_save,
      schedule=loop.Schedule.of(tc),
      init=lambda: init_state(config, key),
      make_step=lambda: make_train_step(config),
      **loop.data_feed(config, train_src, batch_size=tc.batch_size, seed=config.seed),
      write_samples=write_samples,
      finish=lambda state, writer: (state._replace(ema_stats=ema_stats(state)), {}))
  return artifact_io.export_backbone(config, workdir, result.state.ema_params,
                                     result.state.ema_stats)


def _refresh_fn(g) -> Callable:
  """(params, stats, source, driver) -> stats after one spectral-norm power iteration."""

  def refresh(params, stats, source, driver):
    _, upd = g.apply({'params': params, 'batch_stats': stats}, source, driver, train=True,
                     mutable=['batch_stats'])
    return upd['batch_stats']

  return refresh


def _ema_stats(config, refresh: Callable, state: ReenactState, samples, mesh) -> Any:
  """Spectral-norm sigmas for the EMA weights: `ema_stats_batches` power iterations.

  Starts from the live generator's u vectors (close to the EMA's); the inputs only drive
  the forward pass (there are no batch statistics).
  """
  repl = parallel.replicated(mesh)
  stats = state.g_stats
  source, driver = (jax.device_put(samples[k][:1], repl) for k in ('source', 'driver'))
  for _ in range(config.train.ema_stats_batches):
    stats = refresh(state.ema_params, stats, source, driver)
  return stats


def _sample_batch(config, source) -> dict[str, np.ndarray]:
  """The first validation cross pairs, float32 in [-1, 1] (source, driver, target)."""
  n = min(config.train.num_sample_images, len(source))
  return avatars_tfds.load(source, np.arange(n))
