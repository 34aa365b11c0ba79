"""Builds the models named by a config; the only place that reads config.backbone."""
import ml_collections

from fiancee_jax.models import oasis


def make_generator(config: ml_collections.ConfigDict) -> oasis.OasisGenerator:
  b = config.backbone
  if b.name != 'oasis':
    raise ValueError(f"config.backbone.name={b.name!r} is not a label-map backbone ('oasis')")
  return oasis.OasisGenerator(
      num_classes=config.data.num_classes, ch=b.ch, width_ratios=tuple(b.width_ratios),
      spade_hidden=b.spade_hidden, z_dim=b.z_dim, spectral_norm=b.spectral_norm)


def make_discriminator(config: ml_collections.ConfigDict) -> oasis.OasisDiscriminator:
  b = config.backbone
  return oasis.OasisDiscriminator(
      num_classes=config.data.num_classes,
      widths=tuple(b.d_ch * r for r in b.d_width_ratios), out_width=b.d_ch,
      spectral_norm=b.spectral_norm)
