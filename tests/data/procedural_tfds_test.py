"""Tests of the procedural TFDS builders (landscapes here; avatars in avatars_test.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fiancee_jax.data import avatars
from fiancee_jax.data import avatars_tfds
from fiancee_jax.data import landscapes
from fiancee_jax.data import landscapes_tfds
from fiancee_jax.data import procedural_tfds

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SIZES = dict(num_train=20, num_validation=6, num_test=8)


def _source(data_dir, split='train', resolution=(24, 32), seed=3, **kwargs):
  args = dict(split=split, resolution=resolution, seed=seed, data_dir=data_dir, **SIZES)
  args.update(kwargs)
  return landscapes_tfds.get_landscapes_source(**args)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('procedural_tfds'))


@pytest.mark.parametrize('split', ['train', 'validation', 'test'])
def test_roundtrip_equals_generate(data_dir, split):
  source = _source(data_dir, split)
  assert len(source) == SIZES[f'num_{split}']
  offset = procedural_tfds.SPLIT_OFFSETS[split]
  for i in range(len(source)):
    labels, image = landscapes.generate(3, offset + i, 24, 32)
    ex = source[i]
    assert ex['labels'].dtype == np.uint8 and ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['labels'], labels)
    np.testing.assert_array_equal(ex['image'], image)


def test_generator_index_and_batched_reads(data_dir):
  source = _source(data_dir, 'validation')
  assert procedural_tfds.generator_index('validation', 4) == (1 << 30) + 4
  batch = source.__getitems__([4, 1])
  np.testing.assert_array_equal(batch[0]['image'], source[4]['image'])
  np.testing.assert_array_equal(
      batch[1]['labels'],
      landscapes.generate(3, procedural_tfds.generator_index('validation', 1),
                          24, 32)[0])


def test_splits_use_disjoint_indices(data_dir):
  n = max(SIZES.values())
  ranges = [set(range(o, o + n)) for o in procedural_tfds.SPLIT_OFFSETS.values()]
  assert not (ranges[0] & ranges[1] or ranges[0] & ranges[2] or
              ranges[1] & ranges[2])
  images = {split: {_source(data_dir, split)[i]['image'].tobytes()
                    for i in range(6)} for split in procedural_tfds.SPLITS}
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
      landscapes.generate(3, procedural_tfds.SPLIT_OFFSETS['test'] + 2, 24, 32)[0])


def test_no_tensorflow_imported(data_dir):
  _source(data_dir)
  assert 'tensorflow' not in sys.modules


def test_two_processes_build_the_same_dataset(tmp_path):
  code = (
      'import sys, numpy as np\n'
      'from fiancee_jax.data import landscapes_tfds\n'
      "s = landscapes_tfds.get_landscapes_source(split='train', "
      'resolution=(16, 16), seed=11, num_train=300, '
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
  tfds.disable_progress_bar()
  builder = landscapes_tfds.Landscapes(config='16x16_seed2_30-3-3', data_dir=str(tmp_path),
                                       num_workers=3)
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source(split='train')
  for i in range(30):
    np.testing.assert_array_equal(source[i]['image'],
                                  landscapes.generate(2, i, 16, 16)[1])
  # Avatars' split-dependent argument (cross pairs outside train) reaches the helpers too.
  builder = avatars_tfds.Avatars(config='32x32_seed1_4-5-2', data_dir=str(tmp_path),
                                 num_workers=2)
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source(split='validation')
  for i in range(5):
    expected = avatars.example(1, procedural_tfds.generator_index('validation', i), 32, 32,
                               cross=True)
    np.testing.assert_array_equal(source[i]['driver'], expected['driver'])
    assert bool(source[i]['cross'])


def test_helper_with_an_empty_part(tmp_path):
  # More workers than examples: some parts are empty.
  builder = landscapes_tfds.Landscapes(config='16x16_seed2_2-1-1', data_dir=str(tmp_path),
                                       num_workers=4)
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source(split='train')
  assert len(source) == 2
  np.testing.assert_array_equal(source[1]['labels'], landscapes.generate(2, 1, 16, 16)[0])


@pytest.mark.parametrize('kwargs,match', [
    (dict(split='val'), 'unknown split'),
    (dict(resolution=(8, 8)), r'config\.data\.resolution'),
    (dict(resolution=(8, 8, 3)), r'config\.data\.resolution'),
    (dict(num_validation=0, split='validation'), r'config\.data\.num_validation'),
    (dict(seed=-1), r'config\.data\.seed'),
])
def test_get_source_errors(data_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _source(data_dir, **kwargs)


