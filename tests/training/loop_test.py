"""The training loop on a toy trainer (least squares): resume, NaN check, fetches, preemption."""
import itertools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import checkpoint
from fiancee_jax import metric_logging
from fiancee_jax import parallel
from fiancee_jax.training import loop

_W = np.float32([1.0, -2.0, 0.5])


class _Interrupted(Exception):
  pass


def _init():
  return {'w': jnp.zeros((3,), jnp.float32), 'count': jnp.zeros((), jnp.int32)}


def _make_step(nan_at=None):
  def step(state, batch):
    def loss_fn(w):
      return jnp.mean((batch['x'] @ w - batch['y']) ** 2)

    loss, grad = jax.value_and_grad(loss_fn)(state['w'])
    count = state['count'] + 1
    if nan_at is not None:  # the measurement of step `nan_at` only
      loss = jnp.where(count == nan_at, jnp.nan, loss)
    return {'w': state['w'] - 0.1 * grad, 'count': count}, {'loss': loss,
                                                             'grad_norm': jnp.linalg.norm(grad)}
  return step


def _batches(start, *, fail_at=None, on_step=None):
  for s in itertools.count(start):
    if s == fail_at:
      raise _Interrupted()
    if on_step is not None:
      on_step(s)
    x = np.random.default_rng(s).standard_normal((4, 3)).astype(np.float32)
    yield {'x': x, 'y': x @ _W}


def _run(workdir, *, num_steps=10, log_every=2, checkpoint_every=4, sample_every=0,
         nan_at=None, batches=_batches, make_step=None, write_samples=None, finish=None,
         async_save=False, convert=None, check_batch=None):
  return loop.train(
      stage='toy', workdir=str(workdir), mesh=parallel.make_mesh(1),
      schedule=loop.Schedule(num_steps=num_steps, log_every=log_every,
                             checkpoint_every=checkpoint_every, keep_checkpoints=5,
                             sample_every=sample_every),
      init=_init, make_step=make_step or (lambda: _make_step(nan_at)), batches=batches,
      write_samples=write_samples, finish=finish, async_save=async_save, convert=convert,
      check_batch=check_batch)


def _ckpt_steps(workdir):
  return checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints', 'toy')).all_steps()


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  wd = tmp_path_factory.mktemp('full')
  return wd, jax.device_get(_run(wd).state)


def test_trains_and_saves_a_finished_checkpoint(uninterrupted):
  wd, state = uninterrupted
  assert int(state['count']) == 10
  assert np.abs(state['w'] - _W).max() < np.abs(_W).max()  # it learned something
  assert _ckpt_steps(wd) == [4, 8, 10]
  records = metric_logging.read_metrics(str(wd), 'toy')
  assert [r['step'] for r in records] == [2, 4, 6, 8, 10]


def test_resume_after_an_interruption_is_bit_exact(uninterrupted, tmp_path):
  _, full = uninterrupted
  with pytest.raises(_Interrupted):
    _run(tmp_path, batches=lambda start: _batches(start, fail_at=6))
  assert _ckpt_steps(tmp_path) == [4]
  resumed = jax.device_get(_run(tmp_path).state)
  np.testing.assert_array_equal(resumed['w'], full['w'])
  assert int(resumed['count']) == 10


def test_async_checkpoints_resume_bit_exact(uninterrupted, tmp_path):
  _, full = uninterrupted
  with pytest.raises(_Interrupted):
    _run(tmp_path, batches=lambda start: _batches(start, fail_at=9), async_save=True)
  assert _ckpt_steps(tmp_path) == [4, 8]  # the write in flight was finalised on the way out
  resumed = jax.device_get(_run(tmp_path, async_save=True).state)
  np.testing.assert_array_equal(resumed['w'], full['w'])
  assert _ckpt_steps(tmp_path) == [4, 8, 10]


def test_finished_stage_is_read_back_without_compiling_a_step(uninterrupted):
  wd, full = uninterrupted

  def no_step():
    raise AssertionError('a finished stage must not build its step')

  result = _run(wd, make_step=no_step)
  assert result.metadata['finished'] and result.metadata['data_position'] == 10
  np.testing.assert_array_equal(jax.device_get(result.state['w']), full['w'])


def test_nan_between_fetches_raises_before_the_next_save(tmp_path):
  # Fetches at 2 (checkpoint), 4 (log + checkpoint): the NaN of step 3 is not fetched by
  # itself, the device-side record names it at step 4, and nothing of step 4 is saved.
  with pytest.raises(metric_logging.NonFiniteMetricError, match=r"'loss' is nan at step 3"):
    _run(tmp_path, log_every=4, checkpoint_every=2, nan_at=3)
  assert _ckpt_steps(tmp_path) == [2]
  assert [r['step'] for r in metric_logging.read_metrics(str(tmp_path), 'toy')] == []


def test_metrics_are_fetched_only_at_log_checkpoint_and_sample_steps(tmp_path, monkeypatch):
  fetched = []
  real_fetch = loop.fetch

  def counting_fetch(tree):
    out = real_fetch(tree)
    fetched.append(int(out[1]['count']))  # steps taken when fetched
    return out

  monkeypatch.setattr(loop, 'fetch', counting_fetch)
  drawn = []
  _run(tmp_path, num_steps=12, log_every=4, checkpoint_every=6, sample_every=5,
       write_samples=lambda state, step, writer: drawn.append(step))
  assert fetched == [4, 5, 6, 8, 10, 12]
  assert drawn == [5, 10, 12]
  assert [r['step'] for r in metric_logging.read_metrics(str(tmp_path), 'toy')] == [4, 8, 12]


def test_finish_runs_once_and_its_metadata_is_stored(tmp_path):
  calls = []

  def finish(state, writer):
    calls.append(int(jax.device_get(state['count'])))
    return {**state, 'w': state['w'] * 2}, {'note': 'doubled'}

  result = _run(tmp_path, finish=finish)
  assert calls == [10] and result.metadata['note'] == 'doubled'
  again = _run(tmp_path, finish=finish)  # read back: finish is not run again
  assert calls == [10] and again.metadata['note'] == 'doubled'
  np.testing.assert_array_equal(jax.device_get(again.state['w']),
                                jax.device_get(result.state['w']))


def test_sigterm_saves_at_the_next_step_boundary_and_resumes_bit_exact(uninterrupted,
                                                                      tmp_path):
  _, full = uninterrupted
  previous = signal.getsignal(signal.SIGTERM)

  def term_at(s):
    if s == 5:  # while loading the batch of step 6
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.Preempted, match='step 6') as e:
    _run(tmp_path, batches=lambda start: _batches(start, on_step=term_at))
  assert e.value.step == 6
  assert signal.getsignal(signal.SIGTERM) == previous  # the loop's handler is gone again
  assert _ckpt_steps(tmp_path) == [4, 6]
  resumed = jax.device_get(_run(tmp_path).state)
  np.testing.assert_array_equal(resumed['w'], full['w'])


def _quantised(start):
  """_batches with x stored as uint8 (x = q / 32 - 4 exactly)."""
  for b in _batches(start):
    q = np.clip(np.round((b['x'] + 4) * 32), 0, 255).astype(np.uint8)
    yield {'q': q, 'y': (q.astype(np.float32) / 32 - 4) @ _W}


def _dequantise(batch):
  return {'x': batch['q'].astype(jnp.float32) / 32 - 4, 'y': batch['y']}


def test_convert_runs_inside_the_compiled_step(tmp_path):
  checked = []
  on_device = _run(tmp_path / 'device', batches=_quantised, convert=_dequantise,
                   check_batch=checked.append)
  assert checked[0]['q'].dtype == np.uint8  # the check sees the batch as loaded
  on_host = _run(tmp_path / 'host',
                 batches=lambda start: map(_dequantise, _quantised(start)))
  np.testing.assert_array_equal(jax.device_get(on_device.state['w']),
                                jax.device_get(on_host.state['w']))


def test_a_bad_schedule_is_refused_before_compute(tmp_path):
  with pytest.raises(ValueError, match="log_every=0 for stage 'toy'"):
    _run(tmp_path, log_every=0)
  assert not os.path.exists(tmp_path / 'checkpoints')
