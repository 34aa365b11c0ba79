"""The workdir of a job: every path in it, config.json, timings.jsonl.

Layout (DESIGN.md section 3):

  WORKDIR/config.json             the job's config (write_config refuses another one)
  WORKDIR/timings.jsonl           one {stage, seconds, time} line per stage run
  WORKDIR/metrics.jsonl           metric_logging.MetricWriter
  WORKDIR/tensorboard/STAGE/      metric_logging.MetricWriter
  WORKDIR/checkpoints/STAGE/      training checkpoints of a stage (resuming only)
  WORKDIR/artifacts/KIND          params-only artifacts (artifacts.py), what inference reads
  WORKDIR/samples/STAGE_STEP.png  sample grids written during training
  WORKDIR/t_star.json             t*, fixed after the backbone stage (metrics/anchors.py)
  WORKDIR/report/                 report.json (over seeds), bench.json and plots
  WORKDIR/seeds/SEED/             the other seeds' workdirs and every seed's report
                                  (replicates.py)

config.json is written and compared by config_checks.write_config (before any compute).
"""
import json
import os
import time

import jax
import ml_collections

CONFIG_FILE = 'config.json'
TIMINGS_FILE = 'timings.jsonl'


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
  """The config `workdir` was made with (locked; sequences come back as lists).

  Raises:
    FileNotFoundError: no config.json (names the path and the way on).
    ValueError: config.json is not a JSON object (names the path).
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir!r} is not a fiancee-jax workdir (run '
        'python -m fiancee_jax.main --workdir=... first), or pass the config explicitly')
  with open(path) as f:
    text = f.read()
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); it may be truncated: restore it, or '
                     'pass the config explicitly') from None
  if not isinstance(values, dict):
    raise ValueError(f'{path} holds a JSON {type(values).__name__}, not a config object')
  return ml_collections.ConfigDict(values).lock()


def record_time(workdir: str, stage: str, seconds: float) -> None:
  """Appends {stage, seconds, time} to WORKDIR/timings.jsonl (wall time of a stage run)."""
  if jax.process_index() == 0:
    with open(timings_path(workdir), 'a') as f:
      f.write(json.dumps({'stage': stage, 'seconds': round(seconds, 2),
                          'time': time.time()}) + '\n')
