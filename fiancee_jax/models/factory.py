"""Builds the models named by a config; dispatches on config.backbone.name."""
import ml_collections
from flax import linen as nn

from fiancee_jax import tasks
from fiancee_jax.models import exits
from fiancee_jax.models import oasis
from fiancee_jax.models import predictor
from fiancee_jax.models import reenact


def make_generator(config: ml_collections.ConfigDict) -> nn.Module:
  """The staged backbone: OasisGenerator ('oasis') or ReenactGenerator ('reenact')."""
  b = config.backbone
  tasks.get_task(config)  # names the known backbones if b.name is unknown
  if b.name == 'reenact':
    return reenact.make_generator(config)
  return oasis.OasisGenerator(
      num_classes=config.data.num_classes, ch=b.ch, width_ratios=tuple(b.width_ratios),
      spade_hidden=b.spade_hidden, z_dim=b.z_dim, spectral_norm=b.spectral_norm)


def make_discriminator(config: ml_collections.ConfigDict) -> nn.Module:
  """OASIS's U-Net discriminator, or the reenactment backbone's patch discriminator."""
  b = config.backbone
  if b.name == 'reenact':
    return reenact.make_discriminator(config)
  return oasis.OasisDiscriminator(
      num_classes=config.data.num_classes,
      widths=tuple(b.d_ch * r for r in b.d_width_ratios), out_width=b.d_ch,
      spectral_norm=b.spectral_norm)


def database_spec(config: ml_collections.ConfigDict):
  """The DatabaseSpec the config's model expects."""
  from fiancee_jax.guidance import database  # pylint: disable=g-import-not-at-top
  g = make_generator(config)
  db = config.database
  if not 0 <= db.key_block < g.num_blocks:
    raise ValueError(f'config.database.key_block={db.key_block} is not a block index '
                     f'(0..{g.num_blocks - 1})')
  return database.DatabaseSpec(
      resolution=tuple(config.data.resolution), grid=tuple(db.grid), key_block=db.key_block,
      feature_width=g.widths[db.key_block + 1], key_dim=db.key_dim,
      num_entries=db.num_entries, num_classes=config.data.get('num_classes', 0),
      metric=db.metric,
      top_k=db.top_k, temperature=db.temperature, chunk=db.chunk)


def make_exit_model(config: ml_collections.ConfigDict, *, guided: bool) -> exits.ExitModel:
  """Backbone + exits as configured; `guided` selects the database-fed variant."""
  from fiancee_jax.guidance import database  # pylint: disable=g-import-not-at-top
  lookup = database.make_lookup(database_spec(config)) if guided else None
  e = config.exits
  hidden = e.get('spade_hidden_mult', None)
  return exits.ExitModel(
      backbone=make_generator(config), attach_after=tuple(e.attach_after),
      width_mult=_branch_mults(e, 'width_mult', e.width_mult), guided=guided,
      key_block=config.database.key_block, lookup=lookup,
      hidden_mult=_branch_mults(e, 'hidden_mult', hidden),
      z_aware=e.get('z_aware', True))


def _branch_mults(e: ml_collections.ConfigDict, what: str,
                  default: float | None) -> tuple[float, ...] | float | None:
  """config.exits.branch_{what}s (one multiplier per branch) if given, else `default`."""
  per_branch = tuple(e.get(f'branch_{what}s', ()))
  if not per_branch:
    return default
  if len(per_branch) != len(e.attach_after):
    raise ValueError(f'config.exits.branch_{what}s={per_branch} needs one multiplier per exit '
                     f'branch ({len(e.attach_after)}: config.exits.attach_after='
                     f'{tuple(e.attach_after)}), or () for the single one')
  return per_branch


def make_predictor(config: ml_collections.ConfigDict) -> nn.Module:
  """Predictor of the distances of the config's branch exits; apply(params, *inputs)."""
  p, n = config.predictor, len(config.exits.attach_after)
  if tasks.get_task(config).name == 'reenactment':
    return predictor.PairPredictor(num_outputs=n, width=p.width, pool=p.pool)
  return predictor.Predictor(num_classes=config.data.num_classes, num_outputs=n,
                             width=p.width, pool=p.pool, use_z=p.get('use_z', False),
                             members=p.get('members', 1))
