"""Checkpoints of training state and one-off pytrees; the only module that imports orbax.

Two entry points:

- `Checkpointer`: a directory of numbered steps (`DIR/100`, `DIR/200`, ...) for resumable
  training. Every step holds the state pytree, a JSON metadata dict (data position, config hash,
  ...) and a small layout record.
- `save_pytree` / `load_pytree`: one directory holding one pytree + metadata (e.g. the guiding
  database), replaced atomically.

Guarantees, and how they are kept:

- Atomic saves, synchronous by default. A step is written by orbax into a staging directory
  (`STEP.staging-*`), its file list `_FILES.json` (size and CRC-32 of every file) is added,
  and only then is it renamed to `STEP`; old steps are renamed away before they are deleted.
  So a step directory always has its file list, and a SIGKILL at any moment leaves only
  complete steps plus staging leftovers, which step listings ignore and the next
  `Checkpointer` removes. With `async_save=True` (`config.checkpoint.async_save`) `save()`
  returns once the state is copied off the devices; orbax writes the staging directory in the
  background while training goes on, and the step is finalised (file list, rename, old steps
  deleted) at the next `save()`, `wait()` or `close()`: until then it is a staging leftover,
  so the guarantees above hold unchanged.
- Damage is never resumed from silently. A step is intact when its `_FILES.json` exists and
  every listed file exists with its size and checksum (checked by `restore()`, which reads
  them). A step without `_FILES.json` is damaged. `restore()` refuses a damaged newest step
  with a `CheckpointError` naming the step and the way on: delete it (the stage then resumes
  from the step before, or from scratch), or run with `allow_restart=True`
  (`--config.checkpoint.allow_restart=True`), which falls back past damaged steps with a
  warning naming each, and to scratch when none is intact. Damage means missing, truncated
  or rewritten files alike: the outcome does not depend on how the files were damaged.
- Typed PRNG keys (`jax.random.key`) are stored as their `key_data` (uint32) and re-wrapped on
  restore with the implementation recorded at save time.
- Structure and shapes are checked against the target before reading any array, so a config
  change fails with the leaf path instead of an orbax/tensorstore error.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any

_MANIFEST = '_FILES.json'
_FORMAT_VERSION = 1
_STATE, _METADATA, _LAYOUT = 'state', 'metadata', 'layout'


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model it is restored into."""


class CorruptCheckpointError(CheckpointError):
  """The files of one step/directory are damaged (missing, truncated, rewritten, no file list);
  an older step may still be good."""


_CorruptCheckpointError = CorruptCheckpointError


# ----------------------------------------------------------------------------------------------
# Pytree helpers.


def _key_name(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path: tuple[Any, ...]) -> str:
  """`(DictKey('params'), GetAttrKey('mu'), SequenceKey(0))` -> 'params/mu/0'."""
  return '/'.join(_key_name(k) for k in path)


def _is_prng_key(x: Any) -> bool:
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _encode_keys(tree: PyTree) -> tuple[PyTree, dict[str, str]]:
  """Replaces typed PRNG key arrays by their uint32 key data; returns {leaf path: impl}."""
  impls = {}

  def encode(path, x):
    if _is_prng_key(x):
      impls[_path_str(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(encode, tree), impls


def _abstract_key_data(x: Any) -> Any:
  """ShapeDtypeStruct of `key_data(x)` for a key-typed target leaf, keeping its sharding."""
  if isinstance(x, jax.Array):
    data = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
  out = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  sharding = getattr(x, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    # key_data appends the key's trailing dims, which are never partitioned.
    extra = len(out.shape) - len(x.shape)
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec) + extra)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)


def _abstract_target(target: PyTree) -> PyTree:
  """What orbax restores onto: arrays become ShapeDtypeStructs with the target's sharding.

  NumPy arrays and Python scalars are left alone, so they come back as NumPy arrays / scalars.
  """

  def to_abstract(x):
    if _is_prng_key(x):
      return _abstract_key_data(x)
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  return jax.tree.map(to_abstract, target)


def _check_matches(
    where: str, checkpoint_tree: PyTree, abstract_target: PyTree
) -> None:
  """Raises CheckpointError naming the first leaf whose path or shape differs."""
  ckpt = {
      _path_str(p): _leaf_shape(m)
      for p, m in jax.tree_util.tree_flatten_with_path(checkpoint_tree)[0]
  }
  model = {
      _path_str(p): _leaf_shape(x)
      for p, x in jax.tree_util.tree_flatten_with_path(abstract_target)[0]
  }
  prefix = f'checkpoint {where} does not match the model: '
  suffix = '; was it written with another config?'
  for path, shape in model.items():
    if path not in ckpt:
      raise CheckpointError(
          f'{prefix}{path} (shape {shape}) is in the model but not in the checkpoint{suffix}')
    if ckpt[path] != shape:
      raise CheckpointError(
          f'{prefix}{path} has shape {ckpt[path]} in the checkpoint but {shape} in the '
          f'model{suffix}')
  extra = [p for p in ckpt if p not in model]
  if extra:
    raise CheckpointError(
        f'{prefix}{extra[0]} (shape {ckpt[extra[0]]}) is in the checkpoint but not in the '
        f'model ({len(extra)} such leaves){suffix}')


def _key_impl(x: Any) -> Any:
  """The PRNG implementation of a key-typed target leaf (array or ShapeDtypeStruct)."""
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  # jax has no public accessor for an abstract key's impl; wrap_key_data accepts this object.
  return x.dtype._impl  # pylint: disable=protected-access


def _decode_keys(restored: PyTree, target: PyTree, impls: Mapping[str, str]) -> PyTree:
  """Re-wraps the leaves whose target is a typed PRNG key (saved as key data)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(target)
  restored_leaves = treedef.flatten_up_to(restored)
  out = []
  for (path, t), r in zip(leaves_with_path, restored_leaves):
    if _is_prng_key(t):
      r = jax.random.wrap_key_data(r, impl=impls.get(_path_str(path)) or _key_impl(t))
    out.append(r)
  return jax.tree_util.tree_unflatten(treedef, out)


def _check_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
  metadata = dict(metadata or {})
  try:
    json.dumps(metadata)
  except TypeError as e:
    raise TypeError(
        f'checkpoint metadata must be JSON-serialisable ({e}); convert arrays with '
        '.tolist() and numbers with int()/float()') from e
  return metadata


# ----------------------------------------------------------------------------------------------
# File manifest (sizes and CRC-32 of every file of a finalised checkpoint directory).


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open('rb') as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _list_files(root: epath.Path) -> list[str]:
  files = []
  for dirpath, _, filenames in root.walk():
    for name in filenames:
      rel = str(epath.Path(dirpath, name).relative_to(root))
      if rel != _MANIFEST:
        files.append(rel)
  return sorted(files)


def _write_manifest(root: epath.Path) -> None:
  """Records every file of `root`; written to a tmp name and renamed, so never half-written."""
  files = {
      rel: [(root / rel).stat().length, _crc32(root / rel)] for rel in _list_files(root)
  }
  tmp = root / f'{_MANIFEST}.tmp-{uuid.uuid4().hex}'
  with tmp.open('w') as f:
    json.dump({'format_version': _FORMAT_VERSION, 'files': files}, f)
    f.flush()
    if hasattr(f, 'fileno'):
      os.fsync(f.fileno())
  tmp.rename(root / _MANIFEST)


def _verify_manifest(root: epath.Path, where: str, *, checksums: bool) -> None:
  """Raises _CorruptCheckpointError naming `where` if a listed file is gone or changed."""
  manifest = root / _MANIFEST
  if not root.exists():
    raise _CorruptCheckpointError(f'checkpoint {where} does not exist')
  if not manifest.exists():
    # Saves add the file list before the directory gets its final name: without it, nothing
    # says the files are complete and unchanged.
    raise _CorruptCheckpointError(
        f'checkpoint {where} is corrupt: it has no file list {_MANIFEST}, so its files cannot '
        'be checked')
  try:
    files = json.loads(manifest.read_text())['files']
  except (ValueError, KeyError, TypeError) as e:
    raise _CorruptCheckpointError(
        f'checkpoint {where} is corrupt: its file list {_MANIFEST} is unreadable ({e})') from e
  for rel, (size, crc) in files.items():
    path = root / rel
    if not path.exists():
      raise _CorruptCheckpointError(f'checkpoint {where} is corrupt: {rel} is missing')
    actual = path.stat().length
    if actual != size:
      raise _CorruptCheckpointError(
          f'checkpoint {where} is corrupt: {rel} has {actual} bytes, expected {size}')
    if checksums and _crc32(path) != crc:
      raise _CorruptCheckpointError(
          f'checkpoint {where} is corrupt: {rel} does not match its checksum')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.StandardCheckpointHandler()
  registry.add(_STATE, ocp.args.StandardSave, state_handler)
  registry.add(_STATE, ocp.args.StandardRestore, state_handler)
  for item in (_METADATA, _LAYOUT):
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(item, ocp.args.JsonSave, json_handler)
    registry.add(item, ocp.args.JsonRestore, json_handler)
  return registry


def _save_args(tree: PyTree, metadata: Mapping[str, Any] | None) -> ocp.args.Composite:
  metadata = _check_json(metadata)
  encoded, impls = _encode_keys(tree)
  layout = {'format_version': _FORMAT_VERSION, 'prng_keys': impls}
  return ocp.args.Composite(**{
      _STATE: ocp.args.StandardSave(encoded),
      _METADATA: ocp.args.JsonSave(metadata),
      _LAYOUT: ocp.args.JsonSave(layout),
  })


def _as_corrupt(where: str, e: Exception) -> _CorruptCheckpointError:
  message = str(e).split('\n')[0][:300]
  return _CorruptCheckpointError(
      f'checkpoint {where} is unreadable ({type(e).__name__}: {message})')


# ----------------------------------------------------------------------------------------------
# Checkpointer: numbered steps for resumable training.


# Names a Checkpointer gives directories that are not (or no longer) steps: a step being
# written, a step being deleted, and orbax's own staging names inside them.
_STAGING, _DELETING = 'staging', 'deleting'
_LEFTOVER = re.compile(rf'^\d+\.({_STAGING}-|{_DELETING}-|orbax-checkpoint-tmp-)')


class Checkpointer:
  """Saves and restores training state as numbered steps under one directory.

  Example::

    with Checkpointer(workdir + '/checkpoints/backbone', save_every=500) as ckpt:
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
      for step in range(int(state.step), num_steps):
        state, measurements = train_step(state, batch)
        ckpt.save(step + 1, state, metadata={'data_position': ...})

  Saves are synchronous unless `async_save`: once `save()` returns, the step is finalised on
  disk, file list included. With `async_save`, the step is finalised by the next `save()`,
  `wait()` or `close()` (leaving the `with` block closes). A damaged newest step stops
  `restore()` with a CheckpointError that says how to
  go on, unless the Checkpointer was opened with `allow_restart=True`.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 100,
               allow_restart: bool = False, async_save: bool = False):
    """Opens (and creates) a checkpoint directory; removes leftovers of interrupted saves.

    Args:
      directory: where step directories go, e.g. `runs/x/checkpoints/backbone`; local or any
        path orbax supports (gs://...).
      max_to_keep: how many of the newest steps to keep; older ones are deleted after a save.
      save_every: `should_save(step)` is true every this many steps.
      allow_restart: fall back past damaged steps (with a warning naming each) instead of
        refusing them; with no intact step, `latest_step()` is None (train from scratch).
        `config.checkpoint.allow_restart` in the pipeline.
      async_save: write steps in the background (see the module docstring);
        `config.checkpoint.async_save` in the pipeline.
    """
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep={max_to_keep}; keep at least 1 checkpoint')
    if save_every < 1:
      raise ValueError(f'save_every={save_every}; it must be a positive number of steps')
    self._display_dir = str(directory)
    self._directory = epath.Path(
        directory if '://' in str(directory) else os.path.abspath(directory))
    self._max_to_keep = max_to_keep
    self._save_every = save_every
    self._allow_restart = bool(allow_restart)
    self._async = ocp.AsyncCheckpointer(_composite_handler()) if async_save else None
    self._pending: tuple[int, epath.Path] | None = None  # (step, staging) being written
    self._verified: set[int] = set()  # steps whose checksums this object has verified
    self.restored_step: int | None = None
    """Step that the last `restore()` actually read (differs from the newest after a fallback)."""
    self._directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      for path in self._directory.iterdir():
        if _LEFTOVER.match(path.name):
          logging.info('Removing %s, left by an interrupted save or deletion.', path)
          _remove(path)
    _sync(f'fiancee_checkpoint_open_{self._directory.name}')

  @property
  def directory(self) -> str:
    return self._display_dir

  def _where(self, step: int) -> str:
    return f'{self._display_dir.rstrip("/")}/{step}'

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def all_steps(self) -> list[int]:
    """All steps on disk, oldest first (damaged ones included; see latest_step)."""
    if not self._directory.exists():
      return []
    return sorted(int(p.name) for p in self._directory.iterdir()
                  if p.name.isdigit() and p.is_dir())

  def _is_intact(self, step: int, *, checksums: bool) -> bool:
    if checksums and step in self._verified:
      return True
    try:
      _verify_manifest(self._step_dir(step), self._where(step), checksums=checksums)
    except _CorruptCheckpointError as e:
      logging.warning('%s', e)
      return False
    if checksums:
      self._verified.add(step)
    return True

  def latest_step(self) -> int | None:
    """The step `restore()` reads: the newest on disk, or None to start from scratch.

    Without allow_restart this is the newest step whatever its state (restore refuses it if
    it is damaged). With allow_restart, damaged steps are skipped with a warning (every file
    is read to verify its checksum), and None means that no step is intact.
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      return None
    if not self._allow_restart:
      return steps[-1]
    for step in reversed(steps):
      if self._is_intact(step, checksums=True):
        if step != steps[-1]:
          logging.warning('allow_restart: resuming from %s, the newest intact step.',
                          self._where(step))
        return step
    logging.warning('allow_restart: every checkpoint in %s is damaged (steps %s); the stage '
                    'starts from scratch and replaces them.', self._display_dir, steps)
    return None

  def should_save(self, step: int) -> bool:
    """True every `save_every` steps."""
    return step % self._save_every == 0

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      metadata: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves `state` (and JSON `metadata`) as `step` if `should_save(step)` or `force`.

    Call on every process. Blocks until the step is finalised on disk, with its file list;
    with `async_save`, until the state is copied off the devices (a previous background
    save is finalised first).

    If `step` already exists and is intact, nothing is written (a resumed run reaching a step it
    already saved). If it exists but is damaged (a run that fell back past it with
    allow_restart), it is replaced.

    Args:
      step: the training step; names the directory.
      state: pytree of jax/NumPy arrays and scalars, possibly sharded, possibly typed PRNG keys.
      metadata: JSON-serialisable dict stored beside the state.
      force: save even if `should_save(step)` is false (e.g. at the end of training).

    Returns:
      Whether a checkpoint was written.
    """
    if not force and not self.should_save(step):
      return False
    self.wait()  # one write at a time: the previous step is final before this one starts
    if step in self.all_steps():
      if self._is_intact(step, checksums=True):
        logging.info('Checkpoint %s already exists; not saving it again.', self._where(step))
        return False
      logging.warning('Replacing damaged checkpoint %s.', self._where(step))
    args = _save_args(state, metadata)
    token = uuid.uuid4().hex[:8] if jax.process_count() == 1 else 'multihost'
    staging = self._directory / f'{step}.{_STAGING}-{token}'
    if self._async is not None:
      self._async.save(staging, args=args, force=True)  # returns once copied off the devices
      self._pending = (step, staging)
      logging.info('Writing checkpoint %s in the background.', self._where(step))
      return True
    with _composite_checkpointer() as checkpointer:
      checkpointer.save(staging, args=args, force=True)
    self._finalise(step, staging)
    return True

  def _finalise(self, step: int, staging: epath.Path) -> None:
    """Adds the file list to a written staging directory and renames it to its step."""
    final = self._step_dir(step)
    if jax.process_index() == 0:
      _write_manifest(staging)
      if final.exists():
        _remove(final)
      staging.rename(final)
      self._verified.discard(step)
      for old in self.all_steps()[:-self._max_to_keep]:
        _remove(self._step_dir(old))
    _sync(f'fiancee_checkpoint_saved_{step}')
    logging.info('Saved checkpoint %s.', self._where(step))

  def _restore_step(self, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    where = self._where(step)
    root = self._step_dir(step)
    if step not in self._verified:
      _verify_manifest(root, where, checksums=True)
      self._verified.add(step)
    with _composite_checkpointer() as checkpointer:
      try:
        item_metadata = checkpointer.metadata(root).item_metadata
        saved_tree = item_metadata[_STATE] if item_metadata else None
        if saved_tree is None:
          raise ValueError(f'no "{_STATE}" item')
        layout = checkpointer.restore(
            root, args=ocp.args.Composite(**{_LAYOUT: ocp.args.JsonRestore()}))[_LAYOUT]
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise _as_corrupt(where, e) from e
      abstract = _abstract_target(target)
      _check_matches(where, saved_tree, abstract)
      try:
        restored = checkpointer.restore(root, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract),
            _METADATA: ocp.args.JsonRestore(),
        }))
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise _as_corrupt(where, e) from e
    state = _decode_keys(restored[_STATE], target, layout.get('prng_keys', {}))
    return state, dict(restored[_METADATA] or {})

  def _refusal(self, step: int, damage: Exception) -> CheckpointError:
    """The error for a damaged step: what is wrong, and the two ways on."""
    doomed = [step]
    intact = None
    for older in reversed([s for s in self.all_steps() if s < step]):
      if self._is_intact(older, checksums=True):
        intact = older
        break
      doomed.append(older)
    then = (f'the stage then resumes from step {intact}' if intact is not None else
            'no intact step is left, so the stage then starts from scratch')
    also = (f' and the damaged older steps {", ".join(self._where(s) for s in doomed[1:])}'
            if len(doomed) > 1 else '')
    return CheckpointError(
        f'{damage}. Refusing to resume from an older step or from scratch silently. Either '
        f'delete {self._where(step)}{also} and rerun ({then}), or rerun with '
        '--config.checkpoint.allow_restart=True to fall back past damaged steps (to scratch '
        'if none is intact).')

  def restore(
      self, target: PyTree, step: int | None = None
  ) -> tuple[PyTree, dict[str, Any]]:
    """Restores a step onto the structure, dtypes and shardings of `target`.

    Args:
      target: a pytree like the saved state: concrete arrays (their sharding is used) or
        `jax.ShapeDtypeStruct`s with `sharding=`; NumPy leaves come back as NumPy.
      step: the step to read; None reads `latest_step()`: the newest step (refused if
        damaged), or with allow_restart the newest intact one. `self.restored_step` tells
        which step was read.

    Returns:
      (state, metadata).

    Raises:
      CheckpointError: no checkpoint exists; the step is damaged (the message names it and
        the way on); with allow_restart, no step is intact; or the checkpoint's structure or
        shapes differ from `target`.
    """
    self.wait()
    steps = self.all_steps()
    if step is not None and step not in steps:
      raise CheckpointError(
          f'checkpoint {self._where(step)} does not exist; available steps: {steps}')
    if not steps:
      raise CheckpointError(
          f'no checkpoint in {self._display_dir}; check latest_step() is not None before '
          'restoring, or initialise the state from scratch')
    if step is None and self._allow_restart:
      candidates = list(reversed(steps))
    else:
      candidates = [steps[-1] if step is None else step]
    failures = []
    for candidate in candidates:
      try:
        result = self._restore_step(candidate, target)
      except _CorruptCheckpointError as e:
        if not self._allow_restart or step is not None:
          raise self._refusal(candidate, e) from e
        failures.append(str(e))
        logging.warning('%s; allow_restart: falling back to the previous step.', e)
        continue
      if failures:
        logging.warning('allow_restart: restored %s instead of the newest step.',
                        self._where(candidate))
      self.restored_step = candidate
      return result
    raise CheckpointError(
        f'every checkpoint in {self._display_dir} is damaged; with allow_restart the stage '
        'starts from scratch when latest_step() is None. Problems: ' + ' | '.join(failures))

  def wait(self) -> None:
    """Blocks until a background save is written and finalised (no-op when synchronous)."""
    if self._pending is None:
      return
    step, staging = self._pending
    self._pending = None
    self._async.wait_until_finished()
    self._finalise(step, staging)

  def close(self) -> None:
    """Finalises a background save and stops the background writer."""
    self.wait()
    if self._async is not None:
      self._async.close()
      self._async = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _remove(path: epath.Path) -> None:
  """Deletes a directory so that no half-deleted step remains: renamed away first."""
  if not path.exists():
    return
  doomed = path
  if not _LEFTOVER.match(path.name):
    doomed = path.parent / f'{path.name}.{_DELETING}-{uuid.uuid4().hex[:8]}'
    path.rename(doomed)
  if doomed.is_dir():
    doomed.rmtree()
  else:
    doomed.unlink()


# ----------------------------------------------------------------------------------------------
# One-off pytrees.


def _composite_handler() -> ocp.CompositeCheckpointHandler:
  return ocp.CompositeCheckpointHandler(handler_registry=_handler_registry())


def _composite_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(_composite_handler())


def save_pytree(path: str, tree: PyTree, metadata: Mapping[str, Any] | None = None) -> None:
  """Saves a pytree of arrays (+ JSON metadata) as directory `path`, replacing it atomically.

  The tree is written to a sibling directory and renamed into place, so a reader sees either
  the old or the new content. If `path` already exists, it is moved aside and deleted after the
  swap; a kill between those two renames leaves `path.old-*` (load_pytree says so). Call on
  every process.

  Args:
    path: the directory to create or replace.
    tree: pytree of jax/NumPy arrays, scalars, typed PRNG keys.
    metadata: JSON-serialisable dict.
  """
  final = epath.Path(path if '://' in str(path) else os.path.abspath(path))
  token = uuid.uuid4().hex[:8] if jax.process_count() == 1 else 'multihost'
  staging = final.parent / f'{final.name}.tmp-{token}'
  args = _save_args(tree, metadata)
  final.parent.mkdir(parents=True, exist_ok=True)
  with _composite_checkpointer() as checkpointer:
    checkpointer.save(staging, args=args, force=True)
  if jax.process_index() == 0:
    _write_manifest(staging)
    old = None
    if final.exists():
      old = final.parent / f'{final.name}.old-{uuid.uuid4().hex[:8]}'
      final.rename(old)
    staging.rename(final)
    if old is not None:
      old.rmtree()
  _sync(f'fiancee_save_pytree_{final.name}')


def load_pytree(path: str, target: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
  """Loads what `save_pytree` wrote.

  Args:
    path: the directory passed to `save_pytree`.
    target: optional pytree giving structure, dtypes and shardings (as for
      `Checkpointer.restore`). Without it, arrays come back as NumPy arrays in nested
      dicts/lists (tuples and NamedTuples become lists and dicts), and typed PRNG keys as
      jax key arrays.

  Returns:
    (tree, metadata).

  Raises:
    CheckpointError: `path` is missing or corrupt, or does not match `target`.
  """
  root = epath.Path(path if '://' in str(path) else os.path.abspath(path))
  if not root.exists():
    leftovers = sorted(str(p) for p in root.parent.glob(f'{root.name}.old-*')) if (
        root.parent.exists()) else []
    hint = (f'; an interrupted save left {leftovers[-1]}, rename it to {path} to recover'
            if leftovers else '')
    raise CheckpointError(f'{path} does not exist{hint}')
  _verify_manifest(root, str(path), checksums=True)
  with _composite_checkpointer() as checkpointer:
    try:
      item_metadata = checkpointer.metadata(root).item_metadata
      saved_tree = item_metadata[_STATE] if item_metadata else None
      if saved_tree is None:
        raise ValueError(f'no "{_STATE}" item')
      layout = checkpointer.restore(
          root, args=ocp.args.Composite(**{_LAYOUT: ocp.args.JsonRestore()}))[_LAYOUT]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _as_corrupt(str(path), e) from e
    if target is None:
      # NumPy targets make orbax return NumPy; np.empty only reserves (untouched) memory.
      abstract = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved_tree)
    else:
      abstract = _abstract_target(target)
      _check_matches(str(path), saved_tree, abstract)
    try:
      restored = checkpointer.restore(root, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract),
          _METADATA: ocp.args.JsonRestore(),
      }))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _as_corrupt(str(path), e) from e
  impls = layout.get('prng_keys', {})
  if target is not None:
    tree = _decode_keys(restored[_STATE], target, impls)
  else:
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.wrap_key_data(x, impl=impls[_path_str(p)])
        if _path_str(p) in impls else x,
        restored[_STATE])
  return tree, dict(restored[_METADATA] or {})


def restore_finished(directory: str, target: PyTree, *, stage: str,
                     total_steps: int) -> tuple[PyTree, dict]:
  """Restores the final checkpoint of a finished stage (what later stages build on).

  Raises:
    CheckpointError: naming `directory` when there is no checkpoint, or when the stage
      stopped before its last step (with the step it reached and the command to finish).
  """
  ckpt = Checkpointer(directory)
  try:
    if ckpt.latest_step() is None:
      raise CheckpointError(f'no {stage} checkpoint in {directory}; run --stages={stage} first')
    state, meta = ckpt.restore(target)
    if not meta.get('finished'):
      raise CheckpointError(
          f'the {stage} stage in {directory} stopped at step {ckpt.restored_step} of '
          f'{total_steps}; finish it with --stages={stage}')
  finally:
    ckpt.close()
  return state, meta


def read_pytree_metadata(path: str) -> dict[str, Any]:
  """The JSON metadata that `save_pytree` stored in `path`, without reading the arrays.

  Raises:
    CheckpointError: `path` is missing, or its metadata cannot be read.
  """
  root = epath.Path(path if '://' in str(path) else os.path.abspath(path))
  if not root.exists():
    raise CheckpointError(f'{path} does not exist')
  with _composite_checkpointer() as checkpointer:
    try:
      restored = checkpointer.restore(
          root, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _as_corrupt(str(path), e) from e
  return dict(restored[_METADATA] or {})
