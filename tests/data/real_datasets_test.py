"""Tests of the ADE20K and Cityscapes builders on fake directories in the official layouts."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import oasis_ade20k
from configs import oasis_cityscapes
from fiancee_jax.data import input_pipeline
from fiancee_jax.data import manual_tfds
from fiancee_jax.data import prepare
from fiancee_jax.data import sources
from tests.data import fake_datasets


def _config(module, tmp, manual_dir, **data):
  config = module.get_config('tiny')
  config.data.update(data_dir=os.path.join(tmp, 'tfds'), manual_dir=manual_dir, **data)
  return config


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
  """(config, ADEChallengeData2016 folder), prepared."""
  tmp = str(tmp_path_factory.mktemp('ade'))
  top = fake_datasets.make_ade20k(os.path.join(tmp, 'manual'))
  # manual_dir may be the parent of ADEChallengeData2016.
  config = _config(oasis_ade20k, tmp, os.path.join(tmp, 'manual'), num_validation=3)
  assert prepare.prepare(config) == {'train': 9, 'validation': 3, 'test': 4}
  return config, top


@pytest.fixture(scope='module')
def cityscapes(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('cityscapes'))
  manual = fake_datasets.make_cityscapes(os.path.join(tmp, 'manual'))
  config = _config(oasis_cityscapes, tmp, manual, num_validation=4)
  return config, manual


def _expected(image_path, labels_path, h, w):
  image = Image.open(image_path).convert('RGB').resize((w, h), Image.Resampling.BICUBIC)
  labels = Image.open(labels_path).resize((w, h), Image.Resampling.NEAREST)
  return np.asarray(image), np.asarray(labels)


def test_ade20k_splits_are_official_validation_and_a_carve_of_train(ade):
  config, top = ade
  h, w = config.data.resolution
  test = sources.data_source(config, 'test')
  for i in (0, 3):
    stem = f'ADE_val_{i + 1:08d}'
    image, labels = _expected(os.path.join(top, 'images', 'validation', stem + '.jpg'),
                              os.path.join(top, 'annotations', 'validation', stem + '.png'),
                              h, w)
    ex = test[i]
    assert ex['labels'].dtype == np.uint8 and ex['labels'].shape == (h, w)
    np.testing.assert_array_equal(ex['labels'], labels)
    np.testing.assert_array_equal(ex['image'], image)
  train_ids, val_ids = manual_tfds.carve(12, 3, config.data.seed)
  assert not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == 12
  val = sources.data_source(config, 'validation')
  stem = f'ADE_train_{val_ids[1] + 1:08d}'
  _, labels = _expected(os.path.join(top, 'images', 'training', stem + '.jpg'),
                        os.path.join(top, 'annotations', 'training', stem + '.png'), h, w)
  np.testing.assert_array_equal(val[1]['labels'], labels)
  # Batched reads give the same examples.
  np.testing.assert_array_equal(val.__getitems__([2, 1])[1]['image'], val[1]['image'])


def test_the_carve_is_seeded():
  a, b = manual_tfds.carve(100, 10, 0), manual_tfds.carve(100, 10, 0)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], manual_tfds.carve(100, 10, 1)[1])
  with pytest.raises(ValueError, match=r'config\.data\.num_validation=100'):
    manual_tfds.carve(100, 100, 0)


def test_cityscapes_reads_label_ids_and_ignores_other_gtfine_files(cityscapes):
  config, manual = cityscapes
  h, w = config.data.resolution
  assert (h, w) == (16, 32)
  sizes = {s: len(sources.data_source(config, s)) for s in ('train', 'validation', 'test')}
  assert sizes == {'train': 8, 'validation': 4, 'test': 4}
  stem = 'frankfurt_000002_000019'
  image, labels = _expected(
      os.path.join(manual, 'leftImg8bit', 'val', 'frankfurt', stem + '_leftImg8bit.png'),
      os.path.join(manual, 'gtFine', 'val', 'frankfurt', stem + '_gtFine_labelIds.png'), h, w)
  ex = sources.data_source(config, 'test')[2]
  np.testing.assert_array_equal(ex['labels'], labels)
  np.testing.assert_array_equal(ex['image'], image)
  labels, = sources.load_data(config, 'train', 8)
  assert labels.dtype == np.int32 and labels.max() < 35


def test_training_batches_flip_as_a_function_of_seed_and_step(ade):
  config, _ = ade
  assert config.data.flip
  source = sources.data_source(config, 'train')
  flipped = next(sources.train_batches(config, source, batch_size=8, seed=5, start_step=3,
                                       prefetch=0))
  unflipped = next(input_pipeline.batches(source, batch_size=8, seed=5, start_step=3,
                                          prefetch=0))
  mask = input_pipeline.flip_mask(3, batch_size=8, seed=5)
  assert mask.any() and not mask.all()
  for i, m in enumerate(mask):
    for key in ('labels', 'image'):
      want = unflipped[key][i, :, ::-1] if m else unflipped[key][i]
      np.testing.assert_array_equal(flipped[key][i], want)
  np.testing.assert_array_equal(flipped['index'], unflipped['index'])
  # Two processes flip what one flips.
  parts = [input_pipeline.flip_mask(3, batch_size=8, seed=5, process_index=p, process_count=2)
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), mask)
  masks = np.stack([input_pipeline.flip_mask(s, batch_size=64, seed=0) for s in range(20)])
  assert 0.4 < masks.mean() < 0.6


def test_a_validation_image_among_the_training_files_is_refused(tmp_path):
  top = fake_datasets.make_ade20k(str(tmp_path / 'manual'), num_train=6, num_val=2)
  # A copy of a test image, renamed, in the training split: found by its content.
  for kind, ext in (('images', '.jpg'), ('annotations', '.png')):
    shutil.copy(os.path.join(top, kind, 'validation', 'ADE_val_00000002' + ext),
                os.path.join(top, kind, 'training', 'ADE_train_00000099' + ext))
  config = _config(oasis_ade20k, str(tmp_path), top, num_validation=6)
  with pytest.raises(ValueError, match=r'would overlap test: 1 examples share their image '
                     r"content .*'ADE_train_00000099'"):
    sources.data_source(config, 'validation')


@pytest.mark.parametrize('damage,error,match', [
    ('no_annotations', manual_tfds.LayoutError,
     r'annotations/training is not a directory; expected ADEChallengeData2016/images/'),
    ('lonely_image', manual_tfds.LayoutError,
     r"1 files in .* have no partner, e.g. the image 'ADE_train_00000099'"),
    ('rgb_annotation', ValueError, r'ADE_train_00000001\.png is a RGB image; label maps'),
    ('class_id', ValueError, r'has class id 200 but the dataset has 151 classes'),
])
def test_a_wrong_layout_names_the_expected_one(tmp_path, damage, error, match):
  top = fake_datasets.make_ade20k(str(tmp_path / 'manual'), num_train=3, num_val=2)
  ann = os.path.join(top, 'annotations', 'training')
  if damage == 'no_annotations':
    shutil.rmtree(ann)
  elif damage == 'lonely_image':
    shutil.copy(os.path.join(top, 'images', 'training', 'ADE_train_00000001.jpg'),
                os.path.join(top, 'images', 'training', 'ADE_train_00000099.jpg'))
  elif damage == 'rgb_annotation':
    Image.new('RGB', (40, 36)).save(os.path.join(ann, 'ADE_train_00000001.png'))
  else:
    Image.fromarray(np.full((36, 40), 200, np.uint8)).save(
        os.path.join(ann, 'ADE_train_00000001.png'))
  config = _config(oasis_ade20k, str(tmp_path), top, num_validation=1)
  with pytest.raises(error, match=match):
    sources.data_source(config, 'train')


def test_a_missing_manual_dir_says_where_the_files_go(tmp_path):
  config = _config(oasis_cityscapes, str(tmp_path), '')
  with pytest.raises(manual_tfds.LayoutError,
                     match=r'downloads/manual/leftImg8bit/train is not a directory; expected '
                     r'leftImg8bit/\{train,val\}/<city>/\*_leftImg8bit\.png and gtFine'):
    sources.data_source(config, 'test')


def test_the_class_count_must_be_the_datasets(ade):
  config, _ = ade
  config = config.copy_and_resolve_references()
  config.data.num_classes = 150
  with pytest.raises(ValueError, match=r'ade20k_oasis has 151 classes .*num_classes=151'):
    sources.data_source(config, 'train')
