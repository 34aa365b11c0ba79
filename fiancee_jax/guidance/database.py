"""Guiding database: nearest-patch retrieval of backbone outputs for the exit branches.

Our design (the paper leaves it open):
- keys: the output of backbone block `key_block` (cheap: every exit computes it),
  average-pooled to a `grid` of patches, centred and projected by PCA to `key_dim`
  dimensions, L2-normalised (cosine) or not (L2);
- values (config `value_type`): 'image', the full backbone's output image over the same
  patch (what the early exits cannot afford to compute), which guided exits take as an
  input; or 'residual', per exit branch the backbone's image minus that (unguided) exit's
  image over the patch (what the exit gets wrong), which is added to the exit's image;
  `patch_h x patch_w x channels` numbers per entry (channels 3, or 3 per branch);
- entries: `num_entries` prototypes picked by k-means over the patches of `num_images`
  training inputs: for 'image' values, for each centroid the member nearest to it (so values
  stay sharp); for 'residual' values the centroid itself with the mean residual of its
  members (averaging what no key can tell apart).
A query pools and projects its own block features, finds the top-k keys per patch with
one matmul + an exact top-k (ops/top_k.py, the implementation named by `top_k_impl`) per
chunk of keys, blends their values (`blend`: softmax of similarity / temperature, or their
plain mean) and tiles them into a guiding image [B, H, W, channels].
"""
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import checkpoint
from fiancee_jax.ops import top_k as top_k_lib

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatabaseSpec:
  """Static shape of a database; what a model and a database must agree on."""
  resolution: tuple[int, int]  # (H, W) of images
  grid: tuple[int, int]  # query/patch grid (gh, gw); patch = H/gh x W/gw pixels
  key_block: int
  feature_width: int  # channels of block `key_block` output
  key_dim: int
  num_entries: int
  num_classes: int
  metric: str = 'cosine'  # 'cosine' | 'l2'
  top_k: int = 1
  temperature: float = 0.05
  chunk: int = 4096  # keys per matmul chunk
  channels: int = 3  # value channels per pixel: 3 (an image), or 3 per branch (residuals)
  blend: str = 'softmax'  # 'softmax' (of similarity / temperature) | 'mean' of the top-k
  value_agg: str = 'medoid'  # an entry's value: its 'medoid' patch's | its members' 'mean'

  def __post_init__(self):
    h, w = self.resolution
    gh, gw = self.grid
    if h % gh or w % gw:
      raise ValueError(f'config.database.grid={self.grid} must divide the resolution '
                       f'{self.resolution}')
    if self.metric not in ('cosine', 'l2'):
      raise ValueError(f"config.database.metric={self.metric!r}: use 'cosine' or 'l2'")
    if self.blend not in ('softmax', 'mean'):
      raise ValueError(f"config.database.blend={self.blend!r}: use 'softmax' or 'mean'")
    if self.value_agg not in ('medoid', 'mean'):
      raise ValueError(f"database value_agg={self.value_agg!r}: use 'medoid' or 'mean'")
    if self.channels < 1:
      raise ValueError(f'database channels={self.channels} must be >= 1')
    if not 1 <= self.top_k <= self.num_entries:
      raise ValueError(f'config.database.top_k={self.top_k} must be in [1, num_entries]')
    if not 1 <= self.key_dim <= self.feature_width:
      raise ValueError(f'config.database.key_dim={self.key_dim} must be in '
                       f'[1, {self.feature_width}] '
                       f'(the width of block {self.key_block})')

  @property
  def patch(self) -> tuple[int, int]:
    return self.resolution[0] // self.grid[0], self.resolution[1] // self.grid[1]

  @property
  def value_dim(self) -> int:
    return self.patch[0] * self.patch[1] * self.channels


def pool(feats: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Average-pools features [B, h, w, C] to the patch grid [B, gh, gw, C]."""
  b, h, w, c = feats.shape
  gh, gw = grid
  if h % gh or w % gw:
    raise ValueError(f'features {h}x{w} cannot be pooled to the database grid {grid}')
  return feats.reshape(b, gh, h // gh, gw, w // gw, c).mean(axis=(2, 4))


def _project(spec: DatabaseSpec, db: dict, pooled: jax.Array) -> jax.Array:
  q = (pooled - db['mean']) @ db['proj']
  if spec.metric == 'cosine':
    q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
  return q


def _top_k(spec: DatabaseSpec, db: dict, q: jax.Array,
           impl: str = 'xla') -> tuple[jax.Array, jax.Array]:
  """q [M, D] -> (scores [M, k], indices [M, k]); keys processed in chunks; `impl` names the
  top-k implementation (ops/top_k.py)."""
  keys = db['keys']
  n = keys.shape[0]
  k = spec.top_k

  def scores_of(kc):
    s = q @ kc.T
    if spec.metric == 'l2':
      s = 2 * s - jnp.sum(kc * kc, axis=-1)[None]  # -|q-k|^2 up to a per-query constant
    return s

  if n <= spec.chunk:
    return top_k_lib.exact_top_k(scores_of(keys), k, impl)
  num_chunks = -(-n // spec.chunk)
  pad = num_chunks * spec.chunk - n
  kp = jnp.pad(keys, ((0, pad), (0, 0))).reshape(num_chunks, spec.chunk, -1)
  valid = (jnp.arange(num_chunks * spec.chunk) < n).reshape(num_chunks, spec.chunk)

  def body(carry, xs):
    best_s, best_i = carry
    kc, vc, c = xs
    s = jnp.where(vc[None], scores_of(kc), -jnp.inf)
    cs, ci = top_k_lib.exact_top_k(s, k, impl)
    all_s = jnp.concatenate([best_s, cs], axis=1)
    all_i = jnp.concatenate([best_i, ci + c * spec.chunk], axis=1)
    ts, ti = jax.lax.top_k(all_s, k)
    return (ts, jnp.take_along_axis(all_i, ti, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf), jnp.zeros((q.shape[0], k), jnp.int32))
  (s, i), _ = jax.lax.scan(body, init, (kp, valid, jnp.arange(num_chunks)))
  return s, i


@dataclasses.dataclass(frozen=True)
class Lookup:
  """lookup(db, feats [B, h, w, C], out_hw) -> guide [B, H', W', channels] (pure, jittable).

  `top_k_impl` names the top-k implementation (ops/top_k.py); every one returns the same
  entries, so it changes how the lookup runs, not what it returns.
  """
  spec: DatabaseSpec
  top_k_impl: str = 'xla'

  def __post_init__(self):
    if self.top_k_impl not in top_k_lib.TOP_K_IMPLS:
      raise ValueError(f'unknown top-k implementation {self.top_k_impl!r} '
                       f'(config.kernels.top_k); known: {top_k_lib.TOP_K_IMPLS}')

  def __call__(self, db: dict, feats: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    spec = self.spec
    if feats.shape[-1] != spec.feature_width:
      raise ValueError(f'database keys were built from {spec.feature_width}-wide features, '
                       f'got {feats.shape[-1]}')
    b = feats.shape[0]
    gh, gw = spec.grid
    ph, pw = spec.patch
    q = _project(spec, db, pool(feats, spec.grid)).reshape(b * gh * gw, -1)
    s, idx = _top_k(spec, db, q, self.top_k_impl)
    if spec.top_k == 1:
      w = jnp.ones_like(s)
    elif spec.blend == 'mean':
      w = jnp.full_like(s, 1.0 / spec.top_k)
    else:
      w = jax.nn.softmax(s / spec.temperature, axis=-1)
    vals = jnp.einsum('mk,mkv->mv', w, db['values'][idx])
    c = spec.channels
    img = vals.reshape(b, gh, gw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5)
    img = img.reshape(b, gh * ph, gw * pw, c)
    if img.shape[1:3] != tuple(out_hw):
      img = jax.image.resize(img, (b, *out_hw, c), 'linear')
    return img


def make_lookup(spec: DatabaseSpec, top_k_impl: str = 'xla') -> Lookup:
  """The lookup of databases of this spec, its top-k run by `top_k_impl` (ops/top_k.py)."""
  return Lookup(spec, top_k_impl)


def patches_of(spec: DatabaseSpec, images: jax.Array) -> jax.Array:
  """images [B, H, W, C] -> values [B * gh * gw, ph * pw * C] in grid order."""
  b, c = images.shape[0], images.shape[-1]
  gh, gw = spec.grid
  ph, pw = spec.patch
  x = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * gh * gw, ph * pw * c)


def fit(spec: DatabaseSpec, feats: np.ndarray, values: np.ndarray, key: jax.Array,
        kmeans_iters: int = 10) -> dict:
  """Builds the database arrays from pooled features [M, C] and their values [M, V]."""
  m = feats.shape[0]
  if m < spec.num_entries:
    raise ValueError(f'config.database.num_entries={spec.num_entries} exceeds the {m} patches '
                     'available; raise config.database.num_images or lower num_entries')
  if values.shape != (m, spec.value_dim):
    raise ValueError(f'database values have shape {values.shape}, expected {(m, spec.value_dim)}')
  feats = jnp.asarray(feats, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  mean = feats.mean(axis=0)
  _, _, vt = jnp.linalg.svd(feats - mean, full_matrices=False)
  proj = vt[:spec.key_dim].T
  db0 = {'mean': mean, 'proj': proj}
  keys_all = _project(spec, db0, feats)
  if spec.value_agg == 'mean':
    cent, assign = _kmeans(keys_all, spec.num_entries, key, kmeans_iters)
    if spec.metric == 'cosine':
      cent = cent / (jnp.linalg.norm(cent, axis=-1, keepdims=True) + 1e-6)
    count = jax.ops.segment_sum(jnp.ones(m), assign, spec.num_entries)
    total = jax.ops.segment_sum(values, assign, spec.num_entries)
    return {'keys': cent, 'values': total / jnp.maximum(count, 1)[:, None],
            'mean': mean, 'proj': proj}
  idx = _kmeans_medoids(keys_all, spec.num_entries, key, kmeans_iters)
  return {'keys': keys_all[idx], 'values': values[idx], 'mean': mean, 'proj': proj}


def _sq_dist(x: jax.Array, cent: jax.Array) -> jax.Array:
  return jnp.sum(x * x, 1)[:, None] - 2 * x @ cent.T + jnp.sum(cent * cent, 1)[None]


@functools.partial(jax.jit, static_argnums=(1, 3))
def _kmeans(x: jax.Array, n: int, key: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
  """(centroids [n, D], assignment [M]) of Lloyd's k-means over x [M, D], started from n
  distinct random points; the assignment is to the returned centroids, and a centroid left
  empty keeps its place (no member, so a 'mean' entry of value 0)."""
  cent = _lloyd(x, n, key, iters)
  return cent, jnp.argmin(_sq_dist(x, cent), axis=1)


def _lloyd(x: jax.Array, n: int, key: jax.Array, iters: int) -> jax.Array:
  init = jax.random.choice(key, x.shape[0], (n,), replace=False)
  cent = x[init]

  def step(cent, _):
    d = jnp.sum(x * x, 1)[:, None] - 2 * x @ cent.T + jnp.sum(cent * cent, 1)[None]
    assign = jnp.argmin(d, axis=1)
    onehot = jax.nn.one_hot(assign, n)
    count = onehot.sum(0)
    new = (onehot.T @ x) / jnp.maximum(count, 1)[:, None]
    return jnp.where(count[:, None] > 0, new, cent), None

  cent, _ = jax.lax.scan(step, cent, None, length=iters)
  return cent


@functools.partial(jax.jit, static_argnums=(1, 3))
def _kmeans_medoids(x: jax.Array, n: int, key: jax.Array, iters: int) -> jax.Array:
  """Indices of the n points nearest to k-means centroids (distinct points, sorted)."""
  d = _sq_dist(x, _lloyd(x, n, key, iters))
  # Greedy distinct medoids: each centroid takes its nearest point not yet taken.
  def pick(taken, c):
    dc = jnp.where(taken, jnp.inf, d[:, c])
    i = jnp.argmin(dc)
    return taken.at[i].set(True), i

  _, idx = jax.lax.scan(pick, jnp.zeros(x.shape[0], bool), jnp.arange(n))
  return idx


def _meta(spec: DatabaseSpec) -> dict:
  d = dataclasses.asdict(spec)
  d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
  return {'schema_version': SCHEMA_VERSION, 'spec': d}


def save(path: str, spec: DatabaseSpec, db: dict) -> None:
  """Writes the database (arrays + spec) through checkpoint.save_pytree (atomic)."""
  checkpoint.save_pytree(path, jax.device_get(db), metadata=_meta(spec))


def load(path: str, expected: DatabaseSpec) -> dict:
  """Loads a database and checks that it belongs to the model described by `expected`.

  Raises:
    ValueError naming the first field that differs (feature width, patch grid, classes...),
    checkpoint.CheckpointError if the file is missing or corrupt.
  """
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(f'no guiding database at {path}; run the database stage')
  db, meta = checkpoint.load_pytree(path)
  if meta.get('schema_version') != SCHEMA_VERSION:
    raise ValueError(f'database {path} has schema version {meta.get("schema_version")}, '
                     f'this code reads version {SCHEMA_VERSION}; rebuild it (--stages=database)')
  got = meta['spec']
  want = _meta(expected)['spec']
  for field in ('resolution', 'grid', 'key_block', 'feature_width', 'key_dim', 'num_classes',
                'num_entries', 'metric'):
    if got.get(field) != want[field]:
      raise ValueError(
          f'database {path} does not match the model: {field} is {got.get(field)} in the '
          f'database but {want[field]} in the config; rebuild it with --stages=database')
  shapes = {'keys': (expected.num_entries, expected.key_dim),
            'values': (expected.num_entries, expected.value_dim),
            'mean': (expected.feature_width,),
            'proj': (expected.feature_width, expected.key_dim)}
  for name, shape in shapes.items():
    if name not in db or tuple(np.shape(db[name])) != shape:
      raise ValueError(f'database {path}: array {name!r} has shape '
                       f'{None if name not in db else np.shape(db[name])}, expected {shape}')
    if not np.all(np.isfinite(db[name])):
      raise ValueError(f'database {path}: array {name!r} has non-finite values')
  return {k: jnp.asarray(db[k]) for k in shapes}


def nbytes(db: dict[str, Any]) -> int:
  return int(sum(np.asarray(v).nbytes for v in db.values()))
