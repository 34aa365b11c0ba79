"""Builds the models named by a config; dispatches on config.backbone.name.

Models run the kernel implementations `kernels(config)` names (config.kernels with 'auto'
resolved for the default backend, ops/kernels.py); pass `kernels=` to build the same model
on others (metrics/costs.py counts FLOPs on ops.kernels.XLA). Models compute in float32
unless `dtype=` names another compute dtype (models/precision.py): the trainers pass
`train_dtype(config)`, the benchmark each of config.benchmark.dtypes; inference and every
measurement run float32. Parameters never depend on either.
"""
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from fiancee_jax import tasks
from fiancee_jax.guidance import database
from fiancee_jax.models import exits
from fiancee_jax.models import oasis
from fiancee_jax.models import precision
from fiancee_jax.models import predictor
from fiancee_jax.models import reenact
from fiancee_jax.ops import kernels as kernels_lib


def get_task(config: ml_collections.ConfigDict) -> tasks.Task:
  """The task of config.backbone.name ('oasis' or 'reenact')."""
  name = config.backbone.name
  res = tuple(int(v) for v in config.data.resolution)
  if name == 'oasis':
    return tasks.Synthesis(num_classes=config.data.num_classes, resolution=res,
                           z_dim=config.backbone.z_dim)
  if name == 'reenact':
    return tasks.Reenactment(resolution=res)
  raise ValueError(f"config.backbone.name={name!r}: known backbones are 'oasis' (label-map "
                   "synthesis) and 'reenact' (face reenactment)")


def kernels(config: ml_collections.ConfigDict, platform: str | None = None) -> dict[str, str]:
  """The concrete kernel implementations of config.kernels on `platform` (default: JAX's
  default backend): {'conv': ..., 'top_k': ...}. ValueError names an unknown op or name."""
  return kernels_lib.resolve(config.get('kernels'),
                             jax.default_backend() if platform is None else platform)


def _kernels(config, given: Mapping[str, str] | None) -> dict[str, str]:
  return kernels(config) if given is None else kernels_lib.check_concrete(given)


def train_dtype(config: ml_collections.ConfigDict) -> str:
  """The compute dtype of every training step, config.train.dtype ('float32' when a config
  written before the key existed has none); ValueError for an unknown name."""
  name = config.train.get('dtype', 'float32')
  precision.compute_dtype(name)
  return name


def make_generator(config: ml_collections.ConfigDict, *,
                   kernels: Mapping[str, str] | None = None,
                   dtype: str = 'float32') -> nn.Module:
  """The staged backbone: OasisGenerator ('oasis') or ReenactGenerator ('reenact'),
  computing in `dtype` ('float32' or 'bfloat16'; parameters are float32 either way)."""
  b = config.backbone
  get_task(config)  # names the known backbones if b.name is unknown
  conv_impl = _kernels(config, kernels)['conv']
  dt = precision.compute_dtype(dtype)
  if b.name == 'reenact':
    return reenact.make_generator(config, conv_impl, dt)
  return oasis.OasisGenerator(
      num_classes=config.data.num_classes, ch=b.ch, width_ratios=tuple(b.width_ratios),
      spade_hidden=b.spade_hidden, z_dim=b.z_dim, spectral_norm=b.spectral_norm,
      conv_impl=conv_impl, dtype=dt)


def make_discriminator(config: ml_collections.ConfigDict, *,
                       kernels: Mapping[str, str] | None = None,
                       dtype: str = 'float32') -> nn.Module:
  """OASIS's U-Net discriminator, or the reenactment backbone's patch discriminator,
  computing in `dtype`."""
  b = config.backbone
  conv_impl = _kernels(config, kernels)['conv']
  dt = precision.compute_dtype(dtype)
  if b.name == 'reenact':
    return reenact.make_discriminator(config, conv_impl, dt)
  return oasis.OasisDiscriminator(
      num_classes=config.data.num_classes,
      widths=tuple(b.d_ch * r for r in b.d_width_ratios), out_width=b.d_ch,
      spectral_norm=b.spectral_norm, conv_impl=conv_impl, dtype=dt)


def database_spec(config: ml_collections.ConfigDict):
  """The DatabaseSpec the config's model expects."""
  g = make_generator(config, kernels=kernels_lib.XLA)  # only its widths are read
  db = config.database
  if not 0 <= db.key_block < g.num_blocks:
    raise ValueError(f'config.database.key_block={db.key_block} is not a block index '
                     f'(0..{g.num_blocks - 1})')
  residual = guidance(config) == 'residual'
  return database.DatabaseSpec(
      resolution=tuple(config.data.resolution), grid=tuple(db.grid), key_block=db.key_block,
      feature_width=g.widths[db.key_block + 1], key_dim=db.key_dim,
      num_entries=db.num_entries, num_classes=config.data.get('num_classes', 0),
      metric=db.metric,
      top_k=db.top_k, temperature=db.temperature, chunk=db.chunk,
      channels=3 * len(config.exits.attach_after) if residual else 3,
      blend=db.get('blend', 'softmax'), value_agg='mean' if residual else 'medoid')


def residual_guidance(config: ml_collections.ConfigDict) -> bool:
  """True when the database holds residuals of the trained exits (guided exits with
  config.database.value_type 'residual'): it is then built after the exits, from them, and the
  predictor is trained on both."""
  return bool(config.exits.guided) and guidance(config) == 'residual'


def guidance(config: ml_collections.ConfigDict) -> str:
  """How guided exits use the database (models/exits.py): 'input' for 'image' values,
  'residual' for 'residual' values (config.database.value_type)."""
  return 'residual' if config.database.get('value_type', 'image') == 'residual' else 'input'



def make_exit_model(config: ml_collections.ConfigDict, *, guided: bool,
                    kernels: Mapping[str, str] | None = None,
                    dtype: str = 'float32') -> exits.ExitModel:
  """Backbone + exits as configured; `guided` selects the database-fed variant. Backbone
  and branches compute in `dtype`; the database lookup in float32."""
  k = _kernels(config, kernels)
  lookup = database.make_lookup(database_spec(config), k['top_k']) if guided else None
  e = config.exits
  hidden = e.get('spade_hidden_mult', None)
  return exits.ExitModel(
      backbone=make_generator(config, kernels=k, dtype=dtype),
      attach_after=tuple(e.attach_after),
      width_mult=_branch_mults(e, 'width_mult', e.width_mult), guided=guided,
      key_block=config.database.key_block, lookup=lookup,
      hidden_mult=_branch_mults(e, 'hidden_mult', hidden),
      z_aware=e.get('z_aware', True), guidance=guidance(config))


def _branch_mults(e: ml_collections.ConfigDict, what: str,
                  default: float | None) -> tuple[float, ...] | float | None:
  """config.exits.branch_{what}s (one multiplier per branch) if given, else `default`."""
  per_branch = tuple(e.get(f'branch_{what}s', ()))
  if not per_branch:
    return default
  if len(per_branch) != len(e.attach_after):
    raise ValueError(f'config.exits.branch_{what}s={per_branch} needs one multiplier per exit '
                     f'branch ({len(e.attach_after)}: config.exits.attach_after='
                     f'{tuple(e.attach_after)}), or () for the single one')
  return per_branch


def make_predictor(config: ml_collections.ConfigDict, *, dtype: str = 'float32') -> nn.Module:
  """Predictor of the distances of the config's branch exits; apply(params, *inputs);
  computes in `dtype`, predicts float32."""
  p, n = config.predictor, len(config.exits.attach_after)
  dt = precision.compute_dtype(dtype)
  if get_task(config).name == 'reenactment':
    return predictor.PairPredictor(num_outputs=n, width=p.width, pool=p.pool, dtype=dt)
  return predictor.Predictor(num_classes=config.data.num_classes, num_outputs=n,
                             width=p.width, pool=p.pool, use_z=p.get('use_z', False),
                             members=p.get('members', 1), dtype=dt)


def exit_variants(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The exit variants a config's run can load, in order: 'guided' and/or 'unguided'.

  With 'residual' guidance both: the guided variant is the unguided branches plus the
  database's residuals."""
  e = config.exits
  if not e.guided:
    return ('unguided',)
  if e.train_unguided or guidance(config) == 'residual':
    return ('guided', 'unguided')
  return ('guided',)


def trained_variants(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The branch sets the exits stage trains and its artifact holds, in order: with 'residual'
  guidance only 'unguided' (the guided variant adds residuals to those branches), else
  exit_variants."""
  return ('unguided',) if residual_guidance(config) else exit_variants(config)


def branch_set(config: ml_collections.ConfigDict, variant: str) -> str:
  """The branch set of the exits artifact that exit `variant` runs (trained_variants)."""
  return 'unguided' if guidance(config) == 'residual' else variant


def variable_templates(config: ml_collections.ConfigDict, kind: str,
                       variant: str | None = None) -> Any:
  """Abstract variables (jax.ShapeDtypeStruct leaves) of a params-only artifact.

  Built with jax.eval_shape: nothing is initialised, compiled or run. What each kind holds
  (artifacts.py):
    'backbone': generator variables {'params', 'batch_stats'};
    'database': {'keys' [N, key_dim], 'values' [N, patch_h * patch_w * channels],
                 'mean' [feature_width], 'proj' [feature_width, key_dim]}, float32;
    'exits': {variant: [variables_k per branch]}, for `variant` or, when None, for every
      branch set the config trains (trained_variants);
    'predictor': predictor variables.
  No optimizer state, no discriminator.

  Raises:
    ValueError: unknown kind or variant.
  """
  specs = tasks.input_specs(get_task(config), 1)
  if kind == 'backbone':
    g = make_generator(config)
    return jax.eval_shape(lambda *x: g.init(jax.random.key(0), *x), *specs)
  if kind == 'database':
    spec = database_spec(config)
    f32 = jnp.float32
    return {'keys': jax.ShapeDtypeStruct((spec.num_entries, spec.key_dim), f32),
            'values': jax.ShapeDtypeStruct((spec.num_entries, spec.value_dim), f32),
            'mean': jax.ShapeDtypeStruct((spec.feature_width,), f32),
            'proj': jax.ShapeDtypeStruct((spec.feature_width, spec.key_dim), f32)}
  if kind == 'exits':
    names = trained_variants(config) if variant is None else (variant,)
    for v in names:
      if v not in ('guided', 'unguided'):
        raise ValueError(f"exit variant {v!r}: use 'guided' or 'unguided'")
    bb = variable_templates(config, 'backbone')
    db = variable_templates(config, 'database') if 'guided' in names else None
    out = {}
    for v in names:
      model = make_exit_model(config, guided=(v == 'guided'))
      out[v] = jax.eval_shape(
          lambda b, d, *x, m=model: m.init_exits(jax.random.key(0), b, d, *x),
          bb, db if v == 'guided' else None, *specs)
    return out
  if kind == 'predictor':
    p = make_predictor(config)
    return jax.eval_shape(lambda *x: p.init(jax.random.key(0), *x), *specs)
  raise ValueError(f"unknown artifact kind {kind!r}; use 'backbone', 'database', 'exits' or "
                   "'predictor'")
