"""Exit branches and exit paths, generic over staged backbones.

A staged backbone (a linen module) provides `conditioning(*inputs)`, `stem(cond)`,
`block(i, h, cond, train=...)`, `head(h)`, `num_blocks` and a `light_factory` with
`block_width(j, mult)`, `block(j, mult, name, hidden_mult=None)`, `head(name)`,
`condition(cond)` (the spatial part of the conditioning light blocks see),
`latent(cond)` (the per-image latent [B, Z] z-aware light blocks take as `z=`, or None) and
`dtype` (the compute dtype of the light blocks and heads, models/precision.py: a branch
computes in it, and its image is float32).
An exit attached after block i is a 1x1 projection of the block-i features followed by
light versions of blocks i+1..K-1 and its own image head. A guided exit uses the guiding map
(guidance/database.py) as `guidance` says: 'input' concatenates it to the projected
features and to the conditioning the light blocks see, so that it reaches every resolution
of the branch; 'residual' leaves the branch as it is and adds the map's channels 3k..3k+2
(the retrieved residual of exit k) to exit k's image, clipped to [-1, 1].

Widths: light block j of branch k has `widths[j + 1] x width_mult[k]` channels and (OASIS)
a SPADE hidden width of `spade_hidden x hidden_mult[k]`; the two are separate knobs because
at full resolution SPADE's modulation, not the feature path, is what a narrow light block
spends its FLOPs on. Each light block's output is sown into the 'intermediates' collection
as `out_{j}` (at the resolution of backbone block j's output), for feature distillation.

Exit k < len(attach_after) is a branch; exit len(attach_after) is the backbone itself.
`exit_path(k)` builds a pure function of (params, inputs) with k static, so each exit
compiles to its own executable.
"""
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fiancee_jax.models import layers

Params = Any
# lookup(database, key_features [B, h, w, C], out_hw) -> guide [B, H, W, G]
LookupFn = Callable[[Any, jax.Array, tuple[int, int]], jax.Array]
# How a guided exit uses the guide (see the module docstring).
GUIDANCE = ('input', 'residual')


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Average-pools [B, H, W, C] to [B, h, w, C] (integer factors) or repeats up."""
  b, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  if h % size[0] == 0 and w % size[1] == 0:
    fh, fw = h // size[0], w // size[1]
    return x.reshape(b, size[0], fh, size[1], fw, c).mean(axis=(2, 4))
  return jax.image.resize(x, (b, *size, c), 'linear')


class ExitBranch(nn.Module):
  """Light blocks attach_after+1..K-1 and a head; input: block-`attach_after` features."""
  factory: Any
  attach_after: int
  width_mult: float
  guided: bool
  hidden_mult: float | None = None  # SPADE hidden width x this; None = width_mult
  z_aware: bool = True  # light blocks take factory.latent(cond) (z) when there is one

  @nn.compact
  def __call__(self, h: jax.Array, cond: jax.Array, guide: jax.Array | None = None, *,
               train: bool = False, momentum: float = 0.9) -> jax.Array:
    """h: [B, h, w, C_i]; cond: [B, H, W, S]; guide: [B, H, W, G] or None -> [B, H, W, 3]."""
    width = self.factory.block_width(self.attach_after, self.width_mult)
    dtype = self.factory.dtype
    x = layers.Conv(width, (1, 1), dtype=dtype, name='proj')(h)
    cond = cond.astype(dtype)
    latent = self.factory.latent(cond) if self.z_aware else None
    block_kw = dict(train=train, momentum=momentum)
    if latent is not None:
      block_kw['z'] = latent
    cond = self.factory.condition(cond)
    if self.guided:
      if guide is None:
        raise ValueError(f'exit after block {self.attach_after} is guided but got no guide')
      guide = guide.astype(dtype)  # the lookup computes in float32
      x = jnp.concatenate([x, area_resize(guide, x.shape[1:3])], axis=-1)
      cond = jnp.concatenate([cond, area_resize(guide, cond.shape[1:3])], axis=-1)
    for j in range(self.attach_after + 1, self.factory.num_blocks):
      x = self.factory.block(j, self.width_mult, name=f'block_{j}',
                             hidden_mult=self.hidden_mult)(x, cond, **block_kw)
      self.sow('intermediates', f'out_{j}', x)
    return self.factory.head(name='head')(x)


def _per_branch(value: float | Sequence[float] | None, n: int, what: str) -> tuple:
  """A multiplier given once or per branch -> one per branch (None stays None)."""
  if value is None or isinstance(value, (int, float)):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f'{what}={value} gives {len(value)} multipliers for {n} exit branches; '
                     'give one number or one per entry of config.exits.attach_after')
  return value


@dataclasses.dataclass(frozen=True)
class ExitModel:
  """Static description of a backbone with exits; params are passed to its functions.

  Params layout: {'backbone': backbone variables, 'exits': [exit variables per branch],
  'database': guiding database arrays (or None when unguided)}.
  """
  backbone: nn.Module
  attach_after: tuple[int, ...]
  width_mult: float | tuple[float, ...]  # light-block widths x this (one, or per branch)
  guided: bool
  key_block: int  # block whose output gives the database keys
  lookup: LookupFn | None = None
  # SPADE hidden width of the light blocks x this (one, or per branch); None = width_mult.
  hidden_mult: float | tuple[float, ...] | None = None
  z_aware: bool = True  # light blocks see the backbone's latent (z), if it has one
  guidance: str = 'input'  # how a guided exit uses the guide: 'input' | 'residual'

  def __post_init__(self):
    if self.guidance not in GUIDANCE:
      raise ValueError(f'guidance {self.guidance!r}: use one of {GUIDANCE}')
    k = self.backbone.num_blocks
    pts = tuple(self.attach_after)
    if not pts or list(pts) != sorted(set(pts)) or pts[0] < 0 or pts[-1] >= k - 1:
      raise ValueError(
          f'config.exits.attach_after={pts} must be increasing block indices in [0, {k - 2}] '
          f'(the backbone has {k} blocks; the last block is the backbone exit)')
    for what, mults in (('width_mult', self.width_mult), ('hidden_mult', self.hidden_mult)):
      mults = _per_branch(mults, len(pts), what)
      if any(m is not None and not m > 0 for m in mults):
        raise ValueError(f'{what}={mults} must be > 0 (light-block width multipliers)')
    if self.guided and not 0 <= self.key_block <= pts[0]:
      raise ValueError(
          f'config.database.key_block={self.key_block} must be <= the earliest attach point '
          f'{pts[0]} so that every exit can afford the database keys')

  @property
  def num_exits(self) -> int:
    """Branches plus the backbone (the last exit)."""
    return len(self.attach_after) + 1

  @property
  def branches(self) -> list[ExitBranch]:
    n = len(self.attach_after)
    fed = self.guided and self.guidance == 'input'
    return [ExitBranch(self.backbone.light_factory, a, w, fed, hidden_mult=hm,
                       z_aware=self.z_aware)
            for a, w, hm in zip(self.attach_after,
                                _per_branch(self.width_mult, n, 'width_mult'),
                                _per_branch(self.hidden_mult, n, 'hidden_mult'))]

  def last_block(self, k: int) -> int:
    """Last backbone block that exit k runs."""
    return self.backbone.num_blocks - 1 if k == len(self.attach_after) else self.attach_after[k]

  def prefix(self, bb: Params, inputs: Sequence[jax.Array], upto: int):
    """Runs conditioning, stem and blocks 0..upto; returns (h, cond, key_features, outs).

    outs[i] is the output of block i (a dict so that callers pick what they need).
    """
    g = self.backbone
    cond = g.apply(bb, *inputs, method='conditioning')
    h = g.apply(bb, cond, method='stem')
    outs = {}
    for i in range(upto + 1):
      h = g.apply(bb, h, cond, method=lambda m, h, c, i=i: m.block(i, h, c))
      outs[i] = h
    return h, cond, outs

  def guide(self, params: Params, outs: dict, out_hw: tuple[int, int]) -> jax.Array | None:
    if not self.guided:
      return None
    return self.lookup(params['database'], outs[self.key_block], out_hw)

  def branch_guide(self, guide: jax.Array | None) -> jax.Array | None:
    """What a branch takes as its `guide` argument (None unless guidance is 'input')."""
    return guide if self.guidance == 'input' else None

  def finish(self, k: int, image: jax.Array, guide: jax.Array | None) -> jax.Array:
    """Branch k's image [B, H, W, 3] after guidance: + its retrieved residual, clipped, for
    'residual' guidance; unchanged otherwise."""
    if not self.guided or self.guidance != 'residual':
      return image
    residual = guide[..., 3 * k:3 * k + 3]
    return jnp.clip(image + residual.astype(image.dtype), -1.0, 1.0)

  def exit_path(self, k: int) -> Callable[..., jax.Array]:
    """path_k(params, *inputs) -> images [B, H, W, 3]; k static (one executable per exit)."""
    if not 0 <= k < self.num_exits:
      raise ValueError(f'exit {k} does not exist (0..{self.num_exits - 1})')

    def path(params: Params, *inputs: jax.Array) -> jax.Array:
      bb = params['backbone']
      h, cond, outs = self.prefix(bb, inputs, self.last_block(k))
      if k == len(self.attach_after):
        return self.backbone.apply(bb, h, method='head')
      guide = self.guide(params, outs, cond.shape[1:3])
      image = self.branches[k].apply(params['exits'][k], h, cond, self.branch_guide(guide))
      return self.finish(k, image, guide)

    return path

  def backbone_pass(self, params: Params, *inputs: jax.Array):
    """The frozen part shared by all exits: (outs, cond, teacher, guide).

    outs[i]: output of block i; teacher: the backbone's image [B, H, W, 3]; guide: the
    guiding map [B, H, W, G] or None.
    """
    bb = params['backbone']
    h, cond, outs = self.prefix(bb, inputs, self.backbone.num_blocks - 1)
    teacher = self.backbone.apply(bb, h, method='head')
    return outs, cond, teacher, self.guide(params, outs, cond.shape[1:3])

  def branch_outputs(self, exit_vars: Sequence[Params], outs: dict, cond: jax.Array,
                     guide: jax.Array | None, *, train: bool = False,
                     momentum: float = 0.9, features: bool = False):
    """Every branch's image from a `backbone_pass`.

    Returns:
      (images, stats), or (images, stats, feats) with `features`: images is a list of
      [B, H, W, 3] (one per branch); stats the branches' new batch_stats when `train`, else
      None; feats[k] = {j: output of light block j of branch k [B, h_j, w_j, C_kj]}, at the
      resolution of `outs[j]` (the backbone's block j).
    """
    images, stats, feats = [], [], []
    mutable = (['batch_stats'] if train else []) + (['intermediates'] if features else [])
    fed = self.branch_guide(guide)
    for k, branch in enumerate(self.branches):
      h = outs[branch.attach_after]
      kw = dict(train=True, momentum=momentum) if train else {}
      if mutable:
        img, upd = branch.apply(exit_vars[k], h, cond, fed, mutable=mutable, **kw)
      else:
        img, upd = branch.apply(exit_vars[k], h, cond, fed), {}
      img = self.finish(k, img, guide)
      if train:
        stats.append(upd['batch_stats'])
      if features:
        feats.append({int(name.removeprefix('out_')): v[0]
                      for name, v in upd['intermediates'].items()})
      images.append(img)
    stats = stats if train else None
    return (images, stats, feats) if features else (images, stats)

  def all_exits(self, params: Params, *inputs: jax.Array):
    """(list of branch images [B, H, W, 3], teacher [B, H, W, 3]) sharing one backbone pass."""
    outs, cond, teacher, guide = self.backbone_pass(params, *inputs)
    images, _ = self.branch_outputs(params['exits'], outs, cond, guide)
    return images, teacher

  def init_exits(self, key: jax.Array, bb: Params, database: Any,
                 *inputs: jax.Array) -> list[Params]:
    """Initial variables of every branch (shapes from a forward of the backbone prefix)."""
    h, cond, outs = self.prefix(bb, inputs, self.backbone.num_blocks - 1)
    guide = (self.guide({'database': database}, outs, cond.shape[1:3])
             if self.guidance == 'input' else None)
    return [b.init(jax.random.fold_in(key, k), outs[b.attach_after], cond, guide)
            for k, b in enumerate(self.branches)]
