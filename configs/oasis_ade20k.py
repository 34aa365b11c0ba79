"""python -m fiancee_jax.main --config=configs/oasis_ade20k.py --workdir=runs/ade20k

Needs the ADE20K files (fiancee_jax/data/ade20k.py says where they go; prepare once with
`python -m fiancee_jax.data.prepare --config=configs/oasis_ade20k.py
--config.data.manual_dir=DIR`) and accelerators: 126,200 steps at batch 32 (OASIS recommends
4 V100 GPUs). `python -m fiancee_jax.stats --config=configs/oasis_ade20k.py` prints the
costs in seconds, without data (74.31 M parameters and 194.4 GMACs per image, as the
official generator). `configs/oasis_ade20k.py:tiny` (32x32, tiny widths, a few steps) runs
every stage on a small fake directory in CI (a few minutes on 2 CPU cores).

OASIS on ADE20K: the 151-class ADEChallengeData2016 maps at 256x256, horizontal flips,
and the official recipe (its config.py and scripts/train_ade20k.sh): batch 32, Adam (0,
0.999), lr G 1e-4 and D 4e-4, EMA 0.9999, LabelMix 10, 200 epochs of the 20,210 training
images (631 steps each). OASIS's other augmentation, a random 256 crop of the 286x286
resized image, is not applied. The calibration split is carved from the training images;
test is the official validation split (2000 images).
"""
import os
import runpy
import types

import ml_collections

common = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` selects a variant ('tiny')."""
  config = common.variant_of('landscapes', arg, 'configs/oasis_ade20k.py')
  config.data.update(name='ade20k', num_classes=151, flip=True)
  if arg == 'tiny':
    # A carve that fits a fake directory of a few dozen images and can still certify the
    # router's target (risk control needs >= 19 calibration samples at 0.95).
    config.data.update(resolution=(32, 32), num_validation=20)
    config.router.num_eval = 8
  else:
    config.data.update(resolution=(256, 256), num_validation=1000)
    config.backbone.update(ch=64, spade_hidden=128, z_dim=64, d_ch=64,
                           width_ratios=(16, 16, 16, 8, 4, 2, 1),
                           d_width_ratios=(2, 2, 4, 4, 8, 8))
    config.train.update(batch_size=32, num_steps=200 * (20_210 // 32), lr_g=1e-4, lr_d=4e-4,
                        ema_decay=0.9999, labelmix_weight=10.0, log_every=100,
                        sample_every=5000, checkpoint_every=5000, ema_stats_batches=50)
    # The paper's guided exits, with the unguided ones beside them for the ablation (the
    # embedded 64x64 default is unguided: there guidance did not help).
    config.exits.update(guided=True, train_unguided=True)
  return config.lock()
