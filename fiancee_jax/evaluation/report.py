"""Stage `evaluate`: quality vs compute on the test split -> report/report.json + plots.

Routing figures follow DESIGN.md section 3: `saved_fraction` = 1 - mean routed GFLOPs
(predictor and lookup included) / backbone GFLOPs; `met_fraction` = share of samples whose
true distance (of the chosen exit) <= threshold; `oracle_saved_fraction` = the same with
the true distances deciding (no predictor); `best_static_saved_fraction` = savings of the
cheapest single exit whose mean distance meets the threshold (0 if only the backbone).
"""
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import stats as scipy_stats

from fiancee_jax import stats
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.data import sources
from fiancee_jax.evaluation import plots
from fiancee_jax.guidance import database as database_lib
from fiancee_jax.routing import router
from fiancee_jax.training import exits as exits_training
from fiancee_jax.training import predictor as predictor_training


def route_ids(scores: np.ndarray, threshold: float, margins: np.ndarray) -> np.ndarray:
  """Cheapest exit whose score + margin <= threshold, else the backbone: int32 [N]."""
  return np.asarray(router.route(jnp.asarray(scores), threshold, jnp.asarray(margins)))


def _json_floats(x: np.ndarray) -> list[float | None]:
  """Floats for report.json; an infinite margin (exit never taken) becomes None."""
  return [float(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64).ravel()]


def routing_table(pred: np.ndarray, true: np.ndarray,
                  margins: Callable[[float], np.ndarray] | np.ndarray,
                  exit_gflops: np.ndarray, predictor_gflops: float,
                  thresholds: np.ndarray) -> list[dict]:
  """Routing figures per threshold (see module docstring).

  Args:
    pred, true: [N, E - 1] predicted and measured distances of the branch exits.
    margins: [E - 1] calibration margins, or threshold -> [E - 1] margins
      (FianceeModel.margins_at).
    exit_gflops: [E] GFLOPs per exit, the backbone last.
    predictor_gflops: GFLOPs of the predictor per sample.
    thresholds: thresholds on the distance.
  """
  n, e1 = true.shape
  full = np.concatenate([true, np.zeros((n, 1), true.dtype)], axis=1)  # backbone: 0
  backbone = exit_gflops[-1]
  mean_dist = true.mean(axis=0)
  rows = []
  margins_at = margins if callable(margins) else (lambda t: margins)
  for t in thresholds:
    ids = route_ids(pred, float(t), margins_at(float(t)))
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
  (almost) everything to the earliest exit: the 99th percentile of its true distance (a
  per-threshold calibration at target 0.95 sends everything there once the threshold passes
  ~the 95th) and of its routing score (prediction + margin), whichever is larger."""
  lo = float(np.percentile(true[:, -1], 5))
  hi = float(np.percentile(true[:, 0], 99))
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


def _fid_feature_fn(config: ml_collections.ConfigDict):
  """The Inception feature function of config.distance.fid_weights, or None if unset."""
  path = config.distance.get('fid_weights', '')
  if not path:
    return None
  from fiancee_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  return fid.make_feature_fn(fid.load_params(path))


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes workdir/report/report.json and the plots; returns the report."""
  n = min(config.router.num_eval, config.data.num_test)
  fid_fn = _fid_feature_fn(config)  # a bad weights file fails here, before any compute
  variants = exits_training.variants(config)
  model = workdir_lib.load_model(config, workdir)
  inputs, true = predictor_training.split_distances(config, workdir, 'test', n, variants[0])
  no_guide = None
  if 'unguided' in variants and variants[0] == 'guided':
    no_guide = predictor_training.split_distances(config, workdir, 'test', n, 'unguided')[1]
  pred = np.asarray(jax.jit(model.predict_fn())(model.predictor_params, *inputs))
  # Threshold-free margins shift the scores; risk-control margins are set per threshold.
  scores = pred + model.margins_at(0.0)[None] if model.risk_control is None else None
  thresholds = (np.asarray(config.router.thresholds, np.float32) if config.router.thresholds
                else default_thresholds(true, scores))
  exit_gflops = np.asarray(model.exit_gflops)
  routing = routing_table(pred, true, model.margins_at, exit_gflops, model.predictor_gflops,
                          thresholds)
  uncalibrated = routing_table(pred, true, np.zeros(model.num_exits - 1, np.float32),
                               exit_gflops, model.predictor_gflops, thresholds)
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
                      'margins': (None if model.risk_control is not None
                                  else _json_floats(model.margins_at(0.0))),
                      'margins_per_threshold': [_json_floats(model.margins_at(r['threshold']))
                                                for r in routing],
                      'met_fraction_per_threshold': [r['met_fraction'] for r in routing],
                      'met_fraction_uncalibrated': [r['met_fraction'] for r in uncalibrated]},
      'routing': routing,
      'routing_uncalibrated': uncalibrated,
  }
  split = sources.load_split(config, 'test', n)
  target = split.get('target')
  if target is not None or fid_fn is not None:
    outputs = exit_outputs(model, inputs, config.predictor.measure_batch)
    if target is not None:
      report['ground_truth'] = truth_table(config, model, inputs, outputs, target, pred,
                                           routing)
    if fid_fn is not None:
      report['fid'] = fid_table(fid_fn, outputs, split['image'] if target is None else target)
  report['headline'] = headline(report)
  out = os.path.join(workdir, 'report')
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'report.json.tmp'), 'w') as f:
      json.dump(_finite_or_none(report), f, indent=2, allow_nan=False)
    os.replace(os.path.join(out, 'report.json.tmp'), os.path.join(out, 'report.json'))
    plots.write_all(out, report, pred, true, model, inputs, target)
  return report


def exit_outputs(model, inputs: tuple[np.ndarray, ...], batch: int) -> list[np.ndarray]:
  """Every exit's images on N inputs, the backbone last: E arrays float32 [N, H, W, 3]."""

  @jax.jit
  def f(*x):
    images, teacher = model.exit_model.all_exits(model.params, *x)
    return images + [teacher]

  n = len(inputs[0])
  outs = []
  for s in range(0, n, batch):
    x = tuple(v[s:s + batch] for v in inputs)
    pad = batch - len(x[0])
    if pad:  # one compiled shape
      x = tuple(np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for v in x)
    outs.append([np.asarray(o)[:batch - pad] for o in f(*x)])
  return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def truth_table(config: ml_collections.ConfigDict, model, inputs: tuple[np.ndarray, ...],
                outputs: list[np.ndarray], target: np.ndarray, pred: np.ndarray,
                routing: list[dict]) -> dict:
  """Distances to the ground truth (reenactment cross pairs): every exit, the backbone, the
  routed output at each threshold, and the copy-the-source / copy-the-driver baselines.

  Args:
    inputs: the exit paths' inputs of the N test examples; inputs[0] is the source and
      inputs[1] the driver image, float32 [N, H, W, 3].
    outputs: `exit_outputs` of those inputs (E arrays [N, H, W, 3], the backbone last).
    target: float32 [N, H, W, 3] ground truth (identity of the source, motion of the driver).
    pred: [N, E - 1] predicted distances (routing at each threshold of `routing`).
  """
  dist = jax.jit(exits_training.get_distance(config).fn)
  b = config.predictor.measure_batch

  def score(images):  # per-sample distance and L1 to the truth, [N] each
    d = np.concatenate([np.asarray(dist(images[s:s + b], target[s:s + b]))
                        for s in range(0, len(target), b)])
    return d, np.abs(images - target).mean(axis=(1, 2, 3))

  scored = [score(o) for o in outputs]
  d = np.stack([x[0] for x in scored], -1)  # [N, E]
  l1 = np.stack([x[1] for x in scored], -1)
  copies = {name: score(images) for name, images in (('copy_source', inputs[0]),
                                                      ('copy_driver', inputs[1]))}
  rows = np.arange(len(target))
  routed = []
  for r in routing:
    ids = route_ids(pred, r['threshold'], model.margins_at(r['threshold']))
    routed.append({'threshold': r['threshold'], 'distance': float(d[rows, ids].mean()),
                   'l1': float(l1[rows, ids].mean())})
  out = {
      'distance': model.distance,
      'num_eval': int(len(target)),
      'exits': [{'exit': k, 'distance': float(d[:, k].mean()), 'l1': float(l1[:, k].mean())}
                for k in range(d.shape[1])],  # the backbone last
      **{name: {'distance': float(v[0].mean()), 'l1': float(v[1].mean())}
         for name, v in copies.items()},
      'backbone_better_than_copy_source_fraction': float(
          (d[:, -1] < copies['copy_source'][0]).mean()),
      'routed': routed,
  }
  return out


def fid_table(feature_fn, outputs: list[np.ndarray], reals: np.ndarray,
              batch: int = 50) -> dict:
  """FID of every exit's images (the backbone last) against `reals` [N, H, W, 3] in [-1, 1].

  feature_fn: images [B, H, W, 3] -> features [B, D] (metrics/fid.py's Inception pool3).
  """
  # pylint: disable-next=g-import-not-at-top
  from fiancee_jax.metrics import fid
  mu, sigma = fid.statistics(fid.compute_features(feature_fn, reals, batch=batch))
  scores = []
  for k, images in enumerate(outputs):
    m, s = fid.statistics(fid.compute_features(feature_fn, images, batch=batch))
    scores.append({'exit': k, 'fid': fid.frechet_distance(m, s, mu, sigma)})
  return {'num_images': int(len(reals)), 'exits': scores,
          'note': 'FID with few images is biased upwards; compare exits, not papers'}


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
