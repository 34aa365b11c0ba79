"""Stage `database`: builds the guiding database from the backbone artifact.

The frozen backbone runs on the first `config.database.num_images` training inputs (z from a
fixed stream); keys are pooled features of block `config.database.key_block`, values the
backbone's output patches (guidance/database.py). The result is the `database` artifact,
whose parent is the backbone artifact it was built from. A damaged database artifact is
rebuilt, with a warning naming the damage.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fiancee_jax import artifacts
from fiancee_jax import tasks
from fiancee_jax.data import sources
from fiancee_jax.guidance import database
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io

STAGE = 'database'


def build(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact | None:
  """Runs the database stage; returns the `database` artifact (built once per workdir).

  Call on every process (each computes the same database; every process takes part in the
  artifact's save). Returns None, building nothing, when the exits are not guided
  (config.exits.guided False): nothing would read the database.
  """
  if not config.exits.guided:
    logging.info('database: the exits are not guided (config.exits.guided=False); no database')
    return None
  backbone = artifact_io.load_backbone(config, workdir)
  if artifacts.exists(workdir, STAGE):
    logging.info('database: found %s', artifacts.path(workdir, STAGE))
    try:
      return artifact_io.load_database(config, workdir, backbone)
    except artifacts.DamagedArtifactError as e:
      # The database is a function of the backbone and the config: rebuilt, it is the same
      # arrays with the same fingerprint, so exits built from it stay valid.
      logging.warning('%s; rebuilding it from the backbone artifact.', e.damage)
  spec = factory.database_spec(config)
  bb = backbone.tree
  model = factory.make_exit_model(config, guided=False)
  task = factory.get_task(config)
  data = sources.load_data(config, 'train', config.database.num_images)
  n = len(data[0])
  bs = config.exits.batch_size
  key = jax.random.fold_in(jax.random.key(config.seed), 2)

  @jax.jit
  def features(bb, *inputs):  # bb an argument: closed over, XLA would fold it in
    h, _, outs = model.prefix(bb, inputs, model.backbone.num_blocks - 1)
    teacher = model.backbone.apply(bb, h, method='head')
    pooled = database.pool(outs[spec.key_block], spec.grid)
    return pooled.reshape(-1, pooled.shape[-1]), database.patches_of(spec, teacher)

  feats, values = [], []
  for start in range(0, n, bs):
    chunk = tuple(jnp.asarray(x[start:start + bs]) for x in data)
    f, v = features(bb, *tasks.make_inputs(task, chunk, jax.random.fold_in(key, start)))
    feats.append(np.asarray(f))
    values.append(np.asarray(v))
  db = database.fit(spec, np.concatenate(feats), np.concatenate(values),
                    jax.random.fold_in(key, 10**6), config.database.kmeans_iters)
  db = jax.device_get(db)
  metadata = {'spec': artifact_io.database_spec_json(spec), 'num_images': n}
  parents = {'backbone': backbone.fingerprint}
  fp = artifacts.save(workdir, STAGE, db, config=config, parents=parents, metadata=metadata)
  logging.info('database: %d entries from %d images, %.1f MB', spec.num_entries, n,
               database.nbytes(db) / 1e6)
  return artifacts.Artifact(tree=db, fingerprint=fp, parents=parents, metadata=metadata)
