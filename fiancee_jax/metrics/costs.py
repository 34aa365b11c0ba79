"""Every cost the project reports: parameters, GFLOPs and MAC shares of a config's models.

GFLOPs are XLA's cost analysis of each compiled forward at batch 1 (multiply-add = 2), always
on the plain XLA kernels (ops.kernels.XLA), whatever config.kernels says: one model reports
the same GFLOPs on every backend, and the kernel choice (which changes how a conv runs, not
what it computes) never moves a reported saving. Nothing is cached here: each call compiles
what it counts, so callers that need a result twice keep it.
"""
import copy
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections

from fiancee_jax import config_checks
from fiancee_jax import tasks
from fiancee_jax.guidance import database
from fiancee_jax.metrics import flops
from fiancee_jax.models import factory
from fiancee_jax.ops import kernels

XLA = kernels.XLA


def abstract_inputs(config: ml_collections.ConfigDict,
                    batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
  """ShapeDtypeStructs of the exit paths' inputs (tasks.py) at `batch`."""
  return tasks.input_specs(factory.get_task(config), batch)


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


def backbone_stats(config: ml_collections.ConfigDict) -> dict:
  """{'params': int, 'gflops': float} of the generator forward at batch 1."""
  g = factory.make_generator(config, kernels=XLA)
  inputs = abstract_inputs(config)
  variables = jax.eval_shape(g.init, jax.random.key(0), *inputs)
  gf = flops.gflops(lambda v, *x: g.apply(v, *x), variables, *inputs)
  return {'params': flops.param_count(variables['params']), 'gflops': gf}


def lookup_gflops(config: ml_collections.ConfigDict) -> float:
  """GFLOPs of one database lookup at batch 1 (keys from block key_block)."""
  config = _unchunked(config)
  spec = factory.database_spec(config)
  g = factory.make_generator(config, kernels=XLA)
  inputs = abstract_inputs(config)
  bb = jax.eval_shape(g.init, jax.random.key(0), *inputs)
  prefix = factory.make_exit_model(config, guided=False, kernels=XLA).prefix
  _, _, outs = jax.eval_shape(lambda v, *x: prefix(v, x, spec.key_block), bb, *inputs)
  lookup = database.make_lookup(spec, XLA['top_k'])
  return flops.gflops(lambda db, f: lookup(db, f, tuple(config.data.resolution)),
                      abstract_database(config), outs[spec.key_block])


def exit_stats(config: ml_collections.ConfigDict, *, guided: bool | None = None) -> list[dict]:
  """Per exit (the backbone last): {'exit', 'attach_after', 'gflops' (its own compiled path
  at batch 1, database lookup included when guided), 'params' (of its branch; the
  backbone's for the last)}. `guided` defaults to config.exits.guided."""
  guided = bool(config.exits.guided if guided is None else guided)
  model = factory.make_exit_model(_unchunked(config), guided=guided, kernels=XLA)
  inputs = abstract_inputs(config)
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
        'params': flops.param_count(bb['params'] if last else ex[k]['params']),
    })
  return out


def predictor_stats(config: ml_collections.ConfigDict) -> dict:
  """{'params': int, 'gflops': float} of the predictor at batch 1."""
  model = factory.make_predictor(config)
  inputs = abstract_inputs(config)
  params = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return {'params': flops.param_count(params['params']),
          'gflops': flops.gflops(model.apply, params, *inputs)}


def g2d_param_count(params: dict) -> int:
  """Parameters of G2D (1x1 reduction, blocks, head) in reenactment generator params."""
  return sum(flops.param_count(v) for k, v in params.items() if k.startswith('g2d'))


def reenact_stats(config: ml_collections.ConfigDict) -> dict:
  """Costs of the reenactment generator (config.backbone.name 'reenact') at batch 1.

  Returns:
    {'params': int, 'gflops': float, 'g2d_params': int, 'g2d_gflops': float}: the whole
    generator (source, driver -> image) and G2D alone (projected volume -> image, the part
    exits replace).
  """
  if factory.get_task(config).name != 'reenactment':
    raise ValueError(f'reenact_stats needs the reenactment backbone, got '
                     f'config.backbone.name={config.backbone.name!r}; use backbone_stats')
  g = factory.make_generator(config, kernels=XLA)
  h, w = config.data.resolution
  img = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  variables = jax.eval_shape(g.init, jax.random.key(0), img, img)
  gf = flops.gflops(lambda v, s, d: g.apply(v, s, d), variables, img, img)
  lh, lw = g.latent_size(config.data.resolution)
  feats = jax.ShapeDtypeStruct((1, lh, lw, g.volume_depth * g.volume_channels), jnp.float32)
  g2d_gf = flops.gflops(lambda v, f, s: g.apply(v, f, s, method='g2d'), variables, feats, img)
  return {'params': flops.param_count(variables['params']), 'gflops': gf,
          'g2d_params': g2d_param_count(variables['params']), 'g2d_gflops': g2d_gf}


def macs(fn: Callable[..., Any], *args: Any) -> int:
  """Multiply-accumulates of the convolutions and matmuls in fn(*args) (args may be abstract).

  Counted from the traced program, not by XLA: a conv output element costs (kernel taps) x
  (input channels per group), border taps included, so a conv's count is its shapes' product.
  A scan body counts once per iteration, a conditional its largest branch.
  """
  return _jaxpr_macs(jax.make_jaxpr(fn)(*flops.abstract(args)).jaxpr)


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      total += (math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]]
                * math.prod(rhs[d] for d in spec[2:]))
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    subs = [_jaxpr_macs(sub) for sub in jax_core.jaxprs_in_params(eqn.params)]
    if name == 'cond':
      total += max(subs, default=0)
    elif name == 'scan':
      total += eqn.params['length'] * sum(subs)
    else:
      total += sum(subs)
  return total


def broadcast_z_share(config: ml_collections.ConfigDict) -> float:
  """Share of the backbone's MACs (`macs`, batch 1) that convolve the broadcast z channels.

  OASIS concatenates z, broadcast over the map, to the one-hot labels, and its stem conv and
  every SPADE's first (shared) 3x3 conv read both: a saving measured against a backbone that
  spends most of its MACs there says little about one that does not. Counted exactly as
  1 - MACs(the same backbone with z_dim = 0) / MACs(backbone). 0.0 for a backbone without z.
  """
  task = factory.get_task(config)
  if not task.noise_dim:
    return 0.0
  data = task.data_specs(1)

  def count(z_dim: int) -> int:
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.backbone.z_dim = z_dim
    g = factory.make_generator(cfg, kernels=XLA)
    z = jax.ShapeDtypeStruct((1, z_dim), jnp.float32)
    variables = jax.eval_shape(g.init, jax.random.key(0), *data, z)
    return macs(lambda v, *x: g.apply(v, *x), variables, *data, z)

  full = count(config.backbone.z_dim)
  return (full - count(0)) / full


def compute_stats(config: ml_collections.ConfigDict) -> dict:
  """All costs of the config's models: backbone (with its broadcast-z share of MACs), exits,
  predictor, database lookup; with `reenact`, G2D's share too."""
  config_checks.check_config(config)
  spec = factory.database_spec(config)
  backbone = backbone_stats(config)
  backbone['broadcast_z_share'] = broadcast_z_share(config)
  if factory.get_task(config).name == 'reenactment':  # exits replace G2D only: say what share it is
    r = reenact_stats(config)
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
