"""python -m fiancee_jax.stats --config=configs/oasis_ade20k.py

Seconds, no data: parameters and GFLOPs of OASIS at the paper's scale, ADE20K 256x256,
151 classes (74.31 M parameters, 194.4 GMACs per image, as the official generator).
Training (`python -m fiancee_jax.main --config=configs/oasis_ade20k.py
--workdir=runs/ade20k`) needs the ADE20K files (README, 'Real datasets') and accelerators:
the recipe is OASIS's (batch 32, Adam (0, 0.999), lr G 1e-4 / D 4e-4, EMA 0.9999, LabelMix
10, 200 epochs). `configs/oasis_ade20k.py:tiny` is the same pipeline at tiny widths and
32x32.
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
  config.data.update(name='scene_parse150', num_classes=151,
                     resolution=(32, 32) if arg == 'tiny' else (256, 256))
  if arg != 'tiny':
    config.backbone.update(ch=64, spade_hidden=128, z_dim=64, d_ch=64,
                           width_ratios=(16, 16, 16, 8, 4, 2, 1),
                           d_width_ratios=(2, 2, 4, 4, 8, 8))
    config.train.update(batch_size=32, num_steps=300_000, lr_g=1e-4, lr_d=4e-4,
                        ema_decay=0.9999, log_every=100, sample_every=5000,
                        checkpoint_every=5000, ema_stats_batches=50)
  return config.lock()
