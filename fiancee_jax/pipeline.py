"""The stage table of a FIANCEE job and `run`, which runs stages in order.

Each stage resumes from its own checkpoint under WORKDIR/checkpoints/STAGE and ends by
exporting its artifact (training stages) or report files; a preempted training stage raises
`loop.Preempted` after saving, so no later stage runs.

t* is fixed right after the backbone stage (training/t_star.py), before any exit is trained.
A database of exit residuals (config.database.value_type 'residual') is built after the exits
stage, from its artifact (stage_order).
The seeded stages (database, exits, predictor, evaluate) run once per seed of
config.evaluate.seeds (replicates.py); the evaluate stage then writes the report aggregated
over seeds to WORKDIR/report/report.json.
"""
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from fiancee_jax import config_checks
from fiancee_jax import parallel
from fiancee_jax import replicates
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import benchmark
from fiancee_jax.evaluation import report
from fiancee_jax.models import factory
from fiancee_jax.training import backbone
from fiancee_jax.training import database
from fiancee_jax.training import exits
from fiancee_jax.training import predictor
from fiancee_jax.training import reenact
from fiancee_jax.training import t_star

Stage = Callable[[ml_collections.ConfigDict, str], Any]

# The backbone stage's trainer for each config.backbone.name. With models/factory.py, this
# table is the only place that looks at a backbone's name.
BACKBONE_TRAINERS: dict[str, Stage] = {'oasis': backbone.train, 'reenact': reenact.train}


def run_benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage `benchmark`: report/bench.json and report/bench.md (evaluation/benchmark.py)."""
  return benchmark.run_stage(config, workdir)


def run_seeded(stage: Stage, name: str, config: ml_collections.ConfigDict,
               workdir: str) -> Any:
  """Runs a seeded stage once per seed (replicates.py); returns the first seed's result, or
  for `evaluate` the report aggregated over seeds."""
  t_star.fix(config, workdir)  # a no-op once fixed; the replicates copy it
  reps = replicates.prepare(config, workdir, process_index=jax.process_index())
  if name != 'evaluate':
    results = []
    for seed, cfg, sub in reps:
      logging.info('stage %s, seed %d', name, seed)
      results.append(stage(cfg, sub))
    return results[0]
  reports = []
  for seed, cfg, sub in reps:
    logging.info('stage evaluate, seed %d', seed)
    reports.append(stage(cfg, sub, replicates.report_dir(workdir, seed),
                         anchors_of=reports[0] if reports else None))
  return report.write_aggregate(os.path.join(workdir, 'report'), reports,
                                replicates.report_dir(workdir, reps[0][0]))


def stage_order(config: ml_collections.ConfigDict, names: list[str]) -> list[str]:
  """`names` (config_checks.parse_stages order) in the order this config runs them: a
  database of exit residuals ('residual' guidance) is built right after the exits."""
  if not factory.residual_guidance(config) or 'database' not in names or 'exits' not in names:
    return list(names)
  names = [n for n in names if n != 'database']
  names.insert(names.index('exits') + 1, 'database')
  return names


def stage_table(config: ml_collections.ConfigDict) -> dict[str, Stage]:
  """{stage name: fn(config, workdir)} for this config, in config_checks.KNOWN_STAGES."""
  name = config.backbone.name
  if name not in BACKBONE_TRAINERS:
    raise ValueError(f'config.backbone.name={name!r} has no trainer; known: '
                     f'{", ".join(sorted(BACKBONE_TRAINERS))}')
  return {'backbone': BACKBONE_TRAINERS[name], 'database': database.build,
          'exits': exits.train, 'predictor': predictor.train, 'evaluate': report.evaluate,
          'benchmark': run_benchmark}


def run(config: ml_collections.ConfigDict, workdir: str, stages: str,
        launch: parallel.Launch | None = None) -> dict[str, Any]:
  """Runs `stages` (comma-separated) on `workdir`; returns {stage: result}.

  Training stages return their artifact (artifacts.Artifact), evaluate and benchmark their
  report dicts. `launch` (parallel.launch) joins a multi-process run after the checks and
  before any compute; None joins one only with config.distributed (cluster auto-detection).

  Raises:
    config_checks.ConfigError: a bad config, stage list or workdir, before any compute and
      before config.json is written.
    parallel.LaunchError: the multi-process run cannot be joined (parallel.initialize).
    training.loop.Preempted: a training stage was preempted (its state is saved).
  """
  # Everything is checked before the first stage: no stage fails on a setting of a later one.
  names = config_checks.parse_stages(stages)
  config_checks.check_config(config)
  names = stage_order(config, names)
  table = stage_table(config)
  workdir = config_checks.check_workdir(workdir)
  # The backend starts here, after every check that needs no device: nothing above touches it.
  parallel.initialize(launch or parallel.launch(auto=config.distributed))
  config_checks.check_devices(config, jax.device_count())
  config_checks.write_config(config, workdir, process_index=jax.process_index())
  parallel.barrier('fiancee_config')
  results = {}
  for name in names:
    logging.info('stage %s', name)
    start = time.perf_counter()
    if name in replicates.SEEDED_STAGES:
      results[name] = run_seeded(table[name], name, config, workdir)
    else:
      results[name] = table[name](config, workdir)
    if name == 'backbone':
      t_star.fix(config, workdir)
    workdir_lib.record_time(workdir, name, time.perf_counter() - start)
  return results
