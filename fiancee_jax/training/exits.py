"""Stage `exits`: distils all exit branches jointly from the frozen backbone.

For each batch the backbone (EMA weights) runs once: it gives the teacher image, the
features every branch starts from and the database keys. Every branch, in the guided
variant and (for the ablation) the unguided one, is trained to reproduce the teacher
for the same label map and z: L1 + the configured perceptual distance + optional
feature distillation (losses/distillation.py) + an optional OASIS adversarial term
against the frozen discriminator.
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

from fiancee_jax import checkpoint
from fiancee_jax import metric_logging
from fiancee_jax import parallel
from fiancee_jax import tasks
from fiancee_jax.data import visualize
from fiancee_jax.guidance import build as database_build
from fiancee_jax.losses import distillation
from fiancee_jax.losses import oasis as oasis_losses
from fiancee_jax.metrics import distances
from fiancee_jax.models import factory
from fiancee_jax.training import backbone as backbone_training
from fiancee_jax.training import optimizers

STAGE = 'exits'


class ExitsState(NamedTuple):
  step: jax.Array  # int32 [], completed steps (= data position)
  rng: jax.Array  # typed PRNG key []
  # {'guided': [branch params], 'unguided': [...]} (variants present only), plus
  # 'distill': {variant: [FeatureProjections params per branch]} when feature_weight > 0.
  params: Any
  stats: Any  # same structure: branch batch_stats
  opt: optax.OptState


def variants(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Exit variants this config trains."""
  v = ('guided',) if config.exits.guided else ('unguided',)
  if config.exits.guided and config.exits.train_unguided:
    v += ('unguided',)
  return v


def get_distance(config: ml_collections.ConfigDict) -> distances.Distance:
  return distances.from_config(config)


def init_state(config, key, bb, db) -> ExitsState:
  inputs = [jnp.zeros(s.shape, s.dtype)
            for s in tasks.input_specs(tasks.get_task(config), 1)]
  params, stats, distill = {}, {}, {}
  for v in variants(config):
    model = factory.make_exit_model(config, guided=(v == 'guided'))
    ev = model.init_exits(jax.random.fold_in(key, len(params)), bb, db, *inputs)
    params[v] = [e['params'] for e in ev]
    stats[v] = [e['batch_stats'] for e in ev]
    if config.exits.get('feature_weight', 0.0):
      _, cond, outs = model.prefix(bb, inputs, model.backbone.num_blocks - 1)
      guide = model.guide({'database': db}, outs, cond.shape[1:3])
      _, _, feats = model.branch_outputs(ev, outs, cond, guide, features=True)
      distill[v] = [distillation.init_projections(jax.random.fold_in(key, 1000 + k), outs, f)
                    for k, f in enumerate(feats)]
  if distill:
    params['distill'] = distill
  tx = _optimizer(config)
  return ExitsState(step=jnp.zeros((), jnp.int32), rng=jax.random.fold_in(key, 99),
                    params=params, stats=stats, opt=tx.init(params))


def _optimizer(config):
  e = config.exits
  lr = optimizers.schedule(e.lr, e.num_steps, e.get('lr_schedule', 'constant'),
                           e.get('warmup_steps', 0))
  return optimizers.adam(lr, e.b1, e.b2)


def make_train_step(config: ml_collections.ConfigDict, bb: dict, dvars: dict, db: Any):
  """step(state, batch) -> (state, measurements); backbone, D and database are constants."""
  e = config.exits
  models = {v: factory.make_exit_model(config, guided=(v == 'guided'))
            for v in variants(config)}
  dist = get_distance(config)
  disc = factory.make_discriminator(config)
  tx = _optimizer(config)
  task = tasks.get_task(config)
  num_classes = config.data.get('num_classes', 0)
  feature_weight = e.get('feature_weight', 0.0)
  feature_norm = e.get('feature_loss', 'l2')
  distillation.check_weights(e.l1_weight, e.perceptual_weight, feature_weight, feature_norm)

  def step(state: ExitsState, batch):
    data = tuple(batch[k] for k in task.data_keys)
    inputs = tasks.make_inputs(task, data, jax.random.fold_in(state.rng, state.step))
    # One frozen backbone pass (with the database lookup) serves every variant.
    any_model = models[variants(config)[0]]
    h, cond, outs = any_model.prefix(bb, inputs, any_model.backbone.num_blocks - 1)
    teacher = any_model.backbone.apply(bb, h, method='head')
    guide = (models['guided'].guide({'database': db}, outs, cond.shape[1:3])
             if 'guided' in models else None)

    def loss_fn(params):
      total, meas, new_stats = 0.0, {}, {}
      for v, model in models.items():
        ev = [{'params': p, 'batch_stats': s} for p, s in zip(params[v], state.stats[v])]
        images, st, feats = model.branch_outputs(
            ev, outs, cond, guide if v == 'guided' else None, train=True, features=True)
        new_stats[v] = st
        suffix = '' if v == 'guided' else '_noguide'
        for k, img in enumerate(images):
          projected = None
          if feature_weight:
            projected = distillation.FeatureProjections(
                distillation.projection_widths(outs, feats[k])).apply(
                    {'params': params['distill'][v][k]}, feats[k])
          loss, terms = distillation.exit_loss(
              img, teacher, distance_fn=dist.fn, l1_weight=e.l1_weight,
              perceptual_weight=e.perceptual_weight, feature_weight=feature_weight,
              projected=projected, teacher_features=outs, feature_norm=feature_norm)
          if e.adversarial_weight > 0:
            logits = disc.apply(dvars, img)
            adv = oasis_losses.n1_cross_entropy(logits, batch['labels'], for_real=True,
                                                num_classes=num_classes)
            loss = loss + e.adversarial_weight * adv
            meas[f'exit{k}{suffix}/adv'] = adv
          meas[f'exit{k}{suffix}/l1'] = terms['l1']
          if 'perceptual' in terms:
            meas[f'exit{k}{suffix}/{dist.name}'] = terms['perceptual']
          if 'features' in terms:
            meas[f'exit{k}{suffix}/features'] = terms['features']
          total = total + loss
      return total, (new_stats, meas)

    (loss, (new_stats, meas)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt = tx.update(grads, state.opt, state.params)
    params = optax.apply_updates(state.params, updates)
    meas['loss'] = loss
    return state._replace(step=state.step + 1, params=params, stats=new_stats, opt=opt), meas

  return step


def train(config: ml_collections.ConfigDict, workdir: str) -> ExitsState:
  """Runs (or resumes) the exits stage; returns the final state."""
  e = config.exits
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(e.batch_size, mesh, 'config.exits.batch_size')
  repl, data_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  bb, dvars = backbone_training.load_backbone(config, workdir)
  db = database_build.load(config, workdir) if config.exits.guided else None
  bb, dvars, db = parallel.replicate((bb, dvars, db), mesh)
  train_src = tasks.data_source(config, 'train')
  task = tasks.get_task(config)

  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  state = jax.jit(lambda k: init_state(config, k, bb, db), out_shardings=repl)(key)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints', STAGE),
                                 max_to_keep=e.keep_checkpoints, save_every=e.checkpoint_every)
  # Resume order: this stage's latest valid checkpoint in the workdir, else scratch.
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    logging.info('exits: resumed at step %d', int(state.step))
    if meta.get('finished'):
      return state
  start = int(state.step)
  step_fn = jax.jit(make_train_step(config, bb, dvars, db), in_shardings=(repl, data_sh),
                    out_shardings=(repl, repl), donate_argnums=0)
  samples = sample_inputs(config)
  batches = tasks.train_batches(config, train_src, batch_size=e.batch_size,
                                seed=config.seed + 3, start_step=start)
  with metric_logging.MetricWriter(workdir, stage=STAGE, total_steps=e.num_steps) as writer:
    for step in range(start, e.num_steps):
      batch = next(batches)
      if step == start:
        tasks.check_batch(config, batch)
      state, m = step_fn(state, parallel.shard_batch({k: batch[k] for k in task.data_keys},
                                                     mesh))
      m = metric_logging.check_finite(jax.device_get(m), step + 1, stage=STAGE)
      if (step + 1) % e.log_every == 0 or step + 1 == e.num_steps:
        writer.write_scalars(step + 1, m)
      writer.update_progress(step + 1, m)
      if (step + 1) % e.sample_every == 0 or step + 1 == e.num_steps:
        write_samples(config, workdir, bb, db, state, samples, step + 1)
      if ckpt.should_save(step + 1) and step + 1 < e.num_steps:
        ckpt.save(step + 1, state, metadata={'data_position': step + 1})
    if hasattr(batches, 'close'):
      batches.close()
  ckpt.save(int(state.step), state, metadata={'data_position': int(state.step),
                                              'finished': True}, force=True)
  ckpt.close()
  return state


def load_exits(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict]]:
  """Trained exit variables per variant: {'guided': [vars_k], 'unguided': [...]}."""
  bb, _ = backbone_training.load_backbone(config, workdir)
  db = database_build.load(config, workdir) if config.exits.guided else None
  target = jax.eval_shape(lambda: init_state(config, jax.random.key(0), bb, db))
  state, _ = checkpoint.restore_finished(os.path.join(workdir, 'checkpoints', STAGE), target,
                                         stage=STAGE, total_steps=config.exits.num_steps)
  return {v: [{'params': p, 'batch_stats': s}
              for p, s in zip(state.params[v], state.stats[v])] for v in variants(config)}


@functools.lru_cache(maxsize=4)
def _jitted_all_exits(config_json: str, guided: bool):
  """One compiled pass over all exits per config (sample grids do not recompile)."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  return jax.jit(factory.make_exit_model(config, guided=guided).all_exits)


def sample_inputs(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{'data', 'inputs'} of the first validation examples that sample grids show."""
  task = tasks.get_task(config)
  data = tasks.load_data(config, 'validation', config.train.num_sample_images)
  inputs = tasks.make_inputs(task, data, jax.random.key(config.seed + 7))
  return {'data': data, 'inputs': tuple(np.asarray(x) for x in inputs)}


def write_samples(config, workdir, bb, db, state: ExitsState, samples, step: int) -> None:
  """samples/exits_{step}.png: data | backbone | exit 0 | exit 1 | ... (guided variant)."""
  if jax.process_index() != 0:
    return
  v = variants(config)[0]
  ev = [{'params': p, 'batch_stats': s} for p, s in zip(state.params[v], state.stats[v])]
  images, teacher = _jitted_all_exits(config.to_json_best_effort(), v == 'guided')(
      {'backbone': bb, 'exits': ev, 'database': db}, *samples['inputs'])
  to_u8 = visualize.images_to_uint8
  cols = tasks.get_task(config).columns(samples['data']) + [to_u8(np.asarray(teacher))]
  cols += [to_u8(np.asarray(img)) for img in images]
  os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  visualize.save_grid(cols, os.path.join(workdir, 'samples', f'{STAGE}_{step:06d}.png'))
