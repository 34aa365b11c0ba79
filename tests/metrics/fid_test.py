"""Tests of the Flax FID Inception, its .npz loader, the converter's key mapping and the FID math.

No torch and no download: the weights are fabricated. The layer table and the forward below are
written out from torchvision's `Inception3.__init__` / `BasicConv2d` and pytorch-fid's
`FIDInceptionA/C/E_1/E_2.forward`, independently of fiancee_jax/metrics/fid.py, and the Flax
network is checked against a NumPy re-implementation of PyTorch's conv2d, BatchNorm (eval),
max_pool2d, avg_pool2d(count_include_pad=False) and bilinear F.interpolate. Only two Inception
shapes compile (75x75 unresized, and 299x299 at batch 2).
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from fiancee_jax.metrics import fid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torchvision's published parameter count of inception_v3 (aux_logits=True, 1000 classes)
# minus InceptionAux(768, 1000) (conv0 1x1 768->128 + BN, conv1 5x5 128->768 + BN, fc 768->1000)
# minus fc 2048->1000: the conv weights and BN gamma/beta the FID Inception's pool3 uses.
TORCHVISION_INCEPTION_V3_PARAMS = 27_161_264
AUX_PARAMS = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
FC_PARAMS = 2048 * 1000 + 1000
FID_INCEPTION_TRAINABLE = TORCHVISION_INCEPTION_V3_PARAMS - AUX_PARAMS - FC_PARAMS  # 21,785,568


# --- Independent layer table: torchvision Inception3.__init__ with the FID blocks ------------

def fid_inception_convs() -> dict[str, tuple]:
  """{name: (in, out, (kh, kw), stride, (ph, pw))} in state-dict order (aux_logits=False)."""
  convs = {}

  def conv_block(name, cin, cout, kernel_size, stride=1, padding=0):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    convs[name] = (cin, cout, pair(kernel_size), stride, pair(padding))

  conv_block('Conv2d_1a_3x3', 3, 32, kernel_size=3, stride=2)
  conv_block('Conv2d_2a_3x3', 32, 32, kernel_size=3)
  conv_block('Conv2d_2b_3x3', 32, 64, kernel_size=3, padding=1)
  conv_block('Conv2d_3b_1x1', 64, 80, kernel_size=1)
  conv_block('Conv2d_4a_3x3', 80, 192, kernel_size=3)

  def inception_a(p, in_channels, pool_features):
    conv_block(f'{p}.branch1x1', in_channels, 64, kernel_size=1)
    conv_block(f'{p}.branch5x5_1', in_channels, 48, kernel_size=1)
    conv_block(f'{p}.branch5x5_2', 48, 64, kernel_size=5, padding=2)
    conv_block(f'{p}.branch3x3dbl_1', in_channels, 64, kernel_size=1)
    conv_block(f'{p}.branch3x3dbl_2', 64, 96, kernel_size=3, padding=1)
    conv_block(f'{p}.branch3x3dbl_3', 96, 96, kernel_size=3, padding=1)
    conv_block(f'{p}.branch_pool', in_channels, pool_features, kernel_size=1)

  def inception_b(p, in_channels):
    conv_block(f'{p}.branch3x3', in_channels, 384, kernel_size=3, stride=2)
    conv_block(f'{p}.branch3x3dbl_1', in_channels, 64, kernel_size=1)
    conv_block(f'{p}.branch3x3dbl_2', 64, 96, kernel_size=3, padding=1)
    conv_block(f'{p}.branch3x3dbl_3', 96, 96, kernel_size=3, stride=2)

  def inception_c(p, in_channels, c7):
    conv_block(f'{p}.branch1x1', in_channels, 192, kernel_size=1)
    conv_block(f'{p}.branch7x7_1', in_channels, c7, kernel_size=1)
    conv_block(f'{p}.branch7x7_2', c7, c7, kernel_size=(1, 7), padding=(0, 3))
    conv_block(f'{p}.branch7x7_3', c7, 192, kernel_size=(7, 1), padding=(3, 0))
    conv_block(f'{p}.branch7x7dbl_1', in_channels, c7, kernel_size=1)
    conv_block(f'{p}.branch7x7dbl_2', c7, c7, kernel_size=(7, 1), padding=(3, 0))
    conv_block(f'{p}.branch7x7dbl_3', c7, c7, kernel_size=(1, 7), padding=(0, 3))
    conv_block(f'{p}.branch7x7dbl_4', c7, c7, kernel_size=(7, 1), padding=(3, 0))
    conv_block(f'{p}.branch7x7dbl_5', c7, 192, kernel_size=(1, 7), padding=(0, 3))
    conv_block(f'{p}.branch_pool', in_channels, 192, kernel_size=1)

  def inception_d(p, in_channels):
    conv_block(f'{p}.branch3x3_1', in_channels, 192, kernel_size=1)
    conv_block(f'{p}.branch3x3_2', 192, 320, kernel_size=3, stride=2)
    conv_block(f'{p}.branch7x7x3_1', in_channels, 192, kernel_size=1)
    conv_block(f'{p}.branch7x7x3_2', 192, 192, kernel_size=(1, 7), padding=(0, 3))
    conv_block(f'{p}.branch7x7x3_3', 192, 192, kernel_size=(7, 1), padding=(3, 0))
    conv_block(f'{p}.branch7x7x3_4', 192, 192, kernel_size=3, stride=2)

  def inception_e(p, in_channels):
    conv_block(f'{p}.branch1x1', in_channels, 320, kernel_size=1)
    conv_block(f'{p}.branch3x3_1', in_channels, 384, kernel_size=1)
    conv_block(f'{p}.branch3x3_2a', 384, 384, kernel_size=(1, 3), padding=(0, 1))
    conv_block(f'{p}.branch3x3_2b', 384, 384, kernel_size=(3, 1), padding=(1, 0))
    conv_block(f'{p}.branch3x3dbl_1', in_channels, 448, kernel_size=1)
    conv_block(f'{p}.branch3x3dbl_2', 448, 384, kernel_size=3, padding=1)
    conv_block(f'{p}.branch3x3dbl_3a', 384, 384, kernel_size=(1, 3), padding=(0, 1))
    conv_block(f'{p}.branch3x3dbl_3b', 384, 384, kernel_size=(3, 1), padding=(1, 0))
    conv_block(f'{p}.branch_pool', in_channels, 192, kernel_size=1)

  inception_a('Mixed_5b', 192, pool_features=32)
  inception_a('Mixed_5c', 256, pool_features=64)
  inception_a('Mixed_5d', 288, pool_features=64)
  inception_b('Mixed_6a', 288)
  inception_c('Mixed_6b', 768, c7=128)
  inception_c('Mixed_6c', 768, c7=160)
  inception_c('Mixed_6d', 768, c7=160)
  inception_c('Mixed_6e', 768, c7=192)
  inception_d('Mixed_7a', 768)
  inception_e('Mixed_7b', 1280)
  inception_e('Mixed_7c', 2048)
  return convs


CONVS = fid_inception_convs()


def pytorch_fid_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """A fabricated pt_inception-2015-12-05 state dict (what `.numpy()` of it gives)."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, (cin, cout, (kh, kw), _, _) in CONVS.items():
    state[f'{name}.conv.weight'] = (
        rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2 / (cin * kh * kw))).astype(np.float32)
    state[f'{name}.bn.weight'] = rng.uniform(0.8, 1.2, cout).astype(np.float32)
    state[f'{name}.bn.bias'] = rng.normal(0, 0.1, cout).astype(np.float32)
    state[f'{name}.bn.running_mean'] = rng.normal(0, 0.1, cout).astype(np.float32)
    state[f'{name}.bn.running_var'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    state[f'{name}.bn.num_batches_tracked'] = np.array(0, np.int64)
  state['fc.weight'] = np.zeros((1008, 2048), np.float32)  # dropped by the converter
  state['fc.bias'] = np.zeros((1008,), np.float32)
  return state


@pytest.fixture(scope='module')
def torch_state():
  return pytorch_fid_state_dict()


@pytest.fixture(scope='module')
def weights_path(torch_state, tmp_path_factory):
  path = tmp_path_factory.mktemp('fid') / 'fid_inception.npz'
  np.savez(path, **fid.convert_state_dict(torch_state))
  return str(path)


@pytest.fixture(scope='module')
def variables(weights_path):
  return fid.load_params(weights_path)


@pytest.fixture(scope='module')
def feature_fn(variables):
  return fid.make_feature_fn(variables)


def images(seed: int, batch: int, height: int = 75, width: int = 75) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-0.8, 0.8, (batch, max(height // 8, 2), max(width // 8, 2), 3))
  smooth = np.asarray(jax.image.resize(coarse, (batch, height, width, 3), 'bilinear'))
  return np.clip(smooth + 0.1 * rng.normal(size=smooth.shape), -1, 1).astype(np.float32)


# --- NumPy reference of PyTorch's ops and of pytorch-fid's forward ---------------------------

_window = np.lib.stride_tricks.sliding_window_view


def torch_conv_bn_relu(state, name, x):
  """BasicConv2d.forward in eval mode on NHWC float64."""
  _, _, (kh, kw), stride, (ph, pw) = CONVS[name]
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  patches = _window(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # [N, h, w, C, kh, kw]
  y = np.einsum('nhwcpq,ocpq->nhwo', patches, state[f'{name}.conv.weight'], optimize=True)
  bn = lambda k: np.float64(state[f'{name}.bn.{k}'])
  y = (y - bn('running_mean')) / np.sqrt(bn('running_var') + 1e-3) * bn('weight') + bn('bias')
  return np.maximum(y, 0)


def torch_max_pool(x, stride, pad=0):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  return _window(x, (3, 3), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


def torch_avg_pool_exclude_pad(x):
  """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = _window(np.pad(x, pad), (3, 3), axis=(1, 2)).sum(axis=(-2, -1))
  count = _window(np.pad(np.ones_like(x[..., :1]), pad), (3, 3), axis=(1, 2)).sum(axis=(-2, -1))
  return total / count


def torch_bilinear(x, out_h, out_w):
  """F.interpolate(mode='bilinear', align_corners=False) on NHWC (upsample_bilinear2d)."""
  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = np.minimum(src.astype(int), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0
  h0, h1, lh = taps(x.shape[1], out_h)
  w0, w1, lw = taps(x.shape[2], out_w)
  lh, lw = lh[None, :, None, None], lw[None, None, :, None]
  rows = x[:, h0] * (1 - lh) + x[:, h1] * lh
  return rows[:, :, w0] * (1 - lw) + rows[:, :, w1] * lw


def pytorch_fid_reference(state, x):
  """pytorch-fid InceptionV3(output_blocks=[3], resize_input=False) on NHWC in [-1, 1]."""
  c = lambda name, h: torch_conv_bn_relu(state, name, h)
  cat = lambda *branches: np.concatenate(branches, axis=-1)
  x = np.float64(x)
  for name in ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'):
    x = c(name, x)
  x = torch_max_pool(x, 2)
  x = torch_max_pool(c('Conv2d_4a_3x3', c('Conv2d_3b_1x1', x)), 2)
  for p in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):  # FIDInceptionA
    x = cat(c(f'{p}.branch1x1', x),
            c(f'{p}.branch5x5_2', c(f'{p}.branch5x5_1', x)),
            c(f'{p}.branch3x3dbl_3', c(f'{p}.branch3x3dbl_2', c(f'{p}.branch3x3dbl_1', x))),
            c(f'{p}.branch_pool', torch_avg_pool_exclude_pad(x)))
  p = 'Mixed_6a'  # InceptionB
  x = cat(c(f'{p}.branch3x3', x),
          c(f'{p}.branch3x3dbl_3', c(f'{p}.branch3x3dbl_2', c(f'{p}.branch3x3dbl_1', x))),
          torch_max_pool(x, 2))
  for p in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):  # FIDInceptionC
    b7 = x
    for i in (1, 2, 3):
      b7 = c(f'{p}.branch7x7_{i}', b7)
    dbl = x
    for i in (1, 2, 3, 4, 5):
      dbl = c(f'{p}.branch7x7dbl_{i}', dbl)
    x = cat(c(f'{p}.branch1x1', x), b7, dbl, c(f'{p}.branch_pool', torch_avg_pool_exclude_pad(x)))
  p = 'Mixed_7a'  # InceptionD
  b7 = x
  for i in (1, 2, 3, 4):
    b7 = c(f'{p}.branch7x7x3_{i}', b7)
  x = cat(c(f'{p}.branch3x3_2', c(f'{p}.branch3x3_1', x)), b7, torch_max_pool(x, 2))
  for p, pool in (('Mixed_7b', torch_avg_pool_exclude_pad),  # FIDInceptionE_1
                  ('Mixed_7c', lambda h: torch_max_pool(h, 1, pad=1))):  # FIDInceptionE_2
    b3 = c(f'{p}.branch3x3_1', x)
    dbl = c(f'{p}.branch3x3dbl_2', c(f'{p}.branch3x3dbl_1', x))
    x = cat(c(f'{p}.branch1x1', x),
            cat(c(f'{p}.branch3x3_2a', b3), c(f'{p}.branch3x3_2b', b3)),
            cat(c(f'{p}.branch3x3dbl_3a', dbl), c(f'{p}.branch3x3dbl_3b', dbl)),
            c(f'{p}.branch_pool', pool(x)))
  return x.mean(axis=(1, 2))


# --- Layout, parameter count and converter ---------------------------------------------------

def test_layout_is_pytorch_fid_state_dict(torch_state):
  expected = [(k, v.shape) for k, v in torch_state.items()
              if not k.startswith('fc.') and not k.endswith('num_batches_tracked')]
  assert list(fid.npz_shapes().items()) == expected  # same keys, shapes and order
  assert len(fid.conv_specs()) == 94


def test_parameter_count_is_the_fid_inception():
  shapes = fid.npz_shapes()
  trainable = sum(np.prod(s) for k, s in shapes.items()
                  if not k.endswith(('running_mean', 'running_var')))
  assert FID_INCEPTION_TRAINABLE == 21_785_568
  assert trainable == FID_INCEPTION_TRAINABLE
  bn_channels = sum(spec.out_channels for spec in fid.conv_specs().values())
  assert bn_channels == 17_216
  assert sum(np.prod(s) for s in shapes.values()) == 21_820_000  # + running mean and var


def test_flax_variables_match_the_npz_layout(variables):
  shapes = jax.eval_shape(fid.InceptionV3(resize_input=False).init, jax.random.key(0),
                          jnp.zeros((1, 75, 75, 3)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, shapes, variables)))
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  assert count(shapes['params']) == FID_INCEPTION_TRAINABLE
  assert count(shapes['batch_stats']) == 2 * 17_216


def test_converter_maps_keys_and_transposes(torch_state, variables):
  arrays = fid.convert_state_dict(torch_state, sha256='ab' * 32)
  assert set(arrays) == set(fid.npz_shapes()) | {'format_version', 'source_sha256'}
  assert int(arrays['format_version']) == 1 and str(arrays['source_sha256']) == 'ab' * 32
  key = 'Mixed_6b.branch7x7_2'
  np.testing.assert_array_equal(arrays[f'{key}.conv.weight'], torch_state[f'{key}.conv.weight'])
  # OIHW -> HWIO: kernel[kh, kw, i, o] == weight[o, i, kh, kw]; (1, 7) kernel.
  kernel = np.asarray(variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel'])
  assert kernel.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(kernel[0, 5, 3, 9], torch_state[f'{key}.conv.weight'][9, 3, 0, 5])
  bn = variables['batch_stats']['Mixed_7c']['branch_pool']['bn']
  np.testing.assert_array_equal(bn['var'], torch_state['Mixed_7c.branch_pool.bn.running_var'])


def test_converter_accepts_the_pytorch_fid_wrapper_state_dict(torch_state):
  blocks = [['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'],
            ['Conv2d_3b_1x1', 'Conv2d_4a_3x3'],
            ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c',
             'Mixed_6d', 'Mixed_6e'],
            ['Mixed_7a', 'Mixed_7b', 'Mixed_7c']]
  where = {name: (i, j) for i, names in enumerate(blocks) for j, name in enumerate(names)}
  wrapped = {}
  for key, value in torch_state.items():
    top, rest = key.split('.', 1)
    if top in where:
      wrapped['module.blocks.{}.{}.{}'.format(*where[top], rest)] = value
  arrays = fid.convert_state_dict(wrapped)
  np.testing.assert_array_equal(arrays['Mixed_7a.branch3x3_2.conv.weight'],
                                torch_state['Mixed_7a.branch3x3_2.conv.weight'])


def test_converter_refuses_torchvision_imagenet_weights(torch_state):
  state = dict(torch_state, **{'AuxLogits.conv0.conv.weight': np.zeros((128, 768, 1, 1))})
  with pytest.raises(ValueError, match=r"tv\.pth.*torchvision.*pt_inception-2015-12-05"):
    fid.convert_state_dict(state, source='tv.pth')
  state = dict(torch_state, **{'fc.weight': np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match='1000-way fc'):
    fid.convert_state_dict(state)


def test_converter_names_missing_unexpected_and_misshaped_keys(torch_state):
  state = dict(torch_state)
  del state['Mixed_6e.branch7x7dbl_5.bn.running_var']
  with pytest.raises(ValueError, match=r"x\.pth has no 'Mixed_6e\.branch7x7dbl_5\.bn\.running_var'"
                                       r" \(float32 \[192\]\)"):
    fid.convert_state_dict(state, source='x.pth')
  state = dict(torch_state, **{'Mixed_5b.branch5x5_2.conv.weight': np.zeros((64, 48, 3, 3))})
  with pytest.raises(ValueError, match=r"'Mixed_5b\.branch5x5_2\.conv\.weight' has shape "
                                       r"\[64, 48, 3, 3\] but .* needs \[64, 48, 5, 5\]"):
    fid.convert_state_dict(state)
  state = dict(torch_state, **{'Mixed_8a.conv.weight': np.zeros((1,))})
  with pytest.raises(ValueError, match=r"does not have: \['Mixed_8a\.conv\.weight'\]"):
    fid.convert_state_dict(state)


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'convert_fid_weights', os.path.join(REPO, 'scripts', 'convert_fid_weights.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conversion_script_round_trip_without_torch(torch_state, tmp_path, capsys):
  script = _load_script()
  assert script.parse_args(['--pth=a.pth', '--output=b.npz']).pth == 'a.pth'
  pth = tmp_path / 'not_official.pth'
  pth.write_bytes(b'fake torch file')
  output = script.convert(str(pth), str(tmp_path / 'out' / 'fid'), load=lambda _: torch_state)
  assert output.endswith('out/fid.npz')
  captured = capsys.readouterr()
  assert 'WARNING' in captured.err and '21,820,000 values' in captured.out
  loaded = fid.load_params(output)
  np.testing.assert_array_equal(loaded['params']['Conv2d_1a_3x3']['bn']['scale'],
                                torch_state['Conv2d_1a_3x3.bn.weight'])
  with np.load(output) as npz:
    assert str(npz['source_sha256']) == script.sha256_of(str(pth))


# --- Loader errors ---------------------------------------------------------------------------

def _rewrite(source: str, target, edit) -> str:
  with np.load(source) as npz:
    arrays = {k: npz[k] for k in npz.files}
  edit(arrays)
  np.savez(target, **arrays)
  return str(target)


def test_loader_missing_file(tmp_path):
  path = tmp_path / 'nope.npz'
  with pytest.raises(ValueError, match=r"nope\.npz' does not exist.*convert_fid_weights\.py"):
    fid.load_params(path)
  with pytest.raises(FileNotFoundError):  # as LPIPS raises
    fid.load_params(path)


def test_loader_not_an_npz(tmp_path):
  text = tmp_path / 'weights.npz'
  text.write_text('not a zip file')
  with pytest.raises(ValueError, match=r"weights\.npz' is not a readable \.npz"):
    fid.load_params(text)
  npy = tmp_path / 'array.npy'
  np.save(npy, np.zeros(3))
  with pytest.raises(ValueError, match=r"array\.npy' is not a readable \.npz.*one ndarray"):
    fid.load_params(npy)


def test_loader_names_missing_key(weights_path, tmp_path):
  path = _rewrite(weights_path, tmp_path / 'missing.npz',
                  lambda a: a.pop('Mixed_7b.branch3x3_2b.bn.weight'))
  with pytest.raises(ValueError,
                     match=r"missing\.npz' has no 'Mixed_7b\.branch3x3_2b\.bn\.weight'"):
    fid.load_params(path)


def test_loader_names_wrong_shape(weights_path, tmp_path):
  def edit(arrays):
    arrays['Conv2d_4a_3x3.conv.weight'] = np.zeros((192, 80, 3, 1), np.float32)
  path = _rewrite(weights_path, tmp_path / 'shape.npz', edit)
  with pytest.raises(ValueError, match=r"shape\.npz'.*'Conv2d_4a_3x3\.conv\.weight' has shape "
                                       r"\[192, 80, 3, 1\] but .* needs \[192, 80, 3, 3\]"):
    fid.load_params(path)


def test_loader_rejects_bad_metadata_values_and_extra_keys(weights_path, tmp_path):
  path = _rewrite(weights_path, tmp_path / 'bare.npz', lambda a: a.pop('format_version'))
  with pytest.raises(ValueError, match=r"bare\.npz'.*'format_version'.*convert_fid_weights\.py"):
    fid.load_params(path)
  path = _rewrite(weights_path, tmp_path / 'v2.npz',
                  lambda a: a.update(format_version=np.array(2, np.int32)))
  with pytest.raises(ValueError, match='format_version 2; this code reads 1'):
    fid.load_params(path)
  path = _rewrite(weights_path, tmp_path / 'extra.npz',
                  lambda a: a.update({'fc.weight': np.zeros((1008, 2048), np.float32)}))
  with pytest.raises(ValueError, match=r"extra\.npz' has keys .* does not use: \['fc\.weight'\]"):
    fid.load_params(path)

  def negative_var(arrays):
    arrays['Mixed_5b.branch1x1.bn.running_var'][3] = -1
  path = _rewrite(weights_path, tmp_path / 'var.npz', negative_var)
  with pytest.raises(ValueError, match=r"'Mixed_5b\.branch1x1\.bn\.running_var' has negative"):
    fid.load_params(path)


# --- The network -----------------------------------------------------------------------------

def test_inception_is_pytorch_fid_forward(torch_state, variables):
  """The unresized network at its smallest input (75x75, 1x1 after Mixed_7a) vs NumPy."""
  x = images(0, 2, 75, 75)
  got = jax.jit(fid.InceptionV3(resize_input=False).apply)(variables, x)
  want = pytorch_fid_reference(torch_state, x)
  assert got.shape == (2, 2048) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_avg_and_max_pools_are_the_fid_patches():
  x = np.random.default_rng(0).normal(size=(1, 5, 6, 4))
  np.testing.assert_allclose(fid._avg_pool_3x3(jnp.asarray(x)), torch_avg_pool_exclude_pad(x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fid._max_pool_3x3_stride2(jnp.asarray(x)), torch_max_pool(x, 2),
                             rtol=1e-6)


@pytest.mark.parametrize('shape', [(75, 75), (320, 310), (299, 299), (64, 400)])
def test_resize_is_torch_bilinear(shape):
  x = np.random.default_rng(0).uniform(-1, 1, (1, *shape, 3))
  got = fid.resize_bilinear(jnp.asarray(x, jnp.float32))
  assert got.shape == (1, 299, 299, 3)
  # Both sides compute sample positions in float32 (torch's opmath for float is float too), so
  # they differ by ~1e-5 from the float64 reference; antialiasing would differ by ~0.2-0.6.
  np.testing.assert_allclose(got, torch_bilinear(x, 299, 299), atol=1e-4)


def test_feature_fn_at_299(feature_fn, variables):
  x = images(1, 3, 75, 75)  # resized to 299x299 inside
  first = np.asarray(feature_fn(x[:2]))
  assert first.shape == (2, 2048) and first.dtype == np.float32
  assert np.all(np.isfinite(first)) and np.all(first >= 0) and first.std() > 0
  # 3 images at batch 2: [x0, x1], then [x2, zero padding]; inference BN is per image.
  features = fid.compute_features(feature_fn, x, batch=2)
  assert features.shape == (3, 2048)
  np.testing.assert_array_equal(features[:2], first)  # deterministic
  alone = np.asarray(feature_fn(np.stack([x[2], x[0]])))
  np.testing.assert_allclose(features[2], alone[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(features[0], features[2])


def test_inputs_are_checked(variables):
  with pytest.raises(AssertionError):
    fid.InceptionV3().apply(variables, jnp.zeros((1, 75, 75, 1)))
  with pytest.raises(ValueError, match='>= 75 without resizing'):
    fid.InceptionV3(resize_input=False).apply(variables, jnp.zeros((1, 64, 80, 3)))
  with pytest.raises(ValueError, match=r'\[N, H, W, 3\]'):
    fid.compute_features(lambda x: x, np.zeros((2, 8, 8)))


# --- Statistics and the Frechet distance -----------------------------------------------------

def reference_frechet(mu1, s1, mu2, s2):
  """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), via symmetric eigendecompositions."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.clip(inner, 0, None)))
  return np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


def random_stats(seed, dim=16, n=200):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  features = rng.normal(size=(n, dim)) @ mix + rng.normal(size=dim)
  return fid.statistics(features.astype(np.float32))


def test_statistics_are_mean_and_unbiased_covariance():
  features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = fid.statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
  x = np.float64(features)
  np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, (x - mu).T @ (x - mu) / 49, rtol=1e-10)
  with pytest.raises(ValueError, match='N >= 2'):
    fid.statistics(features[:1])


def test_frechet_distance_matches_reference():
  (mu1, s1), (mu2, s2) = random_stats(0), random_stats(1)
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(value, float) and value > 0
  np.testing.assert_allclose(value, reference_frechet(mu1, s1, mu2, s2), rtol=1e-8)
  np.testing.assert_allclose(value, fid.frechet_distance(mu2, s2, mu1, s1), rtol=1e-8)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_diagonal_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  want = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)  # 5 + 1 + 1 + 6.25
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want,
                             rtol=1e-12)
  assert want == 13.25


def test_frechet_distance_singular_fallback(monkeypatch):
  """pytorch-fid's path: a non-finite sqrtm retries with eps on both diagonals."""
  (mu1, s1), (mu2, s2) = random_stats(0, dim=8), random_stats(1, dim=8)
  calls = []
  real_sqrtm = linalg.sqrtm

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
  value = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(8)) @ (s2 + 1e-3 * np.eye(8)))
  np.testing.assert_allclose(
      value, reference_frechet(mu1, s1 + 1e-3 * np.eye(8), mu2, s2 + 1e-3 * np.eye(8))
      - 2 * 8 * 1e-3, rtol=1e-8)  # the traces of sigma1, sigma2 are taken without the offset


def test_frechet_distance_rank_deficient_covariances():
  """Fewer samples than dimensions (the usual small-N FID) still gives the reference value."""
  rng = np.random.default_rng(0)
  (mu1, s1), (mu2, s2) = (fid.statistics(rng.normal(size=(6, 10)) + shift) for shift in (0, 1))
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(value, reference_frechet(mu1, s1, mu2, s2), rtol=1e-5)


def test_frechet_distance_errors():
  with pytest.raises(ValueError, match='imaginary component'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))
  with pytest.raises(ValueError, match=r'mu \[D\] and sigma \[D, D\]'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_fid_batches_features_and_compares_statistics():
  """fid() = frechet_distance of the statistics of the batched features (a linear stand-in)."""
  projection = np.random.default_rng(0).normal(size=(4 * 4 * 3, 5)).astype(np.float32)
  calls = []

  def linear_features(x):
    calls.append(x.shape)
    return jnp.asarray(x).reshape(x.shape[0], -1) @ projection

  a, b = images(0, 23, 4, 4), images(1, 17, 4, 4)
  value = fid.fid(linear_features, a, b, batch=8)
  assert set(calls) == {(8, 4, 4, 3)}  # padded to one shape
  want = fid.frechet_distance(*fid.statistics(a.reshape(23, -1) @ projection),
                              *fid.statistics(b.reshape(17, -1) @ projection))
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert abs(fid.fid(linear_features, a, a, batch=8)) < 1e-6
  # An iterable of batches gives the same features as one array.
  np.testing.assert_allclose(
      fid.compute_features(linear_features, [a[:10], a[10:]], batch=8),
      fid.compute_features(linear_features, a, batch=8), rtol=1e-6)
