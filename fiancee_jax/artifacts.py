"""Params-only artifacts: what each stage exports for inference, with fingerprints.

Layout, one `checkpoint.save_pytree` directory per kind:

  WORKDIR/artifacts/backbone    EMA generator variables {'params', 'batch_stats'}
  WORKDIR/artifacts/database    guiding database arrays {'keys', 'values', 'mean', 'proj'}
  WORKDIR/artifacts/exits       {'guided': [variables_k, ...], 'unguided': [...]}: the
                                variants trained, variables_k = {'params', 'batch_stats'}
  WORKDIR/artifacts/predictor   predictor variables (outputs in distance units)

No optimizer state, no discriminator, no PRNG state. Each artifact's metadata is its manifest:

  {'format': 1, 'kind': str, 'fingerprint': str, 'parents': {kind: fingerprint},
   'config': {dotted key: value}, 'metadata': {...}}

`fingerprint` is a sha256 over the kind, the config values it depends on (`DEPENDS_ON`), its
parents' fingerprints and every array (path, dtype, shape, bytes). A later artifact names the
fingerprints of the ones it was built from, so a database, exits or predictor from another run
is refused at load with both fingerprints named.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fiancee_jax import checkpoint

FORMAT = 1
KINDS = ('backbone', 'database', 'exits', 'predictor')
# The stage that writes each kind (for error messages).
STAGE_OF = {'backbone': 'backbone', 'database': 'database', 'exits': 'exits',
            'predictor': 'predictor'}
# Config values (dotted keys; a whole section when no dot) that an artifact is built from,
# beyond its parents. Two configs that agree on these can share the artifact.
DEPENDS_ON = {
    'backbone': ('backbone', 'data.name', 'data.resolution', 'data.num_classes'),
    'database': ('database', 'data.name', 'data.seed'),
    'exits': ('exits',),
    'predictor': ('predictor', 'router.calibration', 'router.target_met', 'distance'),
}


class ArtifactError(ValueError):
  """An artifact is missing, damaged, or does not belong to this config or workdir."""


class DamagedArtifactError(ArtifactError):
  """An artifact's files are damaged (missing, truncated, rewritten, no file list, or arrays
  that do not hash to its fingerprint); its stage can rebuild it.

  Attributes:
    damage: what is wrong, naming the directory (the message adds the way on).
  """

  def __init__(self, kind: str, p: str, damage: str):
    self.damage = damage
    super().__init__(f'{damage}; delete {p} and rerun --stages={STAGE_OF[kind]} to rebuild it')


class Artifact(NamedTuple):
  tree: Any  # the pytree of arrays
  fingerprint: str  # sha256 hex of this artifact
  parents: dict[str, str]  # kind -> fingerprint of what it was built from
  metadata: dict[str, Any]  # kind-specific JSON (e.g. calibration for the predictor)


def path(workdir: str, kind: str) -> str:
  """WORKDIR/artifacts/KIND."""
  _check_kind(kind)
  return os.path.join(workdir, 'artifacts', kind)


def exists(workdir: str, kind: str) -> bool:
  return os.path.isdir(path(workdir, kind))


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f'unknown artifact kind {kind!r}; known: {", ".join(KINDS)}')


def _jsonable(x: Any) -> Any:
  if isinstance(x, ml_collections.ConfigDict):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in sorted(x.items())}
  if isinstance(x, (tuple, list)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x


def config_values(config: ml_collections.ConfigDict, kind: str) -> dict[str, Any]:
  """{dotted key: JSON value} of the config values artifact `kind` depends on."""
  out = {}
  for key in DEPENDS_ON[kind]:
    node: Any = config
    for part in key.split('.'):
      node = node.get(part) if hasattr(node, 'get') else None
    out[key] = _jsonable(node)
  return out


def tree_digest(tree: Any) -> str:
  """sha256 hex over every leaf's path, dtype, shape and bytes (host copies)."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for p, x in leaves:
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    h.update(jax.tree_util.keystr(p).encode())
    h.update(f'{a.dtype.str}{a.shape}'.encode())
    h.update(memoryview(a).cast('B'))
  return h.hexdigest()


def fingerprint(kind: str, tree: Any, values: Mapping[str, Any],
                parents: Mapping[str, str]) -> str:
  h = hashlib.sha256()
  h.update(json.dumps({'kind': kind, 'config': _jsonable(dict(values)),
                       'parents': dict(sorted(parents.items()))}, sort_keys=True).encode())
  h.update(tree_digest(tree).encode())
  return h.hexdigest()


def save(workdir: str, kind: str, tree: Any, *, config: ml_collections.ConfigDict,
         parents: Mapping[str, str] | None = None,
         metadata: Mapping[str, Any] | None = None) -> str:
  """Writes artifact `kind` (atomically; call on every process); returns its fingerprint."""
  _check_kind(kind)
  tree = jax.device_get(tree)
  parents = dict(parents or {})
  values = config_values(config, kind)
  fp = fingerprint(kind, tree, values, parents)
  manifest = {'format': FORMAT, 'kind': kind, 'fingerprint': fp, 'parents': parents,
              'config': values, 'metadata': _jsonable(dict(metadata or {}))}
  checkpoint.save_pytree(path(workdir, kind), tree, metadata=manifest)
  return fp


def read_manifest(workdir: str, kind: str) -> dict[str, Any]:
  """The manifest of artifact `kind` without reading its arrays."""
  p = path(workdir, kind)
  if not os.path.isdir(p):
    raise ArtifactError(f'no {kind} artifact at {p}; run --stages={STAGE_OF[kind]}')
  try:
    return checkpoint.read_pytree_metadata(p)
  except checkpoint.CheckpointError as e:
    raise DamagedArtifactError(kind, p, f'{kind} artifact at {p} is damaged ({e})') from e


def load(workdir: str, kind: str, template: Any = None, *,
         config: ml_collections.ConfigDict | None = None,
         parents: Mapping[str, str] | None = None) -> Artifact:
  """Reads artifact `kind` of `workdir` and checks where it came from.

  Args:
    workdir: the run directory.
    kind: one of KINDS.
    template: pytree of arrays or ShapeDtypeStructs (structure, shapes, dtypes); None reads
      the arrays as stored.
    config: when given, the values the artifact depends on must equal this config's.
    parents: {kind: fingerprint} the artifact must have been built from.

  Raises:
    DamagedArtifactError: damaged files or arrays (names the file and the stage to rerun).
    ArtifactError: missing, foreign (names both fingerprints), or built with other config
      values (names the keys).
  """
  p = path(workdir, kind)
  if not os.path.isdir(p):
    raise ArtifactError(f'no {kind} artifact at {p}; run --stages={STAGE_OF[kind]}')
  # Where it came from is checked on the manifest before the arrays are read, so that an
  # artifact of another config or run is named as such, not as one of unexpected shapes.
  _check_manifest(p, kind, read_manifest(workdir, kind), config, parents)
  try:
    tree, manifest = checkpoint.load_pytree(p, template)
  except checkpoint.CorruptCheckpointError as e:
    raise DamagedArtifactError(kind, p, f'{kind} artifact at {p} is damaged ({e})') from e
  except checkpoint.CheckpointError as e:
    raise ArtifactError(f'{kind} artifact at {p} cannot be read ({e}); rebuild it with '
                        f'--stages={STAGE_OF[kind]} after deleting {p}') from e
  fp = fingerprint(kind, tree, manifest.get('config', {}), manifest.get('parents', {}))
  if fp != manifest.get('fingerprint'):
    raise DamagedArtifactError(
        kind, p, f'{kind} artifact at {p} is damaged: its arrays hash to {fp[:12]} but its '
        f'manifest says {str(manifest.get("fingerprint"))[:12]}')
  _check_manifest(p, kind, manifest, config, parents)
  return Artifact(tree=tree, fingerprint=manifest['fingerprint'],
                  parents=dict(manifest.get('parents', {})),
                  metadata=dict(manifest.get('metadata', {})))


def _check_manifest(p: str, kind: str, manifest: Mapping[str, Any],
                    config: ml_collections.ConfigDict | None,
                    parents: Mapping[str, str] | None) -> None:
  """Raises ArtifactError unless `manifest` is a `kind` artifact of this format, built with
  `config`'s values (when given) from `parents` (when given)."""
  if manifest.get('format') != FORMAT or manifest.get('kind') != kind:
    raise ArtifactError(f'{p} is not a {kind} artifact of format {FORMAT} (manifest kind '
                        f'{manifest.get("kind")!r}, format {manifest.get("format")!r})')
  values = manifest.get('config', {})
  if config is not None:
    want = config_values(config, kind)
    differ = sorted(k for k in want if want[k] != values.get(k))
    if differ:
      detail = '; '.join(f'config.{k} is {values.get(k)!r} there, {want[k]!r} here'
                         for k in differ)
      raise ArtifactError(f'{kind} artifact at {p} was built with another config ({detail}); '
                          f'rerun --stages={STAGE_OF[kind]} in a new workdir or use the '
                          'config it was built with')
  for parent, want_fp in (parents or {}).items():
    got = manifest.get('parents', {}).get(parent)
    if got != want_fp:
      raise ArtifactError(
          f'{kind} artifact at {p} was built from {parent} {str(got)[:12]} but this workdir\'s '
          f'{parent} is {want_fp[:12]}: it belongs to another run; rebuild it with '
          f'--stages={STAGE_OF[kind]}')
