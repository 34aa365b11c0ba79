"""MegaPortraits' structure at the paper's G2D scale, avatars at 256x256 (costs only).

  python -c "from configs import megaportraits_256 as c; \
      from fiancee_jax.metrics import costs; print(costs.reenact_stats(c.get_config()))"

G2D as in MegaPortraits: the 96 x 16 = 1536-channel projection of the driven volume at
64x64, a 1x1 conv to 512, 8 ResBlocks at 512, then three upsampling stages 512 -> 256 ->
128 -> 64 and the image head. MegaPortraits decodes to 512x512 (x2 in every stage); at
256x256 only two x2 steps fit after a 64x64 latent, so the first stage (512 -> 256) keeps
64x64 (`up_factors=(1, 2, 2)`); parameters are the same either way. The encoders, warps and
G3D follow the same structure at comparable widths. Training at this scale needs an
accelerator; on 2 CPU cores use configs/avatars.py.
"""
import ml_collections

from configs import avatars


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = avatars.get_config()
  with config.unlocked():
    config.data.update(resolution=(256, 256), num_train=20_000, num_validation=1024,
                       num_test=2048)
    config.backbone.update(
        enc_widths=(64, 128, 256), volume_depth=16, volume_channels=96, app_blocks_3d=2,
        g3d_blocks=4, id_dim=512, expr_dim=50, motion_widths=(32, 64, 128, 256, 256),
        motion_input=128, warp_width=16, g2d_width=512, num_res_blocks=8,
        up_widths=(256, 128, 64), up_factors=(1, 2, 2), d_widths=(64, 128, 256, 512),
        # The paper's G2D: no source skip, a normalised image head (the small avatars
        # default needs both changes to keep flat colours at its widths).
        source_skip=False, head_norm=True)
    config.train.update(batch_size=16, num_steps=200_000, lr_g=2e-4, lr_d=2e-4,
                        ema_decay=0.9999, log_every=100, sample_every=5000,
                        checkpoint_every=5000)
    config.exits.update(attach_after=(3, 7, 8), batch_size=16, num_steps=50_000)
    config.database.update(key_block=3)
  if arg:
    raise ValueError(f'unknown variant {arg!r} of configs/megaportraits_256.py')
  return config.lock()
