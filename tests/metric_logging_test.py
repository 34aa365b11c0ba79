"""Tests for fiancee_jax.metric_logging: JSONL, NaN handling, TensorBoard, progress."""

import glob
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import metric_logging


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_jsonl_lines_and_append_on_reopen(tmp_path):
  workdir = str(tmp_path)
  with metric_logging.MetricWriter(workdir, stage='backbone', total_steps=10,
                                   progress=False) as writer:
    writer.write_scalars(1, {'g/loss': jnp.float32(1.5), 'd/loss': 2, 'lr': np.float64(1e-4)})
    # Flushed at once: readable before close.
    assert len(_lines(workdir)) == 1
    writer.write_scalars(2, {'g/loss': jnp.array([0.5])})
  with metric_logging.MetricWriter(workdir, stage='backbone', total_steps=10,
                                   progress=False) as writer:
    writer.write_scalars(3, {'g/loss': 0.25})
  lines = _lines(workdir)
  assert [line['step'] for line in lines] == [1, 2, 3]
  first = lines[0]
  assert set(first) == {'stage', 'step', 'time', 'g/loss', 'd/loss', 'lr'}
  assert first['stage'] == 'backbone' and first['g/loss'] == 1.5 and first['d/loss'] == 2.0
  assert first['lr'] == pytest.approx(1e-4)
  assert isinstance(first['time'], float) and first['time'] > 1.6e9
  assert lines[1]['g/loss'] == 0.5


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_raises_and_writes_nothing_for_that_step(tmp_path, bad):
  workdir = str(tmp_path)
  with metric_logging.MetricWriter(workdir, stage='exits', total_steps=10,
                                   progress=False) as writer:
    writer.write_scalars(1, {'exit2/l1': 0.5, 'exit2/lpips': 0.1})
    with pytest.raises(metric_logging.NonFiniteMetricError) as e:
      writer.write_scalars(2, {'exit2/l1': 0.4, 'exit2/lpips': jnp.float32(bad)})
    assert isinstance(e.value, FloatingPointError)
    assert "'exit2/lpips'" in str(e.value) and 'step 2' in str(e.value)
  assert [line['step'] for line in _lines(workdir)] == [1]


def test_check_finite_returns_floats_and_raises():
  values = metric_logging.check_finite({'a': jnp.float32(0.5), 'b': 2}, step=3)
  assert values == {'a': 0.5, 'b': 2.0}
  with pytest.raises(metric_logging.NonFiniteMetricError, match="'b' is nan at step 4"):
    metric_logging.check_finite({'a': 1.0, 'b': jnp.float32(np.nan)}, step=4)


def test_rejects_non_scalars_and_reserved_names(tmp_path):
  with metric_logging.MetricWriter(str(tmp_path), stage='s', total_steps=1,
                                   progress=False) as writer:
    with pytest.raises(ValueError, match="'g/loss' has shape \\(2,\\)"):
      writer.write_scalars(1, {'g/loss': jnp.ones(2)})
    with pytest.raises(ValueError, match="'step' is reserved"):
      writer.write_scalars(1, {'step': 3})
    with pytest.raises(ValueError, match='expected uint8'):
      writer.write_images(1, {'sample': np.zeros((4, 4, 3), np.float32)})
  assert metric_logging.read_metrics(str(tmp_path)) == []


def test_tensorboard_scalars_and_images(tmp_path):
  workdir = str(tmp_path)
  with metric_logging.MetricWriter(workdir, stage='backbone', total_steps=2,
                                   progress=False) as writer:
    writer.write_scalars(1, {'g/loss': 1.0})
    writer.write_images(1, {'samples': np.full((8, 8, 3), 200, np.uint8)})
  events = glob.glob(os.path.join(workdir, 'tensorboard', 'backbone', 'events.out.tfevents.*'))
  assert len(events) == 1
  content = open(events[0], 'rb').read()
  assert b'g/loss' in content and b'samples' in content


def test_read_metrics_filters_by_stage_and_skips_cut_line(tmp_path):
  workdir = str(tmp_path)
  for stage, steps in (('backbone', (1, 2)), ('exits', (1,)), ('backbone', (3,))):
    with metric_logging.MetricWriter(workdir, stage=stage, total_steps=5,
                                     progress=False) as writer:
      for step in steps:
        writer.write_scalars(step, {'loss': float(step)})
  assert [r['step'] for r in metric_logging.read_metrics(workdir, 'backbone')] == [1, 2, 3]
  assert [r['stage'] for r in metric_logging.read_metrics(workdir, 'exits')] == ['exits']
  assert len(metric_logging.read_metrics(workdir)) == 4
  assert metric_logging.read_metrics(str(tmp_path / 'nowhere')) == []
  # A kill mid-write leaves a partial line; the next run starts on a fresh line.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"stage": "exits", "st')
  with metric_logging.MetricWriter(workdir, stage='exits', total_steps=5,
                                   progress=False) as writer:
    writer.write_scalars(2, {'loss': 2.0})
  assert [r['step'] for r in metric_logging.read_metrics(workdir, 'exits')] == [1, 2]


def test_progress_log_line_without_tty(tmp_path, caplog):
  with metric_logging.MetricWriter(str(tmp_path), stage='backbone', total_steps=4,
                                   progress=True, log_every_secs=0.0) as writer:
    with caplog.at_level(logging.INFO):
      writer.update_progress(2, {'g/loss': jnp.float32(0.75), 'd/loss': 1.0})
      writer.update_progress(4)
  messages = [r.getMessage() for r in caplog.records]
  assert any('backbone step 4/4' in m and 'steps/s' in m and 'g/loss=0.75' in m
             for m in messages), messages


def test_disabled_writer_writes_nothing_but_still_checks(tmp_path):
  workdir = str(tmp_path / 'run')
  with metric_logging.MetricWriter(workdir, stage='s', total_steps=3, enabled=False) as writer:
    assert not writer.enabled
    writer.write_scalars(1, {'loss': 1.0})
    writer.write_images(1, {'x': np.zeros((2, 2, 3), np.uint8)})
    writer.update_progress(1)
    with pytest.raises(metric_logging.NonFiniteMetricError):
      writer.write_scalars(2, {'loss': float('nan')})
  assert not os.path.exists(workdir)
