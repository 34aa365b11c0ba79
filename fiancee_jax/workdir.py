"""The workdir of a job: every path in it, config.json, timings.jsonl.

Layout (DESIGN.md section 3):

  WORKDIR/config.json             the job's config (write_config refuses another one)
  WORKDIR/timings.jsonl           one {stage, seconds, time} line per stage run
  WORKDIR/metrics.jsonl           metric_logging.MetricWriter
  WORKDIR/tensorboard/STAGE/      metric_logging.MetricWriter
  WORKDIR/checkpoints/STAGE/      training checkpoints of a stage (resuming only)
  WORKDIR/artifacts/KIND          params-only artifacts (artifacts.py), what inference reads
  WORKDIR/samples/STAGE_STEP.png  sample grids written during training
  WORKDIR/report/                 report.json, bench.json and plots

`load_model` (below) reads a trained workdir into a FianceeModel.
"""
import json
import os
import time

import jax
import ml_collections
from absl import logging

from fiancee_jax import model as model_lib

CONFIG_FILE = 'config.json'
TIMINGS_FILE = 'timings.jsonl'
# Sections that change no stored artifact (only how the benchmark stage times the model): a
# workdir accepts a config that differs there, and config.json is updated to it.
REPLACEABLE_SECTIONS = ('benchmark',)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def timings_path(workdir: str) -> str:
  return os.path.join(workdir, TIMINGS_FILE)


def checkpoints(workdir: str, stage: str) -> str:
  """WORKDIR/checkpoints/STAGE: the stage's training checkpoints (for resuming only)."""
  return os.path.join(workdir, 'checkpoints', stage)


def artifacts_dir(workdir: str) -> str:
  """WORKDIR/artifacts: one params-only artifact per kind (artifacts.path)."""
  return os.path.join(workdir, 'artifacts')


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, 'samples')


def sample_path(workdir: str, stage: str, step: int) -> str:
  """WORKDIR/samples/STAGE_STEP.png (step zero-padded to 6 digits)."""
  return os.path.join(samples_dir(workdir), f'{stage}_{step:06d}.png')


def report_dir(workdir: str) -> str:
  """WORKDIR/report: report.json, bench.json, bench.md and the plots."""
  return os.path.join(workdir, 'report')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored in WORKDIR/config.json (unlocked ConfigDict of plain values).

  Raises:
    FileNotFoundError: naming the file, when the workdir has no config.json.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a workdir of a job '
                            '(run python -m fiancee_jax.main --workdir=... first)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json; refuses a workdir made with a different config.

  Only the REPLACEABLE_SECTIONS may differ; then config.json is rewritten with this config.

  Raises:
    ValueError: naming the sections that differ, when others than REPLACEABLE_SECTIONS do.
  """
  path = config_path(workdir)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  new = json.loads(text)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old == new:
      return
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not set(differ) <= set(REPLACEABLE_SECTIONS):
      raise ValueError(
          f'{path} holds a different config than this run (sections {differ} differ); '
          'resume with the same config or use a new --workdir')
    logging.info('config sections %s changed; updating %s', differ, path)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)


def record_time(workdir: str, stage: str, seconds: float) -> None:
  """Appends {stage, seconds, time} to WORKDIR/timings.jsonl (wall time of a stage run)."""
  if jax.process_index() == 0:
    with open(timings_path(workdir), 'a') as f:
      f.write(json.dumps({'stage': stage, 'seconds': round(seconds, 2),
                          'time': time.time()}) + '\n')


def load_model(config: ml_collections.ConfigDict, workdir: str,
               variant: str | None = None) -> model_lib.FianceeModel:
  """The trained model of `workdir` (the guided exits unless `variant='unguided'`).

  Raises:
    checkpoint.CheckpointError naming the missing stage, ValueError if the database or a
    checkpoint does not belong to this config.
  """
  # Imported here: the trainers import this module for the workdir's paths.
  # pylint: disable=g-import-not-at-top
  from fiancee_jax import stats
  from fiancee_jax import tasks
  from fiancee_jax.models import factory
  from fiancee_jax.training import exits as exits_training
  from fiancee_jax.training import predictor as predictor_training
  variant = variant or exits_training.variants(config)[0]
  guided = variant == 'guided'
  params = predictor_training.trained_exit_params(config, workdir, variant)
  pp, cal = predictor_training.load_predictor(config, workdir)
  costs = stats.exit_stats(config, guided=guided)
  return model_lib.FianceeModel(
      exit_model=factory.make_exit_model(config, guided=guided),
      params=jax.device_put(params), predictor=factory.make_predictor(config),
      predictor_params=pp, margins=cal['margins'], risk_control=cal['risk_control'],
      exit_gflops=tuple(c['gflops'] for c in costs),
      predictor_gflops=stats.predictor_stats(config)['gflops'],
      task=tasks.get_task(config), distance=exits_training.get_distance(config).name)
