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
  """Stage `benchmark`: report/bench.json and report/bench.md from the trained model."""
  # pylint: disable=g-import-not-at-top
  from fiancee_jax import workdir as workdir_lib
  from fiancee_jax.evaluation import benchmark
  from fiancee_jax.evaluation import report
  from fiancee_jax.training import predictor
  model = workdir_lib.load_model(config, workdir)
  n = min(config.router.num_eval, config.data.num_test)
  inputs, _ = predictor.split_distances(config, workdir, 'test', n)
  data = inputs[:len(model.task.data_keys)]
  # t* and fixed thresholds only: a threshold picked from the evaluate stage's results would
  # always favour 'everyone to the earliest exit'.
  thresholds = report.benchmark_thresholds(config, workdir, model)
  b = config.benchmark
  bench = benchmark.run_benchmark(model, data, batch_size=b.batch_size,
                                  thresholds=thresholds, warmup=b.warmup, iters=b.iters,
                                  switch_rounds=b.switch_rounds, parts=b.exit_parts,
                                  lowering_rounds=b.lowering_rounds, seed=config.seed)
  if jax.process_index() == 0:
    benchmark.write_bench(bench, os.path.join(workdir, 'report'))
  return bench


# Sections that change no stored artifact (only how the benchmark stage times the model): a
# workdir accepts a config that differs there, and config.json is updated to it.
REPLACEABLE_SECTIONS = ('benchmark',)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """workdir/config.json; refuses a workdir made with a different config.

  Only the REPLACEABLE_SECTIONS may differ; then config.json is rewritten with this config.
  """
  path = os.path.join(workdir, 'config.json')
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
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str, stages: str) -> dict:
  """Runs `stages` (comma-separated) on `workdir`; returns {stage: result}."""
  config_checks.check_config(config)
  names = config_checks.parse_stages(stages)
  parallel.maybe_initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  write_config(config, workdir)
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
