"""Seed replicates: the database, exits and predictor repeated per seed on the one backbone.

With config.evaluate.seeds = S the seeded stages (database, exits, predictor, evaluate) run
once per seed config.seed, config.seed + 1, ..., config.seed + S - 1:

  WORKDIR/                    the first seed: its artifacts are what `load_model(WORKDIR)`
                              and the benchmark read
  WORKDIR/seeds/SEED/         every other seed: a workdir of its own (config.json with
                              config.seed = SEED, checkpoints, artifacts), holding a copy of
                              the backbone artifact and of t_star.json
  WORKDIR/seeds/SEED/report/  each seed's report.json and plots (the first seed's too)
  WORKDIR/report/             the report aggregated over seeds (intervals.aggregate_seed_reports)

A seed changes every random draw of the seeded stages (database sampling, exit and predictor
initialisation and batches, the fixed z of the validation and test inputs); the backbone and
t* are shared, so the spread across seeds is the spread of the method on that backbone.
"""
import os
import shutil

import ml_collections

from fiancee_jax import artifacts
from fiancee_jax import checkpoint
from fiancee_jax import config_checks
from fiancee_jax import parallel
from fiancee_jax.evaluation import intervals
from fiancee_jax.metrics import anchors

# Stages repeated per seed, in pipeline order.
SEEDED_STAGES = ('database', 'exits', 'predictor', 'evaluate')


def seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The replicate seeds: config.seed, config.seed + 1, ... (config.evaluate.seeds of them)."""
  return intervals.evaluation_seeds(config.seed, config.evaluate.seeds)


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """A locked copy of `config` with config.seed = seed."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.seed = int(seed)
  return out.lock()


def seed_workdir(config: ml_collections.ConfigDict, workdir: str, seed: int) -> str:
  """Where seed `seed` keeps its checkpoints and artifacts: WORKDIR for the first seed,
  WORKDIR/seeds/SEED for the others."""
  return workdir if seed == config.seed else os.path.join(workdir, 'seeds', str(seed))


def report_dir(workdir: str, seed: int) -> str:
  """WORKDIR/seeds/SEED/report: the report of one seed."""
  return os.path.join(workdir, 'seeds', str(seed), 'report')


def prepare(config: ml_collections.ConfigDict, workdir: str, *,
            process_index: int = 0) -> list[tuple[int, ml_collections.ConfigDict, str]]:
  """[(seed, its config, its workdir)] for every replicate, the first seed first.

  The other seeds' workdirs are created with their config.json and a copy of WORKDIR's
  backbone artifact and t_star.json (replaced when WORKDIR's differ; process 0 writes).
  Call after the backbone stage and t* are done.
  """
  out = []
  for seed in seeds(config):
    sub = seed_workdir(config, workdir, seed)
    cfg = config if sub == workdir else seed_config(config, seed)
    if sub != workdir:
      os.makedirs(sub, exist_ok=True)
      config_checks.write_config(cfg, sub, process_index=process_index)
      # Every process reads the manifests (artifact reads are collective) and takes part in
      # the t* write (anchors.write_t_star); process 0 copies.
      if not _backbone_copy_is_current(workdir, sub) and process_index == 0:
        _copy_backbone(workdir, sub)
      _mirror_t_star(workdir, sub)
    out.append((seed, cfg, sub))
  parallel.barrier('fiancee_replicates')  # every process reads the copies next
  return out


def _backbone_copy_is_current(workdir: str, sub: str) -> bool:
  """Whether `sub` holds a copy of WORKDIR's backbone artifact (same fingerprint)."""
  want = artifacts.read_manifest(workdir, 'backbone')['fingerprint']
  if not os.path.isdir(artifacts.path(sub, 'backbone')):
    return False
  try:
    return artifacts.read_manifest(sub, 'backbone')['fingerprint'] == want
  except (ValueError, OSError, checkpoint.CheckpointError):  # a damaged copy: replaced
    return False


def _copy_backbone(workdir: str, sub: str) -> None:
  src, dst = artifacts.path(workdir, 'backbone'), artifacts.path(sub, 'backbone')
  if os.path.isdir(dst):
    shutil.rmtree(dst)
  tmp = dst + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  os.replace(tmp, dst)


def _mirror_t_star(workdir: str, sub: str) -> None:
  record = anchors.read_t_star(workdir)
  if record is None:
    raise FileNotFoundError(f'{anchors.t_star_path(workdir)} is missing: t* is fixed after the '
                            'backbone stage; run --stages=backbone first')
  if anchors.read_t_star(sub) != record:
    anchors.write_t_star(sub, record)
