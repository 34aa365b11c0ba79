"""Checks a config, the stage list and the workdir before any compute.

`check_config` is the one validation of a whole config: one function per section
(`check_data`, `check_backbone`, ..., `check_checkpoint`) checks types and ranges, then
`check_cross_sections` checks the rules that tie sections together (attach points against the
backbone's blocks, the database's key block against widths and attach points, ...). It touches
no device, so `pipeline.run` calls it before `jax.distributed.initialize()`; `check_devices`
adds the rules that need the device count. `python -m fiancee_jax.stats` runs the same checks.

`check_workdir` and `write_config` guard the workdir: a writable directory, and a
`config.json` that binds the workdir to one config once a checkpoint was written under it.

Every error is a `ConfigError` (a ValueError) naming the key and the fix.
"""
import json
import math
import numbers
import os
import tempfile
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from fiancee_jax import model as model_lib
from fiancee_jax.data import sources
from fiancee_jax.evaluation import intervals
from fiancee_jax.metrics import anchors
from fiancee_jax.metrics import distances
from fiancee_jax.models import factory
from fiancee_jax.models import oasis
from fiancee_jax.models import precision
from fiancee_jax.ops import kernels as kernels_lib
from fiancee_jax.routing import calibration

# The models built here are only inspected (blocks, widths, constructor checks), so they are
# built on the plain XLA kernels, which need no backend to be named ('auto' does).
_XLA = kernels_lib.XLA

KNOWN_STAGES = ('backbone', 'database', 'exits', 'predictor', 'evaluate', 'benchmark')

# Sections that change no stored artifact: a workdir accepts a config that differs there, and
# config.json is updated to it. `benchmark` only changes how the benchmark stage times the
# model; `checkpoint` only how a damaged checkpoint is handled.
REPLACEABLE_SECTIONS = ('benchmark', 'checkpoint', 'kernels')

# Keys added to the config after workdirs were made with it, and the value that reproduces
# what those workdirs did: a config.json without one is read as holding that value.
ADDED_KEYS = {('train', 'dtype'): 'float32', ('data', 'workers'): 0}

CONFIG_FILE = 'config.json'
# Present beside config.json while config.json does not bind the workdir yet: it was written
# over checkpoints that predate it (their config is unknown).
UNCONFIRMED_FILE = 'config.unconfirmed'

# Datasets whose split sizes are the config's num_train / num_test (generated, not read).
_PROCEDURAL_DATASETS = ('landscapes', 'avatars')


class ConfigError(ValueError):
  """A config, --stages or --workdir that the pipeline cannot run; says what to change."""


# -- Value checks. --


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _get(section: ml_collections.ConfigDict, name: str, key: str) -> Any:
  if key not in section:
    raise ConfigError(f'config.{name}.{key} is missing; add it to the config (see '
                      'configs/landscapes.py for every key and its meaning)')
  return section[key]


def _int(section, name: str, key: str, lo: int | None = None, hi: int | None = None) -> int:
  v = _get(section, name, key)
  ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
  if not ok:
    bounds = (f' >= {lo}' if hi is None else f' in [{lo}, {hi}]') if lo is not None else ''
    raise ConfigError(f'config.{name}.{key} must be an integer{bounds}, got {v!r}')
  return int(v)


def _real(section, name: str, key: str, lo: float | None = None, hi: float | None = None, *,
          lo_open: bool = False, hi_open: bool = False) -> float:
  v = _get(section, name, key)
  ok = _is_real(v) and math.isfinite(v)
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    if lo is not None and hi is not None:
      what = f' in {"(" if lo_open else "["}{lo}, {hi}{")" if hi_open else "]"}'
    elif lo is not None:
      what = f' {">" if lo_open else ">="} {lo}'
    else:
      what = ''
    raise ConfigError(f'config.{name}.{key} must be a finite number{what}, got {v!r}')
  return float(v)


def _bool(section, name: str, key: str) -> bool:
  v = _get(section, name, key)
  if not isinstance(v, (bool, np.bool_)):
    raise ConfigError(f'config.{name}.{key} must be True or False, got {v!r}')
  return bool(v)


def _choice(section, name: str, key: str, options: tuple[str, ...]) -> str:
  v = _get(section, name, key)
  if v not in options:
    raise ConfigError(f'config.{name}.{key}={v!r}: use one of {", ".join(map(repr, options))}')
  return v


def _dtype(v: Any, where: str) -> str:
  if v not in precision.DTYPES:
    raise ConfigError(f'{where}={v!r} is not a compute dtype; use one of '
                      f'{", ".join(map(repr, precision.DTYPES))} (float32 parameters either '
                      'way; models/precision.py)')
  return v


def _ints(section, name: str, key: str, lo: int = 1, length: int | None = None,
          nonempty: bool = True) -> tuple[int, ...]:
  v = _get(section, name, key)
  form = f'a tuple of integers >= {lo}' + (f' of length {length}' if length else '')
  if not isinstance(v, (tuple, list)) or not all(_is_int(x) and x >= lo for x in v):
    raise ConfigError(f'config.{name}.{key} must be {form}, got {v!r}')
  if (length is not None and len(v) != length) or (nonempty and not v):
    raise ConfigError(f'config.{name}.{key} must be {form}, got {v!r}')
  return tuple(int(x) for x in v)


def _seed(v: Any, where: str) -> int:
  try:
    return model_lib.check_seed(v, where)
  except ValueError as e:
    raise ConfigError(str(e)) from None


# -- One check per section. --


def check_top_level(config: ml_collections.ConfigDict) -> None:
  """config.seed (an integer) and config.distributed (a bool)."""
  _seed(config.get('seed'), 'config.seed')
  if not isinstance(config.get('distributed', False), (bool, np.bool_)):
    raise ConfigError(f'config.distributed must be True or False, got '
                      f'{config.get("distributed")!r}')


def check_data(config: ml_collections.ConfigDict) -> None:
  d, s = config.data, 'data'
  res = _ints(d, s, 'resolution', lo=1, length=2)
  if not all(16 <= r <= 1024 for r in res):
    raise ConfigError(f'config.data.resolution must be (H, W) with 16 <= H, W <= 1024, got '
                      f'{res}')
  if not isinstance(_get(d, s, 'name'), str):
    raise ConfigError(f'config.data.name must be a dataset name (str), got {d.name!r}')
  if d.name not in sources.DATASETS:
    raise ConfigError(f'config.data.name={d.name!r} is not a known dataset; use one of '
                      f'{", ".join(map(repr, sorted(sources.DATASETS)))} '
                      '(fiancee_jax/data/sources.py)')
  _seed(d.get('seed', 0), 'config.data.seed')
  for key in ('num_train', 'num_validation', 'num_test'):
    _int(d, s, key, 1)
  _int(d, s, 'prefetch', 0)
  _int(d, s, 'workers', 0)
  if not isinstance(d.get('data_dir', ''), str):
    raise ConfigError(f"config.data.data_dir must be a path (str; '' = TFDS's default), got "
                      f'{d.data_dir!r}')


def check_backbone(config: ml_collections.ConfigDict) -> None:
  b, s = config.backbone, 'backbone'
  task = factory.get_task(config)  # raises for an unknown config.backbone.name
  keys = sources.data_keys(config)  # raises for an unknown config.data.name
  if keys != task.data_keys:
    raise ConfigError(f'config.data.name={config.data.name!r} gives ({", ".join(keys)}) but the '
                      f'{b.name!r} backbone takes ({", ".join(task.data_keys)}): pick a '
                      'dataset that gives them (config.data.name) or another backbone '
                      '(config.backbone.name)')
  res = tuple(config.data.resolution)
  _bool(b, s, 'spectral_norm')
  if task.name == 'reenactment':
    for key in ('enc_widths', 'motion_widths', 'up_widths', 'up_factors', 'd_widths'):
      _ints(b, s, key, 1)
    for key in ('volume_depth', 'volume_channels', 'id_dim', 'expr_dim', 'motion_input',
                'warp_width', 'g2d_width'):
      _int(b, s, key, 1)
    for key in ('app_blocks_3d', 'g3d_blocks', 'num_res_blocks'):
      _int(b, s, key, 0)
    _real(b, s, 'flow_scale', 0, lo_open=True)
    for key in ('source_skip', 'head_norm'):
      if key in b:
        _bool(b, s, key)
    factory.make_generator(config, kernels=_XLA).latent_size(res)  # G2D decodes to res?
  else:
    _int(config.data, 'data', 'num_classes', 2)
    for key in ('ch', 'spade_hidden', 'z_dim', 'd_ch'):
      _int(b, s, key, 1)
    ratios = _ints(b, s, 'width_ratios', 1)
    if len(ratios) < 3:
      raise ConfigError(f'config.backbone.width_ratios={ratios} gives {len(ratios) - 1} '
                        'block(s); exits need at least 2 blocks (stem width + one ratio per '
                        'block)')
    oasis.lowest_resolution(res, len(ratios) - 1)
    levels = len(_ints(b, s, 'd_width_ratios', 1))
    if res[0] % 2 ** levels or res[1] % 2 ** levels:
      raise ConfigError(
          f'resolution {res} cannot be halved {levels} times by the discriminator '
          f'(len(config.backbone.d_width_ratios)={levels}); use fewer levels')
  num_blocks = factory.make_generator(config, kernels=_XLA).num_blocks
  if num_blocks < 2:
    raise ConfigError(f'the backbone has {num_blocks} block(s); exits attach after a block '
                      'before the last, so it needs at least 2')


def check_train(config: ml_collections.ConfigDict) -> None:
  """The backbone stage (config.train)."""
  t, s = config.train, 'train'
  for key in ('batch_size', 'num_steps', 'log_every', 'sample_every', 'checkpoint_every',
              'keep_checkpoints', 'ema_stats_batches', 'num_sample_images'):
    _int(t, s, key, 1)
  if 'num_eval' in t:
    _int(t, s, 'num_eval', 1)
  for key in ('lr_g', 'lr_d'):
    _real(t, s, key, 0, lo_open=True)
  for key in ('b1', 'b2', 'ema_decay'):
    _real(t, s, key, 0, 1, hi_open=True)
  for key in ('labelmix_weight', 'l1_weight', 'perceptual_weight', 'adversarial_weight',
              'identity_weight'):
    if key in t:
      _real(t, s, key, 0)
  if 'identity_temperature' in t:
    _real(t, s, 'identity_temperature', 0, lo_open=True)
  if 'dtype' in t:  # configs written before the key existed train in float32
    _dtype(t.dtype, 'config.train.dtype')


def check_distance(config: ml_collections.ConfigDict) -> None:
  dist, s = config.distance, 'distance'
  try:
    distances.check_name(_get(dist, s, 'name'))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for key in ('lpips_weights', 'fid_weights'):
    path = dist.get(key, '')
    if not isinstance(path, str):
      raise ConfigError(f"config.distance.{key} must be a path (str) or '', got {path!r}")
    if path and not os.path.isfile(path):
      raise ConfigError(f'config.distance.{key}={path!r} is not a file; convert the weights '
                        f'with scripts/convert_{key.split("_")[0]}_weights.py (README, "LPIPS '
                        'and FID weights") or leave it empty')


def check_database(config: ml_collections.ConfigDict) -> None:
  db, s = config.database, 'database'
  _int(db, s, 'key_block', 0)
  for key in ('num_images', 'num_entries', 'key_dim', 'top_k', 'chunk'):
    _int(db, s, key, 1)
  _int(db, s, 'kmeans_iters', 0)
  _ints(db, s, 'grid', 1, length=2)
  _choice(db, s, 'metric', ('cosine', 'l2'))
  _choice(db, s, 'value_type', ('image', 'residual'))
  _choice(db, s, 'blend', ('softmax', 'mean'))
  _real(db, s, 'temperature', 0, lo_open=True)
  if db.num_entries < db.top_k:
    raise ConfigError(f'config.database.num_entries={db.num_entries} must be >= '
                      f'config.database.top_k={db.top_k} (a lookup blends the top_k nearest '
                      'entries)')


def check_exits(config: ml_collections.ConfigDict) -> None:
  e, s = config.exits, 'exits'
  pts = _ints(e, s, 'attach_after', 0)
  if any(b <= a for a, b in zip(pts, pts[1:])):
    raise ConfigError(f'config.exits.attach_after={pts} must be strictly increasing block '
                      'indices (one exit per attach point, cheapest first)')
  _real(e, s, 'width_mult', 0, lo_open=True)
  _bool(e, s, 'guided')
  _bool(e, s, 'train_unguided')
  for key in ('batch_size', 'num_steps', 'log_every', 'sample_every', 'checkpoint_every',
              'keep_checkpoints'):
    _int(e, s, key, 1)
  _real(e, s, 'lr', 0, lo_open=True)
  for key in ('b1', 'b2'):
    _real(e, s, key, 0, 1, hi_open=True)
  for key in ('l1_weight', 'perceptual_weight', 'adversarial_weight'):
    _real(e, s, key, 0)


def check_predictor(config: ml_collections.ConfigDict) -> None:
  p, s = config.predictor, 'predictor'
  for key in ('width', 'pool', 'num_train', 'measure_batch', 'batch_size', 'num_steps'):
    _int(p, s, key, 1)
  for key in ('members', 'z_draws'):
    if key in p:
      _int(p, s, key, 1)
  if 'use_z' in p:
    _bool(p, s, 'use_z')
  _real(p, s, 'lr', 0, lo_open=True)
  _choice(p, s, 'loss', ('l1', 'mse', 'quantile'))
  if 'quantile' in p:
    _real(p, s, 'quantile', 0, 1, lo_open=True, hi_open=True)
  h, w = tuple(config.data.resolution)
  if h % p.pool or w % p.pool:
    raise ConfigError(f'config.predictor.pool={p.pool} must divide the resolution {h}x{w} '
                      '(config.data.resolution)')


def check_router(config: ml_collections.ConfigDict) -> None:
  r, s = config.router, 'router'
  # The calibration runs at the end of the predictor stage: a typo must not cost the stage.
  _choice(r, s, 'calibration', tuple(calibration.ALL_METHODS))
  _real(r, s, 'target_met', 0, 1, lo_open=True, hi_open=True)
  _int(r, s, 'num_eval', 1)
  thresholds = _get(r, s, 'thresholds')
  if not isinstance(thresholds, (tuple, list)):
    raise ConfigError(f'config.router.thresholds must be a tuple of distances (() = spread '
                      f'over the measured ones), got {thresholds!r}')
  for t in thresholds:
    try:
      model_lib.check_threshold(t)
    except ValueError as e:
      raise ConfigError(f'config.router.thresholds={tuple(thresholds)}: {e}') from None


def check_benchmark(config: ml_collections.ConfigDict) -> None:
  if 'benchmark' not in config:
    return
  b, s = config.benchmark, 'benchmark'
  for key in ('batch_size', 'iters', 'switch_rounds'):
    _int(b, s, key, 1)
  for key in ('warmup', 'lowering_rounds'):
    _int(b, s, key, 0)
  _bool(b, s, 'exit_parts')
  trace_dir = _get(b, s, 'trace_dir')
  if not isinstance(trace_dir, str):
    raise ConfigError(f"config.benchmark.trace_dir must be a directory name (e.g. 'trace', "
                      f"relative to WORKDIR/report) or '' for no traces, got {trace_dir!r}")
  if trace_dir and os.path.normpath(trace_dir) in ('.', 'hlo'):
    raise ConfigError(f'config.benchmark.trace_dir={trace_dir!r} would mix traces into '
                      "WORKDIR/report or report/hlo; name a subdirectory such as 'trace'")
  # The precision grid (evaluation/precision_grid.py).
  dtypes = _get(b, s, 'dtypes')
  if not isinstance(dtypes, (tuple, list)) or not dtypes or len(set(dtypes)) < len(dtypes):
    raise ConfigError(f'config.benchmark.dtypes must be a tuple of distinct compute dtypes '
                      f"such as ('float32', 'bfloat16'), got {dtypes!r}")
  for d in dtypes:
    _dtype(d, 'config.benchmark.dtypes entry')
  sizes = _ints(b, s, 'batch_sizes', 1, nonempty=False)
  if list(sizes) != sorted(set(sizes)):
    raise ConfigError(f'config.benchmark.batch_sizes={sizes} must be increasing batch sizes, '
                      'e.g. (1, 8, 64, 256), or () for no precision grid')
  _int(b, s, 'grid_iters', 1)
  _int(b, s, 'grid_warmup', 0)
  n = min(config.router.num_eval, config.data.num_test)
  if b.batch_size > n:
    raise ConfigError(f'config.benchmark.batch_size={b.batch_size} exceeds the {n} test inputs '
                      'the benchmark stage reads (min of config.router.num_eval and '
                      'config.data.num_test); lower it or raise both')


def check_evaluate(config: ml_collections.ConfigDict) -> None:
  """config.evaluate: t_star (None or a positive finite number), seeds, bootstrap."""
  if 'evaluate' not in config:
    raise ConfigError('config.evaluate is missing; add it (see configs/landscapes.py)')
  e = config.evaluate
  try:
    anchors.check_t_star(e.get('t_star'))
    intervals.check_seeds(_get(e, 'evaluate', 'seeds'))
    intervals.check_resamples(_get(e, 'evaluate', 'bootstrap_resamples'))
  except ValueError as err:
    raise ConfigError(str(err)) from None
  _int(e, 'evaluate', 'z_average', 1)
  mult = _get(e, 'evaluate', 't_star_multiples')
  if not isinstance(mult, (tuple, list)) or not mult or not all(
      _is_real(m) and math.isfinite(m) and m > 0 for m in mult):
    raise ConfigError(f'config.evaluate.t_star_multiples must be a non-empty tuple of positive '
                      f'numbers, got {mult!r}')


def check_checkpoint(config: ml_collections.ConfigDict) -> None:
  if 'checkpoint' not in config:
    raise ConfigError('config.checkpoint is missing; add config.checkpoint = '
                      'dict(allow_restart=False) (see configs/landscapes.py)')
  _bool(config.checkpoint, 'checkpoint', 'allow_restart')
  _bool(config.checkpoint, 'checkpoint', 'async_save')


def _block_hw(config: ml_collections.ConfigDict, g: Any, i: int) -> tuple[int, int]:
  """(h, w) of backbone block i's output: what the database pools to its grid."""
  res = tuple(config.data.resolution)
  if factory.get_task(config).name == 'reenactment':
    h, w = g.latent_size(res)
    f = math.prod(g.block_factors[:i + 1])
    return h * f, w * f
  h, w = oasis.lowest_resolution(res, g.num_blocks)
  f = 2 ** min(i + 1, g.num_blocks - 1)  # x2 after every block but the last
  return h * f, w * f


def check_cross_sections(config: ml_collections.ConfigDict) -> None:
  """Rules between sections: exits vs backbone, database vs exits, backbone and data."""
  g = factory.make_generator(config, kernels=_XLA)
  k = g.num_blocks
  pts = tuple(config.exits.attach_after)
  if pts[0] < 0 or pts[-1] > k - 2:
    raise ConfigError(f'config.exits.attach_after={pts} must be block indices in [0, {k - 2}]: '
                      f'the backbone has {k} blocks and its last block is the backbone exit')
  db = config.database
  if not 0 <= db.key_block < k:
    raise ConfigError(f'config.database.key_block={db.key_block} is not a block index '
                      f'(0..{k - 1})')
  if db.key_block > pts[0]:
    raise ConfigError(f'config.database.key_block={db.key_block} must be <= the earliest '
                      f'attach point {pts[0]} (config.exits.attach_after={pts}), so that '
                      'every exit has the features the database keys are made from')
  width = g.widths[db.key_block + 1]
  if db.key_dim > width:
    raise ConfigError(f'config.database.key_dim={db.key_dim} exceeds the {width} channels of '
                      f'block {db.key_block} (config.database.key_block); lower key_dim')
  res, grid = tuple(config.data.resolution), tuple(db.grid)
  fh, fw = _block_hw(config, g, db.key_block)
  for what, (h, w) in (('the resolution', res), (f'block {db.key_block} features', (fh, fw))):
    if h % grid[0] or w % grid[1]:
      raise ConfigError(f'config.database.grid={grid} must divide {what} {h}x{w}; choose a '
                        'grid whose sides divide it (or another config.database.key_block)')
  images = db.num_images
  if config.data.name in _PROCEDURAL_DATASETS:
    images = min(images, config.data.num_train)
  patches = images * grid[0] * grid[1]
  if db.num_entries > patches:
    raise ConfigError(f'config.database.num_entries={db.num_entries} exceeds the {patches} '
                      f'patches of its {images} images ({grid[0]}x{grid[1]} each); raise '
                      'config.database.num_images or lower num_entries')
  if factory.get_task(config).name == 'reenactment' and config.exits.adversarial_weight > 0:
    raise ConfigError('config.exits.adversarial_weight must be 0 for the reenactment '
                      'backbone: the adversarial exit loss uses the OASIS discriminator, '
                      'which needs label maps')
  # The models' own constructors: whatever they refuse is refused here, before compute.
  factory.make_exit_model(config, guided=bool(config.exits.guided), kernels=_XLA)
  factory.make_predictor(config)


def check_kernels(config: ml_collections.ConfigDict) -> None:
  """config.kernels names known implementations. Which one 'auto' stands for depends on the
  backend, which is not started yet (parallel.initialize comes after these checks): only the
  names are checked here, resolved as for the CPU."""
  kernels_lib.resolve(config.get('kernels'), 'cpu')


SECTION_CHECKS = (check_top_level, check_data, check_backbone, check_train, check_distance,
                  check_database, check_exits, check_predictor, check_router, check_benchmark,
                  check_evaluate, check_checkpoint, check_kernels)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a config the pipeline cannot run; touches no device.

  Every section's types and ranges, then the rules between sections; stages that run late
  (database, predictor, benchmark) are checked here too, so no stage fails on a setting after
  an earlier one has trained.
  """
  try:
    for check in SECTION_CHECKS:
      check(config)
    check_cross_sections(config)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:  # a model constructor's own check
    raise ConfigError(str(e)) from e


def check_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Batch sizes that are sharded over the devices must divide evenly (global batches)."""
  for key in ('train.batch_size', 'exits.batch_size'):
    section, name = key.split('.')
    v = config[section][name]
    if v % num_devices:
      raise ConfigError(f'config.{key}={v} is not divisible by the {num_devices} devices; '
                        f'choose a multiple of {num_devices}')


def parse_stages(stages: str) -> list[str]:
  """'backbone,exits' -> ['backbone', 'exits'] in pipeline order; unknown or no names raise."""
  if not isinstance(stages, str):
    raise ConfigError(f'stages must be a comma-separated string, got {stages!r}')
  names = [s.strip() for s in stages.split(',') if s.strip()]
  if not names:
    raise ConfigError(f'--stages={stages!r} names no stage; pass some of '
                      f'{",".join(KNOWN_STAGES)} (the default runs them all)')
  unknown = [s for s in names if s not in KNOWN_STAGES]
  if unknown:
    raise ConfigError(f'unknown stage(s) {unknown} in --stages; known: {",".join(KNOWN_STAGES)}')
  return [s for s in KNOWN_STAGES if s in names]


# -- The workdir. --


def check_workdir(workdir: Any) -> str:
  """Creates `workdir` if needed; ConfigError unless it is a directory this process can write.

  Probes the workdir and the directories the stages write into (checkpoints and each stage's
  checkpoint directory, report, samples) by creating and removing a file, so that a read-only
  workdir fails here and not after a stage has computed.

  Returns:
    The workdir as a str.
  """
  if not isinstance(workdir, (str, os.PathLike)) or not str(os.fspath(workdir)).strip():
    raise ConfigError(f'--workdir={workdir!r} is empty; pass the directory where checkpoints, '
                      'metrics and reports go (e.g. --workdir=runs/landscapes)')
  workdir = os.fspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir!r} is a file, not a directory; pass a directory '
                      '(it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir!r} cannot be created ({e.strerror}); pass a path '
                      'you can write to') from None
  dirs = [workdir] + [os.path.join(workdir, d) for d in ('checkpoints', 'report', 'samples')]
  ckpts = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpts):
    dirs += [os.path.join(ckpts, d) for d in sorted(os.listdir(ckpts))]
  for d in dirs:
    if os.path.exists(d) and not os.path.isdir(d):
      if d == workdir or os.path.dirname(d) == workdir:
        raise ConfigError(f'{d} is a file where the pipeline writes a directory; move it '
                          'away or use a new --workdir')
      continue
    if os.path.isdir(d):
      _probe_writable(d)
  return workdir


def _probe_writable(directory: str) -> None:
  try:
    fd, path = tempfile.mkstemp(prefix='.write-probe-', dir=directory)
    os.close(fd)
    os.remove(path)
  except OSError as e:
    raise ConfigError(f'{directory} is not writable ({e.strerror}); the stages write '
                      'checkpoints, metrics and reports there: make it writable or use a new '
                      '--workdir') from None


def _checkpoint_files(workdir: str, newer_than: float | None = None) -> bool:
  """Whether workdir/checkpoints holds a file (modified after `newer_than`, if given)."""
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints')):
    for name in files:
      if newer_than is None:
        return True
      try:
        if os.path.getmtime(os.path.join(root, name)) > newer_than:
          return True
      except OSError:  # removed while walking (a checkpoint being replaced)
        continue
  return False


def config_is_binding(workdir: str) -> bool:
  """Whether workdir/config.json binds the workdir to its config.

  It binds once a checkpoint exists that was written under it: a run that failed before
  writing any checkpoint (a bad setting, shapes that do not match the checkpoints of a
  workdir that had lost its config.json) leaves config.json replaceable by the next run.
  """
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return False
  marker = os.path.join(workdir, UNCONFIRMED_FILE)
  if not os.path.exists(marker):
    return _checkpoint_files(workdir)
  return _checkpoint_files(workdir, newer_than=os.path.getmtime(marker))


def write_config(config: ml_collections.ConfigDict, workdir: str, *,
                 process_index: int = 0) -> None:
  """workdir/config.json; refuses a workdir bound to a different config.

  Rules:
  - No config.json: this config is written. If the workdir already has checkpoints (their
    config is unknown), config.json stays unconfirmed (UNCONFIRMED_FILE beside it) until a
    checkpoint is written under it.
  - config.json equal, or different only in REPLACEABLE_SECTIONS: (re)written with this config.
  - config.json different elsewhere, or unreadable: refused if it binds the workdir
    (`config_is_binding`), else replaced with a warning.

  Args:
    config: the run's config.
    workdir: an existing directory (check_workdir).
    process_index: only process 0 writes.

  Raises:
    ConfigError naming the path, the differing sections and the way on.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  marker = os.path.join(workdir, UNCONFIRMED_FILE)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  new = json.loads(text)
  binding = config_is_binding(workdir)
  old = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
      if not isinstance(old, dict):
        raise ValueError(f'it holds a {type(old).__name__}, not a config')
    except (OSError, ValueError) as e:
      if binding:
        raise ConfigError(
            f'{path} is unreadable ({e}) and the workdir has checkpoints made under it: '
            'restore it from a copy, or delete it and rerun with the config (and overrides) '
            'the workdir was made with, or use a new --workdir') from None
      logging.warning('%s is unreadable (%s) and no checkpoint was made under it; replacing '
                      'it with this config.', path, e)
      old = None
    if old is not None:
      for (section, key), value in ADDED_KEYS.items():
        if isinstance(old.get(section), dict) and key not in old[section]:
          old[section][key] = value
    if old is not None and old != new:
      differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      if set(differ) <= set(REPLACEABLE_SECTIONS):
        logging.info('config sections %s changed; updating %s', differ, path)
      elif binding:
        raise ConfigError(
            f'{path} holds a different config than this run (sections {differ} differ) and '
            'the workdir has checkpoints made with it; resume with the same config or use a '
            'new --workdir')
      else:
        logging.warning('%s holds another config (sections %s differ) but no checkpoint was '
                        'made under it; replacing it with this config.', path, differ)
  unconfirmed = not binding and _checkpoint_files(workdir)
  if unconfirmed and not os.path.exists(marker):
    logging.warning('the checkpoints in %s predate its %s (their config is unknown); this '
                    'config binds the workdir once a checkpoint is written under it.',
                    workdir, CONFIG_FILE)
  if process_index != 0 or (old == new and os.path.exists(marker) == unconfirmed):
    return
  if old != new:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  if unconfirmed and not os.path.exists(marker):
    with open(marker, 'w') as f:
      f.write(f'{CONFIG_FILE} was written over checkpoints that predate it; it binds the '
              'workdir once a checkpoint is written after this file.\n')
  elif not unconfirmed and os.path.exists(marker):
    os.remove(marker)
