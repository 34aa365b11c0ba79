"""The training loop of every stage: resume > step > NaN check > log > samples > checkpoint.

A trainer supplies its state's initialiser, a pure step function
`step(state, batch) -> (state, measurements)`, its batches from a given step on, and
optionally a sample writer and an end-of-training hook; `train` does the rest:

1. Resume (once). Order: this stage's latest valid checkpoint in WORKDIR/checkpoints/STAGE
   (a finished one is returned at once, nothing is compiled or stepped), else a fresh state
   from `init` (scratch). A damaged newest checkpoint stops the stage (checkpoint.py says
   how to go on) unless `allow_restart`. The step number is the data position:
   batches(step) resumes the data exactly.
2. Step: the jitted step (state replicated and donated, batch sharded over `data`). Beside
   the measurements it keeps, on the device, the first step whose measurements were not all
   finite, so that a NaN between two fetches is not missed.
3. NaN check: the measurements and that record are fetched to the host together, and only
   every `log_every` steps, at sample and checkpoint steps, at a preemption and at the end;
   a non-finite value raises `metric_logging.NonFiniteMetricError` naming the metric and
   the first bad step, before anything of those steps is logged, drawn or saved. Nothing
   non-finite is ever checkpointed.
4. Log: metrics.jsonl / TensorBoard every `log_every` steps and at the last step.
5. Samples: the trainer's writer every `sample_every` steps and once at the end.
6. Checkpoint every `checkpoint_every` steps; at the end, after `finish`, the final state
   with metadata `finished: True` (plus what `finish` returns).

Preemption: SIGTERM (one process; the handler is installed while `train` runs) or JAX's
preemption notice (multi-process, `multihost_utils.reached_preemption_sync_point`, which
every process calls at every step so all save the same step) makes the loop check and save
the state at the next step boundary and raise `Preempted`, so no later stage runs. Rerunning
the same command resumes from that step and ends with the parameters of an uninterrupted
run, bit for bit.
"""
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fiancee_jax import checkpoint
from fiancee_jax import metric_logging
from fiancee_jax import parallel
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.data import sources

State = Any
Batch = dict[str, Any]
Measurements = dict[str, jax.Array]
StepFn = Callable[[State, Batch], tuple[State, Measurements]]
# sample writer: (state, step, writer) -> None; finish: (state, writer) -> (state, metadata)
SampleFn = Callable[[State, int, metric_logging.MetricWriter], None]
FinishFn = Callable[[State, metric_logging.MetricWriter], tuple[State, dict[str, Any]]]


class Schedule(NamedTuple):
  num_steps: int  # the stage's last step
  log_every: int  # metrics fetched, checked and logged every this many steps
  checkpoint_every: int  # a checkpoint every this many steps (and at the end)
  keep_checkpoints: int  # newest checkpoints kept on disk
  sample_every: int = 0  # sample grids every this many steps (0: only at the end)

  @classmethod
  def of(cls, section: Any) -> 'Schedule':
    """From a config section holding these keys (config.train, .exits, .predictor)."""
    return cls(num_steps=section['num_steps'], log_every=section['log_every'],
               checkpoint_every=section['checkpoint_every'],
               keep_checkpoints=section['keep_checkpoints'],
               sample_every=section.get('sample_every', 0))


class Result(NamedTuple):
  state: State  # the finished state (replicated over the mesh)
  metadata: dict[str, Any]  # the finished checkpoint's metadata (what `finish` added too)


class Preempted(Exception):
  """A preemption notice stopped the stage after saving its state; rerun to resume."""

  def __init__(self, stage: str, step: int, directory: str):
    self.stage, self.step, self.directory = stage, step, directory
    super().__init__(f'stage {stage!r} was preempted; its state at step {step} is saved in '
                     f'{directory}: rerun the same command to resume')


def fetch(tree: Any) -> Any:
  """The loop's only device-to-host transfer (one `jax.device_get` of a whole pytree)."""
  return jax.device_get(tree)


class _PreemptionNotice:
  """Whether a preemption asked the loop to stop (context manager; see module docstring)."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._use_jax = False

  def __enter__(self) -> '_PreemptionNotice':
    if jax.distributed.is_initialized():
      # JAX's preemption service owns SIGTERM and agrees on one step for every process; a
      # handler of our own would let processes stop at different steps and deadlock a save.
      self._use_jax = True
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  @property
  def signalled(self) -> bool:
    return self._signalled

  def reached(self, step: int) -> bool:
    """True when the state should be saved after `step` (call at every step, every process)."""
    if self._use_jax:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # the service is off (jax_enable_preemption_service)
        logging.warning('no preemption notices: %s', e)
        self._use_jax = False
        return False
    return self._signalled

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _compile(step_fn: StepFn, state: State, batch: Batch, mesh: Mesh,
             convert: Callable[[Batch], Batch] | None = None):
  """(jitted watched step, initial watch): the step plus the first non-finite measurements.

  `convert` (the loader's batch -> the step's batch, e.g. uint8 images to float32) is
  compiled into the step, so that it runs on the devices.

  watch = {'count': steps taken, 'bad_at': count at the first step whose measurements were
  not all finite (-1: none), 'bad': that step's measurements}.
  """
  repl, data_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  if convert is not None:
    step_fn = lambda state, batch, step_fn=step_fn: step_fn(state, convert(batch))
  m_shapes = jax.eval_shape(step_fn, state, batch)[1]
  watch = {'count': jnp.zeros((), jnp.int32), 'bad_at': jnp.full((), -1, jnp.int32),
           'bad': jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shapes)}

  def watched(state, batch, watch):
    state, m = step_fn(state, batch)
    new_bad = (watch['bad_at'] < 0) & ~_all_finite(m)
    watch = {'count': watch['count'] + 1,
             'bad_at': jnp.where(new_bad, watch['count'], watch['bad_at']),
             'bad': jax.tree.map(lambda b, x: jnp.where(new_bad, x, b), watch['bad'], m)}
    return state, m, watch

  compiled = jax.jit(watched, in_shardings=(repl, data_sh, repl),
                     out_shardings=(repl, repl, repl), donate_argnums=(0, 2))
  return compiled, jax.device_put(watch, repl)


def _checked(m: Measurements, watch: dict, *, start: int, step: int,
             stage: str) -> dict[str, float]:
  """Fetches the measurements of `step` and the watch; raises on anything non-finite."""
  m, watch = fetch((m, watch))
  if int(watch['bad_at']) >= 0:
    bad_step = start + int(watch['bad_at']) + 1
    metric_logging.check_finite(watch['bad'], bad_step, stage=stage)
    raise metric_logging.NonFiniteMetricError(  # check_finite raises; this is a fallback
        f'a metric of stage {stage!r} was not finite at step {bad_step}')
  return metric_logging.check_finite(m, step, stage=stage)


def _abstract(init: Callable[[], State], mesh: Mesh) -> State:
  """init's state as ShapeDtypeStructs, replicated over the mesh (a restore target)."""
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                      jax.eval_shape(init))


def train(*, stage: str, workdir: str, mesh: Mesh, schedule: Schedule,
          init: Callable[[], State], make_step: Callable[[], StepFn],
          batches: Callable[[int], Iterator[Batch]],
          check_batch: Callable[[Batch], None] | None = None,
          convert: Callable[[Batch], Batch] | None = None,
          write_samples: SampleFn | None = None,
          finish: FinishFn | None = None, allow_restart: bool = False,
          async_save: bool = False) -> Result:
  """Runs (or resumes, or reads back) one stage's training.

  Args:
    stage: the stage's name: checkpoints go to WORKDIR/checkpoints/STAGE, metrics are
      logged under it.
    workdir: the run directory.
    mesh: the device mesh (state replicated, batches sharded over `data`).
    schedule: steps, logging, sampling and checkpoint intervals.
    init: () -> fresh state, pure (traced: under jit for a fresh state, under eval_shape for
      a restore target). The state need not hold its step: the loop counts on the host.
    make_step: () -> pure step(state, batch) -> (state, flat dict of scalar measurements);
      called only when there are steps to run (it may measure or load what the step needs).
    batches: start_step -> iterator of host batches (dicts of NumPy arrays, this process's
      rows) from that global step on, the same batches for the same step on every run.
    check_batch: raises ValueError for a first batch that does not fit the config.
    convert: batch -> the step's batch, traced into the compiled step (None: the batches
      are the step's).
    write_samples: (state, step, writer) -> None; called every `sample_every` steps and
      once at the end (after `finish`) on every process.
    finish: (state, writer) -> (state, metadata) at the end, before the final checkpoint
      (e.g. recomputing EMA statistics); the metadata is stored with it.
    allow_restart: fall back past damaged checkpoints (to scratch if none is intact) with a
      warning naming each, instead of refusing them (config.checkpoint.allow_restart).
    async_save: write checkpoints in the background while training goes on
      (config.checkpoint.async_save; checkpoint.Checkpointer).

  Returns:
    Result(state, metadata of the finished checkpoint).

  Raises:
    metric_logging.NonFiniteMetricError: a measurement was NaN or infinite (nothing of the
      steps since the last check is saved).
    Preempted: after saving the state on a preemption notice.
  """
  for name, value in schedule._asdict().items():
    if value < (0 if name == 'sample_every' else 1):
      raise ValueError(f'{name}={value} for stage {stage!r}: it must be >= '
                       f'{0 if name == "sample_every" else 1} (config section of the stage)')
  n = schedule.num_steps
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir, stage),
                                 max_to_keep=schedule.keep_checkpoints,
                                 save_every=schedule.checkpoint_every,
                                 allow_restart=allow_restart, async_save=async_save)
  with ckpt, _PreemptionNotice() as preemption:
    # Resume order: (1) this stage's latest valid checkpoint in the workdir; (2) scratch.
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(_abstract(init, mesh))
      start = ckpt.restored_step
      logging.info('%s: resumed at step %d', stage, start)
      if meta.get('finished'):
        return Result(state, meta)
    else:
      state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
      start = 0
    with metric_logging.MetricWriter(workdir, stage=stage, total_steps=n) as writer:
      if start < n:
        state = _steps(stage, mesh, schedule, ckpt, preemption, writer, state, start,
                       make_step(), batches, check_batch, convert, write_samples)
      extra = {}
      if finish is not None:
        state, extra = finish(state, writer)
      if write_samples is not None:
        write_samples(state, n, writer)
    meta = {'data_position': n, **extra, 'finished': True}
    ckpt.save(n, state, metadata=meta, force=True)
    if preemption.signalled:  # arrived during `finish`: the stage is done, stop the job
      raise Preempted(stage, n, ckpt.directory)
  return Result(state, meta)


def _steps(stage, mesh, schedule, ckpt, preemption, writer, state, start, step_fn, batches,
           check_batch, convert, write_samples) -> State:
  """Steps start..num_steps (see the module docstring for the order of things per step)."""
  n, every = schedule.num_steps, schedule.sample_every
  it = batches(start)
  compiled = watch = None
  try:
    for step in range(start, n):
      batch = next(it)
      if step == start and check_batch is not None:
        check_batch(batch)
      batch = parallel.shard_batch(batch, mesh)
      if compiled is None:
        compiled, watch = _compile(step_fn, state, batch, mesh, convert)
      state, m, watch = compiled(state, batch, watch)
      done = step + 1
      # The last step is never saved unfinished: `finish` and the final save follow.
      stop = preemption.reached(done) and done < n
      log = done % schedule.log_every == 0 or done == n
      sample = write_samples is not None and every > 0 and done % every == 0 and done < n
      save = ckpt.should_save(done) and done < n
      if log or sample or save or stop:
        values = _checked(m, watch, start=start, step=done, stage=stage)
        if log:
          writer.write_scalars(done, values)
      writer.update_progress(done)
      if sample:
        write_samples(state, done, writer)
      if save or stop:
        ckpt.save(done, state, metadata={'data_position': done}, force=True)
      if stop:
        logging.warning('%s: preempted, state saved at step %d', stage, done)
        raise Preempted(stage, done, ckpt.directory)
  finally:
    if hasattr(it, 'close'):
      it.close()
  return state


def data_feed(config, source, *, batch_size: int, seed: int) -> dict[str, Callable[..., Any]]:
  """{'batches', 'check_batch', 'convert'} for `train`: deterministic batches of `source` from
  any step (data/sources.py; step s of `seed` is always the same batch) as stored (uint8
  images: a quarter of float32's bytes to move), the first batch's check, and the
  conversion to model inputs that runs inside the compiled step."""
  convert = sources.dataset(config).convert
  return {'batches': lambda start: sources.train_batches(
              config, source, batch_size=batch_size, seed=seed, start_step=start,
              convert=False),
          'check_batch': lambda batch: sources.check_batch(config, convert(batch)),
          'convert': convert}
