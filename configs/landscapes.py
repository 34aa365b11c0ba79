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
      ch=8,  # base width; block widths are ch * width_ratios
      width_ratios=(16, 16, 16, 8, 4, 2, 1),
      spade_hidden=16,  # SPADE hidden width (128 at ch 64: scale with ch)
      z_dim=64,
      spectral_norm=True,
      # U-Net discriminator: encoder widths d_ch * d_width_ratios (one x2 down each),
      # last decoder block d_ch wide (OASIS: d_ch 64, ratios (2, 2, 4, 4, 8, 8)).
      d_ch=8,
      d_width_ratios=(2, 2, 4, 4, 8, 8),
  )

  config.train = dict(
      batch_size=16,  # global batch, sharded over the `data` mesh axis
      num_steps=300,
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

  # Image distance between an exit's output and the backbone's: 'auto' = LPIPS (alex) if
  # lpips_weights names a converted .npz (scripts/convert_lpips_weights.py), else 1-MS-SSIM.
  # fid_weights: a converted FID Inception .npz (scripts/convert_fid_weights.py); when set,
  # the evaluate stage also reports FID of the backbone and of every exit against the test
  # split's real images.
  config.distance = dict(name='auto', lpips_weights='', fid_weights='')

  # Guiding database (guidance/database.py explains keys and values).
  config.database = dict(
      key_block=2,  # keys from this block's output (<= the earliest attach point)
      num_images=256,  # training inputs run through the backbone to make entries
      num_entries=2048,  # prototypes kept (k-means medoids)
      key_dim=32,  # PCA dimensions of a key
      grid=(8, 8),  # patches per image (a query per patch)
      metric='cosine',  # 'cosine' | 'l2'
      top_k=4,
      temperature=0.05,  # softmax temperature over top-k similarities
      chunk=4096,  # keys per matmul chunk in the lookup
      kmeans_iters=10,
  )

  # Exit branches, distilled from the frozen backbone (EMA weights).
  config.exits = dict(
      attach_after=(3, 4),  # backbone blocks after which exits attach
      width_mult=0.5,  # light blocks: feature widths x width_mult
      spade_hidden_mult=0.5,  # light blocks: SPADE hidden width x this (x backbone's)
      # Per-branch multipliers (one per attach point) overriding the two above; () = same.
      branch_width_mults=(),
      branch_hidden_mults=(),
      z_aware=True,  # light blocks see z (a Dense(z) in each SPADE); False: z-blind
      guided=True,  # feed the guiding database to the exits
      train_unguided=True,  # also train the same exits without guidance (ablation)
      batch_size=16,
      num_steps=500,
      lr=1e-3,
      lr_schedule='cosine',  # 'constant' | 'cosine' (decays to 0 at num_steps)
      warmup_steps=0,  # linear warm-up from 0 over these steps
      b1=0.5,
      b2=0.999,
      l1_weight=1.0,
      perceptual_weight=1.0,  # x config.distance (differentiable)
      # x feature distillation (losses/distillation.py): 1x1-projected light-block outputs
      # against the backbone's block outputs, 'l2' | 'l1' relative to the teacher's scale.
      feature_weight=0.0,
      feature_loss='l2',
      adversarial_weight=0.0,  # x OASIS generator loss against the frozen discriminator
      log_every=20,
      sample_every=200,
      checkpoint_every=100,
      keep_checkpoints=3,
  )

  # Predictor of every exit's distance to the backbone (models/predictor.py).
  config.predictor = dict(
      width=16,
      pool=4,  # label map average-pooled by this factor before the convs
      use_z=True,  # z enters the first conv: most of a distance's variance is z's
      members=5,  # ensemble of independently initialised predictors (mean)
      num_train=2048,  # training label maps whose exit distances are measured as targets
      z_draws=16,  # z per training label map: num_train * z_draws measured targets
      measure_batch=32,
      batch_size=64,
      num_steps=4000,  # Adam, cosine decay from lr to 0; standardised targets
      lr=3e-3,
      loss='l1',  # 'l1' | 'mse'
  )

  # Routing: thresholds on the distance, calibration of the decision margins.
  config.router = dict(
      target_met=0.95,  # share of samples that must meet the threshold (calibration)
      # routing/calibration.py: 'risk_control' (a margin per threshold, the guarantee at the
      # threshold asked for) | 'max_score' | 'bonferroni' (one margin for every threshold at
      # once: far more conservative) | 'per_exit' | 'none'
      calibration='risk_control',
      thresholds=(),  # () = 12 thresholds spread over the measured distances
      num_eval=512,  # test inputs in the report (<= config.data.num_test)
  )

  # Benchmark stage (bench.json); switch_rounds: interleaved batch-1 switch-vs-direct rounds;
  # exit_parts: also time each exit's prefix, lookup and branch alone (where its time goes);
  # lowering_rounds: interleaved rounds timing each exit with and without the CPU lowerings
  # (models/conv.py; 0 = not measured).
  config.benchmark = dict(batch_size=64, warmup=3, iters=10, switch_rounds=200,
                          exit_parts=True, lowering_rounds=20)
  config.lock()

  if arg == 'tiny':
    config.data.update(resolution=(16, 16), num_train=64, num_validation=48,
                       num_test=32, prefetch=1)
    config.backbone.update(ch=2, spade_hidden=4, z_dim=8, d_ch=2,
                           width_ratios=(8, 8, 4, 2, 1),
                           d_width_ratios=(2, 2, 4))
    config.train.update(batch_size=8, num_steps=4, log_every=2,
                        sample_every=2, checkpoint_every=2,
                        ema_stats_batches=2)
    config.database.update(key_block=1, num_images=8, num_entries=64, key_dim=4,
                           grid=(4, 4), chunk=32, kmeans_iters=2)
    config.exits.update(attach_after=(1, 2), batch_size=8, num_steps=4, log_every=2,
                        sample_every=2, checkpoint_every=2)
    config.predictor.update(width=4, members=2, num_train=32, z_draws=2, measure_batch=16,
                            batch_size=16, num_steps=4)
    config.router.update(num_eval=32)
    config.benchmark.update(batch_size=8, warmup=1, iters=2, switch_rounds=4,
                            exit_parts=False, lowering_rounds=2)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of configs/landscapes.py '
                     "(known: 'tiny')")
  return config
