"""Shipped pretrained backbones: the backbone stage's artifact, installed instead of trained.

`config.train.pretrained = NAME` makes the backbone stage copy the artifact shipped in
fiancee_jax/assets/backbones/NAME/ into WORKDIR/artifacts/backbone instead of training one
('' trains from scratch). A shipped backbone is

  NAME/backbone/   an artifact directory exactly as the backbone stage writes it (artifacts.py)
  NAME/sha256      one line per file of backbone/: "<sha256 hex>  backbone/<path>", the
                   format of `sha256sum` (so `cd NAME && sha256sum -c sha256` checks it too)

Before copying, every file's sha256 and the config values the artifact was built from
(artifacts.DEPENDS_ON['backbone']: the backbone section, the dataset's name, resolution and
classes) are checked against this config; after copying, artifacts.load checks its
fingerprint. `ship` (scripts/ship_backbone.py) makes such a directory from a trained workdir.
"""
import hashlib
import os
import shutil
import uuid

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax.training import artifact_io

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'assets', 'backbones')
SHA256_FILE = 'sha256'
_ARTIFACT = 'backbone'
_TRAIN_HINT = "set --config.train.pretrained='' to train the backbone in this workdir instead"


def available(assets_dir: str | None = None) -> list[str]:
  """Names of the shipped backbones (in `assets_dir`, default ASSETS_DIR)."""
  assets_dir = assets_dir or ASSETS_DIR
  if not os.path.isdir(assets_dir):
    return []
  return sorted(n for n in os.listdir(assets_dir)
                if os.path.isdir(os.path.join(assets_dir, n, _ARTIFACT)))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _files(root: str) -> list[str]:
  """Paths of every file under root/backbone, relative to root, '/'-separated, sorted."""
  out = []
  for dirpath, _, names in os.walk(os.path.join(root, _ARTIFACT)):
    for name in names:
      out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, '/'))
  return sorted(out)


def write_sha256(root: str) -> str:
  """Writes root/sha256 listing every file of root/backbone; returns its path."""
  lines = [f'{_sha256(os.path.join(root, rel))}  {rel}\n' for rel in _files(root)]
  path = os.path.join(root, SHA256_FILE)
  with open(path, 'w') as f:
    f.writelines(lines)
  return path


def verify_sha256(root: str) -> None:
  """Raises ValueError naming the first file that is missing, extra or changed."""
  path = os.path.join(root, SHA256_FILE)
  if not os.path.exists(path):
    raise ValueError(f'the shipped backbone {root} has no {SHA256_FILE} file; reinstall the '
                     f'package, or {_TRAIN_HINT}')
  listed = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      digest, sep, rel = line.rstrip('\n').partition('  ')
      if not sep or len(digest) != 64:
        raise ValueError(f'{path} line {number} is not "<sha256>  <path>"; reinstall the '
                         f'package, or {_TRAIN_HINT}')
      listed[rel] = digest
  present = _files(root)
  for rel in present:
    if rel not in listed:
      raise ValueError(f'{os.path.join(root, rel)} is not listed in {path}: the shipped '
                       f'backbone was modified; reinstall the package, or {_TRAIN_HINT}')
  for rel, digest in listed.items():
    full = os.path.join(root, rel)
    if not os.path.isfile(full):
      raise ValueError(f'{full} (listed in {path}) is missing; reinstall the package, or '
                       f'{_TRAIN_HINT}')
    if _sha256(full) != digest:
      raise ValueError(f'{full} does not match its sha256 in {path}: the shipped backbone is '
                       f'damaged; reinstall the package, or {_TRAIN_HINT}')


def _check_config(config: ml_collections.ConfigDict, name: str, source: str) -> dict:
  """The shipped artifact's manifest; raises ValueError if it was built for other values."""
  try:
    manifest = checkpoint.read_pytree_metadata(source)
  except checkpoint.CheckpointError as e:
    raise ValueError(f'the shipped backbone {source} cannot be read ({e}); {_TRAIN_HINT}') from e
  have, want = manifest.get('config', {}), artifacts.config_values(config, 'backbone')
  differ = sorted(k for k in want if have.get(k) != want[k])
  if differ:
    detail = '; '.join(f'config.{k} is {have.get(k)!r} there, {want[k]!r} here' for k in differ)
    raise ValueError(f'the shipped backbone {name!r} (config.train.pretrained) was trained '
                     f'with another config ({detail}); use the config it was trained with, or '
                     f'{_TRAIN_HINT}')
  return manifest


def install(config: ml_collections.ConfigDict, workdir: str,
            assets_dir: str | None = None) -> artifacts.Artifact:
  """Copies the shipped backbone `config.train.pretrained` to WORKDIR/artifacts/backbone.

  Call on every process. A workdir that already holds it is left as it is.

  Args:
    config: the job's config; `config.train.pretrained` names the backbone.
    workdir: the run directory.
    assets_dir: where shipped backbones are (default ASSETS_DIR, the package's).

  Returns:
    The installed backbone artifact (checked against the config).

  Raises:
    ValueError: no such shipped backbone, damaged files, or other config values; each
      message says to set --config.train.pretrained='' to train instead.
    artifacts.ArtifactError: the workdir holds another backbone.
  """
  name = config.train.pretrained
  assets_dir = assets_dir or ASSETS_DIR
  root = os.path.join(assets_dir, name)
  source = os.path.join(root, _ARTIFACT)
  if not os.path.isdir(source):
    shipped = ', '.join(repr(n) for n in available(assets_dir)) or 'none'
    raise ValueError(f'config.train.pretrained={name!r}: there is no shipped backbone at '
                     f'{source} (shipped: {shipped}); {_TRAIN_HINT}')
  verify_sha256(root)
  manifest = _check_config(config, name, source)
  dest = artifacts.path(workdir, _ARTIFACT)
  if not os.path.isdir(dest):
    if jax.process_index() == 0:
      tmp = f'{dest}.tmp-{uuid.uuid4().hex[:8]}'
      shutil.copytree(source, tmp)
      os.replace(tmp, dest)
      logging.info('backbone: installed the shipped backbone %r in %s', name, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('fiancee_pretrained_backbone')
  art = artifact_io.load_backbone(config, workdir)
  if art.fingerprint != manifest.get('fingerprint'):
    raise artifacts.ArtifactError(
        f'{dest} holds another backbone ({art.fingerprint[:12]}) than the shipped {name!r} '
        f'({str(manifest.get("fingerprint"))[:12]}); use a new --workdir')
  return art


def ready_backbone(config: ml_collections.ConfigDict,
                   workdir: str) -> artifacts.Artifact | None:
  """The backbone the stage need not train, or None when it must train one.

  With `config.train.pretrained` the shipped backbone (installed into the workdir); else the
  backbone artifact the workdir already holds, checked against the config.
  """
  if config.train.pretrained:
    return install(config, workdir)
  if artifacts.exists(workdir, _ARTIFACT):
    return artifact_io.load_backbone(config, workdir)
  return None


def ship(workdir: str, name: str, assets_dir: str | None = None, *,
         overwrite: bool = False) -> str:
  """Copies WORKDIR/artifacts/backbone to ASSETS_DIR/NAME/backbone and writes its sha256.

  `assets_dir` defaults to ASSETS_DIR (the package's, what `install` reads).

  Returns:
    The shipped directory ASSETS_DIR/NAME.

  Raises:
    artifacts.ArtifactError: the workdir has no intact backbone artifact.
    FileExistsError: NAME is shipped already and `overwrite` is False.
  """
  artifacts.load(workdir, _ARTIFACT)  # refuses a missing or damaged artifact
  root = os.path.join(assets_dir or ASSETS_DIR, name)
  if os.path.exists(root):
    if not overwrite:
      raise FileExistsError(f'{root} exists; choose another --name or pass --overwrite')
    shutil.rmtree(root)
  os.makedirs(root)
  shutil.copytree(artifacts.path(workdir, _ARTIFACT), os.path.join(root, _ARTIFACT))
  write_sha256(root)
  return root
