"""Tests of the TFDS sources: landscapes build/read, real-dataset remapping."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fiancee_jax.data import landscapes
from fiancee_jax.data import tfds_sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SIZES = dict(num_train=20, num_validation=6, num_test=8)


def _source(data_dir, split='train', resolution=(24, 32), seed=3, **kwargs):
  args = dict(name='landscapes', split=split, resolution=resolution,
              num_classes=12, seed=seed, data_dir=data_dir, **SIZES)
  args.update(kwargs)
  return tfds_sources.get_source(**args)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds_sources'))


@pytest.mark.parametrize('split', ['train', 'validation', 'test'])
def test_roundtrip_equals_generate(data_dir, split):
  source = _source(data_dir, split)
  assert len(source) == SIZES[f'num_{split}']
  offset = tfds_sources.SPLIT_OFFSETS[split]
  for i in range(len(source)):
    labels, image = landscapes.generate(3, offset + i, 24, 32)
    ex = source[i]
    assert ex['labels'].dtype == np.uint8 and ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['labels'], labels)
    np.testing.assert_array_equal(ex['image'], image)


def test_generator_index_and_batched_reads(data_dir):
  source = _source(data_dir, 'validation')
  assert tfds_sources.generator_index('validation', 4) == (1 << 30) + 4
  batch = source.__getitems__([4, 1])
  np.testing.assert_array_equal(batch[0]['image'], source[4]['image'])
  np.testing.assert_array_equal(
      batch[1]['labels'],
      landscapes.generate(3, tfds_sources.generator_index('validation', 1),
                          24, 32)[0])


def test_splits_use_disjoint_indices(data_dir):
  n = max(SIZES.values())
  ranges = [set(range(o, o + n)) for o in tfds_sources.SPLIT_OFFSETS.values()]
  assert not (ranges[0] & ranges[1] or ranges[0] & ranges[2] or
              ranges[1] & ranges[2])
  images = {split: {_source(data_dir, split)[i]['image'].tobytes()
                    for i in range(6)} for split in tfds_sources.SPLITS}
  assert not images['train'] & images['validation']
  assert not images['train'] & images['test']
  assert not images['validation'] & images['test']


def test_configs_do_not_collide_and_are_reused(data_dir):
  a = _source(data_dir)
  b = _source(data_dir, resolution=(16, 16))
  c = _source(data_dir, seed=4)
  assert b[0]['labels'].shape == (16, 16)
  assert _source(data_dir, resolution=16)[0]['image'].shape == (16, 16, 3)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  names = sorted(os.listdir(os.path.join(data_dir, 'landscapes')))
  assert {'24x32_seed3_20-6-8', '16x16_seed3_20-6-8',
          '24x32_seed4_20-6-8'} <= set(names)
  # A second call reads what is there instead of rebuilding it.
  record = os.path.join(data_dir, 'landscapes', '24x32_seed3_20-6-8', '1.0.0',
                        'landscapes-train.array_record-00000-of-00001')
  before = os.stat(record).st_mtime_ns
  _source(data_dir)
  assert os.stat(record).st_mtime_ns == before


def test_plain_tfds_reads_the_built_dataset(data_dir):
  _source(data_dir)
  source = tfds.data_source('landscapes/24x32_seed3_20-6-8', split='test',
                            data_dir=data_dir, download=False)
  np.testing.assert_array_equal(
      source[2]['labels'],
      landscapes.generate(3, tfds_sources.SPLIT_OFFSETS['test'] + 2, 24, 32)[0])


def test_no_tensorflow_imported(data_dir):
  _source(data_dir)
  assert 'tensorflow' not in sys.modules


def test_two_processes_build_the_same_dataset(tmp_path):
  code = (
      'import sys, numpy as np\n'
      'from fiancee_jax.data import tfds_sources\n'
      "s = tfds_sources.get_source(name='landscapes', split='train', "
      'resolution=(16, 16), num_classes=12, seed=11, num_train=300, '
      'num_validation=4, num_test=4, data_dir=sys.argv[1])\n'
      "print(len(s), int(s[299]['image'].sum()))\n")
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err.decode()[-2000:]
  expected = f'300 {int(landscapes.generate(11, 299, 16, 16)[1].sum())}'
  assert [o.decode().strip().splitlines()[-1] for o, _ in outs] == [expected] * 2
  version_dir = tmp_path / 'landscapes' / '16x16_seed11_300-4-4'
  assert sorted(os.listdir(version_dir)) == ['1.0.0']  # no incomplete.* left


def test_helper_processes_give_the_same_records(tmp_path):
  config = tfds_sources.LandscapesConfig(height=16, width=16, seed=2,
                                         num_train=30, num_validation=3,
                                         num_test=3)
  tfds.disable_progress_bar()
  builder = tfds_sources.Landscapes(config=config.name, data_dir=str(tmp_path),
                                    num_workers=2)
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source(split='train')
  for i in range(30):
    np.testing.assert_array_equal(source[i]['image'],
                                  landscapes.generate(2, i, 16, 16)[1])


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='imagenet'), 'unknown dataset'),
    (dict(split='val'), 'unknown split'),
    (dict(num_classes=151), r'config\.data\.num_classes'),
    (dict(resolution=(8, 8)), r'config\.data\.resolution'),
    (dict(num_validation=0, split='validation'), r'config\.data\.num_validation'),
])
def test_get_source_errors(data_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _source(data_dir, **kwargs)


def test_real_dataset_missing_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='not prepared'):
    tfds_sources.get_source(
        name='scene_parse150', split='train', resolution=(32, 32),
        num_classes=151, seed=0, data_dir=str(tmp_path), **SIZES)


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
        num_classes=151, seed=0, data_dir='', class_map=class_map, **SIZES)
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
        num_classes=151, seed=0, data_dir='', **SIZES)
    with pytest.raises(ValueError, match=r'but the config has 151 classes '
                       r'\(config\.data\.num_classes\)'):
      source[0]  # pylint: disable=pointless-statement


def test_cityscapes_under_mock_data():
  with tfds.testing.mock_data(num_examples=1):
    # The 34-entry train-id map does not cover the mock's random ids.
    source = tfds_sources.get_source(
        name='cityscapes', split='train', resolution=(16, 32), num_classes=20,
        seed=0, data_dir='', class_map=tfds_sources.CITYSCAPES_TRAIN_ID_MAP,
        **SIZES)
    with pytest.raises(ValueError, match='class_map only covers'):
      source[0]  # pylint: disable=pointless-statement
    source = tfds_sources.get_source(
        name='cityscapes', split='test', resolution=(16, 32), num_classes=34,
        seed=0, data_dir='', class_map=np.arange(256) % 34, **SIZES)
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
