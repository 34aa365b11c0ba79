"""python -m fiancee_jax.stats --config=configs/megaportraits_256.py

Seconds, no data: parameters and GFLOPs of MegaPortraits' structure at the paper's G2D
scale, avatars at 256x256. Training it (`python -m fiancee_jax.main
--config=configs/megaportraits_256.py --workdir=runs/mp256`) needs an accelerator; on 2 CPU
cores use configs/avatars.py. `configs/megaportraits_256.py:tiny` keeps this structure (no
source skip, a normalised head, a first G2D stage that does not upsample) at the widths of
`configs/avatars.py:tiny`.

G2D as in MegaPortraits: the 96 x 16 = 1536-channel projection of the driven volume at
64x64, a 1x1 conv to 512, 8 ResBlocks at 512, then three upsampling stages 512 -> 256 ->
128 -> 64 and the image head. MegaPortraits decodes to 512x512 (x2 in every stage); at
256x256 only two x2 steps fit after a 64x64 latent, so the first stage (512 -> 256) keeps
64x64 (`up_factors=(1, 2, 2)`); parameters are the same either way. The encoders, warps and
G3D follow the same structure at comparable widths.
"""
import os
import runpy
import types

import ml_collections

common = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` selects a variant ('tiny')."""
  config = common.variant_of('avatars', arg, 'configs/megaportraits_256.py')
  # The paper's G2D: no source skip, a normalised image head (the small avatars default
  # needs both changes to keep flat colours at its widths).
  config.backbone.update(source_skip=False, head_norm=True)
  if arg == 'tiny':
    config.backbone.update(up_widths=(8, 8, 4), up_factors=(1, 2, 2))
  else:
    config.data.update(resolution=(256, 256), num_train=20_000, num_validation=1024,
                       num_test=2048)
    config.backbone.update(
        enc_widths=(64, 128, 256), volume_depth=16, volume_channels=96, app_blocks_3d=2,
        g3d_blocks=4, id_dim=512, expr_dim=50, motion_widths=(32, 64, 128, 256, 256),
        motion_input=128, warp_width=16, g2d_width=512, num_res_blocks=8,
        up_widths=(256, 128, 64), up_factors=(1, 2, 2), d_widths=(64, 128, 256, 512))
    config.train.update(batch_size=16, num_steps=200_000, lr_g=2e-4, lr_d=2e-4,
                        ema_decay=0.9999, log_every=100, sample_every=5000,
                        checkpoint_every=5000)
    config.exits.update(attach_after=(3, 7, 8), batch_size=16, num_steps=50_000)
    config.database.update(key_block=3)
  return config.lock()
