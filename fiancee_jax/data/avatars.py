"""Embedded procedural avatars: faces with separate identity and motion, for reenactment.

A face is `render(identity, motion, height, width) -> uint8 [H, W, 3]`:

* `Identity` (appearance): head shape (ellipsoid radii, jaw), skin tone, hair colour, style
  (bald, buzz, short, long, curly), hairline and fringe, hair texture frequency, eye colour,
  eye / brow / mouth / nose geometry, optional beard, accessories (glasses or sunglasses,
  hat or cap), clothes, background and the light direction.
* `Motion`: head rotation (yaw, pitch, roll), translation, and expression (mouth open,
  smile, eye blink, brow raise / frown, gaze).

The head is drawn pseudo-3D: every pixel is ray-cast (orthographically) against the head
ellipsoid, a hair shell around it and a hat shell, and the hit point is expressed in the
head's own frame. Eyes, brows, nose, mouth, glasses and beard are painted in those head
coordinates, so under yaw and pitch they shift, foreshorten and disappear behind the
silhouette; the surface normal gives Lambertian shading. Ears, neck, shoulders and long
hair behind the head are 2-D layers that follow the projected head. Edges are anti-aliased
over one pixel (coverage from an implicit function and its pixel gradient).

Because faces are procedural, cross-reenactment has ground truth: the source is
render(A, m1), the driver render(B, m2), and the target render(A, m2) (A's identity with B's
motion). `example(seed, index, H, W, cross=...)` returns such a pair:

* self pair (`cross=False`, training): source render(A, m1), driver = target render(A, m2).
* cross pair (`cross=True`, evaluation): source render(A, m1), driver render(B, m2), target
  render(A, m2).

Both also carry `swap`, the driver's motion rendered with another identity (render(B, m2)
for a self pair, render(A, m2) = target for a cross pair), so a trainer can ask the motion
code of the driver not to change when its identity is swapped.

Determinism: everything is a function of `(seed, index)` through NumPy `default_rng`
streams `[seed, index, k]`: k = 0 identity A, 1 source motion, 2 driver motion, 3 identity B.
Random draws never depend on the resolution (texture frequencies are only capped at the
Nyquist-safe limit when drawn), so the same example at 32x32 and 256x256 is the same face.
Rendering is vectorised NumPy: ~2-4 ms per 64x64 image on one CPU core.

Difficulty varies: an identity draws d_id ~ Beta(1.2, 3.0) (finer, higher-contrast hair;
more glasses, sunglasses, hats, beards; busier backgrounds), a motion draws d_m ~ Beta(1.2,
3.0) (larger yaw / pitch / roll and translation, stronger expressions).
`difficulty(seed, index)` is their mean for the source identity and the driver motion.
"""
import dataclasses

import numpy as np

MIN_SIZE, MAX_SIZE = 32, 256
# Bump when the output of `render` or `example` changes: the TFDS builder's version is this.
GENERATOR_VERSION = '1.0.0'
HAIR_STYLES = ('bald', 'buzz', 'short', 'long', 'curly')
_HAIR_STYLE_P = (0.08, 0.15, 0.35, 0.27, 0.15)
# Streams of default_rng([seed, index, stream]).
IDENTITY_A, SOURCE_MOTION, DRIVER_MOTION, IDENTITY_B = 0, 1, 2, 3

_SKIN = np.array([(0.96, 0.80, 0.69), (0.91, 0.72, 0.58), (0.80, 0.60, 0.45),
                  (0.66, 0.46, 0.32), (0.50, 0.34, 0.24), (0.36, 0.24, 0.17)], np.float32)
_HAIR = np.array([(0.08, 0.07, 0.07), (0.25, 0.16, 0.10), (0.45, 0.30, 0.17),
                  (0.55, 0.25, 0.12), (0.85, 0.72, 0.45), (0.70, 0.70, 0.70),
                  (0.20, 0.30, 0.75), (0.85, 0.35, 0.60)], np.float32)
_HAIR_P = (0.24, 0.24, 0.17, 0.1, 0.12, 0.07, 0.03, 0.03)
_IRIS = np.array([(0.35, 0.2, 0.1), (0.25, 0.45, 0.75), (0.3, 0.55, 0.3),
                  (0.5, 0.5, 0.55), (0.55, 0.45, 0.2)], np.float32)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Appearance of one avatar; lengths in units where the image height spans 2."""
  difficulty: float  # d_id in [0, 1]
  radii: np.ndarray  # float32 [3] head ellipsoid (x, y, z)
  jaw: float  # jaw ellipsoid width / head width: smaller = narrower chin
  skin: np.ndarray  # float32 [3] RGB in [0, 1]
  hair: np.ndarray  # float32 [3]
  hair_style: str  # one of HAIR_STYLES
  hairline: float  # front hairline height on the unit head sphere
  fringe: float  # how far bangs come down at the centre
  parting: float  # x of the parting on the unit sphere
  hair_cycles: float  # strand stripes around the head (before the resolution cap)
  hair_contrast: float
  hair_noise: np.ndarray  # float32 [9, 17] lattice (strand wobble / curls)
  iris: np.ndarray  # float32 [3]
  eyes: np.ndarray  # float32 [4] (x offset, y, x radius, y radius) on the unit sphere
  brow: np.ndarray  # float32 [3] (thickness, half width, curvature)
  brow_colour: np.ndarray  # float32 [3]
  mouth: np.ndarray  # float32 [3] (y, half width, lip thickness)
  lips: np.ndarray  # float32 [3]
  nose: float  # nose length
  blush: float
  beard: float  # 0 = none, else beard density
  glasses: int  # 0 none, 1 clear, 2 sunglasses
  frame: np.ndarray  # float32 [3] glasses frame colour
  hat: int  # 0 none, 1 brimmed hat, 2 cap (front visor)
  hat_colour: np.ndarray  # float32 [3]
  clothes: np.ndarray  # float32 [3]
  background: np.ndarray  # float32 [2, 3] gradient colours
  bg_angle: float
  bg_pattern: int  # 0 gradient, 1 blobs, 2 stripes
  bg_cycles: float
  bg_noise: np.ndarray  # float32 [7, 7] lattice
  skin_noise: np.ndarray  # float32 [9, 9] lattice
  light: np.ndarray  # float32 [3] unit light direction (camera frame)


@dataclasses.dataclass(frozen=True)
class Motion:
  """Pose and expression; angles in radians, translation in image half-heights."""
  difficulty: float  # d_m in [0, 1]
  yaw: float  # + turns the face to the viewer's right
  pitch: float  # + looks up
  roll: float  # + tilts counter-clockwise on screen
  tx: float  # + right
  ty: float  # + up
  mouth_open: float  # [0, 1]
  smile: float  # [-1, 1]
  blink: float  # [0, 1], 1 = closed
  brow: float  # [-1, 1]: + raised, - frown
  gaze: np.ndarray  # float32 [2] (x, y) in [-1, 1]

  def as_array(self) -> np.ndarray:
    """float32 [11]: yaw, pitch, roll, tx, ty, mouth_open, smile, blink, brow, gaze x, y."""
    return np.array([self.yaw, self.pitch, self.roll, self.tx, self.ty, self.mouth_open,
                     self.smile, self.blink, self.brow, *self.gaze], np.float32)


def _check_index(seed: int, index: int) -> None:
  if int(seed) < 0 or int(index) < 0:
    raise ValueError(f'seed and index must be non-negative integers, got seed={seed}, '
                     f'index={index}')


def _check_size(height: int, width: int) -> None:
  for name, v in (('height', height), ('width', width)):
    if not MIN_SIZE <= int(v) <= MAX_SIZE:
      raise ValueError(f'avatars {name} must be in [{MIN_SIZE}, {MAX_SIZE}], got {v} '
                       f'(config.data.resolution)')


def _colour(rng: np.random.Generator, base, jitter: float = 0.06) -> np.ndarray:
  c = np.asarray(base, np.float32) * (1 + jitter * rng.normal(size=3))
  return np.clip(c, 0, 1).astype(np.float32)


def sample_identity(seed: int, index: int, stream: int = IDENTITY_A) -> Identity:
  """Draws the identity of stream `stream` of example `index` (see module docstring)."""
  _check_index(seed, index)
  rng = np.random.default_rng([int(seed), int(index), int(stream)])
  d = float(rng.beta(1.2, 3.0))  # first draw
  a = rng.uniform(0.41, 0.5)
  radii = np.array([a, a * rng.uniform(1.18, 1.36), a * rng.uniform(1.0, 1.2)], np.float32)
  skin = _colour(rng, _SKIN[rng.integers(len(_SKIN))], 0.04)
  hair = _colour(rng, _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)], 0.08)
  style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_P)]
  glasses = 0
  if rng.random() < 0.1 + 0.5 * d:
    glasses = 2 if rng.random() < 0.3 else 1
  hat = 0
  if rng.random() < 0.05 + 0.35 * d:
    hat = 1 if rng.random() < 0.5 else 2
  light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.1, 0.6), 1.0], np.float32)
  bg0 = _colour(rng, rng.uniform(0.15, 0.95, size=3), 0.0)
  return Identity(
      difficulty=d,
      radii=radii,
      jaw=float(rng.uniform(0.68, 0.95)),
      skin=skin,
      hair=hair,
      hair_style=style,
      hairline=float(rng.uniform(0.3, 0.55)),
      fringe=float(rng.uniform(0.0, 0.4) if rng.random() < 0.4 else 0.0),
      parting=float(rng.uniform(-0.5, 0.5)),
      hair_cycles=float((8 + 70 * d) * rng.uniform(0.8, 1.25)),
      hair_contrast=float(0.12 + 0.5 * d),
      hair_noise=rng.random((9, 17), dtype=np.float32),
      iris=_colour(rng, _IRIS[rng.integers(len(_IRIS))], 0.1),
      eyes=np.array([rng.uniform(0.3, 0.4), rng.uniform(0.08, 0.2), rng.uniform(0.11, 0.15),
                     rng.uniform(0.055, 0.075)], np.float32),
      brow=np.array([rng.uniform(0.03, 0.06), rng.uniform(0.12, 0.17),
                     rng.uniform(0.0, 0.04)], np.float32),
      brow_colour=np.clip(hair * rng.uniform(0.6, 0.9), 0, 1).astype(np.float32),
      mouth=np.array([rng.uniform(-0.58, -0.46), rng.uniform(0.17, 0.27),
                      rng.uniform(0.015, 0.035)], np.float32),
      lips=np.clip(skin * np.array([1.0, 0.62, 0.62]) * rng.uniform(0.8, 1.0), 0,
                   1).astype(np.float32),
      nose=float(rng.uniform(0.14, 0.24)),
      blush=float(rng.uniform(0.0, 0.35)),
      beard=float(rng.uniform(0.4, 0.9) if rng.random() < 0.06 + 0.2 * d else 0.0),
      glasses=glasses,
      frame=_colour(rng, rng.uniform(0.0, 0.6, size=3), 0.0),
      hat=hat,
      hat_colour=_colour(rng, rng.uniform(0.05, 0.9, size=3), 0.0),
      clothes=_colour(rng, rng.uniform(0.05, 0.95, size=3), 0.0),
      background=np.stack([bg0, _colour(rng, bg0 * rng.uniform(0.5, 1.3), 0.15)]),
      bg_angle=float(rng.uniform(0, 2 * np.pi)),
      bg_pattern=int(rng.choice(3, p=(0.5 - 0.3 * d, 0.35, 0.15 + 0.3 * d))),
      bg_cycles=float(3 + 25 * d * rng.random()),
      bg_noise=rng.random((7, 7), dtype=np.float32),
      skin_noise=rng.random((9, 9), dtype=np.float32),
      light=light / np.linalg.norm(light),
  )


def sample_motion(seed: int, index: int, stream: int) -> Motion:
  """Draws the motion of stream `stream` (SOURCE_MOTION or DRIVER_MOTION) of `index`."""
  _check_index(seed, index)
  rng = np.random.default_rng([int(seed), int(index), int(stream)])
  d = float(rng.beta(1.2, 3.0))  # first draw
  u = rng.uniform(-1, 1, size=5)
  return Motion(
      difficulty=d,
      yaw=float(u[0] * (0.15 + 0.75 * d)),
      pitch=float(u[1] * (0.08 + 0.35 * d)),
      roll=float(u[2] * (0.05 + 0.3 * d)),
      tx=float(u[3] * (0.03 + 0.12 * d)),
      ty=float(u[4] * (0.02 + 0.08 * d)),
      mouth_open=float(np.clip(rng.uniform(-0.4, 1.0) * (0.5 + 0.5 * d), 0, 1)),
      smile=float(rng.uniform(-1, 1) * (0.4 + 0.6 * d)),
      blink=float(0.0 if rng.random() < 0.75 else rng.uniform(0.3, 1.0)),
      brow=float(rng.uniform(-1, 1) * (0.3 + 0.7 * d)),
      gaze=rng.uniform(-0.6, 0.6, size=2).astype(np.float32),
  )


def difficulty(seed: int, index: int) -> float:
  """Mean of the source identity's and the driver motion's difficulty, in [0, 1]."""
  _check_index(seed, index)
  d_id = np.random.default_rng([int(seed), int(index), IDENTITY_A]).beta(1.2, 3.0)
  d_m = np.random.default_rng([int(seed), int(index), DRIVER_MOTION]).beta(1.2, 3.0)
  return float(0.5 * (d_id + d_m))


# ---------------------------------------------------------------------------
# Rendering helpers. Arrays are float32 [H, W] unless said otherwise.


def _cover(g: np.ndarray) -> np.ndarray:
  """Coverage in [0, 1] of the region g < 0, anti-aliased over one pixel.

  The implicit function is divided by its pixel gradient, giving a signed distance in
  pixels near the boundary; works for any smooth g, in any coordinates.
  """
  if min(g.shape) < 2:  # np.gradient needs two samples per axis
    return (g < 0).astype(np.float32)
  gy, gx = np.gradient(g)
  return np.clip(0.5 - g / (np.sqrt(gx * gx + gy * gy) + 1e-6), 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry) -> np.ndarray:
  """Implicit function of an ellipse: < 0 inside."""
  return np.sqrt(((x - cx) / rx)**2 + ((y - cy) / ry)**2) - 1.0


def _lattice(lattice: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Smooth value noise: samples a [cy + 1, cx + 1] lattice at u, v in [0, 1] (clamped)."""
  cy, cx = lattice.shape[0] - 1, lattice.shape[1] - 1
  x = np.clip(u, 0.0, 1.0) * cx
  y = np.clip(v, 0.0, 1.0) * cy
  i = np.minimum(x.astype(np.int64), cx - 1)
  j = np.minimum(y.astype(np.int64), cy - 1)
  fx, fy = x - i, y - j
  fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
  top = lattice[j, i] * (1 - fx) + lattice[j, i + 1] * fx
  bottom = lattice[j + 1, i] * (1 - fx) + lattice[j + 1, i + 1] * fx
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  """float64 [3, 3] head frame -> camera frame (x right, y up, z towards the viewer)."""
  cy, sy = np.cos(yaw), np.sin(yaw)
  cp, sp = np.cos(pitch), np.sin(pitch)
  cr, sr = np.cos(roll), np.sin(roll)
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
  return rz @ ry @ rx


class _Hit:
  """Orthographic ray-cast of an ellipsoid of the head, per pixel.

  The ellipsoid has `radii` and sits at `offset` in the head frame; the head frame sits at
  `centre` (camera frame) rotated by `rot`. Attributes: alpha (anti-aliased coverage), z
  (camera depth of the front hit, towards the viewer), p (hit point in the head frame,
  relative to the head's origin), s (hit point on this ellipsoid's unit sphere) and the
  camera-frame unit normal.
  """

  def __init__(self, x, y, centre, radii, rot, offset=(0.0, 0.0, 0.0)):
    inv = 1.0 / np.asarray(radii, np.float64)**2
    a = (rot * inv) @ rot.T  # x^T A x = 1 in camera coordinates
    c0 = np.asarray(centre) + rot @ np.asarray(offset)
    qx, qy = x - c0[0], y - c0[1]
    b = a[0, 2] * qx + a[1, 2] * qy
    c = a[0, 0] * qx * qx + 2 * a[0, 1] * qx * qy + a[1, 1] * qy * qy - 1.0
    disc = b * b - a[2, 2] * c  # = a_zz (1 - f), f the projected ellipse's form
    f = 1.0 - disc / a[2, 2]
    self.alpha = _cover(np.sqrt(np.maximum(f, 0.0)) - 1.0)
    dz = (-b + np.sqrt(np.maximum(disc, 0.0))) / a[2, 2]
    self.z = (dz + c0[2]).astype(np.float32)
    local = np.stack([qx, qy, dz], axis=-1) @ rot  # rot^T q per pixel: head frame
    self.p = (local + np.asarray(offset)).astype(np.float32)
    self.s = (local / np.asarray(radii)).astype(np.float32)
    n = (local * inv) @ rot.T
    self.normal = (n / (np.linalg.norm(n, axis=-1, keepdims=True) + 1e-9)).astype(np.float32)


def _window(x: np.ndarray, y: np.ndarray, centre, radii, rot) -> tuple[slice, slice]:
  """Pixel window around the projection of an ellipsoid at `centre` (2 px margin)."""
  cov = (rot * np.asarray(radii, np.float64)**2) @ rot.T  # A^-1: extents are sqrt(diag)
  hx, hy = np.sqrt(cov[0, 0]), np.sqrt(cov[1, 1])
  xs, ys = x[0], y[:, 0]
  cols = np.flatnonzero(np.abs(xs - centre[0]) <= hx + 2.5 * (xs[1] - xs[0]))
  rows = np.flatnonzero(np.abs(ys - centre[1]) <= hy + 2.5 * (ys[0] - ys[1]))
  if not len(cols) or not len(rows):
    return slice(0, 0), slice(0, 0)
  return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _over(image: np.ndarray, colour, alpha: np.ndarray) -> None:
  """In place: image = image * (1 - alpha) + colour * alpha; colour [3] or [H, W, 3]."""
  a = alpha[..., None]
  image *= 1.0 - a
  image += a * colour


def _background(ident: Identity, x, y, h) -> np.ndarray:
  ang = ident.bg_angle
  t = np.clip(0.5 + 0.35 * (x * np.cos(ang) + y * np.sin(ang)), 0, 1)[..., None]
  img = ident.background[0] * (1 - t) + ident.background[1] * t
  u, v = (x + 2) / 4, (y + 1) / 2
  n = _lattice(ident.bg_noise, u, v)
  if ident.bg_pattern == 1:  # soft blobs
    img = img * (0.8 + 0.4 * n[..., None])
  elif ident.bg_pattern == 2:  # stripes, up to the Nyquist-safe frequency
    cycles = min(ident.bg_cycles, h / 6.0)
    s = np.sin(2 * np.pi * cycles * (x * np.sin(ang) - y * np.cos(ang)) / 2 + 4 * n)
    img = img * (0.85 + 0.15 * s[..., None])
  return img.astype(np.float32)


def _hair_texture(ident: Identity, s: np.ndarray, h: int) -> np.ndarray:
  """RGB [H, W, 3] of hair at unit-sphere points s [H, W, 3] (strands or curls)."""
  lon = np.arctan2(s[..., 0], s[..., 2])
  u, v = lon / (2 * np.pi) + 0.5, (s[..., 1] + 1) / 2
  wobble = _lattice(ident.hair_noise, u, v)
  # The front half of the head spans ~radius * h pixels: keep stripes >= ~3 px wide.
  cycles = min(ident.hair_cycles, ident.radii[0] * h * np.pi / 3.5)
  if ident.hair_style == 'curly':
    curls = np.sin(cycles * 0.5 * (lon + 0.5 * np.sin(9 * v * np.pi)) + 6 * wobble)
    curls = curls * np.sin(cycles * 0.25 * np.pi * v + 5 * wobble)
    t = 0.5 + 0.5 * curls
  else:
    t = 0.5 + 0.5 * np.sin(cycles * lon + 5 * wobble)
  shade = 1.0 + ident.hair_contrast * (t - 0.5) * 1.6
  return (ident.hair * shade[..., None]).astype(np.float32)


def _shade(normal: np.ndarray, light: np.ndarray) -> np.ndarray:
  lam = np.maximum(normal @ light, 0.0)
  return (0.5 + 0.55 * lam).astype(np.float32)


def _paint_face(ident: Identity, mo: Motion, img: np.ndarray, s: np.ndarray) -> None:
  """Paints the features on the face layer `img` [h, w, 3] in place.

  `s` [h, w, 3] is the head-frame point of each pixel divided by the head radii (about the
  unit sphere), so features follow the head's rotation.
  """
  sx, sy, sz = s[..., 0], s[..., 1], s[..., 2]
  front = np.clip(sz * 8.0, 0.0, 1.0)  # features live on the front of the head
  # Skin detail and cheeks.
  img *= (0.96 + 0.08 * _lattice(ident.skin_noise, (sx + 1) / 2, (sy + 1) / 2))[..., None]
  for side in (-1, 1):
    blob = np.clip(-_ellipse(sx, sy, side * 0.5, -0.28, 0.2, 0.14), 0, 1)
    _over(img, np.array([0.9, 0.35, 0.35], np.float32), 0.5 * ident.blush * blob * front)
  # Beard (textured, below the mouth line and along the jaw).
  if ident.beard > 0:
    g = np.maximum(ident.mouth[0] + 0.12 - sy, 0) * 4 + np.maximum(np.abs(sx) - 0.85, 0) * 10
    stubble = _lattice(ident.hair_noise, (sx + 1) / 2, (sy + 1) / 2)
    a = np.clip(g, 0, 1) * ident.beard * (0.6 + 0.4 * stubble) * front
    _over(img, ident.hair * 0.8, a)
  # Nose: shadow on the side away from the light, nostrils.
  side = -np.sign(ident.light[0]) or 1.0
  nose_y = ident.eyes[1] - 0.05 - ident.nose / 2
  a = _cover(_ellipse(sx, sy, side * 0.045, nose_y, 0.05, ident.nose / 2)) * 0.25
  _over(img, ident.skin * 0.55, a * front)
  for s_ in (-1, 1):
    a = _cover(_ellipse(sx, sy, s_ * 0.055, nose_y - ident.nose / 2, 0.035, 0.018))
    _over(img, ident.skin * 0.35, 0.8 * a * front)
  # Mouth: lips and an opening whose height and curve follow the expression.
  my, mw, lip = ident.mouth
  mw = mw * (1 + 0.15 * mo.smile)
  t = np.clip(sx / mw, -1.0, 1.0)
  inside_x = np.abs(sx) / mw - 1.0
  height = (0.01 + 0.17 * mo.mouth_open) * (1 - t * t)
  centre = my + 0.09 * mo.smile * (t * t - 0.35) - height / 2
  lips = np.maximum(np.abs(sy - centre) - height / 2 - lip * np.sqrt(1 - t * t) - 0.004,
                    inside_x * 0.1)
  _over(img, ident.lips, _cover(lips) * front)
  opening = np.maximum(np.abs(sy - centre) - height / 2, inside_x * 0.1)
  mouth_in = _cover(opening) * front
  _over(img, np.array([0.3, 0.06, 0.08], np.float32), mouth_in)
  if mo.mouth_open > 0.15:
    teeth = np.maximum(np.abs(sy - (centre + height * 0.32)) - height * 0.18, inside_x * 0.1)
    _over(img, np.array([0.95, 0.93, 0.88], np.float32), _cover(teeth) * mouth_in)
  # Eyes: sclera, iris (gaze), pupil, lash line; blink closes the lids.
  ex, ey, erx, ery = ident.eyes
  open_ = max(1.0 - mo.blink, 0.0)
  for s_ in (-1, 1):
    cx = s_ * ex
    lid = ery * max(open_, 0.08)
    sclera = _cover(_ellipse(sx, sy, cx, ey, erx, lid))
    if open_ > 0.05:
      _over(img, np.array([0.96, 0.95, 0.93], np.float32), sclera * front)
      ix = cx + mo.gaze[0] * erx * 0.45
      iy = ey + mo.gaze[1] * ery * 0.3
      iris = _cover(_ellipse(sx, sy, ix, iy, ery * 0.95, ery * 0.95)) * sclera
      _over(img, ident.iris, iris * front)
      pupil = _cover(_ellipse(sx, sy, ix, iy, ery * 0.42, ery * 0.42)) * sclera
      _over(img, np.array([0.03, 0.03, 0.03], np.float32), pupil * front)
    # Upper lash line: a band on the top edge of the opening (all of it when closed).
    edge = np.abs(_ellipse(sx, sy, cx, ey, erx, lid)) * lid - 0.008
    lash = np.maximum(edge, ey - sy - (0.0 if open_ > 0.05 else lid))
    _over(img, np.array([0.08, 0.05, 0.05], np.float32), 0.9 * _cover(lash) * front)
    # Brows: raised or lowered, inner ends pulled down by a frown.
    bt, bw, curve = ident.brow
    dx = (sx - cx) / bw
    inner = np.clip(-s_ * dx, 0, 1)  # 1 at the inner end
    by = (ey + 0.16 + 0.06 * mo.brow + curve * (1 - dx * dx)
          + 0.05 * min(mo.brow, 0.0) * inner)
    brow = np.maximum(np.abs(sy - by) - bt * (1 - 0.5 * np.abs(dx)), (np.abs(dx) - 1) * bw)
    _over(img, ident.brow_colour, _cover(brow) * front)
  # Glasses: rectangular-ish rims (superellipse) around the eyes, lenses, bridge, temples.
  if ident.glasses:
    rw, rh, th = erx * 1.5, ery * 2.6, 0.018
    for s_ in (-1, 1):
      cx = s_ * ex
      r = (np.abs((sx - cx) / rw)**4 + np.abs((sy - ey) / rh)**4)**0.25
      lens = _cover(r - 1.0) * front
      tint = (0.85, np.array([0.05, 0.05, 0.08], np.float32)) if ident.glasses == 2 else (
          0.12, np.array([0.8, 0.9, 1.0], np.float32))
      _over(img, tint[1], tint[0] * lens)
      _over(img, ident.frame, _cover(np.abs(r - 1.0) * rh - th) * front)
      temple = np.maximum(np.abs(sy - ey - rh * 0.5) - th * 0.6,
                          np.maximum(cx + s_ * rw - sx, sx - (cx + s_ * 0.9)) * s_)
      _over(img, ident.frame, _cover(temple) * np.clip(sz * 8 + 0.5, 0, 1))
    bridge = np.maximum(np.abs(sy - ey - rh * 0.3) - th * 0.7, np.abs(sx) - (ex - rw) - 0.01)
    _over(img, ident.frame, _cover(bridge) * front)


def _hair_mask(ident: Identity, s: np.ndarray) -> np.ndarray:
  """Implicit function (< 0 = hair) on the hair shell's unit-sphere points s."""
  sx, sy, sz = s[..., 0], s[..., 1], s[..., 2]
  back = {'bald': 0.0, 'buzz': -0.1, 'short': -0.25, 'long': -0.75, 'curly': -0.45}[
      ident.hair_style]
  front_line = ident.hairline - ident.fringe * np.exp(-((sx - 0.3 * ident.parting) / 0.45)**2)
  w = np.clip(0.5 - 0.5 * sz, 0.0, 1.0)  # 0 at the face, 1 at the back
  line = front_line * (1 - w) + back * w
  # Sides: hair reaches down to the ears / shoulders.
  side = np.clip(np.abs(sx) - 0.75, 0, 1) * 4.0
  line = line - side * (line - back) * np.clip(1 - sz, 0, 1)
  g = line - sy
  if ident.hair_style in ('short', 'long'):
    # The parting: a gap ~1/30 of the head wide, on the front half of the top.
    gap = -0.02 * np.minimum(np.abs(sx - ident.parting) * 60, 1.0)
    g = np.where(sz > 0.3, np.maximum(g, gap), g)
  return g


def render(identity: Identity, motion: Motion, height: int, width: int) -> np.ndarray:
  """Renders `identity` with `motion`.

  Args:
    identity: appearance (sample_identity).
    motion: pose and expression (sample_motion).
    height: H in [32, 256].
    width: W in [32, 256]; x spans [-W/H, W/H] so faces keep their proportions.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: if the size is outside [32, 256].
  """
  _check_size(height, width)
  h, w = int(height), int(width)
  ident, mo = identity, motion
  y = (1.0 - (np.arange(h, dtype=np.float32) + 0.5) * (2.0 / h))[:, None] * np.ones(
      (1, w), np.float32)
  x = (((np.arange(w, dtype=np.float32) + 0.5) * (2.0 / h)) - w / h)[None, :] * np.ones(
      (h, 1), np.float32)
  rot = _rotation(mo.yaw, mo.pitch, mo.roll)
  radii = ident.radii
  centre = np.array([mo.tx, 0.12 + mo.ty, 0.0])
  img = _background(ident, x, y, h)
  # Shoulders and clothes.
  shoulders = _cover(_ellipse(x, y, 0.6 * mo.tx, -1.12, 1.0, 0.45))
  _over(img, ident.clothes * (0.85 + 0.15 * np.clip(y + 1.2, 0, 1))[..., None], shoulders)
  # Long hair falling behind the head (2-D, follows the projected head and its roll).
  cr, sr = np.cos(mo.roll), np.sin(mo.roll)
  lx = cr * (x - centre[0]) + sr * (y - centre[1])
  ly = -sr * (x - centre[0]) + cr * (y - centre[1])
  if ident.hair_style in ('long', 'curly'):
    length = 1.1 if ident.hair_style == 'long' else 0.6
    half = radii[0] * (1.25 if ident.hair_style == 'long' else 1.35)
    wave = 0.04 * np.sin(lx / half * 7 + 3 * ident.parting)
    g = np.maximum(np.abs(lx) / half - 1.0, (-length + wave - ly) * 3)
    g = np.maximum(g, ly - 0.2 * radii[1])
    fake_s = np.stack([lx / half, 0.5 * ly, np.full_like(lx, -0.5)], axis=-1)
    _over(img, _hair_texture(ident, fake_s, h) * 0.8, _cover(g))
  # Neck.
  neck_w = radii[0] * 0.55
  neck = np.maximum(np.abs(lx) - neck_w, ly + 0.1 * radii[1])
  neck = np.maximum(neck, -ly - 1.3)
  _over(img, ident.skin * 0.72, _cover(neck))
  # Ears: 2-D ovals at the projected ear anchors, wider when seen from the side.
  for s_ in (-1, 1):
    anchor = rot @ np.array([s_ * radii[0] * 0.98, -0.05 * radii[1], -0.05 * radii[2]])
    facing = float((rot @ np.array([s_, 0.0, 0.0]))[2])
    if facing > -0.6:
      ew = 0.05 + 0.07 * max(facing, 0.0) + 0.02
      ear = _cover(_ellipse(x, y, centre[0] + anchor[0] + s_ * 0.02 * (1 - abs(facing)),
                            centre[1] + anchor[1], ew, 0.11 * radii[1] / 0.55))
      _over(img, ident.skin * (0.75 + 0.2 * max(facing, 0.0)), ear)
  # Head: face ellipsoid, hair shell, hat; each drawn in its own window (the bounding box of
  # its projection), depth-tested where they overlap.
  # The face is the union of a cranium and a narrower jaw ellipsoid (front-most hit wins).
  a_, b_, c_ = radii
  win = _window(x, y, centre, radii * 1.05, rot)
  cran = _Hit(x[win], y[win], centre, (a_, 0.88 * b_, c_), rot, (0, 0.12 * b_, 0))
  jaw = _Hit(x[win], y[win], centre, (ident.jaw * a_, 0.58 * b_, 0.9 * c_), rot,
             (0, -0.42 * b_, 0.04 * c_))
  zc = np.where(cran.alpha > 0, cran.z, -9.0)
  zj = np.where(jaw.alpha > 0, jaw.z, -9.0)
  # Blend the two surfaces over a short depth range so the seam does not show as a crease.
  t = np.clip(0.5 + (zj - zc) / (0.35 * c_), 0.0, 1.0)[..., None]
  face_alpha = np.maximum(cran.alpha, jaw.alpha)
  normal = cran.normal * (1 - t) + jaw.normal * t
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-9
  face_img = (ident.skin[None, None, :] * _shade(normal, ident.light)[..., None])
  face_img = face_img.astype(np.float32)
  _paint_face(ident, mo, face_img, (cran.p * (1 - t) + jaw.p * t) / radii)
  _over(img[win], face_img, face_alpha)
  depth = np.full((h, w), -9.0, np.float32)  # camera z of the front-most head surface
  depth[win] = np.where(face_alpha > 0.5, np.maximum(zc, zj), -9.0)
  if ident.hair_style != 'bald':
    vol = {'buzz': 0.02, 'short': 0.08, 'long': 0.09, 'curly': 0.2}[ident.hair_style]
    shell_radii = np.array([a_, 0.88 * b_, c_]) * (1 + vol)
    win = _window(x, y, centre, radii * (1 + vol) * 1.05, rot)
    shell = _Hit(x[win], y[win], centre, shell_radii, rot, (0, 0.12 * b_, 0))
    hair_a = shell.alpha * _cover(_hair_mask(ident, shell.s))
    tex = _hair_texture(ident, shell.s, h) * _shade(shell.normal, ident.light)[..., None]
    _over(img[win], tex, hair_a)
    depth[win] = np.where(hair_a > 0.5, np.maximum(depth[win], shell.z), depth[win])
  if ident.hat:
    top = 0.45 if ident.hat == 1 else 0.5
    hat_radii = np.array([a_, 0.88 * b_, c_]) * 1.12 + np.array([0, 0.04, 0])
    rb = radii[0] * (1.5 if ident.hat == 1 else 1.3)
    win = _window(x, y, centre, np.maximum(hat_radii * 1.15, [rb, 0, rb]), rot)
    xw, yw = x[win], y[win]
    hat = _Hit(xw, yw, centre, hat_radii, rot, (0, 0.12 * b_, 0))
    crown = hat.alpha * _cover((top - hat.s[..., 1]) * 3)
    col = ident.hat_colour * _shade(hat.normal, ident.light)[..., None]
    _over(img[win], col, crown)
    # Brim: a disc (hat) or a front half-disc (cap) in the head's horizontal plane; seen
    # edge-on it keeps a minimum thickness (|n_z| >= 0.08).
    n = rot @ np.array([0.0, 1.0, 0.0])
    p0 = centre + rot @ np.array([0.0, top * hat_radii[1] + 0.12 * b_, 0.0])
    nz = n[2] if abs(n[2]) > 0.08 else np.copysign(0.08, n[2] if n[2] else 1.0)
    z = p0[2] - (n[0] * (xw - p0[0]) + n[1] * (yw - p0[1])) / nz
    q = np.stack([xw - p0[0], yw - p0[1], z - p0[2]], axis=-1) @ rot
    brim = np.sqrt(q[..., 0]**2 + q[..., 2]**2) / rb - 1.0
    if ident.hat == 2:
      brim = np.maximum(brim, -q[..., 2] / rb)
    in_front = np.clip((z - depth[win]) * 40, 0, 1)
    _over(img[win], ident.hat_colour * 0.8, _cover(brim) * in_front)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def example(seed: int, index: int, height: int, width: int, *,
            cross: bool) -> dict[str, np.ndarray]:
  """Example `index`: a self pair (`cross=False`) or a cross pair (`cross=True`).

  Args:
    seed: non-negative generator seed (config.data.seed).
    index: non-negative example index; the TFDS splits use disjoint ranges.
    height: H in [32, 256].
    width: W in [32, 256].
    cross: False: source render(A, m1), driver = target render(A, m2); True: source
      render(A, m1), driver render(B, m2), target render(A, m2).

  Returns:
    {'source', 'driver', 'target', 'swap': uint8 [H, W, 3], 'cross': bool []}; `swap` is the
    driver's motion with another identity (render(B, m2) for self pairs, the target for cross
    pairs). The same arguments always give the same arrays.

  Raises:
    ValueError: size outside [32, 256] or a negative seed / index.
  """
  _check_size(height, width)
  _check_index(seed, index)
  a = sample_identity(seed, index, IDENTITY_A)
  b = sample_identity(seed, index, IDENTITY_B)
  m1 = sample_motion(seed, index, SOURCE_MOTION)
  m2 = sample_motion(seed, index, DRIVER_MOTION)
  source = render(a, m1, height, width)
  a_m2 = render(a, m2, height, width)
  b_m2 = render(b, m2, height, width)
  if cross:
    return {'source': source, 'driver': b_m2, 'target': a_m2, 'swap': a_m2,
            'cross': np.bool_(True)}
  return {'source': source, 'driver': a_m2, 'target': a_m2, 'swap': b_m2,
          'cross': np.bool_(False)}
