"""TFDS builders of real label-map datasets read from the user's files: the shared code.

ADE20K (`ade20k.py`) and Cityscapes (`cityscapes.py`) are read as OASIS reads them, from
the official archives extracted into a *manual directory* (TFDS's `manual_dir`; nothing
is downloaded). A builder lists (image, label map) file pairs of the official splits,
checks the layout before reading anything, and stores every pair at one resolution:
the image resized bicubic, the label map nearest neighbour (as OASIS's loaders), both as
PNG (lossless; read with PIL, no TensorFlow anywhere). The TFDS config name is the
resolution (`256x256`), so the dataset lands in `data_dir/<name>/256x256/<version>/`;
building is serialised across processes by a lock file, like the procedural datasets.

Splits as the pipeline uses them (`get_source`):

- `test`: the official validation split (what OASIS evaluates on);
- `validation` (calibration, t*, samples during training): `num_validation` examples
  carved from the official training split by a permutation seeded with `seed`;
- `train`: the rest of the official training split.

Record names and SHA-1s of the source files are kept in the dataset's metadata; a
calibration or training example whose file name or image content also occurs in test is
refused.
"""
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fiancee_jax.data import procedural_tfds

SPLITS = ('train', 'validation', 'test')
# Builder splits: the official ones.
OFFICIAL_SPLITS = ('train', 'validation')
_CARVE_STREAM = 0x63617276  # 'carv': the carve's own random stream of the data seed


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example's files: the image, its label map, and a name unique in its split."""
  image: str
  labels: str
  name: str


class LayoutError(FileNotFoundError):
  """The manual directory does not hold the dataset in its official layout."""


class ManualConfig(tfds.core.BuilderConfig):
  """One resolution (H, W) of a real dataset."""

  def __init__(self, *, height: int, width: int):
    if not (16 <= height <= 2048 and 16 <= width <= 2048):
      raise ValueError(f'resolution must be in [16, 2048], got {(height, width)} '
                       '(config.data.resolution)')
    super().__init__(name=f'{height}x{width}',
                     description=f'Images and label maps resized to {height}x{width}.')
    self.height, self.width = height, width


class ManualBuilder(procedural_tfds.ParsedConfigBuilder, skip_registration=True):
  """A real label-map dataset from the official files in `manual_dir`.

  Subclasses set NUM_CLASSES and LAYOUT (how the files are laid out: TFDS's manual
  download instructions and the errors' text) and implement `list_pairs(root, split)` for
  the official splits 'train' and 'validation'; `find_root(manual_dir)` may look below
  manual_dir.
  """
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'The official files at one resolution per config.'}
  BUILDER_CONFIGS = [ManualConfig(height=256, width=256)]
  NUM_CLASSES: ClassVar[int]
  LAYOUT: ClassVar[str]

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = getattr(cls, 'LAYOUT', None)

  @classmethod
  def parse_config_name(cls, name: str) -> ManualConfig | None:
    parts = name.split('x')
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
      return None
    return ManualConfig(height=int(parts[0]), width=int(parts[1]))

  @classmethod
  def find_root(cls, manual_dir: str) -> str:
    """The dataset's root below (or at) manual_dir."""
    return manual_dir

  @classmethod
  def list_pairs(cls, root: str, split: str) -> list[Pair]:
    """The (image, label map) files of official split 'train' or 'validation', sorted."""
    raise NotImplementedError

  @classmethod
  def check_layout(cls, manual_dir: str) -> dict[str, list[Pair]]:
    """Lists both official splits; LayoutError (naming the expected layout) if absent."""
    root = cls.find_root(manual_dir)
    return {split: cls.list_pairs(root, split) for split in OFFICIAL_SPLITS}

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.builder_config.height, self.builder_config.width
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(h, w, 3), encoding_format='png'),
            'labels': tfds.features.Image(shape=(h, w, 1), encoding_format='png',
                                          doc=f'class ids in [0, {self.NUM_CLASSES})'),
        }),
        # Record i of a split is file pair i of the sorted listing (metadata['names']).
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    pairs = self.check_layout(os.fspath(dl_manager.manual_dir))
    self.info.metadata['names'] = {s: [p.name for p in ps] for s, ps in pairs.items()}
    self.info.metadata['sha1'] = {s: [_sha1(p.image) for p in ps] for s, ps in pairs.items()}
    return {split: self._generate_examples(ps) for split, ps in pairs.items()}

  def _generate_examples(self, pairs: list[Pair]) -> Iterator[tuple[int, dict[str, Any]]]:
    size = (self.builder_config.width, self.builder_config.height)
    for i, pair in enumerate(pairs):
      image, labels = read_pair(pair, self.NUM_CLASSES)
      # PIL images: TFDS encodes them as PNG with PIL (arrays would need TensorFlow).
      yield i, {'image': image.resize(size, Image.Resampling.BICUBIC),
                'labels': labels.resize(size, Image.Resampling.NEAREST)}


def _sha1(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha1(f.read()).hexdigest()


def read_pair(pair: Pair, num_classes: int) -> tuple[Image.Image, Image.Image]:
  """Opens one pair as (RGB image, single-channel label map) at the files' size.

  Raises:
    ValueError: a label map with several channels, class ids >= num_classes, or an image
      whose size differs from its label map's.
  """
  with Image.open(pair.image) as f:
    image = f.convert('RGB')
  with Image.open(pair.labels) as f:
    labels = f.copy()
  if labels.mode not in ('L', 'P', 'I', 'I;16'):
    raise ValueError(f'{pair.labels} is a {labels.mode} image; label maps must hold one '
                     'class id per pixel (a single channel), not colours')
  ids = np.asarray(labels)
  if ids.size and int(ids.max()) >= num_classes:
    raise ValueError(f'{pair.labels} has class id {int(ids.max())} but the dataset has '
                     f'{num_classes} classes (ids 0..{num_classes - 1})')
  if image.size != labels.size:
    raise ValueError(f'{pair.image} is {image.size[0]}x{image.size[1]} but its label map '
                     f'{pair.labels} is {labels.size[0]}x{labels.size[1]} (W x H)')
  return image, Image.fromarray(ids.astype(np.uint8))


def match_pairs(images: dict[str, str], labels: dict[str, str], *, what: str,
                layout: str) -> list[Pair]:
  """Pairs files by key (sorted); LayoutError naming the layout if either side is empty
  or a key has no partner.

  Args:
    images: key -> image path.
    labels: key -> label map path.
    what: the directories looked at, for errors.
    layout: the expected layout, for errors.
  """
  if not images or not labels:
    raise LayoutError(f'no {"images" if not images else "label maps"} in {what}; expected '
                      f'{layout}')
  lonely = sorted(set(images) ^ set(labels))
  if lonely:
    side = 'image' if lonely[0] in images else 'label map'
    raise LayoutError(f'{len(lonely)} files in {what} have no partner, e.g. the {side} '
                      f'{lonely[0]!r}; expected {layout}')
  return [Pair(images[k], labels[k], k) for k in sorted(images)]


def list_dir(path: str, suffix: str, *, layout: str) -> list[str]:
  """Sorted names in `path` ending with `suffix`; LayoutError naming the layout if the
  directory is missing."""
  if not os.path.isdir(path):
    raise LayoutError(f'{path} is not a directory; expected {layout}')
  return sorted(n for n in os.listdir(path) if n.endswith(suffix))


def prepared_builder(builder_cls: type[ManualBuilder], *, resolution: tuple[int, int] | int,
                     data_dir: str, manual_dir: str) -> ManualBuilder:
  """The builder at `resolution`, preparing it from manual_dir if it is not prepared yet.

  Several processes on one data_dir: one builds, the others wait on a lock file.
  """
  height, width = procedural_tfds.check_resolution(resolution)
  config = ManualConfig(height=height, width=width)

  def make():
    return builder_cls(config=config.name, data_dir=data_dir or None)

  builder = make()
  if builder.is_prepared():
    return builder
  manual = manual_dir or os.path.join(os.fspath(builder.data_dir_root), 'downloads', 'manual')
  builder_cls.check_layout(manual)  # before the lock: a wrong path fails at once
  return procedural_tfds.prepare_once(
      make, download_config=tfds.download.DownloadConfig(manual_dir=manual))


def carve(num_train: int, num_validation: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits official-train record ids into (train, validation), both sorted.

  A pure function of its arguments: validation is the first `num_validation` of a
  permutation of range(num_train) drawn from default_rng([seed, 'carv']).
  """
  if not 0 < num_validation < num_train:
    raise ValueError(f'config.data.num_validation={num_validation} must be in [1, '
                     f'{num_train - 1}]: the calibration split is carved from the '
                     f'{num_train} official training examples')
  order = np.random.default_rng([seed, _CARVE_STREAM]).permutation(num_train)
  return np.sort(order[num_validation:]), np.sort(order[:num_validation])


def check_disjoint(name: str, part: dict[str, list[str]], test: dict[str, list[str]]) -> None:
  """ValueError if an example of `part` has a file name or image content found in test.

  Args:
    name: 'validation' or 'train', for the error.
    part: {'names': [...], 'sha1': [...]} of the part's examples.
    test: the same of the test split.
  """
  for key, what in (('names', 'file name'), ('sha1', 'image content (SHA-1)')):
    shared = sorted(set(part[key]) & set(test[key]))
    if shared:
      example = part['names'][part[key].index(shared[0])]
      raise ValueError(
          f'the {name} split would overlap test: {len(shared)} examples share their {what} '
          f'with the official validation split, e.g. {example!r}. Remove the official '
          'validation files from the training directory; every reported figure is on test')


class IndexedSource:
  """Records `indices` of a TFDS source: `source[i] -> {'labels': uint8 [H, W], 'image':
  uint8 [H, W, 3]}`."""

  def __init__(self, source: Any, indices: np.ndarray, description: str):
    self._source, self._indices = source, np.asarray(indices, np.int64)
    self._description = description

  def __len__(self) -> int:
    return len(self._indices)

  @staticmethod
  def _example(ex: dict[str, Any]) -> dict[str, np.ndarray]:
    return {'labels': np.asarray(ex['labels'])[..., 0], 'image': np.asarray(ex['image'])}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._example(self._source[int(self._indices[index])])

  def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
    ids = [int(self._indices[i]) for i in indices]
    return [self._example(ex) for ex in self._source.__getitems__(ids)]

  def __repr__(self) -> str:
    return f'IndexedSource({self._description}, {len(self)} examples)'


def get_source(builder_cls: type[ManualBuilder], *, split: str,
               resolution: tuple[int, int] | int, num_classes: int, num_validation: int,
               seed: int, data_dir: str, manual_dir: str) -> IndexedSource:
  """A random-access source of one pipeline split (see the module docstring).

  `builder_cls` is the dataset's ManualBuilder subclass; `num_classes` must be its class
  count (config.data.num_classes); `num_validation` examples are carved from the official
  training split with `seed` (config.data.num_validation, config.data.seed); the files
  are read from `manual_dir` ('' means data_dir/downloads/manual) if the dataset is not
  prepared in `data_dir` at `resolution` yet.

  Returns:
    `source[i] -> {'labels': uint8 [H, W], 'image': uint8 [H, W, 3]}`.

  Raises:
    ValueError: unknown split, a class count that is not the dataset's, a carve that does
      not fit, or a validation or train split that would overlap test.
    LayoutError: the dataset is not prepared and manual_dir does not hold it.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; known: {list(SPLITS)}')
  if num_classes != builder_cls.NUM_CLASSES:
    raise ValueError(f'{builder_cls.name} has {builder_cls.NUM_CLASSES} classes but the '
                     f'config has {num_classes} (config.data.num_classes): set '
                     f'config.data.num_classes={builder_cls.NUM_CLASSES}')
  builder = prepared_builder(builder_cls, resolution=resolution, data_dir=data_dir,
                             manual_dir=manual_dir)
  meta = builder.info.metadata
  info = {s: {k: meta[k][s] for k in ('names', 'sha1')} for s in OFFICIAL_SPLITS}
  if split == 'test':
    n = len(info['validation']['names'])
    return IndexedSource(builder.as_data_source(split='validation'), np.arange(n),
                         f'{builder.name} test = official validation')
  train_ids, val_ids = carve(len(info['train']['names']), num_validation, seed)
  ids = val_ids if split == 'validation' else train_ids
  part = {k: [v[i] for i in ids] for k, v in info['train'].items()}
  check_disjoint(split, part, info['validation'])
  return IndexedSource(builder.as_data_source(split='train'), ids,
                       f'{builder.name} {split} carved from official train, seed {seed}')
