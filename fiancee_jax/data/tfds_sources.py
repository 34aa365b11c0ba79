"""Real datasets through TFDS's own builders (array_record), no TensorFlow needed to read.

`get_source(name=..., split=...)` returns a random-access source: `len(source)`
and `source[i] -> {'labels': uint8 [H, W], 'image': uint8 [H, W, 3]}`, already
resized to `resolution` and remapped to the config's class ids.

Datasets (config.data.name):

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
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SPLITS = ('train', 'validation', 'test')
NATIVE_NUM_CLASSES = {'scene_parse150': 151, 'cityscapes': 34}
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
               num_classes: int, data_dir: str,
               class_map: np.ndarray | None = None) -> RemappedSource:
  """Returns a random-access source of one split (see module docstring).

  Args:
    name: config.data.name: 'scene_parse150' or 'cityscapes'.
    split: 'train', 'validation' or 'test'.
    resolution: (H, W) of the examples returned (an int means square).
    num_classes: config.data.num_classes; must equal the dataset's (151, 34)
      unless a `class_map` is given, whose values must be below it.
    data_dir: TFDS data_dir; '' means TFDS's default (~/tensorflow_datasets).
    class_map: int [R] raw dataset id -> class id.

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
        f'(config.data.num_classes): set config.data.num_classes={native} '
        'or pass a class_map')
  if isinstance(resolution, int):
    resolution = (resolution, resolution)
  resolution = tuple(int(v) for v in resolution)
  if len(resolution) != 2:
    raise ValueError(f'resolution must be (H, W), got {resolution} '
                     f'(config.data.resolution)')
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
