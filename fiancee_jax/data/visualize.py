"""Pictures of label maps and images: colouring and PNG grids.

Used by `fiancee_jax.data.show` and by the trainers' sample grids:

  columns = [label_map_to_rgb(labels), images_to_uint8(real), images_to_uint8(fake)]
  save_grid(columns, 'samples/step_000200.png')
"""
import os

import numpy as np
from PIL import Image

from fiancee_jax.data import landscapes


def palette(num_classes: int) -> np.ndarray:
  """Returns uint8 [num_classes, 3] colours; landscapes' PALETTE comes first.

  Classes beyond the landscapes' 12 (ADE20K has 151) get fixed pseudo-random
  colours, the same in every run.
  """
  if num_classes <= landscapes.NUM_CLASSES:
    return np.asarray(landscapes.PALETTE[:num_classes])
  extra = np.random.default_rng(12345).integers(
      0, 256, size=(num_classes - landscapes.NUM_CLASSES, 3), dtype=np.uint8)
  return np.concatenate([landscapes.PALETTE, extra])


def label_map_to_rgb(labels: np.ndarray,
                     num_classes: int | None = None) -> np.ndarray:
  """Colours a label map.

  Args:
    labels: integer [...] class ids (e.g. uint8 [H, W] or int32 [B, H, W]).
    num_classes: size of the palette; default: large enough for `labels`.

  Returns:
    uint8 [..., 3].

  Raises:
    ValueError: if labels has negative ids or ids >= num_classes.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be an integer array, got {labels.dtype}')
  if labels.size and labels.min() < 0:
    raise ValueError(f'labels has negative class id {labels.min()}')
  top = int(labels.max()) + 1 if labels.size else 1
  if num_classes is None:
    num_classes = max(top, landscapes.NUM_CLASSES)
  elif top > num_classes:
    raise ValueError(f'labels has class id {top - 1} but num_classes is '
                     f'{num_classes}')
  return palette(num_classes)[labels]


def images_to_uint8(images: np.ndarray) -> np.ndarray:
  """Converts float images in [-1, 1] (model outputs) to uint8 [..., 3]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(columns: list[np.ndarray], *, min_cell: int = 64,
         separator: int = 2) -> np.ndarray:
  """Tiles N rows x len(columns) columns of cells into one picture.

  Args:
    columns: each uint8 [N, H, W, 3] (or [N, H, W], drawn grey); all with the
      same N, H and W.
    min_cell: cells are upscaled by an integer factor (nearest neighbour) until
      both sides are at least this many pixels.
    separator: white pixels between cells.

  Returns:
    uint8 [rows_px, cols_px, 3].

  Raises:
    ValueError: on an empty list or mismatched shapes.
  """
  if not columns:
    raise ValueError('save_grid needs at least one column')
  cols = []
  for c in columns:
    c = np.asarray(c)
    if c.ndim == 3:
      c = np.repeat(c[..., None], 3, axis=-1)
    if c.ndim != 4 or c.shape[-1] != 3:
      raise ValueError(f'every column must be uint8 [N, H, W, 3], got shape '
                       f'{c.shape}')
    if c.dtype != np.uint8:
      raise ValueError(f'every column must be uint8 (see images_to_uint8), '
                       f'got {c.dtype}')
    cols.append(c)
  shape = cols[0].shape
  for c in cols:
    if c.shape != shape:
      raise ValueError(f'all columns must have the same shape [N, H, W, 3], '
                       f'got {[x.shape for x in cols]}')
  n, h, w, _ = shape
  scale = max(1, -(-min_cell // min(h, w)))
  ch, cw = h * scale, w * scale
  out = np.full((n * ch + (n + 1) * separator,
                 len(cols) * cw + (len(cols) + 1) * separator, 3), 255,
                np.uint8)
  for j, c in enumerate(cols):
    big = c.repeat(scale, axis=1).repeat(scale, axis=2)
    x0 = separator + j * (cw + separator)
    for i in range(n):
      y0 = separator + i * (ch + separator)
      out[y0:y0 + ch, x0:x0 + cw] = big[i]
  return out


def save_grid(columns: list[np.ndarray], path: str, *, min_cell: int = 64,
              separator: int = 2) -> None:
  """Writes `grid(columns)` as a PNG to `path` (parent folders are created).

  Args:
    columns: each uint8 [N, H, W, 3]; the grid has N rows, len(columns) columns.
    path: output file, e.g. 'workdir/samples/step_000200.png'.
    min_cell: minimum cell side in pixels after nearest upscaling.
    separator: white pixels between cells.
  """
  picture = grid(columns, min_cell=min_cell, separator=separator)
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(picture).save(path)
