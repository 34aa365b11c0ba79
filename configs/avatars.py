"""Embedded procedural avatars at 64x64: one-shot reenactment (MegaPortraits-style) on the CPU.

  python -m fiancee_jax.main --config=configs/avatars.py --workdir=runs/avatars

Measured on 2 CPU cores (the README's results): the whole job in 13.2 min (backbone 336 s
for 600 steps of batch 16, database 10 s, exits 172 s, predictor 57 s, evaluate 74 s,
benchmark 141 s); the first run also builds the dataset (~1 min). G2D is 88 % of the
generator's 0.32 GFLOPs. Test split, all 512 cross pairs: 1 - MS-SSIM to the ground truth
0.274 vs 0.325 copying the source and 0.863 copying the driver; L1 0.100 vs 0.076 copying
the source (which gets the static background exactly).

Variants: `configs/avatars.py:tiny` (32x32, a few steps; what the tests use).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` selects a variant ('tiny')."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Multi-host: call jax.distributed.initialize() (arguments from the environment).
  config.distributed = False

  config.data = dict(
      name='avatars',  # fiancee_jax.data.avatars through avatars_tfds
      resolution=(64, 64),  # (H, W), each in [32, 256]
      seed=0,  # seed of the procedural generator
      num_train=2048,  # self pairs (source and driver of one identity)
      num_validation=256,  # cross pairs with ground truth
      num_test=512,
      data_dir='',  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
      prefetch=2,  # batches prepared ahead on a host thread
  )

  config.backbone = dict(
      name='reenact',
      # Appearance encoder: conv at full resolution, then one x2-down block per width.
      enc_widths=(8, 16, 32),
      volume_depth=8,  # D
      volume_channels=8,  # C: the projection has D * C = 64 channels
      # 3-D ResBlocks: cheap in FLOPs but slow on XLA:CPU, hence few at this scale.
      app_blocks_3d=0,  # on the source volume (in the appearance encoder)
      g3d_blocks=1,  # on the canonical volume (G3D)
      id_dim=32,
      expr_dim=8,
      motion_widths=(8, 16, 32),
      motion_input=32,  # the motion encoder sees at most 32x32
      warp_width=8,
      flow_scale=0.25,
      # G2D: 1x1 reduction to g2d_width, num_res_blocks ResBlocks at 16x16, upsampling blocks.
      g2d_width=64,
      num_res_blocks=4,
      up_widths=(32, 16),
      up_factors=(2, 2),
      spectral_norm=True,
      # Every G2D block also sees the source image at its resolution, so that the static
      # background and clothes are copied, not re-rendered from the 16x16 volume.
      source_skip=True,
      warp_padding='border',  # warps outside the volume read its edge ('zeros': a stripe)
      head_norm=False,  # no GroupNorm before the RGB conv: it would drop flat colours
      d_widths=(16, 32, 64),  # patch discriminator
  )

  config.train = dict(
      batch_size=16,  # global batch, sharded over the `data` mesh axis
      num_steps=600,  # the backbone stage's share of the ~20 min budget: <= ~8 min
      lr_g=1e-3,
      lr_d=1e-3,
      b1=0.5,
      b2=0.999,
      ema_decay=0.999,
      ema_stats_batches=4,  # forward passes that refresh spectral-norm sigmas for the EMA
      l1_weight=1.0,
      perceptual_weight=1.0,  # x config.distance (differentiable)
      adversarial_weight=0.05,  # hinge loss against the patch discriminator
      # Contrastive motion loss: the driver's motion code must match that of `swap` (same
      # motion, other identity) against the other examples' (training/reenact.py).
      identity_weight=1.0,
      identity_temperature=0.1,
      log_every=20,
      sample_every=200,
      checkpoint_every=100,
      keep_checkpoints=3,
      num_sample_images=8,
      num_eval=64,  # validation cross pairs scored at every sample step
  )

  # Image distance between an exit's output and the backbone's: 'auto' = LPIPS (alex) if
  # lpips_weights names a converted .npz (scripts/convert_lpips_weights.py), else 1-MS-SSIM.
  # fid_weights: a converted FID Inception .npz (scripts/convert_fid_weights.py); when set,
  # the evaluate stage also reports FID of the backbone and of every exit against the test
  # split's real images.
  config.distance = dict(name='auto', lpips_weights='', fid_weights='')

  # Guiding database (guidance/database.py explains keys and values).
  config.database = dict(
      key_block=0,  # keys from this G2D block's output (<= the earliest attach point)
      num_images=256,
      num_entries=2048,
      key_dim=32,
      grid=(8, 8),
      metric='cosine',
      top_k=4,
      temperature=0.05,
      chunk=4096,
      kmeans_iters=10,
  )

  # Exit branches on G2D, distilled from the frozen backbone (EMA weights).
  config.exits = dict(
      attach_after=(0, 2),  # G2D blocks after which exits attach (0..3 are the ResBlocks)
      width_mult=0.5,  # light G2D blocks: widths x width_mult
      guided=True,
      train_unguided=True,
      batch_size=16,
      num_steps=300,
      lr=1e-3,
      lr_schedule='constant',  # 'constant' | 'cosine' (decays to 0 at num_steps)
      warmup_steps=0,
      b1=0.5,
      b2=0.999,
      l1_weight=1.0,
      perceptual_weight=1.0,
      feature_weight=0.0,  # x feature distillation (losses/distillation.py)
      feature_loss='l2',
      adversarial_weight=0.0,
      log_every=20,
      sample_every=200,
      checkpoint_every=100,
      keep_checkpoints=3,
  )

  # Predictor of every exit's distance to the backbone (models/predictor.py).
  config.predictor = dict(
      width=16,
      pool=4,
      num_train=1024,
      measure_batch=32,
      batch_size=64,
      num_steps=1000,
      lr=3e-3,
      loss='l1',
  )

  config.router = dict(
      target_met=0.95,
      calibration='risk_control',
      thresholds=(),
      num_eval=512,
  )

  # iters keeps the job within 20 min; switch_rounds: interleaved batch-1 switch-vs-direct
  # rounds; exit_parts: also time each exit's prefix, lookup and branch alone;
  # lowering_rounds: each exit with and without the CPU lowerings (0 = not measured).
  config.benchmark = dict(batch_size=64, warmup=2, iters=5, switch_rounds=100,
                          exit_parts=True, lowering_rounds=10)
  config.lock()

  if arg == 'tiny':
    config.data.update(resolution=(32, 32), num_train=32, num_validation=32, num_test=16,
                       prefetch=1)
    config.backbone.update(enc_widths=(8, 8, 16), volume_depth=4, volume_channels=4,
                           app_blocks_3d=0, g3d_blocks=1, id_dim=8, expr_dim=4,
                           motion_widths=(4, 8), motion_input=16, warp_width=4,
                           g2d_width=16, num_res_blocks=2, up_widths=(8, 4),
                           d_widths=(8, 16))
    config.train.update(batch_size=8, num_steps=4, log_every=2, sample_every=2,
                        checkpoint_every=2, ema_stats_batches=1, num_sample_images=4,
                        num_eval=8)
    config.database.update(key_block=1, num_images=8, num_entries=64, key_dim=4,
                           grid=(4, 4), chunk=32, kmeans_iters=2)
    config.exits.update(attach_after=(1, 2), batch_size=8, num_steps=4, log_every=2,
                        sample_every=2, checkpoint_every=2)
    config.predictor.update(width=4, num_train=16, measure_batch=8, batch_size=8,
                            num_steps=4)
    config.router.update(num_eval=16)
    config.benchmark.update(batch_size=4, warmup=1, iters=2, switch_rounds=4,
                            exit_parts=False, lowering_rounds=0)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/avatars.py (known: 'tiny')")
  return config
