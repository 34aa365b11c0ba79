"""python -m fiancee_jax.main --config=configs/landscapes.py --workdir=runs/landscapes

The embedded procedural landscapes at 64x64, nothing downloaded: OASIS scaled down so that
every stage runs on the CPU. The backbone stage installs the shipped trained generator
(fiancee_jax/assets/backbones/landscapes_64, EMA weights, 1.14 M parameters, 0.334 GFLOPs),
so the job accelerates an existing generator as the paper does; it was made with

  python -m fiancee_jax.main --config=configs/landscapes.py --workdir=runs/backbone \
      --stages=backbone --config.train.pretrained='' --config.train.num_steps=1800
  python scripts/ship_backbone.py --workdir=runs/backbone --name=landscapes_64

(1800 steps of batch 16; `--config.train.pretrained=''` trains the backbone from scratch).
z_dim is 8: the 3x3 convs over the broadcast z channels are 10.8 % of the backbone's MACs
(`python -m fiancee_jax.stats`: backbone.broadcast_z_share); at OASIS's z_dim 64 they would
be 49 % here, against 9.9 % in OASIS-ADE20K, and would inflate every saving.

Three seeds of the database, exits and predictor stages run on the one backbone
(config.evaluate.seeds); they fit the job's time budget with 600 exit steps of one
(unguided) variant and 8192 measured predictor targets per seed.

Variants: `:guided` (the guidance ablation: guided and unguided exits side by side, 300 steps
each), `:residual` (the same unguided exits, plus a database of their residuals added to
their images) and `:tiny` (16x16, a few steps of every stage, the backbone trained; what the tests
use; a few minutes).
"""
import os
import runpy
import types

import ml_collections

common = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` selects a variant ('tiny')."""
  config = common.make_config(
      data=dict(
          name='landscapes',  # fiancee_jax.data.sources.DATASETS
          num_classes=12,
      ),
      backbone=dict(
          name='oasis',
          ch=8,  # base width; block widths are ch * width_ratios
          width_ratios=(16, 16, 16, 8, 4, 2, 1),
          spade_hidden=16,  # SPADE hidden width (128 at ch 64: scale with ch)
          z_dim=8,  # broadcast-z share of the MACs: see the module docstring
          spectral_norm=True,
          # U-Net discriminator: encoder widths d_ch * d_width_ratios (one x2 down each),
          # last decoder block d_ch wide (OASIS: d_ch 64, ratios (2, 2, 4, 4, 8, 8)).
          d_ch=8,
          d_width_ratios=(2, 2, 4, 4, 8, 8),
      ),
      train=dict(
          lr_g=1e-4 * 4,
          lr_d=4e-4 * 4,
          b1=0.0,
          b2=0.999,
          ema_decay=0.999,
          ema_stats_batches=8,  # batches that recompute BN statistics for the EMA weights
          labelmix_weight=10.0,
          pretrained='landscapes_64',
      ))
  # z enters the predictor: much of a distance's variance is z's. Every training map x 4 z =
  # 8192 measured targets (half as many rank worse). One trunk of width 8, 0.27 % of the
  # backbone's GFLOPs: three width-16 trunks rank no better and cost 1.8 %, which comes off
  # every saving (docs/results/predictor_size).
  config.predictor.update(use_z=True, members=1, width=8, z_draws=4, num_steps=2000)
  # Light blocks spend on feature width, not SPADE modulation (SPADE hidden x 0.125). Exit 1
  # replaces only the last, full-resolution block, so it keeps that block's full width (x 1.0)
  # where exit 0 halves it: exits at 34 % and 61 % of the backbone's GFLOPs (guided, lookup
  # included; `python -m fiancee_jax.stats`).
  # Unguided by default: guided exits trained alongside unguided ones were further from the
  # backbone at every exit (`:guided` below; docs/results/landscapes_guided), so the default
  # spends the exits' training time on steps instead.
  config.exits.update(spade_hidden_mult=0.125, branch_width_mults=(0.5, 1.0),
                      branch_hidden_mults=(0.125, 0.125), guided=False, num_steps=600)
  config.lock()

  if arg == 'guided':
    # The guidance ablation: guided exits and the same exits unguided, trained side by side
    # (300 steps each, so that the job keeps the default's time budget).
    config.exits.update(guided=True, train_unguided=True, num_steps=300)
  elif arg == 'residual':
    # Residual guidance: the same unguided exits, then a database of what they get wrong
    # (backbone minus exit, per 8x8 patch), keyed on the features of the block exit 0
    # attaches to and added to each exit's image (guidance/database.py).
    config.exits.update(guided=True)
    config.database.update(value_type='residual', key_block=3, num_images=2048, key_dim=32,
                           metric='l2', top_k=4, blend='mean', kmeans_iters=20)
  elif arg == 'tiny':
    common.shrink_for_tests(config)
    config.data.update(resolution=(16, 16), num_train=64, num_validation=48, num_test=32)
    config.backbone.update(ch=2, spade_hidden=4, z_dim=8, d_ch=2, width_ratios=(8, 8, 4, 2, 1),
                           d_width_ratios=(2, 2, 4))
    config.exits.update(guided=True, train_unguided=True)  # the tests exercise both variants
    config.train.update(ema_stats_batches=2, pretrained='')
    config.predictor.update(members=2, num_train=32, z_draws=2, measure_batch=16,
                            batch_size=16)
    config.router.num_eval = 32
    config.evaluate.z_average = 2
    config.benchmark.update(batch_size=8, lowering_rounds=2)
  elif arg:
    raise common.unknown_variant('configs/landscapes.py', arg, ('tiny', 'guided', 'residual'))
  return config
