"""Tests of the procedural avatars and their TFDS source / batches."""
import dataclasses
import sys
import time

import numpy as np
import pytest

from fiancee_jax.data import avatars
from fiancee_jax.data import avatars_tfds
from fiancee_jax.data import procedural_tfds

SIZES = dict(num_train=12, num_validation=6, num_test=5)


def _changed_rows_cols(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > 0
  return np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))


# --- Generator.


def test_same_seed_and_index_give_identical_examples():
  a = avatars.example(7, 3, 32, 32, cross=True)
  b = avatars.example(7, 3, 32, 32, cross=True)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  for seed, index in ((7, 4), (8, 3)):
    assert not np.array_equal(a['source'], avatars.example(seed, index, 32, 32,
                                                           cross=True)['source'])


@pytest.mark.parametrize('height,width', [(32, 32), (48, 64), (64, 64), (256, 256)])
def test_shapes_and_dtypes(height, width):
  ex = avatars.example(0, 1, height, width, cross=False)
  for key in avatars_tfds.IMAGE_KEYS:
    assert ex[key].shape == (height, width, 3) and ex[key].dtype == np.uint8
  assert ex['cross'].dtype == np.bool_ and not ex['cross']


@pytest.mark.parametrize('height,width', [(31, 32), (32, 257), (16, 16)])
def test_size_outside_range_raises(height, width):
  with pytest.raises(ValueError, match=r'\[32, 256\].*config\.data\.resolution'):
    avatars.example(0, 0, height, width, cross=False)


def test_negative_seed_or_index_raises():
  with pytest.raises(ValueError, match='non-negative'):
    avatars.example(-1, 0, 32, 32, cross=False)
  with pytest.raises(ValueError, match='non-negative'):
    avatars.sample_motion(0, -2, avatars.DRIVER_MOTION)


def test_pairs_are_renders_of_the_right_identity_and_motion():
  seed, index, h = 3, 11, 48
  a = avatars.sample_identity(seed, index, avatars.IDENTITY_A)
  b = avatars.sample_identity(seed, index, avatars.IDENTITY_B)
  m1 = avatars.sample_motion(seed, index, avatars.SOURCE_MOTION)
  m2 = avatars.sample_motion(seed, index, avatars.DRIVER_MOTION)
  cross = avatars.example(seed, index, h, h, cross=True)
  np.testing.assert_array_equal(cross['source'], avatars.render(a, m1, h, h))
  np.testing.assert_array_equal(cross['driver'], avatars.render(b, m2, h, h))
  # The ground truth of cross-reenactment: A's identity with B's motion.
  np.testing.assert_array_equal(cross['target'], avatars.render(a, m2, h, h))
  np.testing.assert_array_equal(cross['swap'], cross['target'])
  own = avatars.example(seed, index, h, h, cross=False)
  np.testing.assert_array_equal(own['source'], cross['source'])
  np.testing.assert_array_equal(own['driver'], own['target'])
  np.testing.assert_array_equal(own['driver'], cross['target'])
  np.testing.assert_array_equal(own['swap'], cross['driver'])
  assert not np.array_equal(own['source'], own['driver'])


def _neutral(seed=0, index=5):
  m = avatars.sample_motion(seed, index, avatars.SOURCE_MOTION)
  return dataclasses.replace(m, yaw=0.0, pitch=0.0, roll=0.0, tx=0.0, ty=0.0, mouth_open=0.0,
                             smile=0.0, blink=0.0, brow=0.0, gaze=np.zeros(2, np.float32))


def test_expression_changes_only_its_part_of_the_face():
  ident = dataclasses.replace(avatars.sample_identity(0, 5), hat=0, glasses=0, beard=0.0)
  m, h = _neutral(), 128
  base = avatars.render(ident, m, h, h)
  ey, my = ident.eyes[1], ident.mouth[0]  # heights on the unit head sphere
  radius_px = ident.radii[1] * h / 2
  centre_row = h / 2 - 0.12 * h / 2  # the head centre is at y = 0.12
  for change, lo, hi in (('blink', ey - 0.15, ey + 0.15), ('mouth_open', my - 0.3, my + 0.1)):
    rows, cols = _changed_rows_cols(base, avatars.render(
        ident, dataclasses.replace(m, **{change: 1.0}), h, h))
    assert len(rows), change
    # Rows (top = 0) of the changed band, from heights on the sphere.
    top, bottom = centre_row - hi * radius_px - 2, centre_row - lo * radius_px + 2
    assert top <= rows.min() and rows.max() <= bottom, (change, rows, top, bottom)
    head_half = ident.radii[0] * h / 2
    assert np.all(np.abs(cols + 0.5 - h / 2) <= head_half + 2), change


def test_pose_moves_the_head_not_the_background():
  ident = avatars.sample_identity(0, 6)
  m, h = _neutral(0, 6), 64
  a = avatars.render(ident, m, h, h)
  b = avatars.render(ident, dataclasses.replace(m, yaw=0.6, tx=0.08), h, h)
  assert np.abs(a.astype(int) - b.astype(int)).mean() > 2
  np.testing.assert_array_equal(a[:4, :4], b[:4, :4])  # a background corner
  np.testing.assert_array_equal(a[:4, -4:], b[:4, -4:])


def test_identity_change_keeps_the_motion():
  # Same motion, only the clothes differ: nothing above the shoulders changes.
  ident = avatars.sample_identity(0, 7)
  other = dataclasses.replace(ident, clothes=1.0 - ident.clothes)
  m, h = _neutral(0, 7), 64
  rows, _ = _changed_rows_cols(avatars.render(ident, m, h, h), avatars.render(other, m, h, h))
  assert len(rows) and rows.min() >= h * 0.75


def test_same_example_at_two_resolutions():
  small = avatars.example(2, 9, 32, 32, cross=True)['target'].astype(np.float32)
  big = avatars.example(2, 9, 128, 128, cross=True)['target'].astype(np.float32)
  pooled = big.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
  assert np.abs(pooled - small).mean() < 10  # of 255: same face, finer detail


def test_difficulty_bounds_pose_and_accessories():
  ds = [avatars.difficulty(0, i) for i in range(40)]
  assert all(0.0 <= d <= 1.0 for d in ds)
  for i in range(40):
    m = avatars.sample_motion(0, i, avatars.DRIVER_MOTION)
    assert abs(m.yaw) <= 0.15 + 0.75 * m.difficulty + 1e-6
  ids = [avatars.sample_identity(0, i) for i in range(300)]
  hard = [i for i in ids if i.difficulty > 0.4]
  easy = [i for i in ids if i.difficulty < 0.2]
  frac = lambda xs: np.mean([bool(i.glasses or i.hat) for i in xs])
  assert frac(hard) > frac(easy) + 0.15


def test_render_is_fast():
  ident = avatars.sample_identity(0, 1)
  m = avatars.sample_motion(0, 1, avatars.DRIVER_MOTION)
  avatars.render(ident, m, 64, 64)
  start = time.perf_counter()
  for _ in range(10):
    avatars.render(ident, m, 64, 64)
  # ~3-6 ms on an idle core; generous for shared CI machines.
  assert (time.perf_counter() - start) / 10 < 0.05


# --- TFDS source and batches.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('avatars_tfds'))


def _source(data_dir, split='train', **kwargs):
  args = dict(split=split, resolution=(32, 32), seed=4, data_dir=data_dir, **SIZES)
  args.update(kwargs)
  return avatars_tfds.get_avatars_source(**args)


@pytest.mark.parametrize('split', ['train', 'validation', 'test'])
def test_tfds_roundtrip_equals_generate(data_dir, split):
  source = _source(data_dir, split)
  assert len(source) == SIZES[f'num_{split}']
  for i in range(len(source)):
    expected = avatars.example(4, procedural_tfds.generator_index(split, i), 32, 32,
                               cross=split != 'train')
    ex = source[i]
    for key in expected:
      np.testing.assert_array_equal(ex[key], expected[key])
  batch = source.__getitems__([3, 1])
  np.testing.assert_array_equal(batch[1]['target'], source[1]['target'])
  assert 'tensorflow' not in sys.modules


def test_batches_are_a_function_of_seed_and_step(data_dir):
  source = _source(data_dir)
  first = list(avatars_tfds.batches(source, batch_size=4, seed=1, prefetch=0, num_epochs=2))
  assert len(first) == 6
  resumed = next(avatars_tfds.batches(source, batch_size=4, seed=1, start_step=4))
  for key in first[4]:
    np.testing.assert_array_equal(first[4][key], resumed[key])
  b = first[0]
  assert b['source'].dtype == np.float32 and b['source'].shape == (4, 32, 32, 3)
  assert -1.0 <= b['driver'].min() and b['driver'].max() <= 1.0
  assert b['cross'].dtype == np.bool_ and not b['cross'].any()
  np.testing.assert_array_equal(b['target'], b['driver'])
  parts = [next(avatars_tfds.batches(source, batch_size=4, seed=1, start_step=4,
                                     process_index=p, process_count=2, prefetch=0))
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['index'] for p in parts]), resumed['index'])


def test_eval_batches_pad_and_mask(data_dir):
  source = _source(data_dir, 'test')
  batches = list(avatars_tfds.eval_batches(source, batch_size=4, prefetch=0))
  assert [int(b['mask'].sum()) for b in batches] == [4, 1]
  assert batches[0]['cross'].all()
  avatars_tfds.check_batch(batches[0], resolution=(32, 32))
  with pytest.raises(ValueError, match=r'config\.data\.resolution'):
    avatars_tfds.check_batch(batches[0], resolution=(64, 64))
  with pytest.raises(ValueError, match='float32'):
    avatars_tfds.check_batch({**batches[0], 'source': batches[0]['source'][..., :2]},
                             resolution=(32, 32))


@pytest.mark.parametrize('kwargs,match', [
    (dict(split='val'), 'unknown split'),
    (dict(resolution=(16, 16)), r'config\.data\.resolution'),
    (dict(num_validation=0, split='validation'), r'config\.data\.num_validation'),
])
def test_get_avatars_source_errors(data_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _source(data_dir, **kwargs)
