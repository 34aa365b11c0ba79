"""Stage `evaluate`: quality vs compute on the test split -> report/report.json + plots.

Routing figures follow DESIGN.md section 3: `saved_fraction` = 1 - mean routed GFLOPs
(predictor and lookup included) / backbone GFLOPs; `met_fraction` = share of samples whose
true distance (of the chosen exit) <= threshold; `oracle_saved_fraction` = the same with
the true distances deciding (no predictor); `best_static_saved_fraction` = savings of the
cheapest single exit whose mean distance meets the threshold (0 if only the backbone).
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import stats as scipy_stats

from fiancee_jax import stats
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import plots
from fiancee_jax.guidance import database as database_lib
from fiancee_jax.routing import router
from fiancee_jax.training import exits as exits_training
from fiancee_jax.training import predictor as predictor_training


def route_ids(scores: np.ndarray, threshold: float, margins: np.ndarray) -> np.ndarray:
  """Cheapest exit whose score + margin <= threshold, else the backbone: int32 [N]."""
  return np.asarray(router.route(jnp.asarray(scores), threshold, jnp.asarray(margins)))


def routing_table(pred: np.ndarray, true: np.ndarray, margins: np.ndarray,
                  exit_gflops: np.ndarray, predictor_gflops: float,
                  thresholds: np.ndarray) -> list[dict]:
  """Routing figures per threshold (see module docstring).

  Args:
    pred, true: [N, E - 1] predicted and measured distances of the branch exits.
    margins: [E - 1] calibration margins.
    exit_gflops: [E] GFLOPs per exit, the backbone last.
    predictor_gflops: GFLOPs of the predictor per sample.
    thresholds: thresholds on the distance.
  """
  n, e1 = true.shape
  full = np.concatenate([true, np.zeros((n, 1), true.dtype)], axis=1)  # backbone: 0
  backbone = exit_gflops[-1]
  mean_dist = true.mean(axis=0)
  rows = []
  for t in thresholds:
    ids = route_ids(pred, float(t), margins)
    oracle = route_ids(true, float(t), np.zeros(e1, np.float32))
    chosen = full[np.arange(n), ids]
    mean_g = float(exit_gflops[ids].mean() + predictor_gflops)
    ok = np.nonzero(mean_dist <= t)[0]
    static = 1.0 - exit_gflops[ok[0]] / backbone if len(ok) else 0.0
    rows.append({
        'threshold': float(t),
        'mean_gflops': mean_g,
        'saved_fraction': 1.0 - mean_g / backbone,
        'met_fraction': float((chosen <= t).mean()),
        'mean_distance': float(chosen.mean()),
        'oracle_saved_fraction': float(1.0 - exit_gflops[oracle].mean() / backbone),
        'oracle_mean_distance': float(full[np.arange(n), oracle].mean()),
        'best_static_saved_fraction': float(static),
        'exit_histogram': np.bincount(ids, minlength=e1 + 1).astype(int).tolist(),
    })
  return rows


def default_thresholds(true: np.ndarray, scores: np.ndarray | None = None,
                       num: int = 12) -> np.ndarray:
  """From the 5th percentile of the latest exit's distance up to where routing sends
  (almost) everything to the earliest exit: the 95th percentile of its true distance and
  of its routing score (prediction + margin), whichever is larger."""
  lo = float(np.percentile(true[:, -1], 5))
  hi = float(np.percentile(true[:, 0], 95))
  if scores is not None and np.all(np.isfinite(scores[:, 0])):
    hi = max(hi, float(np.percentile(scores[:, 0], 95)))
  return np.linspace(lo, max(hi, lo + 1e-6), num)


def predictor_quality(pred: np.ndarray, true: np.ndarray) -> dict:
  per_exit = []
  for k in range(true.shape[1]):
    rho = scipy_stats.spearmanr(pred[:, k], true[:, k]).statistic
    per_exit.append({'exit': k, 'mae': float(np.abs(pred[:, k] - true[:, k]).mean()),
                     'spearman': float(rho)})
  return {'mae': float(np.abs(pred - true).mean()),
          'spearman': float(min(r['spearman'] for r in per_exit)),
          'per_exit': per_exit}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes workdir/report/report.json and the plots; returns the report."""
  n = min(config.router.num_eval, config.data.num_test)
  variants = exits_training.variants(config)
  model = workdir_lib.load_model(config, workdir)
  labels, z, true = predictor_training.split_distances(config, workdir, 'test', n, variants[0])
  no_guide = None
  if 'unguided' in variants and variants[0] == 'guided':
    no_guide = predictor_training.split_distances(config, workdir, 'test', n, 'unguided')[2]
  pred = np.asarray(jax.jit(model.predict_fn())(model.predictor_params, jnp.asarray(labels)))
  thresholds = (np.asarray(config.router.thresholds, np.float32) if config.router.thresholds
                else default_thresholds(true, pred + model.margins[None]))
  exit_gflops = np.asarray(model.exit_gflops)
  routing = routing_table(pred, true, model.margins, exit_gflops, model.predictor_gflops,
                          thresholds)
  uncalibrated = routing_table(pred, true, np.zeros_like(model.margins), exit_gflops,
                               model.predictor_gflops, thresholds)
  cstats = stats.exit_stats(config)
  exits = []
  for k, c in enumerate(cstats[:-1]):
    exits.append({**c, 'mean_distance': float(true[:, k].mean()),
                  'mean_distance_no_guidance': (float(no_guide[:, k].mean())
                                                if no_guide is not None else None),
                  'gflops_fraction': c['gflops'] / exit_gflops[-1]})
  db = model.params['database']
  h, w = config.data.resolution
  report = {
      'distance': model.distance,
      'num_eval': int(n),
      'resolution': [h, w],
      'backbone': stats.backbone_stats(config),
      'exits': exits,
      'predictor': {'gflops': model.predictor_gflops, **predictor_quality(pred, true)},
      'database': {'entries': config.database.num_entries,
                   'bytes': database_lib.nbytes(db) if db is not None else 0,
                   'lookup_gflops': stats.lookup_gflops(config)},
      'calibration': {'method': config.router.calibration,
                      'target_met': config.router.target_met,
                      'margins': [float(m) for m in model.margins],
                      'met_fraction_per_threshold': [r['met_fraction'] for r in routing],
                      'met_fraction_uncalibrated': [r['met_fraction'] for r in uncalibrated]},
      'routing': routing,
      'routing_uncalibrated': uncalibrated,
  }
  report['headline'] = headline(report)
  out = os.path.join(workdir, 'report')
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'report.json.tmp'), 'w') as f:
      json.dump(_finite_or_none(report), f, indent=2, allow_nan=False)
    os.replace(os.path.join(out, 'report.json.tmp'), os.path.join(out, 'report.json'))
    plots.write_all(out, report, pred, true, model, labels, z)
  return report


def _finite_or_none(x):
  """JSON has no inf/NaN: such numbers (e.g. a margin that never lets an exit be taken,
  or Spearman of a constant prediction) become null."""
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def headline(report: dict) -> dict:
  """The operating point: most savings among thresholds with met_fraction >= the target."""
  target = report['calibration']['target_met']
  ok = [r for r in report['routing'] if r['met_fraction'] >= target]
  if not ok:
    return {'target_met': target, 'threshold': None}
  r = max(ok, key=lambda r: r['saved_fraction'])
  return {'target_met': target, **{k: r[k] for k in (
      'threshold', 'met_fraction', 'saved_fraction', 'oracle_saved_fraction',
      'best_static_saved_fraction')}}
