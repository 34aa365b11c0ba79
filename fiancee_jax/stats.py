"""Prints parameter counts and GFLOPs of a config's models as JSON, without training.

  python -m fiancee_jax.stats --config=configs/oasis_ade20k.py

GFLOPs are XLA's cost analysis of each compiled forward at batch 1 (multiply-add = 2).
"""
import copy
import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import app
from ml_collections import config_flags

from fiancee_jax import config_checks
from fiancee_jax import tasks
from fiancee_jax.metrics import flops
from fiancee_jax.models import conv
from fiancee_jax.models import factory



def backbone_stats(config: ml_collections.ConfigDict) -> dict:
  """{'params': int, 'gflops': float} of the generator forward at batch 1."""
  g = factory.make_generator(config)
  inputs = _abstract_inputs(config)
  variables = jax.eval_shape(g.init, jax.random.key(0), *inputs)
  gf = flops.gflops(lambda v, *x: g.apply(v, *x), variables, *inputs)
  return {'params': flops.param_count(variables['params']), 'gflops': gf}


def _abstract_inputs(config) -> tuple[jax.ShapeDtypeStruct, ...]:
  """The exit paths' inputs at batch 1 (tasks.py)."""
  return tasks.input_specs(factory.get_task(config), 1)


def abstract_database(config: ml_collections.ConfigDict) -> dict:
  """ShapeDtypeStructs of the database arrays the config's model expects."""
  spec = factory.database_spec(config)
  f32 = jnp.float32
  return {'keys': jax.ShapeDtypeStruct((spec.num_entries, spec.key_dim), f32),
          'values': jax.ShapeDtypeStruct((spec.num_entries, spec.value_dim), f32),
          'mean': jax.ShapeDtypeStruct((spec.feature_width,), f32),
          'proj': jax.ShapeDtypeStruct((spec.feature_width, spec.key_dim), f32)}


def _unchunked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with the whole database in one lookup chunk, for counting FLOPs.

  A lookup over more keys than `database.chunk` scans over the chunks, and XLA's cost
  analysis counts a loop body once, not once per iteration: counted chunked, a lookup over
  4 chunks would show about a quarter of its FLOPs. Unchunked it does the same arithmetic.
  """
  if config.database.chunk >= config.database.num_entries:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.database.chunk = config.database.num_entries
  return config


def lookup_gflops(config: ml_collections.ConfigDict) -> float:
  """GFLOPs of one database lookup at batch 1 (keys from block key_block)."""
  from fiancee_jax.guidance import database  # pylint: disable=g-import-not-at-top
  config = _unchunked(config)
  spec = factory.database_spec(config)
  g = factory.make_generator(config)
  bb = jax.eval_shape(g.init, jax.random.key(0), *_abstract_inputs(config))
  _, _, outs = jax.eval_shape(
      lambda v, *x: factory.make_exit_model(config, guided=False).prefix(
          v, x, spec.key_block), bb, *_abstract_inputs(config))
  lookup = database.make_lookup(spec)
  return flops.gflops(lambda db, f: lookup(db, f, tuple(config.data.resolution)),
                      abstract_database(config), outs[spec.key_block])


# exit_stats of (config JSON, guided, CPU lowerings on) already computed in this process: every
# call compiles every exit path, and load_model, the report and the benchmark each ask for the
# same costs. The lowerings change what runs, and so the counted FLOPs (models/conv.py).
_EXIT_STATS: dict[tuple[str, bool, bool], list[dict]] = {}


def exit_stats(config: ml_collections.ConfigDict, *, guided: bool | None = None) -> list[dict]:
  """Per exit (the backbone last): attach point, GFLOPs of its own compiled path at batch 1
  (database lookup included when guided) and parameters of its branch."""
  guided = bool(config.exits.guided if guided is None else guided)
  key = (config.to_json_best_effort(sort_keys=True), guided, conv.cpu_lowerings_active())
  if key not in _EXIT_STATS:
    _EXIT_STATS[key] = _exit_stats(config, guided)
  return copy.deepcopy(_EXIT_STATS[key])


def _exit_stats(config: ml_collections.ConfigDict, guided: bool) -> list[dict]:
  model = factory.make_exit_model(_unchunked(config), guided=guided)
  inputs = _abstract_inputs(config)
  bb = jax.eval_shape(model.backbone.init, jax.random.key(0), *inputs)
  db = abstract_database(config) if guided else None
  ex = jax.eval_shape(lambda b, d, *x: model.init_exits(jax.random.key(0), b, d, *x),
                      bb, db, *inputs)
  params = {'backbone': bb, 'exits': ex, 'database': db}
  out = []
  for k in range(model.num_exits):
    last = k == model.num_exits - 1
    out.append({
        'exit': k,
        'attach_after': model.last_block(k),
        'gflops': flops.gflops(model.exit_path(k), params, *inputs),
        'params': flops.param_count(bb['params']) if last else flops.param_count(
            ex[k]['params']),
    })
  return out


def predictor_stats(config: ml_collections.ConfigDict) -> dict:
  model = factory.make_predictor(config)
  inputs = _abstract_inputs(config)
  params = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return {'params': flops.param_count(params['params']),
          'gflops': flops.gflops(model.apply, params, *inputs)}


def compute_stats(config: ml_collections.ConfigDict) -> dict:
  """All costs of the config's models: backbone, exits, predictor, database lookup."""
  config_checks.check_config(config)
  spec = factory.database_spec(config)
  backbone = backbone_stats(config)
  if config.backbone.name == 'reenact':  # exits replace G2D only: say what share it is
    from fiancee_jax.models import reenact  # pylint: disable=g-import-not-at-top
    r = reenact.reenact_stats(config)
    backbone['g2d'] = {'params': r['g2d_params'], 'gflops': r['g2d_gflops'],
                       'gflops_fraction': r['g2d_gflops'] / r['gflops']}
  return {
      'backbone': backbone,
      'exits': exit_stats(config),
      'predictor': predictor_stats(config),
      'database': {'entries': spec.num_entries,
                   'bytes': 4 * spec.num_entries * (spec.key_dim + spec.value_dim)
                            + 4 * spec.feature_width * (spec.key_dim + 1),
                   'lookup_gflops': lookup_gflops(config)},
  }


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  print(json.dumps(compute_stats(_CONFIG.value), indent=2))


if __name__ == '__main__':
  # Flags are defined only when run as a script, so importing this module is side-effect free.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  app.run(main)
