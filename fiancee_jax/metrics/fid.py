"""FID (Heusel et al., NeurIPS 2017) with pytorch-fid's Inception in Flax linen, weights from .npz.

FID compares two image sets through the 2048-d pool3 features of the Inception-v3 that TF's
original FID used (graph `inception-2015-12-05`), as pytorch-fid ports it: torchvision's
`Inception3` with the FID patches (`FIDInceptionA/C/E_1`: 3x3 average pools that leave the
zero padding out of the mean; `FIDInceptionE_2`: a 3x3 max pool in the last block), every conv
a `BasicConv2d` (conv without bias, BatchNorm eps 1e-3 with stored statistics, ReLU). Inputs
are resized bilinearly to 299x299 (`F.interpolate(align_corners=False)`, no antialiasing)
before the stem. FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over the features'
means and covariances, computed like pytorch-fid's `calculate_frechet_distance`.

Weights come from ONE .npz file made once, with torch, from pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (nothing in fiancee_jax imports torch):

  pip install torch
  URL=https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights
  wget $URL/pt_inception-2015-12-05-6726825d.pth
  python scripts/convert_fid_weights.py --pth=pt_inception-2015-12-05-6726825d.pth \
      --output=weights/fid_inception.npz

Its keys keep the PyTorch names and layouts; `npz_shapes()` is the layout as data:

  key                            dtype    shape           what
  'format_version'               int32    []              NPZ_FORMAT_VERSION (1)
  'source_sha256'                str      []              optional: sha256 of the .pth
  '{conv}.conv.weight'           float32  [O, I, kh, kw]  (OIHW), no bias
  '{conv}.bn.weight', '.bias'    float32  [O]             BatchNorm gamma, beta
  '{conv}.bn.running_mean/_var'  float32  [O]             BatchNorm statistics

for the 94 convs `{conv}` in `conv_specs()` ('Conv2d_1a_3x3', ..., 'Mixed_7c.branch_pool').
`load_params` checks every key, shape and value and returns the flax variables of
`InceptionV3` (kernels OIHW -> HWIO). FIDs are comparable with pytorch-fid's only with the
converted official weights (any other weights give numbers unrelated to published FIDs), and
only up to float32 rounding in the features; the layers are tested against a NumPy
re-implementation of PyTorch's ops, not against torch itself. pytorch-fid reads 8-bit PNGs:
quantise generated images the same way (`round((x + 1) * 127.5) / 127.5 - 1`) to match it.

Usage:

  feature_fn = fid.make_feature_fn(fid.load_params('weights/fid_inception.npz'))
  value = fid.fid(feature_fn, real_images, fake_images)  # float [N, H, W, 3] in [-1, 1]

Use >= 2048 images per set (fewer make the 2048x2048 covariance singular and FID biased
upwards); published FIDs use 10k or 50k.
"""
import dataclasses
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy import linalg

NPZ_FORMAT_VERSION = 1
FEATURE_DIM = 2048
INPUT_SIDE = 299  # pytorch-fid resizes every input to 299x299
MIN_SIDE = 75  # the smallest input the stem and reductions leave a 1x1 map for
BN_EPS = 1e-3
OFFICIAL_WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
CONVERT_HINT = (
    'Make it once with `pip install torch` and `python scripts/convert_fid_weights.py '
    f'--pth={OFFICIAL_WEIGHTS} --output=FILE.npz` (see that script\'s docstring)')
_METADATA = ('format_version', 'source_sha256')
_BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var')


class WeightsFileNotFoundError(FileNotFoundError, ValueError):
  """No weights file at the path; a FileNotFoundError (as for LPIPS) and a ValueError."""


# ----------------------------------------------------------------------------------------------
# The architecture as data (torchvision/models/inception.py + pytorch_fid/inception.py).

@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """torchvision `BasicConv2d(in, out, kernel_size, stride, padding)`: conv -> BN -> ReLU."""
  in_channels: int
  out_channels: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)


def _conv(cin: int, cout: int, kh: int, kw: int | None = None, stride: int = 1,
          pad: tuple[int, int] | int = 0) -> ConvSpec:
  pad = (pad, pad) if isinstance(pad, int) else pad
  return ConvSpec(cin, cout, (kh, kh if kw is None else kw), stride, pad)


STEM: dict[str, ConvSpec] = {
    'Conv2d_1a_3x3': _conv(3, 32, 3, stride=2),
    'Conv2d_2a_3x3': _conv(32, 32, 3),
    'Conv2d_2b_3x3': _conv(32, 64, 3, pad=1),
    # maxpool 3x3/2
    'Conv2d_3b_1x1': _conv(64, 80, 1),
    'Conv2d_4a_3x3': _conv(80, 192, 3),
    # maxpool 3x3/2
}

# (name, kind, in_channels, width): width is pool_features for 'A', channels_7x7 for 'C'.
# Kinds: A, C = FIDInceptionA/C; B, D = torchvision InceptionB/D (unpatched); E_1, E_2 =
# FIDInceptionE_1 (average pool) / FIDInceptionE_2 (max pool).
BLOCKS: tuple[tuple[str, str, int, int], ...] = (
    ('Mixed_5b', 'A', 192, 32),
    ('Mixed_5c', 'A', 256, 64),
    ('Mixed_5d', 'A', 288, 64),
    ('Mixed_6a', 'B', 288, 0),
    ('Mixed_6b', 'C', 768, 128),
    ('Mixed_6c', 'C', 768, 160),
    ('Mixed_6d', 'C', 768, 160),
    ('Mixed_6e', 'C', 768, 192),
    ('Mixed_7a', 'D', 768, 0),
    ('Mixed_7b', 'E_1', 1280, 0),
    ('Mixed_7c', 'E_2', 2048, 0),
)


def block_convs(kind: str, cin: int, width: int = 0) -> dict[str, ConvSpec]:
  """Returns the convs of one Mixed block, {branch name: spec}, in torchvision's order."""
  if kind == 'A':
    return {'branch1x1': _conv(cin, 64, 1),
            'branch5x5_1': _conv(cin, 48, 1),
            'branch5x5_2': _conv(48, 64, 5, pad=2),
            'branch3x3dbl_1': _conv(cin, 64, 1),
            'branch3x3dbl_2': _conv(64, 96, 3, pad=1),
            'branch3x3dbl_3': _conv(96, 96, 3, pad=1),
            'branch_pool': _conv(cin, width, 1)}
  if kind == 'B':
    return {'branch3x3': _conv(cin, 384, 3, stride=2),
            'branch3x3dbl_1': _conv(cin, 64, 1),
            'branch3x3dbl_2': _conv(64, 96, 3, pad=1),
            'branch3x3dbl_3': _conv(96, 96, 3, stride=2)}
  if kind == 'C':
    c7 = width
    return {'branch1x1': _conv(cin, 192, 1),
            'branch7x7_1': _conv(cin, c7, 1),
            'branch7x7_2': _conv(c7, c7, 1, 7, pad=(0, 3)),
            'branch7x7_3': _conv(c7, 192, 7, 1, pad=(3, 0)),
            'branch7x7dbl_1': _conv(cin, c7, 1),
            'branch7x7dbl_2': _conv(c7, c7, 7, 1, pad=(3, 0)),
            'branch7x7dbl_3': _conv(c7, c7, 1, 7, pad=(0, 3)),
            'branch7x7dbl_4': _conv(c7, c7, 7, 1, pad=(3, 0)),
            'branch7x7dbl_5': _conv(c7, 192, 1, 7, pad=(0, 3)),
            'branch_pool': _conv(cin, 192, 1)}
  if kind == 'D':
    return {'branch3x3_1': _conv(cin, 192, 1),
            'branch3x3_2': _conv(192, 320, 3, stride=2),
            'branch7x7x3_1': _conv(cin, 192, 1),
            'branch7x7x3_2': _conv(192, 192, 1, 7, pad=(0, 3)),
            'branch7x7x3_3': _conv(192, 192, 7, 1, pad=(3, 0)),
            'branch7x7x3_4': _conv(192, 192, 3, stride=2)}
  if kind in ('E_1', 'E_2'):
    return {'branch1x1': _conv(cin, 320, 1),
            'branch3x3_1': _conv(cin, 384, 1),
            'branch3x3_2a': _conv(384, 384, 1, 3, pad=(0, 1)),
            'branch3x3_2b': _conv(384, 384, 3, 1, pad=(1, 0)),
            'branch3x3dbl_1': _conv(cin, 448, 1),
            'branch3x3dbl_2': _conv(448, 384, 3, pad=1),
            'branch3x3dbl_3a': _conv(384, 384, 1, 3, pad=(0, 1)),
            'branch3x3dbl_3b': _conv(384, 384, 3, 1, pad=(1, 0)),
            'branch_pool': _conv(cin, 192, 1)}
  raise ValueError(f'Unknown Inception block kind {kind!r}.')


def conv_specs() -> dict[str, ConvSpec]:
  """Returns all 94 convs, {'Conv2d_1a_3x3' | 'Mixed_5b.branch1x1' | ...: spec}, in order."""
  specs = dict(STEM)
  for name, kind, cin, width in BLOCKS:
    specs.update({f'{name}.{b}': s for b, s in block_convs(kind, cin, width).items()})
  return specs


def npz_shapes() -> dict[str, tuple[int, ...]]:
  """Returns the float32 arrays of the weights .npz: {key: PyTorch-layout shape}."""
  shapes = {}
  for name, spec in conv_specs().items():
    shapes[f'{name}.conv.weight'] = (spec.out_channels, spec.in_channels, *spec.kernel)
    for key in _BN_KEYS:
      shapes[f'{name}.bn.{key}'] = (spec.out_channels,)
  return shapes


# ----------------------------------------------------------------------------------------------
# Conversion from the PyTorch state dict (pure NumPy: the script only adds torch.load, savez).

# pytorch_fid.inception.InceptionV3().state_dict() names modules `blocks.{i}.{j}`.
_WRAPPER_BLOCKS = (
    ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'),
    ('Conv2d_3b_1x1', 'Conv2d_4a_3x3'),
    ('Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
     'Mixed_6e'),
    ('Mixed_7a', 'Mixed_7b', 'Mixed_7c'),
)


def _canonical_key(key: str) -> str:
  key = key.removeprefix('module.')
  parts = key.split('.')
  if len(parts) > 3 and parts[0] == 'blocks' and parts[1].isdigit() and parts[2].isdigit():
    i, j = int(parts[1]), int(parts[2])
    if i < len(_WRAPPER_BLOCKS) and j < len(_WRAPPER_BLOCKS[i]):
      return '.'.join([_WRAPPER_BLOCKS[i][j], *parts[3:]])
  return key


def _summarise_keys(arrays: Mapping[str, object], limit: int = 8) -> str:
  keys = sorted(arrays)
  shown = ', '.join(repr(k) for k in keys[:limit])
  return f'{len(keys)} keys [{shown}{", ..." if len(keys) > limit else ""}]'


def _take(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Returns float32 copies of the `npz_shapes()` keys; raises naming a missing/bad key."""
  out = {}
  for key, shape in npz_shapes().items():
    if key not in arrays:
      raise ValueError(
          f'{source} has no {key!r} (float32 {list(shape)}) needed by the FID Inception; it '
          f'holds {_summarise_keys(arrays)}. Is it made from {OFFICIAL_WEIGHTS}?')
    value = np.asarray(arrays[key])
    if value.shape != shape:
      raise ValueError(
          f'{source}: {key!r} has shape {list(value.shape)} but the FID Inception needs '
          f'{list(shape)}. Is it made from {OFFICIAL_WEIGHTS}?')
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f'{source}: {key!r} has dtype {value.dtype}; it needs float32.')
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
      raise ValueError(f'{source}: {key!r} has non-finite values.')
    if key.endswith('running_var') and np.any(value < 0):
      raise ValueError(f'{source}: {key!r} has negative variances (min {value.min():.3g}).')
    out[key] = value
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str = 'state dict',
                       sha256: str | None = None) -> dict[str, np.ndarray]:
  """Maps pytorch-fid's FID Inception state dict to the arrays of the weights .npz.

  Args:
    state_dict: {name: array} of `pt_inception-2015-12-05-6726825d.pth` (`fid_inception_v3()`'s
      state dict: `Conv2d_1a_3x3.conv.weight`, ..., `fc.*`), or of pytorch-fid's `InceptionV3`
      wrapper (`blocks.0.0.conv.weight`, ...), as NumPy arrays. A `module.` prefix is accepted;
      `fc.*` and `*.num_batches_tracked` are dropped.
    source: how errors name the input (e.g. its path).
    sha256: hex digest of the source file, stored as 'source_sha256'.

  Returns:
    {key: array} as documented in the module docstring.

  Raises:
    ValueError: the state dict is torchvision's ImageNet Inception (other weights), or a key is
      missing, unexpected, mis-shaped or has bad values; the message names it and `source`.
  """
  renamed = {_canonical_key(k): v for k, v in state_dict.items()}
  fc = renamed.get('fc.weight')
  if any(k.startswith('AuxLogits.') for k in renamed) or (fc is not None and
                                                          np.shape(fc)[0] != 1008):
    raise ValueError(
        f'{source} looks like torchvision\'s ImageNet inception_v3 (AuxLogits / a 1000-way fc), '
        f'whose weights and FIDs differ from the TF FID Inception; convert {OFFICIAL_WEIGHTS}.')
  dropped = {k for k in renamed if k.startswith('fc.') or k.endswith('.num_batches_tracked')}
  unexpected = sorted(set(renamed) - set(npz_shapes()) - dropped)
  if unexpected:
    raise ValueError(f'{source} has keys the FID Inception does not have: '
                     f'{unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}. '
                     f'Is it {OFFICIAL_WEIGHTS}?')
  arrays: dict[str, np.ndarray] = {
      'format_version': np.array(NPZ_FORMAT_VERSION, np.int32)}
  if sha256 is not None:
    arrays['source_sha256'] = np.array(sha256)
  arrays.update(_take(renamed, source))
  return arrays


# ----------------------------------------------------------------------------------------------
# Loading.

def _open_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsFileNotFoundError(
        f'FID Inception weights file {path!r} does not exist. {CONVERT_HINT}.')
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: one array, no keys
      raise ValueError(f'it holds one {type(loaded).__name__}, not named arrays')
    with loaded as npz:
      return {key: npz[key] for key in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'FID Inception weights file {path!r} is not a readable .npz ({e}). '
                     f'{CONVERT_HINT}.') from e


def npz_arrays_to_variables(arrays: Mapping[str, np.ndarray],
                            source: str = 'FID Inception weights') -> dict:
  """Maps checked .npz arrays to the flax variables of `InceptionV3`.

  Args:
    arrays: the .npz contents (layout in the module docstring).
    source: how errors name the input (its path).

  Returns:
    {'params': {stem conv | block: {branch: {'conv': {'kernel': [kh, kw, I, O]}, 'bn':
    {'scale', 'bias': [O]}}}}, 'batch_stats': {...: {'bn': {'mean', 'var': [O]}}}} as NumPy
    float32; the tree mirrors the PyTorch names (`Mixed_5b.branch1x1` -> ['Mixed_5b']
    ['branch1x1']).

  Raises:
    ValueError: a key is missing, unexpected, mis-shaped or has bad values (named, with
      `source`), or the format version is not NPZ_FORMAT_VERSION.
  """
  if 'format_version' not in arrays:
    raise ValueError(f'{source} has no \'format_version\' entry, so it was not written by '
                     f'scripts/convert_fid_weights.py. {CONVERT_HINT}.')
  version = int(arrays['format_version'])
  if version != NPZ_FORMAT_VERSION:
    raise ValueError(f'{source} has format_version {version}; this code reads '
                     f'{NPZ_FORMAT_VERSION}. Re-run scripts/convert_fid_weights.py.')
  unexpected = sorted(set(arrays) - set(npz_shapes()) - set(_METADATA))
  if unexpected:
    raise ValueError(f'{source} has keys the FID Inception does not use: {unexpected[:8]}. '
                     f'{CONVERT_HINT}.')
  checked = _take(arrays, source)
  params, stats = {}, {}
  for name in conv_specs():
    path = name.split('.')
    p, s = params, stats
    for part in path:
      p, s = p.setdefault(part, {}), s.setdefault(part, {})
    weight = checked[f'{name}.conv.weight']
    p['conv'] = {'kernel': np.ascontiguousarray(weight.transpose(2, 3, 1, 0))}  # OIHW -> HWIO
    p['bn'] = {'scale': checked[f'{name}.bn.weight'], 'bias': checked[f'{name}.bn.bias']}
    s['bn'] = {'mean': checked[f'{name}.bn.running_mean'],
               'var': checked[f'{name}.bn.running_var']}
  return {'params': params, 'batch_stats': stats}


def load_params(path: str | os.PathLike) -> dict:
  """Loads and checks a weights .npz made by `scripts/convert_fid_weights.py`.

  Args:
    path: the .npz file.

  Returns:
    variables for `InceptionV3().apply(variables, images)` ({'params', 'batch_stats'}), on the
    device.

  Raises:
    WeightsFileNotFoundError (a FileNotFoundError and a ValueError): no such file.
    ValueError: not an .npz, or a key is missing, unexpected or mis-shaped (the message names
      the key and the path). Nothing is computed before these checks pass.
  """
  source = f'FID Inception weights file {os.fspath(path)!r}'
  variables = npz_arrays_to_variables(_open_npz(path), source)
  return jax.device_put(variables)


# ----------------------------------------------------------------------------------------------
# The network.

def resize_bilinear(images: jax.Array, side: int = INPUT_SIDE) -> jax.Array:
  """Resizes [B, H, W, C] to [B, side, side, C] as `F.interpolate(bilinear, align_corners=False)`.

  antialias=False: jax.image.resize antialiases when downscaling by default, PyTorch does not
  (a 320 -> 299 resize would differ by up to ~0.2).
  """
  b, h, w, c = images.shape
  if (h, w) == (side, side):
    return images
  return jax.image.resize(images, (b, side, side, c), method='bilinear', antialias=False)


class BasicConv(nn.Module):
  """torchvision `BasicConv2d` in inference form: conv (no bias), BatchNorm (eps 1e-3), ReLU."""
  spec: ConvSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    spec = self.spec
    (ph, pw), s = spec.padding, spec.stride
    x = nn.Conv(spec.out_channels, spec.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)),
                use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # FID patch: TF's average pool leaves the zero padding out of the mean.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class MixedBlock(nn.Module):
  """One `Mixed_*` block; `kind`, `in_channels`, `width` as in `BLOCKS`."""
  kind: str
  in_channels: int
  width: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    convs = block_convs(self.kind, self.in_channels, self.width)

    def chain(*names: str, h: jax.Array = x) -> jax.Array:
      for name in names:
        h = BasicConv(convs[name], name=name)(h)
      return h

    if self.kind == 'A':
      branches = [chain('branch1x1'),
                  chain('branch5x5_1', 'branch5x5_2'),
                  chain('branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'),
                  chain('branch_pool', h=_avg_pool_3x3(x))]
    elif self.kind == 'B':
      branches = [chain('branch3x3'),
                  chain('branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'),
                  _max_pool_3x3_stride2(x)]
    elif self.kind == 'C':
      branches = [chain('branch1x1'),
                  chain('branch7x7_1', 'branch7x7_2', 'branch7x7_3'),
                  chain(*(f'branch7x7dbl_{i}' for i in range(1, 6))),
                  chain('branch_pool', h=_avg_pool_3x3(x))]
    elif self.kind == 'D':
      branches = [chain('branch3x3_1', 'branch3x3_2'),
                  chain(*(f'branch7x7x3_{i}' for i in range(1, 5))),
                  _max_pool_3x3_stride2(x)]
    else:  # E_1, E_2
      b3 = chain('branch3x3_1')
      dbl = chain('branch3x3dbl_1', 'branch3x3dbl_2')
      if self.kind == 'E_1':
        pooled = _avg_pool_3x3(x)
      else:  # FID patch: the TF graph max-pools here (padding with -inf, as F.max_pool2d)
        pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
      branches = [chain('branch1x1'),
                  chain('branch3x3_2a', h=b3), chain('branch3x3_2b', h=b3),
                  chain('branch3x3dbl_3a', h=dbl), chain('branch3x3dbl_3b', h=dbl),
                  chain('branch_pool', h=pooled)]
    return jnp.concatenate(branches, axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FID Inception up to pool3 (`InceptionV3(output_blocks=[3])`).

  Attributes:
    resize_input: resize every input to 299x299 first, as pytorch-fid does (FID needs it; off,
      any side >= 75 runs as is, which only tests use).
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the pool3 features.

    Args:
      images: float [B, H, W, 3] in [-1, 1] (pytorch-fid's [0, 1] input after `2x - 1`).

    Returns:
      float32 [B, 2048], >= 0 (means of ReLU outputs over the final 8x8 map).
    """
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, 3, 3)
    x = images.astype(jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x)
    elif min(x.shape[1:3]) < MIN_SIDE:
      raise ValueError(f'InceptionV3 needs H, W >= {MIN_SIDE} without resizing; got '
                       f'{x.shape[1:3]}.')
    for name in ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'):
      x = BasicConv(STEM[name], name=name)(x)
    x = _max_pool_3x3_stride2(x)
    for name in ('Conv2d_3b_1x1', 'Conv2d_4a_3x3'):
      x = BasicConv(STEM[name], name=name)(x)
    x = _max_pool_3x3_stride2(x)
    for name, kind, cin, width in BLOCKS:
      x = MixedBlock(kind, cin, width, name=name)(x)
    chex.assert_axis_dimension(x, 3, FEATURE_DIM)
    return jnp.mean(x, axis=(1, 2))


def make_feature_fn(variables: Mapping) -> Callable[[jax.Array], jax.Array]:
  """Builds the pool3 feature extractor.

  Args:
    variables: from `load_params` (or `npz_arrays_to_variables`).

  Returns:
    fn(images float32 [B, H, W, 3] in [-1, 1]) -> float32 [B, 2048]; jitted (one compile per
    input shape), with the variables passed as arguments rather than baked-in constants.
  """
  apply = jax.jit(InceptionV3().apply)

  def feature_fn(images: jax.Array) -> jax.Array:
    return apply(variables, images)

  return feature_fn


# ----------------------------------------------------------------------------------------------
# Statistics and the distance (float64 NumPy, as pytorch-fid).

def compute_features(feature_fn: Callable[[jax.Array], jax.Array],
                     images: np.ndarray | jax.Array | Iterable[np.ndarray],
                     batch: int = 50) -> np.ndarray:
  """Runs `feature_fn` over images in fixed-size batches.

  Args:
    feature_fn: from `make_feature_fn`.
    images: float [N, H, W, 3] in [-1, 1], or an iterable of such arrays (e.g. a sampler's
      batches) with the same H, W.
    batch: images per call; the last chunk is zero-padded to it so only one shape compiles.

  Returns:
    float32 [N, 2048] NumPy.
  """
  if batch < 1:
    raise ValueError(f'batch must be >= 1; got {batch}.')
  chunks = [images] if hasattr(images, 'shape') else images
  out = []
  for chunk in chunks:
    chunk = np.asarray(chunk, np.float32)
    if chunk.ndim != 4 or chunk.shape[-1] != 3:
      raise ValueError(f'FID needs images float [N, H, W, 3]; got shape {chunk.shape}.')
    for start in range(0, chunk.shape[0], batch):
      part = chunk[start:start + batch]
      n = part.shape[0]
      if n < batch:
        part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), np.float32)])
      out.append(np.asarray(feature_fn(part))[:n])
  if not out:
    raise ValueError('FID got no images.')
  return np.concatenate(out)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (mu float64 [D], sigma float64 [D, D]) of features [N, D], N >= 2 (np.cov, N - 1)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'statistics needs features [N, D] with N >= 2; got {features.shape}.')
  if not np.all(np.isfinite(features)):
    raise ValueError('statistics got non-finite features.')
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

  |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)). If sqrtm is not finite (a
  singular product), eps is added to both diagonals and it is retried; an imaginary part of
  the root (numerical error) is dropped unless its diagonal exceeds 1e-3.

  Args:
    mu1: float [D].
    sigma1: float [D, D], symmetric positive semi-definite.
    mu2: float [D].
    sigma2: float [D, D].
    eps: the diagonal offset of the fallback.

  Returns:
    The distance, in squared feature units (>= 0 up to rounding).

  Raises:
    ValueError: mismatched shapes, or a large imaginary component.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'frechet_distance needs mu [D] and sigma [D, D] for both sets; got '
                     f'{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}.')
  diff = mu1 - mu2
  with warnings.catch_warnings():  # a singular product is handled below, as pytorch-fid does
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    logging.warning('FID: sqrtm(sigma1 sigma2) is not finite (singular product); adding %g to '
                    'the diagonals of both covariances.', eps)
    offset = np.eye(d) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: sqrtm(sigma1 sigma2) has an imaginary component of up to '
                       f'{np.max(np.abs(covmean.imag)):.3g}; are both covariances PSD?')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(feature_fn: Callable[[jax.Array], jax.Array],
        images_a: np.ndarray | Iterable[np.ndarray], images_b: np.ndarray | Iterable[np.ndarray],
        batch: int = 50) -> float:
  """FID between two image sets.

  Args:
    feature_fn: from `make_feature_fn`.
    images_a: float [N_a, H, W, 3] in [-1, 1] (or an iterable of such batches).
    images_b: float [N_b, H', W', 3] in [-1, 1] (or an iterable of such batches).
    batch: images per feature_fn call.

  Returns:
    FID (>= 0; 0 for identical sets up to rounding). Comparable to pytorch-fid only with the
    official weights and the same N.
  """
  stats = []
  for images in (images_a, images_b):
    features = compute_features(feature_fn, images, batch)
    if features.shape[0] < FEATURE_DIM:
      logging.warning('FID from %d < %d images: the covariance is singular and FID biased.',
                      features.shape[0], FEATURE_DIM)
    stats.append(statistics(features))
  return frechet_distance(*stats[0], *stats[1])
