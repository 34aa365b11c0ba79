"""Tests of the Flax LPIPS, its .npz loader and the converter's key mapping (no torch needed).

The weights here are fabricated; the layer layouts below are written out from torchvision's
source (`alexnet().features`, `vgg16().features` = make_layers(cfg 'D')), independently of
fiancee_jax/metrics/lpips.py, and the trunk is checked against a NumPy re-implementation of
PyTorch's conv2d / max_pool2d.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.metrics import anchors
from fiancee_jax.metrics import distances
from fiancee_jax.metrics import fid
from fiancee_jax.metrics import lpips

# torchvision features, index for index: ('conv', in, out, kernel, stride, padding),
# ('pool', kernel, stride) or 'relu'.
ALEX_FEATURES = [
    ('conv', 3, 64, 11, 4, 2), 'relu', ('pool', 3, 2),
    ('conv', 64, 192, 5, 1, 2), 'relu', ('pool', 3, 2),
    ('conv', 192, 384, 3, 1, 1), 'relu',
    ('conv', 384, 256, 3, 1, 1), 'relu',
    ('conv', 256, 256, 3, 1, 1), 'relu', ('pool', 3, 2)]


def _vgg16_features():
  layers, in_ch = [], 3
  for v in [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512,
            'M']:
    if v == 'M':
      layers.append(('pool', 2, 2))
    else:
      layers += [('conv', in_ch, v, 3, 1, 1), 'relu']
      in_ch = v
  return layers


TORCHVISION = {'alex': ALEX_FEATURES, 'vgg': _vgg16_features()}
# lpips.pretrained_networks: the ends of slice1..slice5.
LPIPS_TAPS = {'alex': (1, 4, 7, 9, 11), 'vgg': (3, 8, 15, 22, 29)}
HEAD_CHANNELS = {'alex': (64, 192, 384, 256, 256), 'vgg': (64, 128, 256, 512, 512)}


def torchvision_state_dict(net: str, seed: int = 0) -> dict[str, np.ndarray]:
  """A fabricated torchvision state dict (what `.numpy()` of the real one gives), He-init."""
  rng = np.random.default_rng(seed)
  state = {}
  for i, layer in enumerate(TORCHVISION[net]):
    if layer != 'relu' and layer[0] == 'conv':
      _, cin, cout, k, _, _ = layer
      state[f'features.{i}.weight'] = (
          rng.normal(size=(cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
      state[f'features.{i}.bias'] = rng.normal(0, 0.01, (cout,)).astype(np.float32)
  state['classifier.1.weight'] = np.zeros((4, 8), np.float32)  # ignored by the converter
  state['classifier.1.bias'] = np.zeros((4,), np.float32)
  return state


def lpips_heads_state_dict(net: str, seed: int = 1) -> dict[str, np.ndarray]:
  """A fabricated lpips weights/v0.1/{net}.pth: `lin{k}.model.1.weight` [1, C, 1, 1] >= 0."""
  rng = np.random.default_rng(seed)
  return {f'lin{k}.model.1.weight': rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32) / c
          for k, c in enumerate(HEAD_CHANNELS[net])}


def write_fake_weights(path, net: str, seed: int = 0) -> str:
  """Writes random weights in the converter's layout, built from the flax param shapes."""
  dummy = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(lpips.LPIPS(net=net).init, jax.random.key(0), dummy, dummy)['params']
  rng = np.random.default_rng(seed)
  oihw = lambda hwio: tuple(hwio[i] for i in (3, 2, 0, 1))
  arrays = {'net': np.array(net), 'format_version': np.array(1, np.int32)}
  for name, conv in shapes['trunk'].items():
    i = int(name.removeprefix('conv'))
    shape = oihw(conv['kernel'].shape)
    arrays[f'features.{i}.weight'] = (
        rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
    arrays[f'features.{i}.bias'] = rng.normal(0, 0.01, conv['bias'].shape).astype(np.float32)
  for k in range(5):
    shape = oihw(shapes[f'lin{k}']['kernel'].shape)
    arrays[f'lin{k}.weight'] = (rng.uniform(0, 1, shape) / shape[1]).astype(np.float32)
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  folder = tmp_path_factory.mktemp('lpips')
  return {net: write_fake_weights(folder / f'{net}.npz', net) for net in ('alex', 'vgg')}


@pytest.fixture(scope='module')
def lpips_distances(weights):
  return {net: distances.get_distance(f'lpips-{net}', lpips_weights=weights[net])
          for net in ('alex', 'vgg')}


def smooth_images(seed: int, batch: int, height: int, width: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-0.6, 0.6, (batch, max(height // 4, 2), max(width // 4, 2), 3))
  images = np.asarray(jax.image.resize(coarse, (batch, height, width, 3), 'bilinear'))
  return np.clip(images + 0.1 * rng.normal(size=images.shape), -0.8, 0.8).astype(np.float32)


def noisy(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
  return (images + sigma * np.random.default_rng(seed).normal(size=images.shape)).astype(
      np.float32)


# --- NumPy reference of PyTorch's ops and of the lpips package's forward -----------------------

def torch_trunk_reference(state: dict, net: str, x: np.ndarray) -> list[np.ndarray]:
  """torchvision features on NHWC float64 input, returning the LPIPS taps (NHWC)."""
  window = np.lib.stride_tricks.sliding_window_view
  taps = []
  for i, layer in enumerate(TORCHVISION[net][:LPIPS_TAPS[net][-1] + 1]):
    if layer == 'relu':
      x = np.maximum(x, 0)
    elif layer[0] == 'conv':  # out[o] = b[o] + sum_{c,p,q} w[o,c,p,q] xpad[c, s*i+p, s*j+q]
      _, _, _, k, stride, pad = layer
      x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      patches = window(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # [N, h, w, C, k, k]
      x = np.einsum('nhwcpq,ocpq->nhwo', patches, state[f'features.{i}.weight'],
                    optimize=True) + state[f'features.{i}.bias']
    else:  # max_pool2d(kernel, stride), no padding, floor mode
      _, k, stride = layer
      x = window(x, (k, k), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))
    if i in LPIPS_TAPS[net]:
      taps.append(x)
  return taps


def lpips_reference(state: dict, net: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """lpips.LPIPS.forward (v0.1, lpips=True, spatial average) in NumPy, inputs >= 64x64."""
  shift = np.array([-.030, -.088, -.188])
  scale = np.array([.458, .448, .450])
  fx = torch_trunk_reference(state, net, (np.float64(x) - shift) / scale)
  fy = torch_trunk_reference(state, net, (np.float64(y) - shift) / scale)
  total = 0
  for k, (a, b) in enumerate(zip(fx, fy)):
    normalise = lambda f: f / (np.sqrt(np.sum(f**2, axis=-1, keepdims=True)) + 1e-10)
    diff = (normalise(a) - normalise(b))**2
    total = total + np.einsum('nhwc,c->nhw', diff, state[f'lin{k}.weight'][0, :, 0, 0]).mean(
        axis=(1, 2))
  return total


# --- Layout and converter --------------------------------------------------------------------

@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_layout_is_torchvision_and_lpips(net):
  tv = torchvision_state_dict(net)
  expected = {k: v.shape for k, v in tv.items() if k.startswith('features.')}
  expected.update({k.replace('.model.1', ''): v.shape
                   for k, v in lpips_heads_state_dict(net).items()})
  assert lpips.npz_shapes(net) == expected
  assert lpips.TAPS[net] == LPIPS_TAPS[net]
  assert lpips.tap_channels(net) == HEAD_CHANNELS[net]


@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_converter_output_is_what_the_loader_reads(net, weights):
  tv, heads = torchvision_state_dict(net), lpips_heads_state_dict(net)
  arrays = lpips.convert_state_dicts(tv, heads, net)
  with np.load(weights[net]) as fake:  # the file built from the flax param shapes
    assert {k: fake[k].shape for k in fake.files} == {k: v.shape for k, v in arrays.items()}
  assert str(arrays['net']) == net and int(arrays['format_version']) == 1
  for key, value in arrays.items():
    if key.startswith('features.'):
      np.testing.assert_array_equal(value, tv[key])
      assert value.dtype == np.float32
  np.testing.assert_array_equal(arrays['lin2.weight'], heads['lin2.model.1.weight'])
  params = lpips.npz_arrays_to_params(arrays, net)
  # OIHW -> HWIO: kernel[kh, kw, i, o] == weight[o, i, kh, kw].
  conv = lpips.conv_indices(net)[1]
  np.testing.assert_array_equal(params['trunk'][f'conv{conv}']['kernel'][1, 2, 5, 7],
                                tv[f'features.{conv}.weight'][7, 5, 1, 2])
  assert params['lin4']['kernel'].shape == (1, 1, HEAD_CHANNELS[net][4], 1)


def test_converter_accepts_a_whole_lpips_state_dict():
  tv = torchvision_state_dict('alex')
  slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # lpips alexnet: slice k holds features[a:b]
  whole = {f'net.slice{slice_of[int(k.split(".")[1])]}.{k.split(".", 1)[1]}': v
           for k, v in tv.items() if k.startswith('features.')}
  whole.update(lpips_heads_state_dict('alex'))
  whole['scaling_layer.shift'] = np.zeros((1, 3, 1, 1), np.float32)
  arrays = lpips.convert_state_dicts(whole, whole, 'alex')
  np.testing.assert_array_equal(arrays['features.6.weight'], tv['features.6.weight'])


def test_converter_names_a_missing_key():
  tv = torchvision_state_dict('alex')
  del tv['features.3.weight']
  with pytest.raises(ValueError, match=r"trunk\.pth.*'features\.3\.weight'.*\[192, 64, 5, 5\]"):
    lpips.trunk_arrays(tv, 'alex', source='trunk.pth')


def test_converter_names_a_wrong_shape():
  with pytest.raises(ValueError, match=r"'features\.0\.weight' has shape \[64, 3, 3, 3\]"):
    lpips.trunk_arrays(torchvision_state_dict('vgg'), 'alex')  # vgg16 weights for --net=alex
  heads = lpips_heads_state_dict('vgg')
  with pytest.raises(ValueError, match=r"heads\.pth.*'lin1\.weight' has shape \[1, 128, 1, 1\]"):
    lpips.head_arrays(heads, 'alex', source='heads.pth')


def test_converter_rejects_negative_heads():
  heads = lpips_heads_state_dict('alex')
  heads['lin2.model.1.weight'][0, 3] = -0.5
  with pytest.raises(ValueError, match=r"'lin2\.weight' has negative weights"):
    lpips.head_arrays(heads, 'alex')


# --- Loader errors ---------------------------------------------------------------------------

def _rewrite(source: str, target, edit) -> str:
  with np.load(source) as npz:
    arrays = {k: npz[k] for k in npz.files}
  edit(arrays)
  np.savez(target, **arrays)
  return str(target)


def test_loader_names_missing_key_and_path(weights, tmp_path):
  path = _rewrite(weights['alex'], tmp_path / 'missing.npz',
                  lambda a: a.pop('features.8.bias'))
  with pytest.raises(ValueError, match=r"missing\.npz.*'features\.8\.bias'"):
    lpips.load_params(path)


def test_loader_names_wrong_shape_and_path(weights, tmp_path):
  def edit(arrays):
    arrays['lin3.weight'] = np.ones((1, 255, 1, 1), np.float32)
  path = _rewrite(weights['alex'], tmp_path / 'shape.npz', edit)
  with pytest.raises(ValueError, match=r"shape\.npz.*'lin3\.weight' has shape \[1, 255, 1, 1\]"):
    distances.get_distance('lpips-alex', lpips_weights=path)


def test_loader_rejects_unexpected_keys(weights, tmp_path):
  def edit(arrays):
    arrays['features.1.weight'] = np.ones((3,), np.float32)
  path = _rewrite(weights['alex'], tmp_path / 'extra.npz', edit)
  with pytest.raises(ValueError, match=r"extra\.npz.*'features\.1\.weight'"):
    lpips.load_params(path)


def test_loader_rejects_another_trunk(weights):
  with pytest.raises(ValueError, match=r"vgg\.npz.*'vgg' trunk.*lpips-vgg"):
    distances.get_distance('lpips-alex', lpips_weights=weights['vgg'])


def test_loader_rejects_a_file_without_metadata(weights, tmp_path):
  path = _rewrite(weights['alex'], tmp_path / 'bare.npz', lambda a: a.pop('net'))
  with pytest.raises(ValueError, match=r"bare\.npz.*'net'.*convert_lpips_weights\.py"):
    lpips.load_params(path)


# --- The network -----------------------------------------------------------------------------

@pytest.mark.parametrize('net,side', [('alex', 64), ('vgg', 16)])
def test_trunk_is_pytorch_features(net, side, tmp_path):
  state = torchvision_state_dict(net)
  arrays = lpips.convert_state_dicts(state, lpips_heads_state_dict(net), net)
  params = lpips.npz_arrays_to_params(arrays, net)
  x = np.random.default_rng(0).normal(size=(1, side, side + 4, 3)).astype(np.float32)
  taps = jax.jit(lpips.Trunk(net).apply)({'params': params['trunk']}, x)
  expected = torch_trunk_reference(state, net, np.float64(x))
  for got, want in zip(taps, expected, strict=True):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_lpips_is_the_lpips_package_forward():
  state, heads = torchvision_state_dict('alex'), lpips_heads_state_dict('alex')
  params = lpips.npz_arrays_to_params(lpips.convert_state_dicts(state, heads, 'alex'), 'alex')
  x = smooth_images(0, 2, 64, 72)
  y = noisy(x, 0.2)
  got = jax.jit(lpips.LPIPS('alex').apply)({'params': params}, x, y)
  want = lpips_reference({**state, **{k.replace('.model.1', ''): v for k, v in heads.items()}},
                         'alex', x, y)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_small_inputs_are_upsampled_to_64(weights, lpips_distances):
  x = smooth_images(0, 2, 16, 16)
  y = noisy(x, 0.2)
  up = lambda a: jax.image.resize(a, (2, 64, 64, 3), 'bilinear')
  fn = lpips_distances['alex'].fn
  np.testing.assert_allclose(fn(x, y), fn(up(x), up(y)), rtol=1e-5)
  assert lpips.upsample_to_min_side(jnp.zeros((1, 48, 32, 3)), 64).shape == (1, 96, 64, 3)
  assert lpips.upsample_to_min_side(jnp.zeros((1, 64, 48, 3)), 64).shape == (1, 85, 64, 3)


@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_lpips_properties(net, lpips_distances):
  distance = lpips_distances[net]
  assert distance.name == f'lpips-{net}'
  x, other = smooth_images(0, 2, 16, 16), smooth_images(1, 2, 16, 16)
  np.testing.assert_allclose(distance.fn(x, x), 0.0, atol=1e-6)
  forward, backward = distance.fn(x, other), distance.fn(other, x)
  assert forward.shape == (2,) and forward.dtype == jnp.float32
  np.testing.assert_allclose(forward, backward, rtol=1e-5)
  values = np.stack([distance.fn(x, noisy(x, s)) for s in (0.05, 0.1, 0.2, 0.4)])
  assert np.all(values >= 0) and np.all(np.diff(values, axis=0) > 0), values


def test_lpips_rectangular(lpips_distances):
  x = smooth_images(0, 2, 64, 48)
  value = lpips_distances['alex'].fn(x, noisy(x, 0.1))
  assert value.shape == (2,) and np.all(value > 0)


def test_lpips_jit_and_grad(lpips_distances):
  distance = lpips_distances['alex']
  x = smooth_images(0, 2, 16, 16)
  y = noisy(x, 0.1)
  np.testing.assert_allclose(jax.jit(distance.fn)(x, y), distance.fn(x, y), rtol=1e-5)
  loss_grad = jax.jit(jax.grad(lambda a, b: distances.perceptual_loss(distance, a, b)))
  for target in (y, x):  # x: identical images, where features differences are all zero
    grad = loss_grad(x, target)
    assert grad.shape == x.shape and np.all(np.isfinite(grad))
  assert np.abs(loss_grad(x, y)).max() > 0


@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_npz_file_is_used_when_given(net, weights):
  assert distances.get_distance(f'lpips-{net}', lpips_weights=weights[net]).name == f'lpips-{net}'
  assert lpips.load_params(weights[net])[0] == net


def test_frechet_distance_on_lpips_features_orders_image_sets():
  net, feature_fn = lpips.make_feature_fn()
  assert net == 'alex'
  rng = np.random.default_rng(0)
  # Smooth random images (upsampled noise), two independent draws, and the first draw blurred.
  base = rng.uniform(-1, 1, (48, 8, 8, 3)).astype(np.float32)
  a = np.asarray(jax.image.resize(base, (48, 32, 32, 3), 'bilinear'))
  b = np.asarray(jax.image.resize(rng.uniform(-1, 1, (48, 8, 8, 3)).astype(np.float32),
                                  (48, 32, 32, 3), 'bilinear'))
  blurred = np.asarray(anchors.gaussian_blur(a, 2.0))
  features = fid.compute_features(feature_fn, a, batch=16)
  assert features.shape == (48, sum(lpips.tap_channels('alex'))) == (48, 1152)
  # The first tap's 64 channels keep the matrix square roots cheap.
  stats = {name: fid.statistics(fid.compute_features(feature_fn, x, batch=16)[:, :64])
           for name, x in (('a', a), ('b', b), ('blurred', blurred))}
  same = fid.frechet_distance(*stats['a'], *stats['a'])
  other_draw = fid.frechet_distance(*stats['a'], *stats['b'])
  blur = fid.frechet_distance(*stats['a'], *stats['blurred'])
  assert abs(same) < 1e-6
  assert 0 < other_draw < blur  # a new draw of the same kind is closer than a blurred copy
