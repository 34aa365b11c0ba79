"""Tests of the TF-free input pipeline."""
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from fiancee_jax.data import input_pipeline
from fiancee_jax.data import landscapes_tfds

# Every test whose loader runs worker processes shares one xdist worker (group
# 'loader_workers'), so that /dev/shm holds no other test's segments while one is counted.
pytestmark = pytest.mark.xdist_group('loader_workers')


class FakeSource:
  """N examples of 4x6; example i has labels == i % 12 and image == i."""

  def __init__(self, n: int, fail_at: int | None = None):
    self.n, self.fail_at = n, fail_at

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i == self.fail_at:
      raise IOError(f'cannot read example {i}')
    return {'labels': np.full((4, 6), i % 12, np.uint8),
            'image': np.full((4, 6, 3), i, np.uint8)}


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def test_batch_shapes_dtypes_and_range():
  batch = _take(input_pipeline.batches(FakeSource(10), batch_size=4, seed=0),
                1)[0]
  assert batch['labels'].shape == (4, 4, 6) and batch['labels'].dtype == np.int32
  assert batch['image'].shape == (4, 4, 6, 3)
  assert batch['image'].dtype == np.float32
  assert batch['index'].shape == (4,) and batch['index'].dtype == np.int32
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1
  # Each row really is the example its index names.
  np.testing.assert_array_equal(batch['labels'][:, 0, 0], batch['index'] % 12)
  np.testing.assert_allclose(batch['image'][:, 0, 0, 0],
                             batch['index'] / 127.5 - 1, atol=1e-6)
  input_pipeline.check_batch(batch, num_classes=12, resolution=(4, 6))


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_reproduces_the_uninterrupted_sequence(prefetch):
  source = FakeSource(22)
  full = _take(input_pipeline.batches(source, batch_size=4, seed=5,
                                      prefetch=prefetch), 15)
  for k in (1, 5, 11):
    tail = _take(input_pipeline.batches(source, batch_size=4, seed=5,
                                        start_step=k, prefetch=prefetch),
                 15 - k)
    for a, b in zip(full[k:], tail):
      for key in ('labels', 'image', 'index'):
        np.testing.assert_array_equal(a[key], b[key])


def test_each_epoch_is_a_new_permutation():
  # 20 examples, batch 4: 5 steps per epoch, nothing dropped.
  batches = _take(input_pipeline.batches(FakeSource(20), batch_size=4, seed=1),
                  15)
  epochs = [np.concatenate([b['index'] for b in batches[e * 5:(e + 1) * 5]])
            for e in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(20))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(20))


def test_seed_changes_order_and_no_shuffle_keeps_it():
  a = _take(input_pipeline.batches(FakeSource(20), batch_size=4, seed=1), 1)
  b = _take(input_pipeline.batches(FakeSource(20), batch_size=4, seed=2), 1)
  assert not np.array_equal(a[0]['index'], b[0]['index'])
  c = _take(input_pipeline.batches(FakeSource(10), batch_size=4, seed=1,
                                   shuffle=False), 3)
  assert [x['index'].tolist() for x in c] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                              [0, 1, 2, 3]]


def test_process_shards_concatenate_to_the_global_batch():
  source = FakeSource(30)
  whole = _take(input_pipeline.batches(source, batch_size=6, seed=3), 8)
  for count in (2, 3):
    parts = [_take(input_pipeline.batches(
        source, batch_size=6, seed=3, process_index=p, process_count=count), 8)
             for p in range(count)]
    for step in range(8):
      assert all(len(parts[p][step]['index']) == 6 // count
                 for p in range(count))
      for key in ('labels', 'image', 'index'):
        np.testing.assert_array_equal(
            np.concatenate([parts[p][step][key] for p in range(count)]),
            whole[step][key])


def test_finite_epochs_and_drop_remainder():
  it = input_pipeline.batches(FakeSource(10), batch_size=4, seed=0,
                              num_epochs=3)
  assert len(list(it)) == 6  # 2 full batches per epoch
  it = input_pipeline.batches(FakeSource(10), batch_size=4, seed=0,
                              num_epochs=2, drop_remainder=False)
  sizes = [len(b['index']) for b in it]
  assert sizes == [4, 4, 2, 4, 4, 2]
  it = input_pipeline.batches(FakeSource(10), batch_size=4, seed=0,
                              num_epochs=2, start_step=3)
  assert len(list(it)) == 1


@pytest.mark.parametrize('kwargs,match', [
    (dict(batch_size=6, process_count=4), 'not divisible'),
    (dict(batch_size=32), 'fewer than one global batch'),
    (dict(batch_size=4, process_index=2, process_count=2), 'process_index'),
    (dict(batch_size=4, start_step=-1), 'start_step'),
    (dict(batch_size=4, workers=-1), 'workers'),
    (dict(batch_size=4, process_count=2, drop_remainder=False),
     'unequal batches'),
])
def test_bad_arguments_raise_at_call(kwargs, match):
  with pytest.raises(ValueError, match=match):
    input_pipeline.batches(FakeSource(10), seed=0, **kwargs)


def test_read_errors_reach_the_consumer():
  it = input_pipeline.batches(FakeSource(8, fail_at=5), batch_size=8, seed=0)
  with pytest.raises(IOError, match='cannot read example 5'):
    next(it)


def test_close_stops_the_prefetch_thread():
  def alive():
    return [t for t in threading.enumerate()
            if t.name == 'input_pipeline_prefetch']
  before = len(alive())
  it = input_pipeline.batches(FakeSource(40), batch_size=4, seed=0, prefetch=3)
  next(it)
  assert len(alive()) == before + 1
  it.close()
  assert len(alive()) == before


def _worker_processes():
  return [p for p in multiprocessing.active_children()
          if p.name.startswith('input_pipeline_worker_')]


def test_worker_processes_give_the_batches_of_the_thread():
  # Resumed at step 3 of a 2-process job, flipped, in uint8 through the workers and
  # converted here: the same arrays as one thread's float32 batches.
  source = FakeSource(30)
  kwargs = dict(batch_size=8, seed=7, start_step=3, flip=True, process_index=1,
                process_count=2)
  thread = _take(input_pipeline.batches(source, **kwargs), 7)
  it = input_pipeline.batches(source, workers=2, load_fn=input_pipeline.read,
                              convert_fn=input_pipeline.to_inputs, **kwargs)
  workers = [next(it) for _ in range(7)]
  assert len(_worker_processes()) == 2
  it.close()
  assert _worker_processes() == []
  for a, b in zip(thread, workers, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])
  # A finite pass ends with the workers.
  assert len(list(input_pipeline.batches(source, batch_size=8, seed=0, num_epochs=2,
                                         workers=2))) == 2 * (30 // 8)


def _segments():
  return {n for n in os.listdir('/dev/shm') if n.startswith('psm_')}


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='POSIX shared memory in /dev/shm')
def test_worker_batches_leave_no_shared_memory_behind():
  before = _segments()
  # Closed with every worker's queue full (prefetch 3 each), and after a finite pass.
  it = input_pipeline.batches(FakeSource(64), batch_size=4, seed=0, workers=2, prefetch=3)
  next(it)
  deadline = time.time() + 120  # spawned workers import TFDS first
  while len(_segments() - before) < 6 and time.time() < deadline:
    time.sleep(0.05)
  assert len(_segments() - before) >= 6  # batches wait in shared memory, not in pipes
  it.close()
  list(input_pipeline.batches(FakeSource(16), batch_size=4, seed=0, num_epochs=1,
                              workers=2))
  assert _segments() - before == set()


def _bus_error(source, indices):
  os.kill(os.getpid(), signal.SIGBUS)  # what writing to a full /dev/shm does


def test_a_worker_killed_by_a_full_shared_memory_names_the_fix():
  it = input_pipeline.batches(FakeSource(16), batch_size=4, seed=0, workers=1,
                              load_fn=_bus_error)
  with pytest.raises(RuntimeError, match=rf'worker 0 died \(exit code -{int(signal.SIGBUS)}\); '
                                         r'SIGBUS: the shared memory \(/dev/shm\) is full'):
    next(it)
  it.close()


def test_a_worker_read_error_reaches_the_consumer():
  it = input_pipeline.batches(FakeSource(16, fail_at=13), batch_size=4, seed=0,
                              shuffle=False, workers=2)
  assert [next(it)['index'][0] for _ in range(3)] == [0, 4, 8]
  with pytest.raises(IOError, match='cannot read example 13'):
    next(it)
  it.close()
  assert _worker_processes() == []


def test_eval_batches_pad_the_last_batch_with_a_mask():
  batches = list(input_pipeline.eval_batches(FakeSource(10), batch_size=4))
  assert [b['index'].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                    [8, 9, 9, 9]]
  assert [b['mask'].tolist() for b in batches][-1] == [True, True, False,
                                                        False]
  assert all(b['mask'].all() for b in batches[:-1])
  assert all(b['labels'].shape == (4, 4, 6) for b in batches)
  dropped = list(input_pipeline.eval_batches(FakeSource(10), batch_size=4,
                                             drop_remainder=True))
  assert [b['index'].tolist() for b in dropped] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_batches_from_tfds_landscapes(tmp_path):
  source = landscapes_tfds.get_landscapes_source(
      split='train', resolution=(16, 16), seed=0, num_train=16, num_validation=2,
      num_test=2, data_dir=str(tmp_path))
  batch = _take(input_pipeline.batches(source, batch_size=8, seed=0), 1)[0]
  input_pipeline.check_batch(batch, num_classes=12, resolution=(16, 16))
  np.testing.assert_array_equal(batch['labels'][0],
                                source[int(batch['index'][0])]['labels'])


def _good_batch():
  return {'labels': np.zeros((2, 8, 8), np.int32),
          'image': np.zeros((2, 8, 8, 3), np.float32)}


def _with(**changes):
  batch = _good_batch()
  batch.update(changes)
  return batch


def _nan_image():
  image = np.zeros((2, 8, 8, 3), np.float32)
  image[1, 2, 3, 0] = np.nan
  return image


def _bad_class():
  labels = np.zeros((2, 8, 8), np.int32)
  labels[0, 1, 1] = 212
  return labels


@pytest.mark.parametrize('batch,match', [
    (_with(labels=_bad_class()),
     r'^labels has class id 212 but the config has 151 classes '
     r'\(config\.data\.num_classes\)$'),
    (_with(labels=np.zeros((2, 8, 8, 1), np.int32)),
     r'labels must be int32 \[B, H, W\], got shape \(2, 8, 8, 1\)'),
    (_with(labels=np.zeros((2, 8, 8), np.uint8)),
     r'labels must be int32 \[B, H, W\], got dtype uint8'),
    (_with(image=np.zeros((2, 8, 8), np.float32)),
     r'image must be float32 \[B, H, W, 3\], got shape'),
    (_with(image=np.zeros((2, 8, 8, 3), np.float64)),
     'got dtype float64'),
    (_with(labels=np.zeros((2, 4, 4), np.int32),
           image=np.zeros((2, 4, 4, 3), np.float32)),
     r'labels are 4x4 but the config resolution is 8x8 '
     r'\(config\.data\.resolution\)'),
    (_with(image=_nan_image()), 'image has 1 NaN values'),
    (_with(image=np.full((2, 8, 8, 3), 3.0, np.float32)), r'\[-1, 1\]'),
    (_with(labels=-np.ones((2, 8, 8), np.int32)), 'negative class id'),
    ({'image': np.zeros((2, 8, 8, 3), np.float32)}, "no 'labels'"),
])
def test_check_batch_errors(batch, match):
  with pytest.raises(ValueError, match=match):
    input_pipeline.check_batch(batch, num_classes=151, resolution=(8, 8))


def test_check_batch_accepts_a_good_batch():
  input_pipeline.check_batch(_good_batch(), num_classes=151, resolution=(8, 8))
