"""OASIS at the paper's scale: ADE20K (TFDS scene_parse150), 256x256, 151 classes.

  python -m fiancee_jax.stats --config=configs/oasis_ade20k.py          # seconds, no data
  python -m fiancee_jax.main --config=configs/oasis_ade20k.py --workdir=runs/ade20k

Training needs the ADE20K files in TFDS (see README, 'Real datasets') and an accelerator;
the official recipe is ~300k steps at batch 32. The generator matches the official one:
74.31 M parameters, 194.4 GMACs per image.
"""
import ml_collections

from configs import landscapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = landscapes.get_config()
  with config.unlocked():
    config.data.update(name='scene_parse150', resolution=(256, 256), num_classes=151)
    config.backbone.update(ch=64, spade_hidden=128, z_dim=64, d_ch=64,
                           width_ratios=(16, 16, 16, 8, 4, 2, 1),
                           d_width_ratios=(2, 2, 4, 4, 8, 8))
    config.train.update(batch_size=32, num_steps=300_000, lr_g=1e-4, lr_d=4e-4,
                        ema_decay=0.9999, log_every=100, sample_every=5000,
                        checkpoint_every=5000, ema_stats_batches=50)
  if arg:
    raise ValueError(f'unknown variant {arg!r} of configs/oasis_ade20k.py')
  return config.lock()
