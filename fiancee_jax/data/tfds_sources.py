"""Random-access data sources through TFDS (array_record), no TensorFlow needed.

`get_source(name=..., split=...)` returns a `RandomAccessSource`: `len(source)`
and `source[i] -> {'labels': uint8 [H, W], 'image': uint8 [H, W, 3]}`, already
resized to `resolution` and remapped to the config's class ids.

Datasets (config.data.name):

* `landscapes` (12 classes): the embedded procedural dataset
  (`fiancee_jax.data.landscapes`). `get_source` builds it on first use into
  `data_dir/landscapes/{H}x{W}_seed{S}_{train}-{validation}-{test}/{version}/`
  as array_record files (a few seconds at 64x64), so resolutions, seeds and
  split sizes never collide. Building needs no TensorFlow: the features are
  `tfds.features.Tensor` stored as raw bytes, which TFDS serialises with its own
  protobuf copy. Splits use disjoint generator indices: train `[0, n)`,
  validation `2**30 + [0, n)`, test `2**31 + [0, n)`, and record `i` of a split
  is generator index `offset + i` (shuffling is disabled in the builder).
  Concurrent builders of the same dataset are serialised by a lock file in
  `data_dir`; TFDS itself writes into `incomplete.*` and renames on success, so a
  reader never sees a half-written dataset.

* `scene_parse150` (ADE20K, 151 classes: 0 = other/unlabelled + 150): TFDS
  features `image` (jpeg) and `annotation` (png, [H, W, 3]); the class id is the
  annotation's first channel. Caveat: the stock TFDS builder (1.0.0) packs the
  Places-Challenge *instance* annotations, whose red channel is one of 100 object
  categories (0 = stuff/none), not the 150-class scene-parsing map that OASIS
  uses. For the OASIS setting, prepare the dataset from
  `ADEChallengeData2016/annotations` (single channel, 0..150) under the same
  features, or pass a `class_map`. Splits: `train`; `validation` and `test`
  both read TFDS `test` (= the ADE20K validation images, what OASIS evaluates).

* `cityscapes` (TFDS config `semantic_segmentation`; 34 classes = the official
  labelIds 0..33, 0 = unlabelled): features `image_left` and
  `segmentation_label`. `CITYSCAPES_TRAIN_ID_MAP` maps them to the 19 training
  classes + 0 = ignored (use with `num_classes=20`). Splits: `train`,
  `validation`; `test` reads `validation` (test labels are not public).

How to supply the real files (once, on any machine; copy `data_dir` after):

  pip install tensorflow tensorflow-datasets   # TFDS's ADE/Cityscapes builders
                                               # list files with tf.io.gfile
  # ADE20K downloads itself:
  tfds build scene_parse150 --file_format=array_record --data_dir=DATA_DIR
  # Cityscapes needs a login: download leftImg8bit_trainvaltest.zip and
  # gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/ into
  # MANUAL_DIR (TFDS's manual_dir, default DATA_DIR/downloads/manual), then
  tfds build cityscapes/semantic_segmentation --file_format=array_record \
      --data_dir=DATA_DIR --manual_dir=MANUAL_DIR

and set `config.data.data_dir=DATA_DIR`. Reading needs no TensorFlow (images
decode with PIL). Datasets prepared earlier as tfrecord must be rebuilt (or
converted with `tfds convert_format`) to array_record: random access needs it.
"""
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Iterator, Protocol

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fiancee_jax.data import landscapes

try:
  import fcntl
except ImportError:  # Not POSIX: rely on TFDS's rename alone.
  fcntl = None

SPLITS = ('train', 'validation', 'test')
# Generator index offsets per split: disjoint as long as a split has < 2**30.
SPLIT_OFFSETS = {'train': 0, 'validation': 1 << 30, 'test': 1 << 31}
NATIVE_NUM_CLASSES = {'landscapes': landscapes.NUM_CLASSES,
                      'scene_parse150': 151, 'cityscapes': 34}
# Cityscapes labelId (0..33) -> trainId + 1 (1..19); 0 = ignored.
CITYSCAPES_TRAIN_ID_MAP = np.array(
    [0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 5, 0, 0, 0, 6, 0, 7, 8, 9, 10,
     11, 12, 13, 14, 15, 16, 0, 0, 17, 18, 19], np.int32)
CITYSCAPES_TRAIN_ID_MAP.flags.writeable = False

# (TFDS name, image feature, label feature, our split -> TFDS split).
_REAL = {
    'scene_parse150': ('scene_parse150', 'image', 'annotation',
                       {'train': 'train', 'validation': 'test',
                        'test': 'test'}),
    'cityscapes': ('cityscapes/semantic_segmentation', 'image_left',
                   'segmentation_label',
                   {'train': 'train', 'validation': 'validation',
                    'test': 'validation'}),
}
# Below this many pixels in a split, generate in one process (helpers start
# in ~0.2 s).
_PARALLEL_MIN_PIXELS = 1 << 21


def generator_index(split: str, index: int) -> int:
  """The landscapes generator index of record `index` of `split`.

  E.g. `landscapes.difficulty(config.data.seed, generator_index('test', i))`
  is the difficulty of test example i.
  """
  if split not in SPLIT_OFFSETS:
    raise ValueError(f'unknown split {split!r}; known: {list(SPLITS)}')
  return SPLIT_OFFSETS[split] + int(index)


class RandomAccessSource(Protocol):
  """What `get_source` returns (grain-compatible random access)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ...


# ---------------------------------------------------------------------------
# Landscapes builder.


class LandscapesConfig(tfds.core.BuilderConfig):
  """Landscapes at one resolution, seed and split sizes."""

  def __init__(self, *, height: int = 64, width: int = 64, seed: int = 0,
               num_train: int = 2048, num_validation: int = 256,
               num_test: int = 512):
    for key, v in (('resolution', height), ('resolution', width)):
      if not landscapes.MIN_SIZE <= v <= landscapes.MAX_SIZE:
        raise ValueError(
            f'landscapes resolution must be in [{landscapes.MIN_SIZE}, '
            f'{landscapes.MAX_SIZE}], got {(height, width)} '
            f'(config.data.{key})')
    for key, v in (('num_train', num_train),
                   ('num_validation', num_validation),
                   ('num_test', num_test)):
      if not 0 <= v < (1 << 30):
        raise ValueError(f'config.data.{key} must be in [0, 2**30), got {v}')
    if num_train < 1:
      raise ValueError(f'config.data.num_train must be >= 1, got {num_train}')
    if seed < 0:
      raise ValueError(f'config.data.seed must be >= 0, got {seed}')
    super().__init__(
        name=(f'{height}x{width}_seed{seed}_'
              f'{num_train}-{num_validation}-{num_test}'),
        description=(f'{height}x{width} landscapes, generator seed {seed}, '
                     f'{num_train}/{num_validation}/{num_test} examples.'))
    self.height, self.width, self.seed = height, width, seed
    self.num_examples = {'train': num_train, 'validation': num_validation,
                         'test': num_test}


_CONFIG_NAME = re.compile(r'(\d+)x(\d+)_seed(\d+)_(\d+)-(\d+)-(\d+)')


@functools.cache
def _parse_config_name(name: str) -> LandscapesConfig | None:
  """'64x64_seed0_2048-256-512' -> its config (the same object every time)."""
  match = _CONFIG_NAME.fullmatch(name)
  if not match:
    return None
  h, w, seed, tr, va, te = (int(v) for v in match.groups())
  return LandscapesConfig(height=h, width=w, seed=seed, num_train=tr,
                          num_validation=va, num_test=te)


class Landscapes(tfds.core.GeneratorBasedBuilder):
  """Embedded procedural landscapes (label map + image), array_record."""

  VERSION = tfds.core.Version(landscapes.GENERATOR_VERSION)
  RELEASE_NOTES = {'1.0.0': 'First generator.'}
  BUILDER_CONFIGS = [LandscapesConfig()]  # the default 64x64 config

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS 4.9.10 locates the checksums file next to the code with the
    # `importlib_resources` backport, which Python >= 3.9 does not install.
    # Landscapes downloads nothing, so there is nothing to locate.
    return None

  @classmethod
  def get_builder_config(cls, name: str, version=None
                         ) -> tfds.core.BuilderConfig | None:
    # Any well-formed name is a config, so `Landscapes(config=NAME)` and
    # `tfds.builder('landscapes/NAME')` work for every resolution and seed.
    if config := super().get_builder_config(name, version):
      return config
    return _parse_config_name(name)

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """`num_workers`: processes generating examples (default: up to 2)."""
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.builder_config.height, self.builder_config.width
    return tfds.core.DatasetInfo(
        builder=self,
        description=landscapes.__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            # Raw bytes: fast to write and read, no TF needed anywhere.
            'labels': tfds.features.Tensor(
                shape=(h, w), dtype=np.uint8, encoding='bytes',
                doc='class ids into landscapes.CLASSES'),
            'image': tfds.features.Tensor(
                shape=(h, w, 3), dtype=np.uint8, encoding='bytes'),
        }),
        supervised_keys=('labels', 'image'),
        # Record i of a split is generator index offset + i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS
            if self.builder_config.num_examples[split] > 0}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    offset, n = SPLIT_OFFSETS[split], cfg.num_examples[split]
    workers = self._num_workers
    if workers is None:
      big = n * cfg.height * cfg.width >= _PARALLEL_MIN_PIXELS
      workers = min(2, os.cpu_count() or 1) if big else 1
    # This process generates the first part while helpers make the others.
    bounds = np.linspace(0, n, max(workers, 1) + 1).astype(int)
    with _Helpers(cfg, offset, bounds[1:]) as helpers:
      i = 0
      for part in range(len(bounds) - 1):
        if part == 0:
          examples = (landscapes.generate(cfg.seed, offset + j, cfg.height,
                                          cfg.width)
                      for j in range(bounds[0], bounds[1]))
        else:
          examples = helpers.result(part - 1)
        for labels, image in examples:
          yield i, {'labels': labels, 'image': image}
          i += 1


# Run by helper processes: loads landscapes.py by path, so that neither the
# package's __init__ nor the caller's __main__ is imported (unlike
# multiprocessing's spawn), and nothing is forked from a threaded process.
_HELPER_CODE = """
import importlib.util, sys
import numpy as np
path, seed, start, stop, h, w, out = sys.argv[1:]
spec = importlib.util.spec_from_file_location('_landscapes_helper', path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
pairs = [mod.generate(int(seed), i, int(h), int(w))
         for i in range(int(start), int(stop))]
np.savez(out, labels=np.stack([p[0] for p in pairs]),
         image=np.stack([p[1] for p in pairs]))
"""


class _Helpers:
  """Helper processes generating parts [bounds[k], bounds[k+1]) of a split."""

  def __init__(self, cfg: LandscapesConfig, offset: int, bounds: np.ndarray):
    self._cfg, self._offset, self._bounds = cfg, offset, bounds
    self._procs = []

  def __enter__(self) -> '_Helpers':
    self._tmp = None
    if len(self._bounds) > 1:
      self._tmp = tempfile.TemporaryDirectory(prefix='landscapes-')
    for k in range(len(self._bounds) - 1):
      out = os.path.join(self._tmp.name, f'part{k}.npz')
      cmd = [sys.executable, '-c', _HELPER_CODE, landscapes.__file__,
             str(self._cfg.seed), str(self._offset + self._bounds[k]),
             str(self._offset + self._bounds[k + 1]), str(self._cfg.height),
             str(self._cfg.width), out]
      self._procs.append((subprocess.Popen(cmd, stderr=subprocess.PIPE), out))
    return self

  def result(self, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    proc, out = self._procs[k]
    _, err = proc.communicate()
    if proc.returncode:
      raise RuntimeError(f'landscapes helper process failed:\n{err.decode()}')
    with np.load(out) as data:
      labels, image = data['labels'], data['image']
    return zip(labels, image)

  def __exit__(self, *exc) -> None:
    for proc, _ in self._procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
      proc.stderr.close()
    if self._tmp is not None:
      self._tmp.cleanup()


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """Exclusive lock across processes (POSIX flock); a no-op elsewhere."""
  if fcntl is None:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def landscapes_builder(*, resolution: tuple[int, int], seed: int,
                       num_train: int, num_validation: int, num_test: int,
                       data_dir: str = '',
                       num_workers: int | None = None) -> Landscapes:
  """Returns the landscapes builder, preparing the dataset if missing.

  Safe to call from several processes at once on the same data_dir: one
  builds, the others wait on a lock file and then read.
  """
  height, width = (int(v) for v in resolution)
  config = LandscapesConfig(height=height, width=width, seed=int(seed),
                            num_train=int(num_train),
                            num_validation=int(num_validation),
                            num_test=int(num_test))

  def make():
    return Landscapes(config=config.name, data_dir=data_dir or None,
                      num_workers=num_workers)

  builder = make()
  if builder.is_prepared():
    return builder
  lock = os.path.join(os.fspath(builder.data_dir_root),
                      f'.landscapes-{builder.builder_config.name}.lock')
  with _file_lock(lock):
    builder = make()  # Re-read: another process may have built it meanwhile.
    if not builder.is_prepared():
      try:
        builder.download_and_prepare(file_format='array_record')
      except OSError:
        # Without a working lock (e.g. some network file systems) two builders
        # race; TFDS's final rename fails for the loser, the data is intact.
        if not make().is_prepared():
          raise
      builder = make()
  return builder


# ---------------------------------------------------------------------------
# Sources.


class _Landscapes:
  """TFDS landscapes split; already at resolution and in our class ids."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._source[index]
    return {'labels': np.asarray(ex['labels']),
            'image': np.asarray(ex['image'])}

  def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
    # One array_record read for the whole batch.
    return [{'labels': np.asarray(ex['labels']),
             'image': np.asarray(ex['image'])}
            for ex in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f'LandscapesSource({self._source!r})'


def resize_example(labels: np.ndarray, image: np.ndarray,
                   resolution: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Resizes to (H, W): labels by nearest neighbour, image bilinear.

  Args:
    labels: uint8 [h, w] class ids.
    image: uint8 [h', w', 3] (may differ in size from labels).
    resolution: (H, W) target.

  Returns:
    (labels uint8 [H, W], image uint8 [H, W, 3]). The aspect ratio is not
    kept (as in OASIS); PIL's bilinear filter widens its support when
    shrinking, so downsampling averages like an area filter.
  """
  h, w = resolution
  if labels.shape != (h, w):
    labels = np.asarray(Image.fromarray(labels).resize(
        (w, h), Image.Resampling.NEAREST))
  if image.shape[:2] != (h, w):
    image = np.asarray(Image.fromarray(image).resize(
        (w, h), Image.Resampling.BILINEAR))
  return labels, image


def check_class_map(class_map: np.ndarray | None, num_classes: int
                    ) -> np.ndarray | None:
  """Validates a raw id -> class id table; returns it as int32 [R] or None."""
  if class_map is None:
    return None
  class_map = np.asarray(class_map)
  if class_map.ndim != 1 or not np.issubdtype(class_map.dtype, np.integer):
    raise ValueError(f'class_map must be a 1-D integer array (raw id -> class '
                     f'id), got {class_map.dtype} {class_map.shape}')
  bad = np.flatnonzero((class_map < 0) | (class_map >= num_classes))
  if bad.size:
    raise ValueError(
        f'class_map maps raw id {bad[0]} to {class_map[bad[0]]} but the config '
        f'has {num_classes} classes (config.data.num_classes)')
  return class_map.astype(np.int32)


class RemappedSource:
  """Wraps a TFDS source of a real dataset: picks, remaps, resizes.

  `source[i]` reads the TFDS example, takes the label feature's first channel
  as raw class ids, maps them through `class_map` (if any) and resizes.
  """

  def __init__(self, source: Any, *, image_key: str, label_key: str,
               resolution: tuple[int, int], num_classes: int,
               class_map: np.ndarray | None = None):
    self._source = source
    self._image_key, self._label_key = image_key, label_key
    self._resolution = tuple(int(v) for v in resolution)
    self._num_classes = num_classes
    self._class_map = check_class_map(class_map, num_classes)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._source[index]
    raw = np.asarray(ex[self._label_key])
    if raw.ndim == 3:
      raw = raw[..., 0]  # ADE: R channel; Cityscapes: the only channel.
    image = np.asarray(ex[self._image_key])
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    elif image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if self._class_map is not None:
      if raw.size and raw.max() >= len(self._class_map):
        raise ValueError(
            f'example {index} has raw class id {raw.max()} but class_map only '
            f'covers ids < {len(self._class_map)}: pass a longer class_map')
      labels = self._class_map[raw]
    else:
      labels = raw
    if labels.size and labels.max() >= self._num_classes:
      raise ValueError(
          f'labels has class id {labels.max()} but the config has '
          f'{self._num_classes} classes (config.data.num_classes); pass a '
          f'class_map to merge or drop ids')
    labels, image = resize_example(labels.astype(np.uint8),
                                   image.astype(np.uint8), self._resolution)
    return {'labels': labels, 'image': image}

  def __repr__(self) -> str:
    return (f'RemappedSource({self._source!r}, resolution={self._resolution}, '
            f'num_classes={self._num_classes})')


def get_source(*, name: str, split: str, resolution: tuple[int, int] | int,
               num_classes: int, seed: int, num_train: int,
               num_validation: int, num_test: int, data_dir: str,
               class_map: np.ndarray | None = None) -> RandomAccessSource:
  """Returns a random-access source of one split (see module docstring).

  Args:
    name: config.data.name: 'landscapes', 'scene_parse150' or 'cityscapes'.
    split: 'train', 'validation' or 'test'.
    resolution: (H, W) of the examples returned (an int means square).
    num_classes: config.data.num_classes; must equal the dataset's (12, 151,
      34) unless a `class_map` is given, whose values must be below it.
    seed: generator seed (landscapes only).
    num_train: examples in split 'train' (landscapes only).
    num_validation: examples in split 'validation' (landscapes only).
    num_test: examples in split 'test' (landscapes only).
    data_dir: TFDS data_dir; '' means TFDS's default (~/tensorflow_datasets).
    class_map: int [R] raw dataset id -> class id (real datasets only).

  Returns:
    `source` with `len(source)` and `source[i] -> {'labels': uint8 [H, W],
    'image': uint8 [H, W, 3]}`.

  Raises:
    ValueError: unknown name or split, or a class count that does not match.
    FileNotFoundError: a real dataset that was not prepared in data_dir.
  """
  if name not in NATIVE_NUM_CLASSES:
    raise ValueError(f'unknown dataset {name!r} (config.data.name); known: '
                     f'{sorted(NATIVE_NUM_CLASSES)}')
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; known: {list(SPLITS)}')
  native = NATIVE_NUM_CLASSES[name]
  if class_map is None and num_classes != native:
    raise ValueError(
        f'{name} has {native} classes but the config has {num_classes} '
        f'(config.data.num_classes): set config.data.num_classes={native}'
        + ('' if name == 'landscapes' else ' or pass a class_map'))
  if isinstance(resolution, int):
    resolution = (resolution, resolution)
  resolution = tuple(int(v) for v in resolution)
  if len(resolution) != 2:
    raise ValueError(f'resolution must be (H, W), got {resolution} '
                     f'(config.data.resolution)')

  if name == 'landscapes':
    if class_map is not None:
      raise ValueError('class_map applies to real datasets, not landscapes')
    sizes = {'train': num_train, 'validation': num_validation,
             'test': num_test}
    if sizes[split] < 1:
      raise ValueError(f'split {split!r} is empty: set '
                       f'config.data.num_{split} > 0')
    builder = landscapes_builder(
        resolution=resolution, seed=seed, num_train=num_train,
        num_validation=num_validation, num_test=num_test, data_dir=data_dir)
    return _Landscapes(builder.as_data_source(split=split))

  tfds_name, image_key, label_key, split_map = _REAL[name]
  try:
    source = tfds.data_source(tfds_name, split=split_map[split],
                              data_dir=data_dir or None, download=False)
  except (NotImplementedError, AssertionError, FileNotFoundError,
          tfds.core.DatasetNotFoundError) as e:
    where = data_dir or '~/tensorflow_datasets'
    if tfds.builder(tfds_name, data_dir=data_dir or None).is_prepared():
      problem = (f'{tfds_name} is prepared in {where!r} but not as '
                 f'array_record, which random access needs')
    else:
      problem = f'{tfds_name} is not prepared in {where!r}'
    raise FileNotFoundError(
        f'{problem} (config.data.data_dir): see the docstring of '
        f'fiancee_jax/data/tfds_sources.py for the steps. TFDS said: {e}'
    ) from e
  return RemappedSource(source, image_key=image_key, label_key=label_key,
                        resolution=resolution, num_classes=num_classes,
                        class_map=class_map)
