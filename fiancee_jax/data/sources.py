"""The one place that maps `config.data` to data: sources, loaded splits, batches.

Datasets (`config.data.name`) and the data tuple each gives:

- `landscapes`: embedded procedural label maps (`landscapes_tfds`), `(labels,)`.
- `avatars`: embedded procedural face pairs (`avatars_tfds`), `(source, driver)`.
- `ade20k`, `cityscapes`: the real label maps as OASIS trains on them, read from the
  user's files (`ade20k.py`, `cityscapes.py`, shared code in `manual_tfds.py`), `(labels,)`.

A dataset's data tuple must be what the backbone's task takes (`Dataset.data_keys` ==
`task.data_keys`; `config_checks.check_config` compares them before any compute).

Splits: `train` (training), `validation` (calibration, t*, samples during training) and
`test` (every reported figure). Validation never meets test: the procedural datasets draw
each split from its own index range, the real ones carve validation from the official
training split (seeded by config.data.seed) and test is the official validation split.

Batches are dicts of NumPy arrays. Label maps: `labels` int32 [B, H, W], `image` float32
[B, H, W, 3] in [-1, 1]; pairs: `source`, `driver`, `target`, `swap` float32
[B, H, W, 3] in [-1, 1], `cross` bool [B]; both with `index` int32 [B].
"""
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from fiancee_jax.data import ade20k
from fiancee_jax.data import avatars_tfds
from fiancee_jax.data import cityscapes
from fiancee_jax.data import input_pipeline
from fiancee_jax.data import landscapes
from fiancee_jax.data import landscapes_tfds
from fiancee_jax.data import manual_tfds

Batch = dict[str, np.ndarray]
Data = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """How one kind of dataset is opened, loaded and checked.

  Attributes:
    data_keys: the batch keys that form the data tuple a backbone consumes.
    open: (config.data, split) -> random-access source (`len`, `source[i] -> dict`).
    load: (source, indices int [B]) -> batch; `convert(read(source, indices))`.
    read: (source, indices) -> the batch as stored (uint8 images), what loader workers send.
    convert: `read`'s batch -> model inputs.
    check: (config.data, batch) -> None; raises ValueError naming the problem.
    reference: batch -> what the split has beyond the data: the real image of a label map
      ('image'), or the ground truth of a cross pair ('target').
  """
  data_keys: tuple[str, ...]
  open: Callable[[ml_collections.ConfigDict, str], Any]
  load: Callable[[Any, np.ndarray], Batch]
  read: Callable[[Any, np.ndarray], Batch]
  convert: Callable[[Batch], Batch]
  check: Callable[[ml_collections.ConfigDict, Batch], None]
  reference: Callable[[Batch], Batch]


def _open_landscapes(d: ml_collections.ConfigDict, split: str) -> Any:
  if d.num_classes != landscapes.NUM_CLASSES:
    raise ValueError(f'landscapes has {landscapes.NUM_CLASSES} classes but the config has '
                     f'{d.num_classes} (config.data.num_classes): set '
                     f'config.data.num_classes={landscapes.NUM_CLASSES}')
  return landscapes_tfds.get_landscapes_source(
      split=split, resolution=tuple(d.resolution), seed=d.seed, num_train=d.num_train,
      num_validation=d.num_validation, num_test=d.num_test, data_dir=d.data_dir)


def _open_avatars(d: ml_collections.ConfigDict, split: str) -> Any:
  return avatars_tfds.get_avatars_source(
      split=split, resolution=tuple(d.resolution), seed=d.seed, num_train=d.num_train,
      num_validation=d.num_validation, num_test=d.num_test, data_dir=d.data_dir)


def _opener(builder_cls: type[manual_tfds.ManualBuilder]) -> Callable[..., Any]:
  def open_split(d: ml_collections.ConfigDict, split: str) -> Any:
    return manual_tfds.get_source(
        builder_cls, split=split, resolution=tuple(d.resolution), num_classes=d.num_classes,
        num_validation=d.num_validation, seed=d.seed, data_dir=d.data_dir,
        manual_dir=d.manual_dir)
  return open_split


def _check_label_maps(d: ml_collections.ConfigDict, batch: Batch) -> None:
  input_pipeline.check_batch(batch, num_classes=d.num_classes,
                             resolution=tuple(d.resolution))


def _check_pairs(d: ml_collections.ConfigDict, batch: Batch) -> None:
  avatars_tfds.check_batch(batch, resolution=tuple(d.resolution))


def _pair_reference(batch: Batch) -> Batch:
  # Only cross pairs have a ground truth other than the driver itself.
  return {'target': batch['target']} if len(batch['cross']) and batch['cross'].all() else {}


_LABEL_MAPS = dict(data_keys=('labels',), load=input_pipeline.load, read=input_pipeline.read,
                   convert=input_pipeline.to_inputs, check=_check_label_maps,
                   reference=lambda batch: {'image': batch['image']})
_PAIRS = dict(data_keys=('source', 'driver'), load=avatars_tfds.load, read=avatars_tfds.read,
              convert=avatars_tfds.to_inputs, check=_check_pairs,
              reference=_pair_reference)

DATASETS: dict[str, Dataset] = {
    'landscapes': Dataset(open=_open_landscapes, **_LABEL_MAPS),
    'avatars': Dataset(open=_open_avatars, **_PAIRS),
    'ade20k': Dataset(open=_opener(ade20k.Ade20kOasis), **_LABEL_MAPS),
    'cityscapes': Dataset(open=_opener(cityscapes.CityscapesOasis), **_LABEL_MAPS),
}


def dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The Dataset of config.data.name; ValueError naming the known ones otherwise."""
  name = config.data.name
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r} (config.data.name); known: '
                     f'{", ".join(sorted(DATASETS))}')
  return DATASETS[name]


def data_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The keys of the data tuple the config's dataset gives, e.g. ('labels',)."""
  return dataset(config).data_keys


def data_source(config: ml_collections.ConfigDict, split: str) -> Any:
  """Random-access source of the config's dataset split (len(source), source[i] -> dict)."""
  return dataset(config).open(config.data, split)


def load_split(config: ml_collections.ConfigDict, split: str, n: int) -> Batch:
  """The first n examples of `split`: the data keys, plus what the split has beyond the
  data: 'image' (float32 [n, H, W, 3] in [-1, 1], the real image of a label map) or
  'target' (the same, the ground truth of cross pairs)."""
  ds = dataset(config)
  source = data_source(config, split)
  batch = ds.load(source, np.arange(min(n, len(source))))
  return {**{k: batch[k] for k in ds.data_keys}, **ds.reference(batch)}


def load_data(config: ml_collections.ConfigDict, split: str, n: int) -> Data:
  """The data tuple of the first n examples of `split`."""
  loaded = load_split(config, split, n)
  return tuple(loaded[k] for k in data_keys(config))


def train_batches(config: ml_collections.ConfigDict, source: Any, *, batch_size: int,
                  seed: int, start_step: int = 0, prefetch: int | None = None,
                  convert: bool = True) -> Iterator[Batch]:
  """Deterministic training batches (step s of `seed` is always the same) of this process.

  `input_pipeline.batches` with the dataset's batch keys, mirrored at random when
  config.data.flip; `prefetch` defaults to config.data.prefetch; loaded in
  config.data.workers worker processes (0: a thread).
  """
  return input_pipeline.batches(
      source, batch_size=batch_size, seed=seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      prefetch=config.data.prefetch if prefetch is None else prefetch,
      load_fn=dataset(config).read,
      convert_fn=dataset(config).convert if convert else None,
      flip=config.data.flip, workers=config.data.get('workers', 0))


def eval_batches(config: ml_collections.ConfigDict, source: Any, *, batch_size: int,
                 prefetch: int = 2) -> Iterator[Batch]:
  """One in-order pass over `source`, the last batch padded (`input_pipeline.eval_batches`
  with the dataset's batch keys plus 'mask': bool [B], False on padding)."""
  return input_pipeline.eval_batches(source, batch_size=batch_size, prefetch=prefetch,
                                     load_fn=dataset(config).load)


def check_batch(config: ml_collections.ConfigDict, batch: dict[str, Any]) -> None:
  """Raises ValueError naming the problem if a batch does not fit the config."""
  dataset(config).check(config.data, batch)
