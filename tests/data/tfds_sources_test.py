"""Tests of the real datasets read through TFDS's own builders (remapping, resizing)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fiancee_jax.data import tfds_sources


def _real(tmp_path, **kwargs):
  args = dict(name='scene_parse150', split='train', resolution=(32, 32), num_classes=151,
              data_dir=str(tmp_path))
  args.update(kwargs)
  return tfds_sources.get_source(**args)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='imagenet'), 'unknown dataset'),
    (dict(split='val'), 'unknown split'),
    (dict(num_classes=12), r'config\.data\.num_classes'),
    (dict(resolution=(8, 8, 3)), r'config\.data\.resolution'),
])
def test_get_source_errors(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _real(tmp_path, **kwargs)


def test_real_dataset_missing_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='not prepared'):
    tfds_sources.get_source(
        name='scene_parse150', split='train', resolution=(32, 32),
        num_classes=151, data_dir=str(tmp_path))


# --- Real datasets: tfds.testing.mock_data serves data_source without TF.


def _nearest(labels: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(
      (w, h), Image.Resampling.NEAREST))


def test_scene_parse150_under_mock_data_remaps_and_resizes():
  class_map = (np.arange(256) % 151).astype(np.int32)
  with tfds.testing.mock_data(num_examples=4):
    source = tfds_sources.get_source(
        name='scene_parse150', split='validation', resolution=(24, 32),
        num_classes=151, data_dir='', class_map=class_map)
    raw = tfds.data_source('scene_parse150', split='test')
    assert len(source) == 4
    for i in range(4):
      ex = source[i]
      assert ex['labels'].shape == (24, 32) and ex['labels'].dtype == np.uint8
      assert ex['image'].shape == (24, 32, 3) and ex['image'].dtype == np.uint8
      expected = _nearest(class_map[raw[i]['annotation'][..., 0]], 24, 32)
      np.testing.assert_array_equal(ex['labels'], expected)
      assert ex['labels'].max() < 151


def test_scene_parse150_ids_beyond_num_classes_are_rejected():
  # Mock annotations are random bytes, so ids above 150 occur.
  with tfds.testing.mock_data(num_examples=2):
    source = tfds_sources.get_source(
        name='scene_parse150', split='train', resolution=(16, 16),
        num_classes=151, data_dir='')
    with pytest.raises(ValueError, match=r'but the config has 151 classes '
                       r'\(config\.data\.num_classes\)'):
      source[0]  # pylint: disable=pointless-statement


def test_cityscapes_under_mock_data():
  with tfds.testing.mock_data(num_examples=1):
    # The 34-entry train-id map does not cover the mock's random ids.
    source = tfds_sources.get_source(
        name='cityscapes', split='train', resolution=(16, 32), num_classes=20,
        data_dir='', class_map=tfds_sources.CITYSCAPES_TRAIN_ID_MAP)
    with pytest.raises(ValueError, match='class_map only covers'):
      source[0]  # pylint: disable=pointless-statement
    source = tfds_sources.get_source(
        name='cityscapes', split='test', resolution=(16, 32), num_classes=34,
        data_dir='', class_map=np.arange(256) % 34)
    ex = source[0]
    assert ex['labels'].shape == (16, 32) and ex['image'].shape == (16, 32, 3)


def test_class_map_values_beyond_num_classes_are_rejected():
  with pytest.raises(ValueError, match=r'maps raw id 3 to 151 .*'
                     r'config\.data\.num_classes'):
    tfds_sources.check_class_map(np.array([0, 1, 2, 151]), 151)
  with pytest.raises(ValueError, match='1-D integer'):
    tfds_sources.check_class_map(np.zeros((2, 2)), 151)


def test_cityscapes_train_id_map():
  m = tfds_sources.CITYSCAPES_TRAIN_ID_MAP
  assert m.shape == (34,) and sorted(set(m.tolist())) == list(range(20))
  assert m[7] == 1 and m[26] == 14 and m[33] == 19  # road, car, bicycle


def test_remapped_source_on_fake_data():
  # 4x4 annotation with 3 channels (ADE layout): ids 0..3 in the R channel.
  ann = np.zeros((4, 4, 3), np.uint8)
  ann[:2, :2, 0], ann[:2, 2:, 0], ann[2:, :2, 0], ann[2:, 2:, 0] = 0, 1, 2, 3
  ann[..., 1] = 200  # instance ids in G must be ignored
  image = np.zeros((6, 6, 3), np.uint8)
  image[:, 3:] = 255
  fake = [{'annotation': ann, 'image': image}]
  source = tfds_sources.RemappedSource(
      fake, image_key='image', label_key='annotation', resolution=(8, 8),
      num_classes=3, class_map=np.array([0, 2, 2, 1]))
  ex = source[0]
  expected = np.repeat(np.repeat(np.array([[0, 2], [2, 1]]), 4, 0), 4, 1)
  np.testing.assert_array_equal(ex['labels'], expected)
  assert ex['image'].shape == (8, 8, 3)
  assert ex['image'][0, 0, 0] == 0 and ex['image'][0, -1, 0] == 255
  # Downsampling averages (bilinear with widened support).
  small = tfds_sources.resize_example(np.zeros((8, 8), np.uint8),
                                      np.tile([[0], [255]], (4, 8))[..., None]
                                      .repeat(3, -1).astype(np.uint8), (4, 4))
  assert 100 < small[1].mean() < 155
