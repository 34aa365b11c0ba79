"""Runs the stages of a FIANCEE job in order; each resumes from its own checkpoint."""
import json
import os
import time

import jax
import ml_collections
from absl import logging

from fiancee_jax import config_checks
from fiancee_jax import parallel


def _stage_fns():
  # Imported lazily so that `stats` and tests of one stage import only what they need.
  # pylint: disable=g-import-not-at-top
  from fiancee_jax.evaluation import report
  from fiancee_jax.guidance import build
  from fiancee_jax.training import backbone
  from fiancee_jax.training import exits
  from fiancee_jax.training import predictor
  return {'backbone': backbone.train, 'database': build.build, 'exits': exits.train,
          'predictor': predictor.train, 'evaluate': report.evaluate,
          'benchmark': run_benchmark}


def run_benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage `benchmark`: report/bench.json and report/bench.md (evaluation/benchmark.py)."""
  from fiancee_jax.evaluation import benchmark  # pylint: disable=g-import-not-at-top
  return benchmark.run_stage(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str, stages: str) -> dict:
  """Runs `stages` (comma-separated) on `workdir`; returns {stage: result}.

  Raises:
    config_checks.ConfigError: a bad config, stage list or workdir, before any compute and
      before config.json is written.
  """
  # Everything is checked before the first stage: no stage fails on a setting of a later one.
  names = config_checks.parse_stages(stages)
  config_checks.check_config(config)
  parallel.maybe_initialize_distributed(config.distributed)
  config_checks.check_devices(config, jax.device_count())
  workdir = config_checks.check_workdir(workdir)
  config_checks.write_config(config, workdir, process_index=jax.process_index())
  fns = _stage_fns()
  results = {}
  for name in names:
    logging.info('stage %s', name)
    start = time.perf_counter()
    results[name] = fns[name](config, workdir)
    _record_time(workdir, name, time.perf_counter() - start)
  return results


def _record_time(workdir: str, stage: str, seconds: float) -> None:
  """Appends {stage, seconds} to workdir/timings.jsonl (wall time of each stage run)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'timings.jsonl'), 'a') as f:
      f.write(json.dumps({'stage': stage, 'seconds': round(seconds, 2),
                          'time': time.time()}) + '\n')
