"""Tests of the procedural landscapes generator."""
import time

import numpy as np
import pytest

from fiancee_jax.data import landscapes


def _edge_density(labels: np.ndarray) -> float:
  """Share of neighbouring pixel pairs whose labels differ."""
  return float((labels[1:] != labels[:-1]).mean() +
               (labels[:, 1:] != labels[:, :-1]).mean()) / 2


def _image_roughness(image: np.ndarray) -> float:
  """Mean absolute difference between horizontal neighbours."""
  return float(np.abs(np.diff(image.astype(np.float32), axis=1)).mean())


def _rank(x) -> np.ndarray:
  return np.argsort(np.argsort(np.asarray(x)))


def _spearman(a, b) -> float:
  return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def test_same_seed_and_index_give_identical_arrays():
  labels_a, image_a = landscapes.generate(7, 3, 32, 32)
  labels_b, image_b = landscapes.generate(7, 3, 32, 32)
  np.testing.assert_array_equal(labels_a, labels_b)
  np.testing.assert_array_equal(image_a, image_b)


def test_different_index_or_seed_gives_different_arrays():
  _, image = landscapes.generate(7, 3, 32, 32)
  for seed, index in ((7, 4), (8, 3)):
    _, other = landscapes.generate(seed, index, 32, 32)
    assert not np.array_equal(image, other)


@pytest.mark.parametrize('height,width', [(16, 16), (32, 24), (24, 40),
                                          (64, 64), (256, 256)])
def test_shapes_dtypes_and_class_range(height, width):
  for index in range(3):
    labels, image = landscapes.generate(0, index, height, width)
    assert labels.shape == (height, width) and labels.dtype == np.uint8
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert labels.max() < landscapes.NUM_CLASSES


@pytest.mark.parametrize('height,width', [(15, 32), (32, 257), (0, 0)])
def test_size_outside_range_raises(height, width):
  with pytest.raises(ValueError, match=r'\[16, 256\]'):
    landscapes.generate(0, 0, height, width)


def test_negative_seed_or_index_raises():
  with pytest.raises(ValueError, match='non-negative'):
    landscapes.generate(-1, 0, 32, 32)
  with pytest.raises(ValueError, match='non-negative'):
    landscapes.difficulty(0, -5)


def test_classes_and_palette():
  assert landscapes.NUM_CLASSES == len(landscapes.CLASSES) == 12
  assert landscapes.PALETTE.shape == (12, 3)
  assert landscapes.PALETTE.dtype == np.uint8
  # Every class gets its own colour.
  assert len({tuple(c) for c in landscapes.PALETTE}) == 12


def test_every_class_appears():
  seen = np.zeros(landscapes.NUM_CLASSES, bool)
  for index in range(150):
    labels, _ = landscapes.generate(0, index, 64, 64)
    seen[np.unique(labels)] = True
  missing = [landscapes.CLASSES[c] for c in np.flatnonzero(~seen)]
  assert not missing


def test_difficulty_is_right_skewed():
  d = np.array([landscapes.difficulty(0, i) for i in range(400)])
  assert d.min() >= 0 and d.max() <= 1
  assert np.median(d) < d.mean() < 0.4  # most images easy, a long hard tail
  assert 0.02 < (d > 0.6).mean() < 0.2


def test_difficulty_drives_label_and_texture_complexity():
  d, edges, rough, classes = [], [], [], []
  for index in range(200):
    labels, image = landscapes.generate(0, index, 32, 32)
    d.append(landscapes.difficulty(0, index))
    edges.append(_edge_density(labels))
    rough.append(_image_roughness(image))
    classes.append(len(np.unique(labels)))
  assert _spearman(d, edges) > 0.5
  assert _spearman(d, rough) > 0.6
  assert _spearman(d, classes) > 0.4
  # The hardest tenth has several times the boundaries of the easiest tenth.
  order = np.argsort(d)
  easy, hard = np.array(edges)[order[:20]], np.array(edges)[order[-20:]]
  assert hard.mean() > 2.5 * easy.mean()


def test_same_scene_at_two_resolutions():
  # Layout is drawn in relative coordinates from its own stream, so the
  # 64x64 map subsampled at the 32x32 pixel centres mostly agrees.
  agree = []
  for index in range(10):
    small, _ = landscapes.generate(0, index, 32, 32)
    large, _ = landscapes.generate(0, index, 64, 64)
    agree.append((large[1::2, 1::2] == small).mean())
  assert np.mean(agree) > 0.85


def test_generation_is_fast():
  start = time.perf_counter()
  for index in range(200):
    landscapes.generate(0, index, 64, 64)
  per_image = (time.perf_counter() - start) / 200
  # The brief: 3000 images at 64x64 well under 30 s on one (shared) core.
  assert per_image < 0.01, f'{per_image * 1e3:.1f} ms per 64x64 image'
