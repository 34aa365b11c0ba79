"""Embedded procedural landscapes: label maps and images of uneven difficulty.

Every example is a pure function of `(seed, index)`: a label map (`uint8 [H, W]`,
ids into `CLASSES`) and a matching RGB image (`uint8 [H, W, 3]`). Scenes are a sky
band with clouds, a horizon with mountains (snow caps), water / sand / grass /
snow ground, roads and rivers, then objects sorted far to near (trees, rocks,
buildings, flower patches). Each class has its own procedural texture (value
noise, stripes, speckle, window grids of class-specific frequency) and per-image
colour jitter, so a generator has to learn texture per class, not colour alone.

Difficulty is drawn per image from Beta(1.2, 3.0) (`difficulty(seed, index)`):
right-skewed, so most images are easy (few large regions, low-frequency,
low-contrast textures) and a minority are hard (many small objects, thin roads
and rivers, fragmented ground, fine high-contrast textures). The early exits of
the project exploit exactly this unevenness.

Shapes are placed in relative coordinates (and object widths are corrected for
the aspect ratio), and the layout uses its own random stream, so the same
`(seed, index)` gives the same scene at 32x32 and at 256x256, with finer detail
at the higher resolution.
"""
import functools

import numpy as np

CLASSES: tuple[str, ...] = ('sky', 'cloud', 'mountain', 'water', 'grass',
                            'tree', 'rock', 'sand', 'building', 'road', 'snow',
                            'flower')
NUM_CLASSES = len(CLASSES)
(SKY, CLOUD, MOUNTAIN, WATER, GRASS, TREE, ROCK, SAND, BUILDING, ROAD, SNOW,
 FLOWER) = range(NUM_CLASSES)

# Colours for drawing label maps (not the image colours): one row per class.
PALETTE = np.array([
    [110, 170, 240],  # sky
    [235, 235, 235],  # cloud
    [120, 80, 60],  # mountain
    [20, 60, 200],  # water
    [60, 200, 60],  # grass
    [0, 100, 0],  # tree
    [130, 130, 130],  # rock
    [240, 210, 120],  # sand
    [200, 40, 40],  # building
    [60, 60, 60],  # road
    [255, 255, 255],  # snow
    [240, 60, 220],  # flower
], np.uint8)
PALETTE.flags.writeable = False

MIN_SIZE, MAX_SIZE = 16, 256
# Bump when the output of `generate` changes: the TFDS builder's version is this.
GENERATOR_VERSION = '1.0.0'

# Scene kinds, their probabilities and object type weights
# (tree, rock, building, flower patch).
_SCENES = ('meadow', 'coast', 'lake', 'desert', 'winter', 'town')
_SCENE_P = (0.25, 0.17, 0.17, 0.1, 0.1, 0.21)
_OBJECT_WEIGHTS = {
    'meadow': (0.45, 0.15, 0.1, 0.3),
    'coast': (0.3, 0.4, 0.2, 0.1),
    'lake': (0.6, 0.3, 0.05, 0.05),
    'desert': (0.15, 0.6, 0.2, 0.05),
    'winter': (0.6, 0.25, 0.15, 0.0),
    'town': (0.3, 0.05, 0.55, 0.1),
}
_MOUNTAIN_P = {'meadow': 0.6, 'coast': 0.3, 'lake': 0.95, 'desert': 0.6,
               'winter': 0.8, 'town': 0.3}
_ROAD_P = {'meadow': 0.3, 'coast': 0.15, 'lake': 0.15, 'desert': 0.4,
           'winter': 0.15, 'town': 0.9}

_BASE_COLOURS = {
    CLOUD: (0.95, 0.95, 0.97),
    WATER: (0.15, 0.35, 0.6),
    GRASS: (0.3, 0.58, 0.2),
    TREE: (0.1, 0.36, 0.13),
    ROCK: (0.52, 0.49, 0.46),
    SAND: (0.86, 0.76, 0.52),
    ROAD: (0.3, 0.3, 0.32),
    SNOW: (0.93, 0.95, 0.99),
}
_MOUNTAIN_COLOURS = ((0.47, 0.45, 0.5), (0.5, 0.42, 0.34), (0.4, 0.43, 0.4))
_BUILDING_COLOURS = ((0.68, 0.33, 0.24), (0.74, 0.74, 0.7), (0.9, 0.84, 0.68))
_FLOWER_COLOURS = np.array([(0.92, 0.15, 0.2), (0.97, 0.85, 0.1),
                            (0.7, 0.3, 0.88), (1.0, 1.0, 1.0),
                            (0.97, 0.5, 0.72)], np.float32)
_TRUNK_COLOUR = np.array((0.36, 0.23, 0.12), np.float32)


def _check_index(seed: int, index: int) -> None:
  if int(seed) < 0 or int(index) < 0:
    raise ValueError(f'seed and index must be non-negative integers, got '
                     f'seed={seed}, index={index}')


def difficulty(seed: int, index: int) -> float:
  """Returns the difficulty in [0, 1] of example `index` (Beta(1.2, 3.0))."""
  _check_index(seed, index)
  return float(np.random.default_rng([seed, index]).beta(1.2, 3.0))


# ---------------------------------------------------------------------------
# Noise. Value noise on a lattice of `cells` cells, upsampled separably with
# smoothstep weights (two gathers): O(H * W) and independent of the resolution.


@functools.lru_cache(maxsize=512)
def _interp(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (i int64 [n], f float32 [n]): pixel p lies between lattice points
  i[p] and i[p] + 1 at smoothstep weight f[p] of the way."""
  t = (np.arange(n) + 0.5) * (cells / n)
  i = np.minimum(t.astype(np.int64), cells - 1)
  f = t - i
  f = (f * f * (3 - 2 * f)).astype(np.float32)
  i.flags.writeable = False
  f.flags.writeable = False
  return i, f


def _upsample(lattice: np.ndarray, h: int, w: int) -> np.ndarray:
  """Smoothly interpolates float32 [cy + 1, cx + 1] to float32 [h, w]."""
  iy, fy = _interp(h, lattice.shape[0] - 1)
  ix, fx = _interp(w, lattice.shape[1] - 1)
  rows = lattice[iy] * (1 - fy[:, None]) + lattice[iy + 1] * fy[:, None]
  return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def _noise(rng: np.random.Generator, h: int, w: int, cy: float, cx: float,
           cap: bool = True) -> np.ndarray:
  """Returns value noise float32 [h, w] in [0, 1] with about (cy, cx) cells.

  With `cap`, cells finer than 2 px are clamped (textures); layout noise passes
  cap=False so that its random draws do not depend on the resolution.
  """
  cy, cx = max(int(round(cy)), 1), max(int(round(cx)), 1)
  if cap:
    cy, cx = min(cy, max(h // 2, 1)), min(cx, max(w // 2, 1))
  return _upsample(rng.random((cy + 1, cx + 1), dtype=np.float32), h, w)


def _fbm(rng: np.random.Generator, h: int, w: int, cells: float,
         octaves: int = 3, stretch: tuple[float, float] = (1.0, 1.0),
         gain: float = 0.5, cap: bool = True) -> np.ndarray:
  """Returns fractal value noise float32 [h, w], roughly in [0, 1]."""
  total = np.zeros((h, w), np.float32)
  amp, norm = 1.0, 0.0
  for o in range(octaves):
    c = cells * 2**o
    total += amp * _noise(rng, h, w, c * stretch[0], c * stretch[1], cap)
    norm += amp
    amp *= gain
  return total / norm


def _noise1d(rng: np.random.Generator, n: int, cells: int,
             octaves: int = 1) -> np.ndarray:
  """Returns float32 [n] 1-D fractal noise in [0, 1] (cells not capped by n)."""
  total = np.zeros(n, np.float32)
  amp, norm = 1.0, 0.0
  for o in range(octaves):
    c = max(int(cells * 2**o), 1)
    i, f = _interp(n, c)
    v = rng.random(c + 1, dtype=np.float32)
    total += amp * (v[i] * (1 - f) + v[i + 1] * f)
    norm += amp
    amp *= 0.5
  return total / norm


# ---------------------------------------------------------------------------
# Layout: label map painted back to front.


def _window(cy: float, cx: float, ry: float, rx: float, h: int,
            w: int) -> tuple[slice, slice] | None:
  """Pixel window around a shape; ry in height units, rx in width units."""
  r0 = max(int(np.floor((cy - ry) * h)), 0)
  r1 = min(int(np.ceil((cy + ry) * h)) + 1, h)
  c0 = max(int(np.floor((cx - rx) * w)), 0)
  c1 = min(int(np.ceil((cx + rx) * w)) + 1, w)
  if r0 >= r1 or c0 >= c1:
    return None
  return slice(r0, r1), slice(c0, c1)


def _lumps(rng: np.random.Generator, d: float, amount: float = 0.25):
  """Random angular harmonics that make a blob's outline irregular."""
  n = 3
  ks = rng.integers(2, 4 + int(10 * d), size=n)
  amps = rng.uniform(0.3, 1.0, size=n) * amount * (0.6 + d) / n
  phases = rng.uniform(0, 2 * np.pi, size=n)
  return list(zip(ks, amps, phases))


def _blob(yy, xx, cy, cx, ry, rx, lumps) -> np.ndarray:
  """Boolean mask of a lumpy ellipse; yy [n, 1], xx [1, m] relative coords."""
  dy = (yy - cy) / ry
  dx = (xx - cx) / rx
  r = np.sqrt(dy * dy + dx * dx)
  theta = np.arctan2(dy, dx)
  bound = 1.0
  for k, a, p in lumps:
    bound = bound + a * np.sin(k * theta + p)
  return r < bound


class _Scene:
  """Label map under construction plus what rendering needs to know."""

  def __init__(self, h: int, w: int):
    self.h, self.w = h, w
    self.aspect = h / w  # multiplies widths given in height units
    self.yy = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    self.xx = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    self.labels = np.full((h, w), SKY, np.uint8)
    self.trunk = np.zeros((h, w), bool)

  def paint(self, window, mask, cls, where=None):
    if window is None:
      return
    sub = self.labels[window]
    if where is not None:
      mask = mask & np.isin(sub, where)
    sub[mask] = cls


def _layout(rng: np.random.Generator, fine_rng: np.random.Generator,
            d: float, h: int, w: int) -> tuple[_Scene, dict]:
  """Draws the scene; all draws except `fine_rng` are resolution independent."""
  s = _Scene(h, w)
  yy, xx, a = s.yy, s.xx, s.aspect
  kind = _SCENES[rng.choice(len(_SCENES), p=_SCENE_P)]
  size = (1.25 - 0.8 * d) * rng.uniform(0.8, 1.2)  # object size multiplier
  h0 = rng.uniform(0.3, 0.58)
  horizon = (h0 + 0.03 * (_noise1d(rng, w, 3) - 0.5))[None, :]
  ground = yy >= horizon
  depth = np.clip((yy - horizon) / (1.0 - horizon), 0.0, 1.0)  # 0 far, 1 near

  # Clouds (drawn first: mountains hide them).
  for _ in range(min(rng.poisson(0.4 + 9 * d), 25)):
    cy = rng.uniform(0.02, max(h0 - 0.06, 0.05))
    cx = rng.uniform(-0.1, 1.1)
    ry = rng.uniform(0.025, 0.08) * size
    rx = ry * rng.uniform(2.0, 4.0) * a
    lumps = _lumps(rng, d, 0.35)
    win = _window(cy, cx, ry * 1.5, rx * 1.5, h, w)
    if win is not None:
      s.paint(win, _blob(yy[win[0]], xx[:, win[1]], cy, cx, ry, rx, lumps),
              CLOUD)

  # Mountains with optional snow caps.
  if rng.random() < _MOUNTAIN_P[kind]:
    height = rng.uniform(0.1, 0.34) * min(1.0, h0 / 0.42)
    profile = _noise1d(rng, w, 3 + int(10 * d * rng.random()), octaves=4)
    profile = ((profile - profile.min()) / (np.ptp(profile) + 1e-6))**1.6
    ridge = horizon - height * (0.12 + 0.88 * profile[None, :])
    mountain = (yy >= ridge) & ~ground
    s.labels[mountain] = MOUNTAIN
    snow_p = {'lake': 0.7, 'winter': 1.0, 'desert': 0.0}.get(kind, 0.35)
    if rng.random() < snow_p:
      line = horizon - height * rng.uniform(0.45, 0.75)
      jag = _noise(rng, h, w, 3 + 12 * d, 6 + 24 * d, cap=False)
      line = line + 0.08 * height * (jag - 0.5)
      s.labels[mountain & (yy < line)] = SNOW

  # Ground: base material, water bodies, beaches, patches.
  base = {'desert': SAND, 'winter': SNOW}.get(kind, GRASS)
  s.labels[ground] = base
  if kind == 'coast':
    shore = horizon + rng.uniform(0.06, 0.3) * (1 - h0) + 0.06 * (
        _noise1d(rng, w, 2 + int(8 * d)) - 0.5)[None, :]
    beach = shore + rng.uniform(0.03, 0.12) + 0.03 * (
        _noise1d(rng, w, 3 + int(12 * d)) - 0.5)[None, :]
    s.labels[ground & (yy < beach)] = SAND
    s.labels[ground & (yy < shore)] = WATER
  elif kind == 'lake':
    # Shores curve: the lake is deepest where the 1-D noise is highest.
    n = _noise1d(rng, w, 2 + int(4 * d))[None, :]
    thr = rng.uniform(0.2, 0.5)
    reach = np.sqrt(np.clip((n - thr) / (1 - thr), 0, 1))
    lake = ground & (yy < horizon + rng.uniform(0.08, 0.3) * (1 - h0) * reach)
    if rng.random() < 0.5:
      rim = np.zeros_like(lake)
      rim[1:] |= lake[:-1]
      rim[:, 1:] |= lake[:, :-1]
      rim[:, :-1] |= lake[:, 1:]
      s.labels[rim & ground] = SAND
    s.labels[lake] = WATER

  # Fragmented ground for hard images: patches of other materials.
  if rng.random() < d * 1.5:
    other = {GRASS: (SAND, ROCK), SAND: (ROCK, GRASS),
             SNOW: (GRASS, ROCK)}[base]
    field = _fbm(rng, h, w, 2 + 10 * d, octaves=2, cap=False)
    thr = 1.0 - rng.uniform(0.1, 0.3) * d
    s.labels[ground & (s.labels == base) & (field > thr)] = other[
        rng.integers(2)]

  # Ponds.
  if kind in ('meadow', 'town', 'winter', 'desert'):
    for _ in range(rng.poisson(0.2 + 3 * d * (kind != 'desert'))):
      t = rng.uniform(0.1, 1.0)
      cy = h0 + t * (1 - h0)
      cx = rng.uniform(0.0, 1.0)
      ry = rng.uniform(0.02, 0.06) * size * (0.3 + t)
      rx = ry * rng.uniform(2.5, 5.0) * a
      lumps = _lumps(rng, d, 0.2)
      rim = rng.random() < 0.5
      win = _window(cy, cx, ry * 1.6, rx * 1.6, h, w)
      if win is not None:
        sy, sx = yy[win[0]], xx[:, win[1]]
        where = (base, SAND, ROCK, GRASS)
        if rim:
          s.paint(win, _blob(sy, sx, cy, cx, ry * 1.3, rx * 1.3, lumps), SAND,
                  where)
        s.paint(win, _blob(sy, sx, cy, cx, ry, rx, lumps), WATER,
                where + (SAND,))

  # A winding river: a thin structure, mostly in hard images.
  if rng.random() < 0.6 * d:
    x0 = rng.uniform(0.1, 0.9)
    amp = rng.uniform(0.05, 0.2)
    freq = rng.uniform(1.0, 3.0) * np.pi
    phase = rng.uniform(0, 2 * np.pi)
    xc = x0 + amp * depth * np.sin(freq * depth + phase)
    half = (0.004 + rng.uniform(0.01, 0.04) * depth) * a
    half = np.maximum(half, 0.5 / w)
    s.labels[ground & (np.abs(xx - xc) < half) & (s.labels != WATER)] = WATER

  # Roads converge to a vanishing point on the horizon.
  for r in range(1 + (rng.random() < d)):
    if rng.random() >= _ROAD_P[kind] + 0.3 * d - 0.3 * r:
      continue
    vx = rng.uniform(0.2, 0.8)
    xb = rng.uniform(-0.2, 1.2)
    bend = rng.uniform(-0.2, 0.2)
    width = rng.uniform(0.05, 0.16) * (1.0 - 0.65 * d)
    xc = vx + (xb - vx) * depth + bend * np.sin(np.pi * depth)
    half = np.maximum(width * depth * a, 0.5 / w)
    road = ground & (np.abs(xx - xc) < half) & (depth > 0.02)
    s.labels[road] = ROAD

  # Objects, far to near. Every random draw of an object happens before its
  # window is known, so the stream does not depend on the resolution.
  n = min(rng.poisson(1.0 + 40.0 * d**1.5), 80)
  kinds = rng.choice(4, size=n, p=_OBJECT_WEIGHTS[kind])
  ts = np.sort(rng.uniform(0.0, 1.0, size=n) ** 0.8)
  conifer_p = {'winter': 0.9, 'lake': 0.7, 'desert': 0.0}.get(kind, 0.3)
  flower_on = (GRASS,) if base != SAND else (SAND,)
  flower_field = None
  for obj, t in zip(kinds, ts):
    cy = h0 + t * (1.04 - h0)  # base of the object
    cx = rng.uniform(-0.05, 1.05)
    p = 0.15 + 0.85 * t  # perspective scale
    if obj == 0:  # tree
      ht = rng.uniform(0.15, 0.4) * p * size
      conifer = rng.random() < conifer_p
      tiers = 2 + int(6 * d * rng.random())
      trunk_half = max(ht * rng.uniform(0.03, 0.06), 0.5 / h) * a
      spread = rng.uniform(0.22, 0.32) if conifer else rng.uniform(0.8, 1.2)
      lumps = _lumps(rng, d, 0.3)
      win = _window(cy - ht / 2, cx, ht / 2 + 0.01, ht * 0.5 * a, h, w)
      if win is None:
        continue
      sy, sx = yy[win[0]], xx[:, win[1]]
      trunk = (sy >= cy - ht * 0.35) & (sy <= cy) & (np.abs(sx - cx) <
                                                      trunk_half)
      if conifer:
        top = cy - ht
        rel = (sy - top) / (ht * 0.85)
        saw = (rel * tiers) % 1.0
        half = ht * spread * rel * (0.7 + 0.3 * saw) * a
        crown = (rel >= 0) & (rel <= 1) & (np.abs(sx - cx) < half)
      else:
        ry = ht * 0.36
        crown = _blob(sy, sx, cy - ht * 0.62, cx, ry, ry * spread * a, lumps)
      s.paint(win, crown | trunk, TREE)
      s.trunk[win] &= ~crown
      s.trunk[win] |= trunk & ~crown
    elif obj == 1:  # rock
      ry = rng.uniform(0.02, 0.07) * p * size
      rx = ry * rng.uniform(1.0, 2.0) * a
      c = cy - ry * 0.5
      lumps = _lumps(rng, d, 0.3)
      win = _window(c, cx, ry * 1.5, rx * 1.5, h, w)
      if win is not None:
        sy, sx = yy[win[0]], xx[:, win[1]]
        s.paint(win, _blob(sy, sx, c, cx, ry, rx, lumps) & (sy <= cy), ROCK)
    elif obj == 2:  # building
      bh = rng.uniform(0.1, 0.32) * p * size
      bw = rng.uniform(0.4, 1.0) * bh * a
      roof = bw * rng.uniform(0.3, 0.6) if rng.random() < 0.5 else 0.0
      win = _window(cy - (bh + roof / a) / 2, cx, (bh + roof / a) / 2 + 0.01,
                    bw / 2, h, w)
      if win is None:
        continue
      sy, sx = yy[win[0]], xx[:, win[1]]
      dx = np.abs(sx - cx)
      body = (sy >= cy - bh) & (sy <= cy) & (dx < bw / 2)
      if roof:
        rt = cy - bh - roof / a  # roof tip
        rel = (sy - rt) / (roof / a)
        body |= (rel >= 0) & (rel <= 1) & (dx < bw / 2 * rel)
      s.paint(win, body, BUILDING)
      s.trunk[win] &= ~body
    else:  # flower patch: speckle on grass
      ry = rng.uniform(0.02, 0.07) * p * size
      rx = ry * rng.uniform(1.5, 3.5) * a
      density = rng.uniform(0.15, 0.5)
      lumps = _lumps(rng, d, 0.3)
      win = _window(cy, cx, ry * 1.5, rx * 1.5, h, w)
      if win is None:
        continue
      if flower_field is None:  # resolution dependent: its own stream
        flower_field = fine_rng.random((h, w), dtype=np.float32)
      sy, sx = yy[win[0]], xx[:, win[1]]
      patch = _blob(sy, sx, cy, cx, ry, rx, lumps)
      s.paint(win, patch & (flower_field[win] < density), FLOWER, flower_on)
  s.trunk &= s.labels == TREE
  return s, {'kind': kind, 'h0': h0, 'horizon': horizon, 'depth': depth}


# ---------------------------------------------------------------------------
# Rendering: one texture per class present, selected by the label map.


def _render(rng: np.random.Generator, d: float, scene: _Scene,
            info: dict) -> np.ndarray:
  """Returns float32 [H, W, 3] in [0, 1]."""
  h, w = scene.h, scene.w
  yy, xx, labels = scene.yy, scene.xx, scene.labels
  fm = (1.0 + 3.0 * d) * rng.uniform(0.85, 1.2)  # texture frequency
  k = 0.45 + 1.1 * d  # texture contrast
  speckle = rng.random((h, w), dtype=np.float32) - 0.5
  present = np.bincount(labels.ravel(), minlength=NUM_CLASSES) > 0

  def colour(base, jitter=0.07):
    c = np.asarray(base, np.float32) * (1 + jitter * rng.normal(size=3))
    return np.clip(c, 0, 1).astype(np.float32)

  if rng.random() < 0.15:  # dusk
    sky_top, sky_low = colour((0.3, 0.3, 0.6)), colour((0.95, 0.62, 0.42))
  else:
    sky_top, sky_low = colour((0.32, 0.52, 0.86)), colour((0.74, 0.85, 0.96))
  h0 = info['h0']
  image = np.zeros((h, w, 3), np.float32)

  def put(cls, tex):
    m = labels == cls
    image[m] = np.broadcast_to(tex, (h, w, 3))[m]

  def shade(base, s):
    return colour(base)[None, None, :] * s[..., None]

  max_cycles = max(h / 3, 1.0)  # stripes finer than ~3 px would alias
  if present[SKY]:
    t = np.clip(yy / h0, 0, 1) ** 1.5
    sky = sky_top * (1 - t[..., None]) + sky_low * t[..., None]
    put(SKY, sky + 0.04 * (_noise(rng, h, w, 2, 3) - 0.5)[..., None])
  if present[CLOUD]:
    s = 0.85 + 0.35 * k * (_fbm(rng, h, w, 3 * fm) - 0.5)
    put(CLOUD, colour(_BASE_COLOURS[CLOUD], 0.02) * s[..., None])
  if present[MOUNTAIN]:
    n = _fbm(rng, h, w, 4 * fm, octaves=3)
    ridged = 1.0 - np.abs(2 * n - 1)
    angle = rng.uniform(-1, 1)
    cycles = min(5 * fm, max_cycles)
    strata = np.sin(2 * np.pi * cycles * (yy + angle * xx))
    s = 0.8 + 0.6 * k * (ridged - 0.5) + 0.08 * k * strata
    rock = _MOUNTAIN_COLOURS[rng.integers(len(_MOUNTAIN_COLOURS))]
    tex = shade(rock, s)
    put(MOUNTAIN, 0.78 * tex + 0.22 * sky_low)  # aerial haze
  if present[SNOW]:
    s = 0.96 + 0.08 * k * (_noise(rng, h, w, 3 * fm, 4 * fm) - 0.5)
    put(SNOW, colour(_BASE_COLOURS[SNOW], 0.02) * s[..., None])
  if present[WATER]:
    warp = _noise(rng, h, w, 2, 4 * fm)
    cycles = min(10 * fm, max_cycles)
    ripple = np.sin(2 * np.pi * (cycles * yy + 1.5 * warp))
    near = info['depth'][..., None]
    base = colour(_BASE_COLOURS[WATER])
    tex = base * (0.85 + 0.25 * k * ripple)[..., None]
    put(WATER, tex * (0.6 + 0.4 * near) + sky_low * 0.4 * (1 - near))
  if present[GRASS]:
    blades = _noise(rng, h, w, 3 * fm, 16 * fm)
    tint = _noise(rng, h, w, 2, 3)[..., None]
    s = 0.85 + 0.45 * k * (blades - 0.5) + 0.3 * k * speckle
    dry = colour((0.55, 0.6, 0.2)) * s[..., None]  # yellowish patches
    put(GRASS, shade(_BASE_COLOURS[GRASS], s) * (1 - 0.35 * tint)
        + 0.35 * tint * dry)
  if present[TREE]:
    clump = _noise(rng, h, w, 6 * fm, 6 * fm)
    clump = np.clip((clump - 0.35) / 0.3, 0, 1)
    s = 0.6 + 0.7 * k * (clump - 0.5) + 0.15 * k * speckle
    tex = shade(_BASE_COLOURS[TREE], s)
    trunk = colour(_TRUNK_COLOUR) * (0.9 + 0.2 * speckle[..., None])
    put(TREE, np.where(scene.trunk[..., None], trunk, tex))
  if present[ROCK]:
    n = _fbm(rng, h, w, 8 * fm, octaves=2)
    cracks = 1.0 - np.abs(2 * n - 1)
    s = 0.8 + 0.7 * k * (cracks - 0.5) + 0.35 * k * speckle
    put(ROCK, shade(_BASE_COLOURS[ROCK], s))
  if present[SAND]:
    warp = _noise(rng, h, w, 2, 3)
    ang = rng.uniform(-0.6, 0.6)
    cycles = min(4 * fm, max_cycles)
    dunes = np.sin(2 * np.pi * (cycles * (yy + ang * xx) + 1.5 * warp))
    s = 0.92 + 0.1 * k * dunes + 0.15 * k * speckle
    put(SAND, shade(_BASE_COLOURS[SAND], s))
  if present[BUILDING]:
    wall = colour(_BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))])
    nx = min(14 * fm / scene.aspect, w / 3)
    ny = min(12 * fm, h / 3)
    fx = (xx * nx) % 1.0
    fy = (yy * ny) % 1.0
    windows = ((fx > 0.25) & (fx < 0.75) & (fy > 0.3) & (fy < 0.75))
    glass = colour((0.16, 0.2, 0.3))
    tex = np.where(windows[..., None], glass, wall * (0.95 + 0.1 * speckle[
        ..., None]))
    put(BUILDING, tex)
  if present[ROAD]:
    s = 0.9 + 0.5 * k * speckle + 0.1 * (_noise(rng, h, w, 3, 3) - 0.5)
    put(ROAD, shade(_BASE_COLOURS[ROAD], s))
  if present[FLOWER]:
    pick = (_noise(rng, h, w, h / 3, w / 3) * len(_FLOWER_COLOURS) * 1.6)
    pick = pick.astype(np.int64) % len(_FLOWER_COLOURS)
    put(FLOWER, _FLOWER_COLOURS[pick] * (0.9 + 0.3 * speckle[..., None]))
  image *= rng.uniform(0.85, 1.1)  # exposure
  return np.clip(image, 0.0, 1.0)


def generate(seed: int, index: int, height: int,
             width: int) -> tuple[np.ndarray, np.ndarray]:
  """Generates example `index` of the landscapes with generator seed `seed`.

  Args:
    seed: non-negative generator seed (config.data.seed).
    index: non-negative example index; the TFDS splits use disjoint ranges.
    height: H in [16, 256].
    width: W in [16, 256]; rectangular images are allowed.

  Returns:
    (labels, image): labels uint8 [H, W] with ids in [0, NUM_CLASSES), image
    uint8 [H, W, 3]. The same arguments always give the same arrays.

  Raises:
    ValueError: if the size is outside [16, 256] or seed/index are negative.
  """
  for name, v in (('height', height), ('width', width)):
    if not MIN_SIZE <= int(v) <= MAX_SIZE:
      raise ValueError(f'landscapes {name} must be in [{MIN_SIZE}, {MAX_SIZE}],'
                       f' got {v} (config.data.resolution)')
  _check_index(seed, index)
  height, width = int(height), int(width)
  rng = np.random.default_rng([seed, index])
  d = float(rng.beta(1.2, 3.0))  # first draw: equals difficulty(seed, index)
  fine_rng = np.random.default_rng([seed, index, 2])
  scene, info = _layout(rng, fine_rng, d, height, width)
  texture_rng = np.random.default_rng([seed, index, 1])
  image = _render(texture_rng, d, scene, info)
  return scene.labels, (image * 255.0 + 0.5).astype(np.uint8)


def example(seed: int, index: int, height: int, width: int) -> dict[str, np.ndarray]:
  """`generate` as a dict: {'labels': uint8 [H, W], 'image': uint8 [H, W, 3]}.

  The form the TFDS builder (`fiancee_jax.data.landscapes_tfds`) stores.
  """
  labels, image = generate(seed, index, height, width)
  return {'labels': labels, 'image': image}
