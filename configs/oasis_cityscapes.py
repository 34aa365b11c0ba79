"""python -m fiancee_jax.main --config=configs/oasis_cityscapes.py --workdir=runs/cityscapes

Needs the Cityscapes files (fiancee_jax/data/cityscapes.py says where they go; prepare
once with `python -m fiancee_jax.data.prepare --config=configs/oasis_cityscapes.py
--config.data.manual_dir=DIR`) and accelerators: 29,600 steps at batch 20 (OASIS recommends
4 V100 GPUs). `configs/oasis_cityscapes.py:tiny` (16x32, tiny widths, a few steps) runs
every stage on a small fake directory in CI (a few minutes on 2 CPU cores).

OASIS on Cityscapes: gtFine label ids (35 channels), 256x512, horizontal flips, and the
official code's Cityscapes recipe (its config.py and scripts/train_cityscapes.sh): batch
20, Adam (0, 0.999), lr G 4e-4 and D 4e-4, EMA 0.999, LabelMix 5, 200 epochs of the 2975
training images (148 steps each). The calibration split is carved from the training
images; test is the official validation split (500 images).
"""
import os
import runpy
import types

import ml_collections

common = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` selects a variant ('tiny')."""
  config = common.variant_of('oasis_ade20k', arg, 'configs/oasis_cityscapes.py')
  config.data.update(name='cityscapes', num_classes=35,
                     resolution=(16, 32) if arg == 'tiny' else (256, 512))
  if arg != 'tiny':
    config.data.num_validation = 300
    config.train.update(batch_size=20, num_steps=200 * (2975 // 20), lr_g=4e-4, lr_d=4e-4,
                        ema_decay=0.999, labelmix_weight=5.0)
  return config.lock()
