"""Tests of data/sources.py: config.data -> sources, loaded splits, batches."""
import numpy as np
import pytest

from configs import avatars
from configs import landscapes
from fiancee_jax import config_checks
from fiancee_jax.data import procedural_tfds
from fiancee_jax.data import sources
from fiancee_jax.models import factory


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('sources'))


def _config(module, data_dir, **data):
  config = module.get_config('tiny')
  config.data.data_dir = data_dir
  config.data.update(data)
  return config


def test_every_dataset_gives_what_its_task_takes(data_dir):
  for module in (landscapes, avatars):
    config = _config(module, data_dir)
    assert sources.data_keys(config) == factory.get_task(config).data_keys


def test_label_maps_load_with_their_images(data_dir):
  config = _config(landscapes, data_dir)
  split = sources.load_split(config, 'test', 5)
  assert sorted(split) == ['image', 'labels']
  assert split['labels'].shape == (5, 16, 16) and split['labels'].dtype == np.int32
  assert split['image'].shape == (5, 16, 16, 3) and split['image'].dtype == np.float32
  (labels,) = sources.load_data(config, 'test', 5)
  np.testing.assert_array_equal(labels, split['labels'])
  source = sources.data_source(config, 'test')
  np.testing.assert_array_equal(labels[3], source[3]['labels'])
  # More than the split holds: the whole split.
  assert len(sources.load_data(config, 'test', 10_000)[0]) == config.data.num_test


def test_pairs_load_with_ground_truth_on_cross_splits_only(data_dir):
  config = _config(avatars, data_dir)
  test = sources.load_split(config, 'test', 3)
  assert sorted(test) == ['driver', 'source', 'target']
  train = sources.load_split(config, 'train', 3)
  assert sorted(train) == ['driver', 'source']  # self pairs: the target is the driver
  source, driver = sources.load_data(config, 'validation', 2)
  assert source.shape == driver.shape == (2, 32, 32, 3)


def test_train_batches_resume_and_check(data_dir):
  config = _config(landscapes, data_dir)
  source = sources.data_source(config, 'train')
  run = sources.train_batches(config, source, batch_size=8, seed=3, prefetch=0)
  batches = [next(run) for _ in range(3)]
  resumed = next(sources.train_batches(config, source, batch_size=8, seed=3, start_step=2))
  for key in ('labels', 'image', 'index'):
    np.testing.assert_array_equal(batches[2][key], resumed[key])
  sources.check_batch(config, resumed)
  with pytest.raises(ValueError, match=r'config\.data\.num_classes'):
    sources.check_batch(config, {**resumed, 'labels': resumed['labels'] + 12})
  pairs = _config(avatars, data_dir)
  batch = next(sources.train_batches(pairs, sources.data_source(pairs, 'train'),
                                     batch_size=4, seed=0))
  sources.check_batch(pairs, batch)
  with pytest.raises(ValueError, match="no 'source'"):
    sources.check_batch(pairs, resumed)


@pytest.mark.xdist_group('loader_workers')  # see tests/data/input_pipeline_test.py
@pytest.mark.parametrize('module', [landscapes, avatars])
def test_config_workers_load_the_same_batches(module, data_dir):
  # config.data.workers: the TFDS source is pickled to a worker process, which sends the
  # stored uint8 arrays; the batches equal the thread's.
  config = _config(module, data_dir, flip=True)
  source = sources.data_source(config, 'train')
  thread = sources.train_batches(config, source, batch_size=4, seed=1, start_step=5)
  expected = [next(thread) for _ in range(2)]
  thread.close()
  config.data.workers = 1
  worker = sources.train_batches(config, source, batch_size=4, seed=1, start_step=5)
  got = [next(worker) for _ in range(2)]
  worker.close()
  for a, b in zip(expected, got):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_batches_pad_the_last_batch(data_dir):
  config = _config(avatars, data_dir)
  batches = list(sources.eval_batches(config, sources.data_source(config, 'test'),
                                      batch_size=6, prefetch=0))
  assert [int(b['mask'].sum()) for b in batches] == [6, 6, 4]
  assert all(b['cross'].all() for b in batches)


def test_unknown_dataset_names_the_known_ones(data_dir):
  config = _config(landscapes, data_dir)
  config.data.name = 'imagenet'
  with pytest.raises(ValueError, match=r"unknown dataset 'imagenet' \(config\.data\.name\); "
                     'known: .*avatars.*landscapes'):
    sources.data_source(config, 'train')


def test_a_dataset_the_backbone_cannot_take_is_refused_before_compute(data_dir):
  config = _config(landscapes, data_dir)
  config.data.name = 'avatars'
  with pytest.raises(ValueError, match=r"config\.data\.name='avatars' gives \(source, driver\) "
                     r"but the 'oasis' backbone takes \(labels\)"):
    config_checks.check_config(config)


def test_landscapes_class_count_must_match(data_dir):
  config = _config(landscapes, data_dir, num_classes=151)
  with pytest.raises(ValueError, match=r'landscapes has 12 classes .*num_classes=12'):
    sources.data_source(config, 'train')


def test_procedural_splits_are_disjoint_draws():
  # The calibration split of a procedural dataset never meets test: disjoint index ranges.
  n = 1 << 29
  ranges = {s: (procedural_tfds.generator_index(s, 0), procedural_tfds.generator_index(s, n))
            for s in procedural_tfds.SPLITS}
  assert ranges['validation'][1] <= ranges['test'][0]
  assert ranges['train'][1] <= ranges['validation'][0]
