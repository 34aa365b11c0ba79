"""The stages' artifacts as the stages write and read them (never each other's checkpoints).

Each reader restores one params-only artifact (artifacts.py) onto a template built from the
model factory (structure, shapes, dtypes; no optimizer, no discriminator), checks the config
values it was built from, and checks the fingerprints of its parents against the artifacts
this workdir holds, so that a database, exits or predictor of another run is refused.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fiancee_jax import artifacts
from fiancee_jax import tasks
from fiancee_jax.guidance import database as database_lib
from fiancee_jax.models import factory


def _load(workdir: str, kind: str, template: Any, config: ml_collections.ConfigDict,
          parents: dict[str, str] | None = None) -> artifacts.Artifact:
  """artifacts.load, with the config values compared first: an artifact built with another
  config is named as such, not as one whose shapes do not fit the template."""
  have = artifacts.read_manifest(workdir, kind).get('config', {})
  want = artifacts.config_values(config, kind)
  differ = sorted(k for k in want if have.get(k) != want[k])
  if differ:
    detail = '; '.join(f'config.{k} is {have.get(k)!r} there, {want[k]!r} here'
                       for k in differ)
    raise artifacts.ArtifactError(
        f'{kind} artifact at {artifacts.path(workdir, kind)} was built with another config '
        f'({detail}); rerun --stages={artifacts.STAGE_OF[kind]} in a new workdir or use the '
        'config it was built with')
  return artifacts.load(workdir, kind, template, config=config, parents=parents)


def _input_specs(config: ml_collections.ConfigDict) -> tuple[jax.ShapeDtypeStruct, ...]:
  return tasks.input_specs(factory.get_task(config), 1)


def backbone_template(config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs of the generator variables {'params', 'batch_stats'}."""
  g = factory.make_generator(config)
  specs = _input_specs(config)
  return jax.eval_shape(lambda *inputs: g.init(jax.random.key(0), *inputs), *specs)


def database_spec_json(spec: database_lib.DatabaseSpec) -> dict[str, Any]:
  """The spec as the database artifact's metadata stores it (tuples as lists)."""
  d = dataclasses.asdict(spec)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def database_template(spec: database_lib.DatabaseSpec) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of the database arrays {'keys', 'values', 'mean', 'proj'}."""
  f32 = jnp.float32
  return {'keys': jax.ShapeDtypeStruct((spec.num_entries, spec.key_dim), f32),
          'values': jax.ShapeDtypeStruct((spec.num_entries, spec.value_dim), f32),
          'mean': jax.ShapeDtypeStruct((spec.feature_width,), f32),
          'proj': jax.ShapeDtypeStruct((spec.feature_width, spec.key_dim), f32)}


def exits_template(config: ml_collections.ConfigDict, bb: Any, db: Any) -> dict[str, list]:
  """ShapeDtypeStructs of {variant: [variables_k, ...]} for the branch sets the config
  trains."""
  specs = _input_specs(config)

  def init(bb, db, *inputs):
    out = {}
    for v in factory.trained_variants(config):
      model = factory.make_exit_model(config, guided=(v == 'guided'))
      out[v] = model.init_exits(jax.random.key(0), bb, db if v == 'guided' else None,
                                *inputs)
    return out

  return jax.eval_shape(init, bb, db, *specs)


def predictor_template(config: ml_collections.ConfigDict) -> Any:
  model = factory.make_predictor(config)
  specs = _input_specs(config)
  return jax.eval_shape(lambda *inputs: model.init(jax.random.key(0), *inputs), *specs)


def export_backbone(config: ml_collections.ConfigDict, workdir: str, params: Any,
                    batch_stats: Any) -> artifacts.Artifact:
  """Writes the `backbone` artifact, the EMA generator's variables (call on every process)."""
  tree = {'params': params, 'batch_stats': batch_stats}
  metadata = {'steps': config.train.num_steps}
  fp = artifacts.save(workdir, 'backbone', tree, config=config, metadata=metadata)
  return artifacts.Artifact(tree=tree, fingerprint=fp, parents={}, metadata=metadata)


def load_backbone(config: ml_collections.ConfigDict, workdir: str) -> artifacts.Artifact:
  """The backbone artifact: EMA generator variables, checked against the config."""
  return _load(workdir, 'backbone', backbone_template(config), config)


def load_database(config: ml_collections.ConfigDict, workdir: str,
                  backbone: artifacts.Artifact,
                  exits: artifacts.Artifact | None = None) -> artifacts.Artifact:
  """The database artifact built from `backbone` (and, holding residuals, from `exits`),
  with the spec the config's model expects."""
  spec = factory.database_spec(config)
  parents = {'backbone': backbone.fingerprint}
  if factory.residual_guidance(config):
    if exits is None:
      raise ValueError('a residual database is checked against the exits it was built from; '
                       'pass the exits artifact')
    parents['exits'] = exits.fingerprint
  art = _load(workdir, 'database', database_template(spec), config, parents)
  got, want = art.metadata.get('spec'), database_spec_json(spec)
  if got != want:
    differ = sorted(k for k in want if (got or {}).get(k) != want[k])
    raise artifacts.ArtifactError(
        f'the database artifact of {workdir} was built for another model (spec fields '
        f'{differ} differ); rebuild it with --stages=database')
  return art


def load_exits(config: ml_collections.ConfigDict, workdir: str, backbone: artifacts.Artifact,
               database: artifacts.Artifact | None) -> artifacts.Artifact:
  """The exits artifact built from `backbone` (and `database` when a branch set is trained
  on its guide: 'input' guidance)."""
  parents = {'backbone': backbone.fingerprint}
  if database is not None:
    parents['database'] = database.fingerprint
  template = exits_template(config, backbone.tree, None if database is None else database.tree)
  return _load(workdir, 'exits', template, config, parents)


def predictor_parents(config: ml_collections.ConfigDict, exits: artifacts.Artifact,
                      database: artifacts.Artifact | None) -> dict[str, str]:
  """{kind: fingerprint} a predictor is trained from: the exits, and a residual database
  (which changes the guided exits' images without changing the exits artifact)."""
  parents = {'exits': exits.fingerprint}
  if factory.residual_guidance(config):
    parents['database'] = database.fingerprint
  return parents


def load_predictor(config: ml_collections.ConfigDict, workdir: str,
                   exits: artifacts.Artifact,
                   database: artifacts.Artifact | None = None) -> artifacts.Artifact:
  """The predictor artifact trained on the distances of `exits` (with `database`)."""
  return _load(workdir, 'predictor', predictor_template(config), config,
               predictor_parents(config, exits, database))


def load_lineage(config: ml_collections.ConfigDict, workdir: str, *,
                 upto: str) -> dict[str, artifacts.Artifact]:
  """The artifacts of every stage up to `upto` ('backbone', 'database', 'exits',
  'predictor') in the order the stages build them (stage_order); the database only when the
  config's exits are guided or `upto` is 'database'."""
  order = stage_order(config)
  order = order[:order.index(upto) + 1]
  out = {'backbone': load_backbone(config, workdir)}
  for kind in order[1:]:
    if kind == 'database' and (config.exits.guided or upto == 'database'):
      out['database'] = load_database(config, workdir, out['backbone'], out.get('exits'))
    elif kind == 'exits':
      db = None if factory.residual_guidance(config) else out.get('database')
      out['exits'] = load_exits(config, workdir, out['backbone'], db)
    elif kind == 'predictor':
      out['predictor'] = load_predictor(config, workdir, out['exits'], out.get('database'))
  return out


def stage_order(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The artifact kinds in the order the config's stages build them: artifacts.KINDS, with
  the database after the exits when it holds their residuals."""
  if factory.residual_guidance(config):
    return ('backbone', 'exits', 'database', 'predictor')
  return artifacts.KINDS
