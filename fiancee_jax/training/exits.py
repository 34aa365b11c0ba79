"""Stage `exits`: distils all exit branches jointly from the frozen backbone.

For each batch the backbone (EMA weights, the backbone artifact) runs once: it gives the
teacher image, the features every branch starts from and the database keys. Every branch,
in the guided variant and (for the ablation) the unguided one, is trained to reproduce the
teacher for the same label map and z: L1 + the configured perceptual distance + optional
feature distillation (losses/distillation.py) + an optional OASIS adversarial term against
the frozen discriminator (read only when
`config.exits.adversarial_weight` > 0). The backbone pass, the branches and the
discriminator compute in config.train.dtype (models/precision.py); losses, parameters and
optimizer state are float32. The loop (training/loop.py) resumes, checks, logs,
draws samples and checkpoints; the result is the `exits` artifact.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fiancee_jax import artifacts
from fiancee_jax import parallel
from fiancee_jax import tasks
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.data import sources
from fiancee_jax.data import visualize
from fiancee_jax.losses import distillation
from fiancee_jax.losses import oasis as oasis_losses
from fiancee_jax.metrics import distances
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io
from fiancee_jax.training import backbone as backbone_training
from fiancee_jax.training import loop
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
  """Exit variants this config trains ('guided' first when guided)."""
  return factory.trained_variants(config)


def get_distance(config: ml_collections.ConfigDict) -> distances.Distance:
  return distances.from_config(config)


def init_state(config, key, bb, db) -> ExitsState:
  inputs = [jnp.zeros(s.shape, s.dtype)
            for s in tasks.input_specs(factory.get_task(config), 1)]
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


def make_train_step(config: ml_collections.ConfigDict, bb: dict, dvars: dict | None, db: Any):
  """step(state, batch) -> (state, measurements); backbone, D and database are constants.

  dvars: the discriminator's variables, used (and needed) only when
  config.exits.adversarial_weight > 0.
  """
  e = config.exits
  dtype = factory.train_dtype(config)
  models = {v: factory.make_exit_model(config, guided=(v == 'guided'), dtype=dtype)
            for v in variants(config)}
  dist = get_distance(config)
  disc = (factory.make_discriminator(config, dtype=dtype) if e.adversarial_weight > 0
          else None)
  tx = _optimizer(config)
  task = factory.get_task(config)
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
    # The feature loss compares in float32 (the blocks' outputs are in the compute dtype).
    teacher_features = {i: o.astype(jnp.float32) for i, o in outs.items()}

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
            student = {j: f.astype(jnp.float32) for j, f in feats[k].items()}
            projected = distillation.FeatureProjections(
                distillation.projection_widths(outs, student)).apply(
                    {'params': params['distill'][v][k]}, student)
          loss, terms = distillation.exit_loss(
              img, teacher, distance_fn=dist.fn, l1_weight=e.l1_weight,
              perceptual_weight=e.perceptual_weight, feature_weight=feature_weight,
              projected=projected, teacher_features=teacher_features,
              feature_norm=feature_norm)
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


def train(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact:
  """Runs the exits stage; returns the `exits` artifact (trained once per workdir)."""
  e = config.exits
  backbone = artifact_io.load_backbone(config, workdir)
  # Exits fed the guide are trained on the database; a residual database is built from them.
  fed = e.guided and not factory.residual_guidance(config)
  database = artifact_io.load_database(config, workdir, backbone) if fed else None
  if artifacts.exists(workdir, STAGE):
    return artifact_io.load_exits(config, workdir, backbone, database)
  mesh = parallel.data_mesh(e.batch_size, 'config.exits.batch_size')
  dvars = (backbone_training.load_discriminator(config, workdir, backbone)
           if e.adversarial_weight > 0 else None)
  bb, dvars, db = parallel.replicate(
      (backbone.tree, dvars, None if database is None else database.tree), mesh)
  train_src = sources.data_source(config, 'train')
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  result = loop.train(
      stage=STAGE, workdir=workdir, mesh=mesh, allow_restart=config.checkpoint.allow_restart,
      async_save=config.checkpoint.async_save,
      schedule=loop.Schedule.of(e),
      init=lambda: init_state(config, key, bb, db),
      make_step=lambda: make_train_step(config, bb, dvars, db),
      **loop.data_feed(config, train_src, batch_size=e.batch_size, seed=config.seed + 3),
      write_samples=_sample_writer(config, workdir, bb, db, sample_inputs(config)))
  return export(config, workdir, result.state, backbone, database)


def export(config: ml_collections.ConfigDict, workdir: str, state: ExitsState,
           backbone: artifacts.Artifact,
           database: artifacts.Artifact | None) -> artifacts.Artifact:
  """Writes the `exits` artifact from a finished state (call on every process)."""
  tree = {v: [{'params': p, 'batch_stats': s} for p, s in zip(state.params[v], state.stats[v])]
          for v in variants(config)}
  parents = {'backbone': backbone.fingerprint}
  if database is not None:
    parents['database'] = database.fingerprint
  metadata = {'steps': config.exits.num_steps, 'variants': list(variants(config))}
  fp = artifacts.save(workdir, STAGE, tree, config=config, parents=parents, metadata=metadata)
  return artifacts.Artifact(tree=tree, fingerprint=fp, parents=parents, metadata=metadata)


def load_exits(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict]]:
  """Trained exit variables per variant: {'guided': [vars_k], 'unguided': [...]}."""
  return artifact_io.load_lineage(config, workdir, upto='exits')['exits'].tree


def sample_inputs(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{'data', 'inputs'} of the first validation examples that sample grids show."""
  task = factory.get_task(config)
  data = sources.load_data(config, 'validation', config.train.num_sample_images)
  inputs = tasks.make_inputs(task, data, jax.random.key(config.seed + 7))
  return {'data': data, 'inputs': tuple(np.asarray(x) for x in inputs)}


def _sample_writer(config: ml_collections.ConfigDict, workdir: str, bb: Any, db: Any,
                   samples: dict[str, tuple]) -> loop.SampleFn:
  """write(state, step, writer): samples/exits_{step}.png, data | backbone | exit 0 | ...

  Draws the first variant (guided when trained); its pass over all exits is compiled at the
  first grid and reused for every later one of the run.
  """
  v = variants(config)[0]
  all_exits = jax.jit(factory.make_exit_model(config, guided=(v == 'guided')).all_exits)
  task = factory.get_task(config)

  def write(state: ExitsState, step: int, writer) -> None:
    del writer  # the grids go to samples/ only
    # Every process computes (the state spans all of them), process 0 draws.
    ev = [{'params': p, 'batch_stats': s} for p, s in zip(state.params[v], state.stats[v])]
    images, teacher = all_exits({'backbone': bb, 'exits': ev, 'database': db},
                                *samples['inputs'])
    if jax.process_index() != 0:
      return
    to_u8 = visualize.images_to_uint8
    cols = task.columns(samples['data']) + [to_u8(np.asarray(teacher))]
    cols += [to_u8(np.asarray(img)) for img in images]
    visualize.save_grid(cols, workdir_lib.sample_path(workdir, STAGE, step))

  return write
