"""TF-free input pipeline: deterministic, resumable, sharded batches.

Training batches come from `batches(source, ...)`. The global batch at step `s`
is a pure function of `(seed, s)`: epoch `e = s // steps_per_epoch` uses the
permutation `default_rng([seed, e]).permutation(len(source))`, and step `s`
takes its slice `[k * G, (k + 1) * G)` with `k = s % steps_per_epoch` and `G`
the global batch size. Resuming at `start_step` therefore reproduces exactly what
an uninterrupted run sees, without any iterator state to checkpoint: the step
number is the state. Each of `process_count` processes loads only its own
contiguous part `[p * B, (p + 1) * B)` of each global batch, `B = G /
process_count`, so the parts concatenated in process order are the global
batch (what a `data`-sharded `jax.Array` built from per-process data expects).

With `flip`, each example of a training batch is mirrored left-right with probability 1/2,
decided by `flip_mask(step, ...)`: a pure function of `(seed, step)` over the global batch,
so resuming, and any number of processes, flip exactly the examples one uninterrupted
process flips.

Loading runs `prefetch` batches ahead on one background thread (`workers=0`), or in
`workers` worker processes (worker w loads steps start + w, start + w + workers, ...;
batches come back in step order: a worker writes each batch's arrays into one shared-memory
segment and sends only its name and layout; the consumer copies the arrays out and frees
the segment). Either
way the batch of a step is the same, so the number of workers never changes what trains.
The thread or the workers stop when the iterator is exhausted, closed (`it.close()`), or
garbage collected.

Batches are dicts of NumPy arrays:
  labels: int32 [B, H, W] class ids.
  image: float32 [B, H, W, 3] in [-1, 1].
  index: int32 [B] indices into the source.
  mask: bool [B] (eval_batches only) False on padding.
"""
import dataclasses
import itertools
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]
_FLIP_STREAM = 0x666C6970  # 'flip': the flips' own random stream of the data seed


def _check_sharding(batch_size: int, process_index: int,
                    process_count: int) -> int:
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size} '
                     f'(config.train.batch_size)')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, process_count), got '
                     f'{process_index} of {process_count}')
  if batch_size % process_count:
    raise ValueError(
        f'the global batch size {batch_size} is not divisible by the '
        f'{process_count} processes: make config.train.batch_size a multiple '
        f'of jax.process_count()')
  return batch_size // process_count


def steps_per_epoch(num_examples: int, batch_size: int,
                    drop_remainder: bool = True) -> int:
  """Global steps in one pass over `num_examples` at global `batch_size`."""
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def batch_indices(step: int, *, num_examples: int, batch_size: int, seed: int,
                  shuffle: bool = True, drop_remainder: bool = True,
                  process_index: int = 0, process_count: int = 1
                  ) -> np.ndarray:
  """Returns int64 [B]: the source indices this process loads at `step`.

  A pure function of its arguments (see the module docstring). With
  `drop_remainder=False` the last global batch of an epoch is smaller, and is
  split over the processes with `np.array_split` (parts may differ by one).
  """
  per_process = _check_sharding(batch_size, process_index, process_count)
  steps = steps_per_epoch(num_examples, batch_size, drop_remainder)
  if steps < 1:
    raise ValueError(
        f'the dataset has {num_examples} examples, fewer than one global batch '
        f'of {batch_size}: lower config.train.batch_size or add examples '
        f'(config.data.num_train)')
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}')
  epoch, k = divmod(int(step), steps)
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  else:
    order = np.arange(num_examples)
  batch = order[k * batch_size:(k + 1) * batch_size]
  if len(batch) == batch_size:
    return batch[process_index * per_process:(process_index + 1) * per_process]
  return np.array_split(batch, process_count)[process_index]


def read(source: Any, indices: np.ndarray) -> Batch:
  """Reads `source[i]` for each index, as stored.

  Args:
    source: random access, `source[i] -> {'labels': uint8 [H, W], 'image':
      uint8 [H, W, 3]}` (see data/sources.py).
    indices: int [B].

  Returns:
    {'labels': uint8 [B, H, W], 'image': uint8 [B, H, W, 3], 'index': int32 [B]}.
  """
  indices = [int(i) for i in indices]
  getitems = getattr(source, '__getitems__', None)
  examples = getitems(indices) if getitems else [source[i] for i in indices]
  return {'labels': np.stack([np.asarray(ex['labels']) for ex in examples]),
          'image': np.stack([np.asarray(ex['image']) for ex in examples]),
          'index': np.asarray(indices, np.int32)}


def to_inputs(batch: Batch) -> Batch:
  """`read`'s batch -> model inputs: labels int32, image float32 in [-1, 1]."""
  return {**batch, 'labels': batch['labels'].astype(np.int32),
          'image': batch['image'].astype(np.float32) * np.float32(1 / 127.5) - 1.0}


def load(source: Any, indices: np.ndarray) -> Batch:
  """`to_inputs(read(source, indices))`: {'labels': int32 [B, H, W], 'image': float32
  [B, H, W, 3] in [-1, 1], 'index': int32 [B]}."""
  return to_inputs(read(source, indices))


def flip_mask(step: int, *, batch_size: int, seed: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
  """bool [B]: which examples of this process's part of global batch `step` are mirrored.

  Drawn over the whole global batch from default_rng([seed, 'flip', step]), then sliced
  like `batch_indices`.
  """
  per_process = _check_sharding(batch_size, process_index, process_count)
  mask = np.random.default_rng([seed, _FLIP_STREAM, int(step)]).random(batch_size) < 0.5
  return mask[process_index * per_process:(process_index + 1) * per_process]


def flip_batch(batch: Batch, mask: np.ndarray) -> Batch:
  """Mirrors along W every per-example map ([B, H, W] or [B, H, W, C]) where `mask` [B]."""
  mask = np.asarray(mask, bool)
  out = dict(batch)
  for key, x in batch.items():
    if np.ndim(x) >= 3:
      out[key] = np.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)
  return out


class _Prefetcher:
  """Runs an iterator on a daemon thread, `size` items ahead."""

  _DONE = object()

  def __init__(self, items: Iterable[Any], size: int):
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(items,),
                                    name='input_pipeline_prefetch',
                                    daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _run(self, items: Iterable[Any]) -> None:
    try:
      for item in items:
        if not self._put(item):
          return
    except BaseException as e:  # Handed to the consumer, raised there.
      self._put(e)
      return
    self._put(self._DONE)

  def __iter__(self) -> Iterator[Any]:
    try:
      while True:
        item = self._queue.get()
        if item is self._DONE:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      self.close()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)


def _prefetched(items: Iterable[Batch], prefetch: int) -> Iterator[Batch]:
  if prefetch <= 0:
    yield from items
  else:
    yield from _Prefetcher(items, prefetch)


def batches(source: Any, *, batch_size: int, seed: int, start_step: int = 0,
            shuffle: bool = True, drop_remainder: bool = True,
            process_index: int = 0, process_count: int = 1, prefetch: int = 2,
            num_epochs: int | None = None,
            load_fn: Callable[[Any, np.ndarray], Batch] | None = None,
            flip: bool = False, workers: int = 0,
            convert_fn: Callable[[Batch], Batch] | None = None) -> Iterator[Batch]:
  """Yields training batches from global step `start_step` on.

  Args:
    source: random access source (sources.data_source).
    batch_size: global batch size G (config.train.batch_size).
    seed: data order seed; epoch e is shuffled with default_rng([seed, e]).
    start_step: first global step to yield (resume from a checkpoint).
    shuffle: reshuffle every epoch; False keeps the source order.
    drop_remainder: drop the incomplete last global batch of each epoch.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    prefetch: batches prepared ahead on a background thread (0: none).
    num_epochs: stop after this many epochs; None: endless.
    load_fn: (source, indices) -> batch; default `load` (label maps and images).
    flip: mirror each example left-right with probability 1/2 (`flip_mask`).
    workers: worker processes that load batches (0: load on a thread of this process).
      `source` and `load_fn` are pickled to them.
    convert_fn: applied to each loaded (and flipped) batch in this process, after the
      workers: with `load_fn=read, convert_fn=to_inputs` the workers send uint8, a quarter
      of the bytes of float32. Default: none.

  Yields:
    load_fn's batches, by default {'labels': int32 [B, H, W], 'image': float32
    [B, H, W, 3] in [-1, 1], 'index': int32 [B]}, with B = G // process_count.

  Raises:
    ValueError: bad sizes, or G not divisible by process_count.
  """
  num_examples = len(source)
  _check_sharding(batch_size, process_index, process_count)
  if not drop_remainder and process_count > 1:
    raise ValueError('drop_remainder=False would give processes unequal '
                     'batches; use it with process_count=1')
  steps = steps_per_epoch(num_examples, batch_size, drop_remainder)
  if steps < 1:
    raise ValueError(
        f'the dataset has {num_examples} examples, fewer than one global batch '
        f'of {batch_size}: lower config.train.batch_size or add examples')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  if workers < 0:
    raise ValueError(f'workers must be >= 0, got {workers}')
  if num_epochs is None:
    step_range = itertools.count(start_step)
  else:
    step_range = range(start_step, num_epochs * steps)

  make = _StepBatch(source=source, load_fn=load_fn or load, num_examples=num_examples,
                    batch_size=batch_size, seed=seed, shuffle=shuffle,
                    drop_remainder=drop_remainder, process_index=process_index,
                    process_count=process_count, flip=flip)
  if workers:
    stop = sys.maxsize if num_epochs is None else num_epochs * steps
    loaded = _in_workers(make, start_step, stop, workers=workers, prefetch=prefetch)
  else:
    loaded = _prefetched(map(make, step_range), prefetch)
  return loaded if convert_fn is None else _converted(loaded, convert_fn)


def _converted(items: Iterator[Batch], convert_fn: Callable[[Batch], Batch]
               ) -> Iterator[Batch]:
  try:
    for item in items:
      yield convert_fn(item)
  finally:
    items.close()


@dataclasses.dataclass(frozen=True)
class _StepBatch:
  """step -> this process's part of global batch `step` (picklable: it runs in workers)."""
  source: Any
  load_fn: Callable[[Any, np.ndarray], Batch]
  num_examples: int
  batch_size: int
  seed: int
  shuffle: bool
  drop_remainder: bool
  process_index: int
  process_count: int
  flip: bool

  def __call__(self, step: int) -> Batch:
    indices = batch_indices(
        int(step), num_examples=self.num_examples, batch_size=self.batch_size, seed=self.seed,
        shuffle=self.shuffle, drop_remainder=self.drop_remainder,
        process_index=self.process_index, process_count=self.process_count)
    batch = self.load_fn(self.source, indices)
    if self.flip:
      mask = flip_mask(int(step), batch_size=self.batch_size, seed=self.seed,
                       process_index=self.process_index, process_count=self.process_count)
      batch = flip_batch(batch, mask[:len(indices)])
    return batch


def _in_workers(make: _StepBatch, start: int, stop: int, *, workers: int,
                prefetch: int) -> Iterator[Batch]:
  """make(step) for step in [start, stop), computed by `workers` processes, in step order.

  Worker w computes steps start + w, start + w + workers, ... into its own bounded queue;
  the consumer takes from the queues in turn, so the order is the steps' order whatever
  the workers' speeds. Workers are spawned (not forked: the parent runs JAX's threads).
  Batches travel as `_Shared` segments; those still queued when the consumer stops are
  freed here.
  """
  ctx = multiprocessing.get_context('spawn')
  queues = [ctx.Queue(max(prefetch, 1)) for _ in range(workers)]
  stop_event = ctx.Event()
  procs = [ctx.Process(target=_worker, args=(make, start + w, stop, workers, q, stop_event),
                       name=f'input_pipeline_worker_{w}', daemon=True)
           for w, q in enumerate(queues)]
  for p in procs:
    p.start()
  try:
    for i, _ in enumerate(range(start, stop)):
      q, p = queues[i % workers], procs[i % workers]
      while True:
        try:
          item = q.get(timeout=1.0)
          break
        except queue.Empty:
          if not p.is_alive():
            hint = ('; SIGBUS: the shared memory (/dev/shm) is full -- give the container '
                    'more (docker --shm-size) or lower config.data.workers or prefetch'
                    if p.exitcode == -signal.SIGBUS else '; see its output above')
            raise RuntimeError(f'input pipeline worker {i % workers} died (exit code '
                               f'{p.exitcode}){hint}') from None
      if isinstance(item, BaseException):
        raise item
      yield item.take()
  finally:
    stop_event.set()
    # Drained while the workers stop, so that none blocks on a full pipe as it exits.
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
      for q in queues:
        _free_queued(q)
      time.sleep(0.01)
    for p in procs:
      if p.is_alive():
        p.terminate()
      p.join(timeout=5)
    for q in queues:
      _free_queued(q)
      q.cancel_join_thread()
      q.close()


def _free_queued(q: Any) -> None:
  """Frees the segments of the batches waiting in a worker's queue."""
  while True:
    try:
      item = q.get_nowait()
    except Exception:  # pylint: disable=broad-except  (empty, closed or cut short)
      return
    if isinstance(item, _Shared):
      item.free()


@dataclasses.dataclass(frozen=True)
class _Shared:
  """A batch in a shared-memory segment: its name and each array's (key, shape, dtype,
  offset). Only this small record is pickled through the worker's queue."""
  name: str
  layout: tuple[tuple[str, tuple[int, ...], str, int], ...]

  @classmethod
  def put(cls, batch: Batch) -> '_Shared':
    """Copies `batch` into a new segment (the receiver frees it: `take` or `free`)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in batch.items()}
    layout, offset = [], 0
    for k, v in arrays.items():
      layout.append((k, v.shape, v.dtype.str, offset))
      offset += -(-v.nbytes // 64) * 64  # 64-byte aligned arrays
    shm = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
      for (k, shape, dtype, off), v in zip(layout, arrays.values()):
        np.ndarray(shape, dtype, shm.buf, off)[...] = v
    finally:
      shm.close()
    return cls(shm.name, tuple(layout))

  def take(self) -> Batch:
    """The batch, copied out of the segment, which is then freed."""
    shm = shared_memory.SharedMemory(name=self.name)
    try:
      return {k: np.ndarray(shape, np.dtype(dtype), shm.buf, off).copy()
              for k, shape, dtype, off in self.layout}
    finally:
      shm.close()
      shm.unlink()

  def free(self) -> None:
    try:
      shm = shared_memory.SharedMemory(name=self.name)
    except FileNotFoundError:
      return
    shm.close()
    shm.unlink()


def _worker(make: _StepBatch, first: int, stop: int, stride: int, out: Any,
            stop_event: Any) -> None:
  """A worker process: make(step) for step in range(first, stop, stride), into `out`."""
  try:
    for step in range(first, stop, stride):
      item = _Shared.put(make(step))
      while not stop_event.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if stop_event.is_set():
        item.free()
        return
  except BaseException as e:  # Handed to the consumer, raised there.
    out.put(e)


def eval_batches(source: Any, *, batch_size: int, drop_remainder: bool = False,
                 prefetch: int = 2,
                 load_fn: Callable[[Any, np.ndarray], Batch] | None = None) -> Iterator[Batch]:
  """Yields one in-order pass over `source`, padded to static shapes.

  The last batch is padded to `batch_size` by repeating the last example, with
  `mask` False on the padding, so a jitted eval step compiles once; weight
  per-example results by `mask`. With `drop_remainder` it is dropped instead.

  Args:
    source: random access source.
    batch_size: examples per batch.
    drop_remainder: drop the incomplete last batch instead of padding it.
    prefetch: batches prepared ahead on a background thread (0: none).
    load_fn: (source, indices) -> batch; default `load`.

  Yields:
    load_fn's batches plus 'mask': bool [B], by default {'labels': int32 [B, H, W],
    'image': float32 [B, H, W, 3], 'index': int32 [B], 'mask'}.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  n = len(source)
  stop = n - n % batch_size if drop_remainder else n

  load_fn = load_fn or load

  def make(start):
    real = np.arange(start, min(start + batch_size, stop))
    idx = np.pad(real, (0, batch_size - len(real)), mode='edge')
    batch = load_fn(source, idx)
    batch['mask'] = np.arange(batch_size) < len(real)
    return batch

  return _prefetched(map(make, range(0, stop, batch_size)), prefetch)


def check_batch(batch: dict[str, Any], *, num_classes: int,
                resolution: tuple[int, int]) -> None:
  """Raises ValueError if a batch does not fit the config.

  Args:
    batch: {'labels': int32 [B, H, W], 'image': float32 [B, H, W, 3], ...};
      NumPy or JAX arrays.
    num_classes: config.data.num_classes.
    resolution: config.data.resolution (H, W).

  Raises:
    ValueError: naming the problem and the config key to fix.
  """
  for key in ('labels', 'image'):
    if key not in batch:
      raise ValueError(f'batch has no {key!r} (keys: {sorted(batch)})')
  labels, image = np.asarray(batch['labels']), np.asarray(batch['image'])
  if labels.ndim != 3:
    raise ValueError(f'labels must be int32 [B, H, W], got shape '
                     f'{labels.shape}')
  if labels.dtype != np.int32:
    raise ValueError(f'labels must be int32 [B, H, W], got dtype '
                     f'{labels.dtype}')
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f'image must be float32 [B, H, W, 3], got shape '
                     f'{image.shape}')
  if image.dtype != np.float32:
    raise ValueError(f'image must be float32 [B, H, W, 3], got dtype '
                     f'{image.dtype}')
  if image.shape[:3] != labels.shape:
    raise ValueError(f'image {image.shape} and labels {labels.shape} differ '
                     f'in [B, H, W]')
  h, w = (int(v) for v in resolution)
  if labels.shape[1:] != (h, w):
    raise ValueError(
        f'labels are {labels.shape[1]}x{labels.shape[2]} but the config '
        f'resolution is {h}x{w} (config.data.resolution)')
  if labels.size:
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
      raise ValueError(f'labels has negative class id {low}')
    if high >= num_classes:
      raise ValueError(
          f'labels has class id {high} but the config has {num_classes} '
          f'classes (config.data.num_classes)')
  if np.isnan(image).any():
    raise ValueError(f'image has {int(np.isnan(image).sum())} NaN values')
  if image.size and (image.min() < -1.0 or image.max() > 1.0):
    raise ValueError(f'image must be in [-1, 1], got [{image.min()}, '
                     f'{image.max()}]')
