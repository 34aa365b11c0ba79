"""Checks a config before any compute; errors name the key and the fix."""
import os

import ml_collections

from fiancee_jax.data import sources
from fiancee_jax.models import factory
from fiancee_jax.models import oasis
from fiancee_jax.routing import calibration

KNOWN_STAGES = ('backbone', 'database', 'exits', 'predictor', 'evaluate', 'benchmark')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a config the pipeline cannot run."""
  d, b, t = config.data, config.backbone, config.train
  res = tuple(d.resolution)
  if len(res) != 2 or not all(isinstance(r, int) and 16 <= r <= 1024 for r in res):
    raise ValueError(f'config.data.resolution must be (H, W) with 16 <= H, W <= 1024, got {res}')
  task = factory.get_task(config)  # raises for an unknown config.backbone.name
  keys = sources.data_keys(config)  # raises for an unknown config.data.name
  if keys != task.data_keys:
    raise ValueError(f'config.data.name={d.name!r} gives ({", ".join(keys)}) but the '
                     f'{b.name!r} backbone takes ({", ".join(task.data_keys)}): pick a '
                     'dataset that gives them (config.data.name) or another backbone '
                     '(config.backbone.name)')
  for key in ('lpips_weights', 'fid_weights'):
    path = config.distance.get(key, '')
    if path and not os.path.isfile(path):
      raise ValueError(f'config.distance.{key}={path!r} is not a file; convert the weights '
                       f'with scripts/convert_{key.split("_")[0]}_weights.py (README, "LPIPS '
                       'and FID weights") or leave it empty')
  _check_train(t)
  _check_router(config.router)
  if task.name == 'reenactment':
    factory.make_generator(config).latent_size(res)  # raises if G2D cannot decode to res
    if config.exits.adversarial_weight > 0:
      raise ValueError('config.exits.adversarial_weight must be 0 for the reenactment '
                       'backbone: the adversarial exit loss uses the OASIS discriminator, '
                       'which needs label maps')
    return
  if d.num_classes < 2:
    raise ValueError(f'config.data.num_classes must be >= 2, got {d.num_classes}')
  oasis.lowest_resolution(res, len(b.width_ratios) - 1)
  levels = len(b.d_width_ratios)
  if res[0] % 2 ** levels or res[1] % 2 ** levels:
    raise ValueError(
        f'resolution {res} cannot be halved {levels} times by the discriminator '
        f'(len(config.backbone.d_width_ratios)={levels}); use fewer levels')


def _check_router(r: ml_collections.ConfigDict) -> None:
  # The calibration runs at the end of the predictor stage: a typo must not cost the stage.
  if r.calibration not in calibration.ALL_METHODS:
    raise ValueError(f'config.router.calibration={r.calibration!r}: use one of '
                     f'{", ".join(calibration.ALL_METHODS)} (routing/calibration.py)')
  if not 0.0 < r.target_met < 1.0:
    raise ValueError(f'config.router.target_met must be a share in (0, 1), got {r.target_met}')


def _check_train(t: ml_collections.ConfigDict) -> None:
  for key in ('batch_size', 'num_steps', 'log_every', 'sample_every', 'checkpoint_every',
              'keep_checkpoints', 'ema_stats_batches'):
    if t[key] < 1:
      raise ValueError(f'config.train.{key} must be >= 1, got {t[key]}')
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f'config.train.ema_decay must be in [0, 1), got {t.ema_decay}')


def parse_stages(stages: str) -> list[str]:
  """'backbone,exits' -> ['backbone', 'exits'] in pipeline order; unknown names raise."""
  names = [s.strip() for s in stages.split(',') if s.strip()]
  unknown = [s for s in names if s not in KNOWN_STAGES]
  if unknown:
    raise ValueError(f'unknown stage(s) {unknown} in --stages; known: {",".join(KNOWN_STAGES)}')
  return [s for s in KNOWN_STAGES if s in names]
