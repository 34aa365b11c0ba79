"""Metrics of a training stage: JSONL in the workdir, TensorBoard events, a progress bar.

One `MetricWriter` per stage::

  with MetricWriter(workdir, stage='backbone', total_steps=num_steps) as writer:
    for step in range(first_step, num_steps):
      state, measurements = train_step(state, batch)
      writer.update_progress(step + 1)
      if (step + 1) % log_every == 0:
        writer.write_scalars(step + 1, measurements)  # raises on NaN/inf

Files (process 0 only; other processes still check for NaN so every process stops together):

- `workdir/metrics.jsonl`: one JSON object per `write_scalars` call,
  `{"stage": "backbone", "step": 120, "time": 1718000000.1, "g/loss": 1.23, ...}`, appended
  (a resumed run keeps earlier lines) and flushed at once. Read it back with `read_metrics`.
- `workdir/tensorboard/STAGE/`: TensorBoard scalars and images (tensorboardX).
- A tqdm bar on stderr (steps/s and the latest losses) when stderr is a terminal; otherwise a
  log line through absl logging every `log_every_secs`.

`check_finite(scalars, step)` is the NaN/inf check on its own, for steps that are not logged.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

METRICS_FILE = 'metrics.jsonl'
_RESERVED = ('stage', 'step', 'time')
_PROGRESS_INTERVAL_SECS = 0.5  # how often the bar's postfix fetches and formats losses
_NUM_PROGRESS_SCALARS = 4


class NonFiniteMetricError(FloatingPointError):
  """A logged metric is NaN or infinite; training should stop at the last good checkpoint."""


def _to_floats(step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
  """Fetches all values with one device_get and converts them to Python floats."""
  host = jax.device_get(dict(scalars))
  out = {}
  for name, value in host.items():
    if not isinstance(name, str):
      raise TypeError(f'metric names must be strings, got {name!r} at step {step}')
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(
          f'metric {name!r} has shape {array.shape} at step {step}; log scalars only '
          '(reduce it first, e.g. with .mean())')
    out[name] = float(array.reshape(()))
  return out


def check_finite(
    scalars: Mapping[str, float | jax.Array], step: int, *, stage: str | None = None
) -> dict[str, float]:
  """Fetches scalar metrics to the host and checks that none is NaN or infinite.

  Call it on every process, every step if you can afford the device sync, so all processes
  stop at the same step.

  Args:
    scalars: flat dict of scalar metrics (device arrays fetched with one `jax.device_get`).
    step: the step they belong to, for the error message.
    stage: optional stage name, for the error message.

  Returns:
    The metrics as Python floats.

  Raises:
    NonFiniteMetricError: naming the first non-finite metric and the step.
    ValueError: a value is not a scalar.
  """
  values = _to_floats(step, scalars)
  for name, value in values.items():
    if not math.isfinite(value):
      where = f'step {step}' + (f' of stage {stage!r}' if stage else '')
      raise NonFiniteMetricError(
          f'metric {name!r} is {value} at {where}; stopping before writing it so the last '
          'checkpoint is the last good state (lower the learning rate or check the inputs of '
          'this loss)')
  return values


def _ends_without_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b'\n'


def _format_scalars(scalars: Mapping[str, float]) -> str:
  return ', '.join(f'{k}={v:.4g}' for k, v in scalars.items())


def _progress_subset(scalars: Mapping[str, float]) -> dict[str, float]:
  """A few entries for the bar: losses first, in the order given."""
  losses = [k for k in scalars if 'loss' in k]
  others = [k for k in scalars if 'loss' not in k]
  return {k: scalars[k] for k in (losses + others)[:_NUM_PROGRESS_SCALARS]}


class MetricWriter:
  """Writes one stage's scalars and images and shows its progress."""

  def __init__(
      self,
      workdir: str,
      *,
      stage: str,
      total_steps: int,
      enabled: bool = True,
      progress: bool = True,
      log_every_secs: float = 60.0,
  ):
    """Opens the stage's metric sinks.

    Args:
      workdir: the run directory; `metrics.jsonl` and `tensorboard/` go here.
      stage: name recorded with every line (`backbone`, `exits`, ...).
      total_steps: the stage's last step, for the progress bar and ETA.
      enabled: write files and show progress. Forced off on processes other than 0.
      progress: show a tqdm bar when stderr is a terminal. Without a bar (progress=False or
        not a terminal), a log line with step, steps/s and losses is written every
        `log_every_secs`.
      log_every_secs: interval of those log lines.
    """
    self._workdir = workdir
    self._stage = stage
    self._total_steps = total_steps
    self._enabled = enabled and jax.process_index() == 0
    self._log_every_secs = log_every_secs
    self._closed = False
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._show_bar = False
    # Progress state.
    self._latest: Mapping[str, Any] = {}
    self._latest_is_host = True
    self._last_refresh = 0.0
    self._last_log_time = time.monotonic()
    self._last_log_step: int | None = None
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if _ends_without_newline(path):  # a kill mid-write: keep the partial line on its own
      self._jsonl.write('\n')
    # Optional dependency (the `tensorboard` extra), imported here: it pulls in protobuf,
    # which processes > 0 never need.
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning('tensorboardX is not installed (pip install "fiancee-jax[tensorboard]"):'
                      ' no TensorBoard events; %s has every scalar', path)
    else:
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard', stage), flush_secs=30)
    # The bar is created at the first update_progress, starting at that (resumed) step.
    self._show_bar = progress and sys.stderr.isatty()

  @property
  def enabled(self) -> bool:
    return self._enabled

  def write_scalars(self, step: int, scalars: Mapping[str, float | jax.Array]) -> None:
    """Appends one JSONL line and TensorBoard scalars for `step`.

    Args:
      step: the training step.
      scalars: flat dict of scalar metrics, `/`-separated names (`'g/loss'`); device arrays
        are fetched with a single `jax.device_get`.

    Raises:
      NonFiniteMetricError: a value is NaN or infinite (nothing is written for this step).
      ValueError: a value is not a scalar, or a name is one of 'stage', 'step', 'time'.
    """
    values = check_finite(scalars, step, stage=self._stage)
    for name in values:
      if name in _RESERVED:
        raise ValueError(f'metric name {name!r} is reserved for the JSONL record; rename it')
    self._latest, self._latest_is_host = values, True
    if not self._enabled:
      return
    record = {'stage': self._stage, 'step': int(step), 'time': time.time(), **values}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in values.items() if self._tb is not None else ():
      self._tb.add_scalar(name, value, global_step=step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes images to TensorBoard.

    Args:
      step: the training step.
      images: name -> uint8 [H, W, 3] (or [H, W, 1]) array.
    """
    if not self._enabled or self._tb is None:
      return
    for name, image in jax.device_get(dict(images)).items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f'image {name!r} is {image.dtype} {image.shape}; expected uint8 [H, W, 3] '
            '(convert with np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8) for tanh output)')
      self._tb.add_image(name, image, global_step=step, dataformats='HWC')
    self._tb.flush()

  def update_progress(self, step: int, scalars: Mapping[str, Any] | None = None) -> None:
    """Advances the bar (or the periodic log line) to `step`.

    Cheap to call every step: `scalars` (default: those of the last `write_scalars`) are
    fetched from the device only when the display refreshes, at most every 0.5 s.

    Args:
      step: the step just completed.
      scalars: optional latest measurements to show.
    """
    if scalars is not None:
      self._latest, self._latest_is_host = scalars, False
    if not self._enabled:
      return
    now = time.monotonic()
    if self._last_log_step is None:  # first call: rates count from here, after compilation
      self._last_log_step, self._last_log_time = step, now
      if self._show_bar:
        self._bar = tqdm.tqdm(
            total=self._total_steps, initial=step, desc=self._stage, unit='step',
            file=sys.stderr, dynamic_ncols=True, mininterval=_PROGRESS_INTERVAL_SECS)
    if self._bar is not None:
      self._bar.update(max(step - self._bar.n, 0))
      if now - self._last_refresh >= _PROGRESS_INTERVAL_SECS:
        self._last_refresh = now
        self._bar.set_postfix_str(_format_scalars(self._host_latest(step)), refresh=False)
      return
    elapsed = now - self._last_log_time
    if elapsed >= self._log_every_secs or step >= self._total_steps:
      rate = (step - self._last_log_step) / max(elapsed, 1e-9)
      logging.info('%s step %d/%d, %.2f steps/s, %s', self._stage, step, self._total_steps,
                   rate, _format_scalars(self._host_latest(step)))
      self._last_log_time, self._last_log_step = now, step

  def _host_latest(self, step: int) -> dict[str, float]:
    if not self._latest_is_host:
      self._latest, self._latest_is_host = _to_floats(step, self._latest), True
    return _progress_subset(self._latest)

  def close(self) -> None:
    """Flushes and closes everything; safe to call twice."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str, stage: str | None = None) -> list[dict[str, Any]]:
  """Reads `workdir/metrics.jsonl`, optionally only one stage's lines.

  A resumed run re-logs the steps after its last checkpoint, so a (stage, step) can appear
  twice; the later line is the one of the run that continued. A line cut short by a kill
  mid-write is skipped with a warning.

  Args:
    workdir: the run directory.
    stage: keep only lines of this stage.

  Returns:
    The records, in file order; [] if there is no metrics file.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      logging.warning('Skipping %s line %d: not valid JSON (cut short by a kill?).', path,
                      number)
      continue
    if stage is None or record.get('stage') == stage:
      records.append(record)
  return records
