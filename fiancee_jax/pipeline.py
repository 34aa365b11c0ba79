"""The stage table of a FIANCEE job and `run`, which runs stages in order.

Each stage resumes from its own checkpoint under WORKDIR/checkpoints/STAGE and ends by
exporting its artifact (training stages) or report files; a preempted training stage raises
`loop.Preempted` after saving, so no later stage runs.
"""
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from fiancee_jax import config_checks
from fiancee_jax import parallel
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import report
from fiancee_jax.training import backbone
from fiancee_jax.training import database
from fiancee_jax.training import exits
from fiancee_jax.training import predictor
from fiancee_jax.training import reenact

Stage = Callable[[ml_collections.ConfigDict, str], Any]

# The backbone stage's trainer for each config.backbone.name. With models/factory.py, this
# table is the only place that looks at a backbone's name.
BACKBONE_TRAINERS: dict[str, Stage] = {'oasis': backbone.train, 'reenact': reenact.train}


def run_benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage `benchmark`: report/bench.json and report/bench.md from the trained model."""
  # pylint: disable=g-import-not-at-top
  from fiancee_jax import workdir as workdir_lib
  from fiancee_jax.evaluation import benchmark
  from fiancee_jax.evaluation import report
  from fiancee_jax.training import predictor
  model = workdir_lib.load_model(config, workdir)
  n = min(config.router.num_eval, config.data.num_test)
  inputs, true = predictor.split_distances(config, workdir, 'test', n)
  data = inputs[:len(model.task.data_keys)]
  report_path = os.path.join(workdir, 'report', 'report.json')
  if config.router.thresholds:
    thresholds = list(config.router.thresholds)
  elif os.path.exists(report_path):  # the evaluate stage's sweep, with its operating point
    with open(report_path) as f:
      rep = json.load(f)
    rows = rep['routing']
    thresholds = {rows[i]['threshold'] for i in range(0, len(rows), max(1, len(rows) // 4))}
    if rep['headline'].get('threshold') is not None:
      thresholds.add(rep['headline']['threshold'])
    thresholds = sorted(thresholds)
  else:
    thresholds = [float(t) for t in report.default_thresholds(true, num=4)]
  b = config.benchmark
  bench = benchmark.run_benchmark(model, data, batch_size=b.batch_size,
                                  thresholds=thresholds, warmup=b.warmup, iters=b.iters,
                                  switch_rounds=b.switch_rounds, parts=b.exit_parts,
                                  lowering_rounds=b.lowering_rounds, seed=config.seed)
  if jax.process_index() == 0:
    benchmark.write_bench(bench, os.path.join(workdir, 'report'))
  return bench


def stage_table(config: ml_collections.ConfigDict) -> dict[str, Stage]:
  """{stage name: fn(config, workdir)} for this config, in config_checks.KNOWN_STAGES."""
  name = config.backbone.name
  if name not in BACKBONE_TRAINERS:
    raise ValueError(f'config.backbone.name={name!r} has no trainer; known: '
                     f'{", ".join(sorted(BACKBONE_TRAINERS))}')
  return {'backbone': BACKBONE_TRAINERS[name], 'database': database.build,
          'exits': exits.train, 'predictor': predictor.train, 'evaluate': report.evaluate,
          'benchmark': run_benchmark}


def run(config: ml_collections.ConfigDict, workdir: str, stages: str) -> dict[str, Any]:
  """Runs `stages` (comma-separated) on `workdir`; returns {stage: result}.

  Training stages return their artifact (artifacts.Artifact), evaluate and benchmark their
  report dicts.

  Raises:
    ValueError: a bad config or stage name, or a workdir made with another config (before
      any compute).
    training.loop.Preempted: a training stage was preempted (its state is saved).
  """
  config_checks.check_config(config)
  names = config_checks.parse_stages(stages)
  table = stage_table(config)
  parallel.maybe_initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(config, workdir)
  results = {}
  for name in names:
    logging.info('stage %s', name)
    start = time.perf_counter()
    results[name] = table[name](config, workdir)
    workdir_lib.record_time(workdir, name, time.perf_counter() - start)
  return results
