"""Tests of the grid helpers and the `show` CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fiancee_jax.data import landscapes
from fiancee_jax.data import visualize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_label_map_to_rgb_uses_the_palette():
  labels = np.array([[[0, 3], [11, 4]]], np.int32)
  rgb = visualize.label_map_to_rgb(labels)
  assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, 1, 0], landscapes.PALETTE[11])
  # ADE20K ids get stable colours beyond the landscapes palette.
  ade = visualize.label_map_to_rgb(np.array([[150]]), num_classes=151)
  np.testing.assert_array_equal(
      ade, visualize.label_map_to_rgb(np.array([[150]]), num_classes=151))
  with pytest.raises(ValueError, match='class id 12 but num_classes is 12'):
    visualize.label_map_to_rgb(np.array([[12]]), num_classes=12)


def test_save_grid_layout(tmp_path):
  a = np.zeros((3, 16, 20, 3), np.uint8)
  b = np.full((3, 16, 20, 3), 200, np.uint8)
  path = str(tmp_path / 'sub' / 'grid.png')
  visualize.save_grid([a, b], path)
  picture = np.asarray(Image.open(path))
  # 16 px cells are upscaled x4 to >= 64 px; 2 px separators.
  assert picture.shape == (3 * 64 + 4 * 2, 2 * 80 + 3 * 2, 3)
  assert (picture[2:66, 2:82] == 0).all()
  assert (picture[2:66, 84:164] == 200).all()
  with pytest.raises(ValueError, match='same shape'):
    visualize.save_grid([a, b[:2]], path)
  with pytest.raises(ValueError, match='uint8'):
    visualize.save_grid([a.astype(np.float32)], path)


def test_show_cli_writes_a_png(tmp_path):
  out = tmp_path / 'grid.png'
  result = subprocess.run(
      [sys.executable, '-m', 'fiancee_jax.data.show',
       '--config=configs/landscapes.py:tiny', f'--out={out}', '--num=4',
       f'--config.data.data_dir={tmp_path / "tfds"}'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-2000:]
  picture = np.asarray(Image.open(out))
  # tiny is 16x16: cells upscaled to 64, 4 rows, label map | image.
  assert picture.shape == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2, 3)
