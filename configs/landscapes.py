"""Embedded procedural landscapes at 64x64: every stage on the CPU.

  python -m fiancee_jax.main --config=configs/landscapes.py --workdir=runs/landscapes

Variants: `configs/landscapes.py:tiny` (16x16, a few steps; what the tests use).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` selects a variant ('tiny')."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Multi-host: call jax.distributed.initialize() (arguments from the environment).
  config.distributed = False

  config.data = dict(
      name='landscapes',  # 'landscapes' | 'scene_parse150' | 'cityscapes'
      resolution=(64, 64),  # (H, W) of label maps and images
      num_classes=12,
      seed=0,  # seed of the procedural generator (landscapes only)
      num_train=2048,
      num_validation=256,
      num_test=512,
      data_dir='',  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
      prefetch=2,  # batches prepared ahead on a host thread
  )

  config.backbone = dict(
      name='oasis',
      ch=16,  # base width; block widths are ch * width_ratios
      width_ratios=(16, 16, 16, 8, 4, 2, 1),
      spade_hidden=32,  # SPADE hidden width (128 at ch 64: scale with ch)
      z_dim=64,
      spectral_norm=True,
      # U-Net discriminator: encoder widths d_ch * d_width_ratios (one x2 down each),
      # last decoder block d_ch wide (OASIS: d_ch 64, ratios (2, 2, 4, 4, 8, 8)).
      d_ch=16,
      d_width_ratios=(2, 2, 4, 4, 8, 8),
  )

  config.train = dict(
      batch_size=16,  # global batch, sharded over the `data` mesh axis
      num_steps=600,
      lr_g=1e-4 * 4,
      lr_d=4e-4 * 4,
      b1=0.0,
      b2=0.999,
      ema_decay=0.999,
      ema_stats_batches=8,  # batches that recompute BN statistics for the EMA weights
      labelmix_weight=10.0,
      log_every=20,
      sample_every=200,
      checkpoint_every=100,
      keep_checkpoints=3,
      num_sample_images=8,
  )
  config.lock()

  if arg == 'tiny':
    config.data.update(resolution=(16, 16), num_train=64, num_validation=16,
                       num_test=32, prefetch=1)
    config.backbone.update(ch=2, spade_hidden=4, z_dim=8, d_ch=2,
                           width_ratios=(8, 8, 4, 2, 1),
                           d_width_ratios=(2, 2, 4))
    config.train.update(batch_size=8, num_steps=4, log_every=2,
                        sample_every=2, checkpoint_every=2,
                        ema_stats_batches=2)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of configs/landscapes.py '
                     "(known: 'tiny')")
  return config
