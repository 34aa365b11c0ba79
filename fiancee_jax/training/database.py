"""Stage `database`: builds the guiding database from the backbone (and exits) artifacts.

The frozen backbone runs on the first `config.database.num_images` training inputs (z from a
fixed stream); keys are pooled features of block `config.database.key_block`, values
(config.database.value_type, guidance/database.py) the backbone's output patches
('image'), or the backbone's image minus each trained unguided exit's image over the patch
('residual'; the stage then runs after the exits stage). The result is the `database`
artifact, whose parents are the artifacts it was built from. A damaged database artifact is
rebuilt, with a warning naming the damage.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fiancee_jax import artifacts
from fiancee_jax import parallel
from fiancee_jax import tasks
from fiancee_jax.data import sources
from fiancee_jax.guidance import database
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io

STAGE = 'database'


def build(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact | None:
  """Runs the database stage; returns the `database` artifact (built once per workdir).

  Call on every process: the backbone's features are computed over every device of every
  process, each process fits the same database from them, and every process takes part in
  the artifact's save. Returns None, building nothing, when the exits are not guided
  (config.exits.guided False): nothing would read the database.
  """
  if not config.exits.guided:
    logging.info('database: the exits are not guided (config.exits.guided=False); no database')
    return None
  residual = factory.residual_guidance(config)
  if residual:
    arts = artifact_io.load_lineage(config, workdir, upto='exits')
    backbone, exits = arts['backbone'], arts['exits']
  else:
    backbone, exits = artifact_io.load_backbone(config, workdir), None
  if artifacts.exists(workdir, STAGE):
    logging.info('database: found %s', artifacts.path(workdir, STAGE))
    try:
      return artifact_io.load_database(config, workdir, backbone, exits)
    except artifacts.DamagedArtifactError as e:
      # The database is a function of the backbone and the config: rebuilt, it is the same
      # arrays with the same fingerprint, so exits built from it stay valid.
      logging.warning('%s; rebuilding it from the backbone artifact.', e.damage)
  spec = factory.database_spec(config)
  consts = (backbone.tree, exits.tree['unguided'] if residual else None)
  model = factory.make_exit_model(config, guided=False)
  task = factory.get_task(config)
  data = sources.load_data(config, 'train', config.database.num_images)
  n = len(data[0])
  bs = config.exits.batch_size
  key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def features(consts, *inputs):  # per image: pooled keys [gh, gw, C], values [gh * gw, V]
    bb, exit_vars = consts
    h, cond, outs = model.prefix(bb, inputs, model.backbone.num_blocks - 1)
    teacher = model.backbone.apply(bb, h, method='head')
    if exit_vars is None:
      target = teacher
    else:  # [B, H, W, 3 * branches]: exit k's residual in channels 3k..3k+2
      images, _ = model.branch_outputs(exit_vars, outs, cond, None)
      target = jnp.concatenate([teacher - im.astype(teacher.dtype) for im in images], axis=-1)
    values = database.patches_of(spec, target)
    return (database.pool(outs[spec.key_block], spec.grid),
            values.reshape(teacher.shape[0], -1, values.shape[-1]))

  # One z draw per chunk of bs images, keyed by the chunk's first index.
  chunks = [tasks.make_inputs(task, tuple(x[s:s + bs] for x in data),
                              jax.random.fold_in(key, s)) for s in range(0, n, bs)]
  inputs = tuple(np.concatenate([np.asarray(c[i]) for c in chunks])
                 for i in range(len(chunks[0])))
  # The backbone's share of the work is split over every device of every process; the fit
  # (an SVD and a few k-means steps over all patches) runs whole on each process.
  feats, values = parallel.map_rows(features, inputs, bs, consts=consts)
  db = database.fit(spec, feats.reshape(-1, feats.shape[-1]),
                    values.reshape(-1, values.shape[-1]),
                    jax.random.fold_in(key, 10**6), config.database.kmeans_iters)
  db = jax.device_get(db)
  metadata = {'spec': artifact_io.database_spec_json(spec), 'num_images': n}
  parents = {'backbone': backbone.fingerprint}
  if residual:
    parents['exits'] = exits.fingerprint
  fp = artifacts.save(workdir, STAGE, db, config=config, parents=parents, metadata=metadata)
  logging.info('database: %d entries from %d images, %.1f MB', spec.num_entries, n,
               database.nbytes(db) / 1e6)
  return artifacts.Artifact(tree=db, fingerprint=fp, parents=parents, metadata=metadata)
