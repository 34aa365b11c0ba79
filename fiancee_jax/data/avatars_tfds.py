"""Avatars through TFDS (array_record, no TensorFlow needed) and reenactment batches.

`get_avatars_source(split=...)` returns a random-access source: `len(source)` and
`source[i] -> {'source', 'driver', 'target', 'swap': uint8 [H, W, 3], 'cross': bool []}`
(see `fiancee_jax.data.avatars` for what the images are). Split `train` holds self pairs
(target = driver, same identity as the source); `validation` and `test` hold cross pairs
(driver of another identity, target = the source's identity with the driver's motion).
The dataset is built on first use as `procedural_tfds` describes; record `i` of a split is
generator index `procedural_tfds.generator_index(split, i)`.

`input_pipeline.load` stacks only 'labels' and 'image', so reenactment batches come from
`batches` / `eval_batches` here, with the same contract as `input_pipeline.batches`: the
global batch at step s is a pure function of (seed, s) (the indices are
`input_pipeline.batch_indices`), so resuming at `start_step` needs no iterator state.
"""
import functools
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from fiancee_jax.data import avatars
from fiancee_jax.data import input_pipeline
from fiancee_jax.data import procedural_tfds

IMAGE_KEYS = ('source', 'driver', 'target', 'swap')

Batch = dict[str, np.ndarray]


def is_cross(split: str) -> bool:
  """Whether `split` holds cross pairs (validation, test) or self pairs (train)."""
  if split not in procedural_tfds.SPLITS:
    raise ValueError(f'unknown split {split!r}; known: {list(procedural_tfds.SPLITS)}')
  return split != 'train'


class Avatars(procedural_tfds.ProceduralBuilder):
  """Embedded procedural avatars (reenactment pairs), array_record."""

  GENERATOR = avatars
  VERSION = tfds.core.Version(avatars.GENERATOR_VERSION)
  RELEASE_NOTES = {'1.0.0': 'First generator.'}
  BUILDER_CONFIGS = [procedural_tfds.ProceduralConfig(generator=avatars)]  # 64x64

  def features(self, height: int, width: int) -> tfds.features.FeaturesDict:
    # Raw bytes: fast to write and read, no TF needed anywhere.
    image = functools.partial(tfds.features.Tensor, shape=(height, width, 3), dtype=np.uint8,
                              encoding='bytes')
    return tfds.features.FeaturesDict({
        'source': image(doc='identity A, motion m1'),
        'driver': image(doc='motion m2 (identity A in train, B in validation/test)'),
        'target': image(doc='identity A, motion m2 (= driver in train)'),
        'swap': image(doc='motion m2 with the identity the driver does not have'),
        'cross': tfds.features.Tensor(shape=(), dtype=np.bool_, encoding='bytes',
                                      doc='True for cross pairs'),
    })

  def example_kwargs(self, split: str) -> dict[str, Any]:
    return {'cross': is_cross(split)}


def get_avatars_source(*, split: str, resolution: tuple[int, int] | int, seed: int,
                       num_train: int, num_validation: int, num_test: int,
                       data_dir: str) -> procedural_tfds.ProceduralSource:
  """A random-access source of one avatars split (`procedural_tfds.get_source`).

  Split 'train' holds self pairs, 'validation' and 'test' cross pairs; 32 <= H, W <= 256.

  Returns:
    `source[i] -> {'source', 'driver', 'target', 'swap': uint8 [H, W, 3], 'cross': bool []}`.
  """
  return procedural_tfds.get_source(
      Avatars, split=split, resolution=resolution, seed=seed, num_train=num_train,
      num_validation=num_validation, num_test=num_test, data_dir=data_dir)


# ---------------------------------------------------------------------------
# Batches (the input_pipeline contract, with reenactment keys).


def read(source: Any, indices: np.ndarray) -> Batch:
  """Reads `source[i]` for each index, as stored: {'source', 'driver', 'target', 'swap':
  uint8 [B, H, W, 3], 'cross': bool [B], 'index': int32 [B]}."""
  indices = [int(i) for i in indices]
  getitems = getattr(source, '__getitems__', None)
  examples = getitems(indices) if getitems else [source[i] for i in indices]
  batch = {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in IMAGE_KEYS}
  batch['cross'] = np.asarray([bool(ex['cross']) for ex in examples], np.bool_)
  batch['index'] = np.asarray(indices, np.int32)
  return batch


def to_inputs(batch: Batch) -> Batch:
  """`read`'s batch -> model inputs: every image float32 in [-1, 1]."""
  return {**batch, **{k: batch[k].astype(np.float32) * np.float32(1 / 127.5) - 1.0
                      for k in IMAGE_KEYS}}


def load(source: Any, indices: np.ndarray) -> Batch:
  """`to_inputs(read(source, indices))`: {'source', 'driver', 'target', 'swap': float32
  [B, H, W, 3] in [-1, 1], 'cross': bool [B], 'index': int32 [B]}."""
  return to_inputs(read(source, indices))


def batches(source: Any, **kwargs: Any) -> Iterator[Batch]:
  """Training batches from global step `start_step` on: `input_pipeline.batches` (same
  arguments and determinism contract: step s of seed `seed` always holds the same examples,
  each process loads its contiguous part) with the keys of `load`."""
  return input_pipeline.batches(source, load_fn=load, **kwargs)


def eval_batches(source: Any, **kwargs: Any) -> Iterator[Batch]:
  """One in-order pass over `source`, the last batch padded: `input_pipeline.eval_batches`
  with the keys of `load` plus 'mask': bool [B] (False on padding)."""
  return input_pipeline.eval_batches(source, load_fn=load, **kwargs)


def check_batch(batch: dict[str, Any], *, resolution: tuple[int, int]) -> None:
  """Raises ValueError if a reenactment batch does not fit the config.

  Args:
    batch: {'source', 'driver', 'target', ...: float32 [B, H, W, 3] in [-1, 1]}.
    resolution: config.data.resolution (H, W).
  """
  h, w = (int(v) for v in resolution)
  shape = None
  for key in ('source', 'driver', 'target'):
    if key not in batch:
      raise ValueError(f'batch has no {key!r} (keys: {sorted(batch)}); avatars batches '
                       'come from avatars_tfds.batches')
    x = np.asarray(batch[key])
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.float32:
      raise ValueError(f'{key} must be float32 [B, H, W, 3], got {x.dtype} {x.shape}')
    if x.shape[1:3] != (h, w):
      raise ValueError(f'{key} is {x.shape[1]}x{x.shape[2]} but the config resolution is '
                       f'{h}x{w} (config.data.resolution)')
    if shape is not None and x.shape != shape:
      raise ValueError(f'{key} has shape {x.shape} but source has {shape}')
    shape = x.shape
    if np.isnan(x).any():
      raise ValueError(f'{key} has {int(np.isnan(x).sum())} NaN values')
    if x.size and (x.min() < -1.0 or x.max() > 1.0):
      raise ValueError(f'{key} must be in [-1, 1], got [{x.min()}, {x.max()}]')
