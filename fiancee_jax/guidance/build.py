"""Stage `database`: builds the guiding database from the trained backbone."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import tasks
from fiancee_jax.data import sources
from fiancee_jax.guidance import database
from fiancee_jax.models import factory
from fiancee_jax.training import backbone as backbone_training

STAGE = 'database'


def database_path(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints', STAGE, 'database')


def build(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Builds (or loads, if already built for this config) the database of `workdir`."""
  spec = factory.database_spec(config)
  path = database_path(workdir)
  if os.path.exists(path):
    try:
      db = database.load(path, spec)
      logging.info('database: found %s', path)
      _export_artifact(config, workdir, spec, db)
      return db
    except checkpoint.CorruptCheckpointError as e:  # an optional artifact: made again
      logging.warning('database: %s; rebuilding it from the backbone.', e)
  bb, _ = backbone_training.load_backbone(config, workdir)
  model = factory.make_exit_model(config, guided=False)
  task = factory.get_task(config)
  data = sources.load_data(config, 'train', config.database.num_images)
  n = len(data[0])
  bs = config.exits.batch_size
  key = jax.random.fold_in(jax.random.key(config.seed), 2)

  @jax.jit
  def features(*inputs):
    h, cond, outs = model.prefix(bb, inputs, model.backbone.num_blocks - 1)
    teacher = model.backbone.apply(bb, h, method='head')
    pooled = database.pool(outs[spec.key_block], spec.grid)
    return pooled.reshape(-1, pooled.shape[-1]), database.patches_of(spec, teacher)

  feats, values = [], []
  for start in range(0, n, bs):
    chunk = tuple(jnp.asarray(x[start:start + bs]) for x in data)
    f, v = features(*tasks.make_inputs(task, chunk, jax.random.fold_in(key, start)))
    feats.append(np.asarray(f))
    values.append(np.asarray(v))
  db = database.fit(spec, np.concatenate(feats), np.concatenate(values),
                    jax.random.fold_in(key, 10**6), config.database.kmeans_iters)
  if jax.process_index() == 0:
    database.save(path, spec, db)
  logging.info('database: %d entries from %d images, %.1f MB', spec.num_entries, n,
               database.nbytes(db) / 1e6)
  _export_artifact(config, workdir, spec, db)
  return db


def _export_artifact(config, workdir: str, spec, db: dict) -> None:
  """WORKDIR/artifacts/database (artifacts.py), built from this workdir's backbone, once."""
  if not artifacts.exists(workdir, 'database'):
    parent = artifacts.read_manifest(workdir, 'backbone')['fingerprint']
    artifacts.save(workdir, 'database', db, config=config, parents={'backbone': parent},
                   metadata={'spec': database._meta(spec)['spec'],  # pylint: disable=protected-access
                             'num_images': config.database.num_images})


def load(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The database of `workdir`, checked against the config's model."""
  return database.load(database_path(workdir), factory.database_spec(config))
