"""Stage `evaluate`: quality vs compute on the test split -> report/report.json + plots.

The keys follow DESIGN.md section 3. Every figure is on the test split, in the configured
distance (`distance`), with 1 - MS-SSIM as a second column per exit; `distance_anchors` puts
the distances on a scale (metrics/anchors.py). The headline is `at_t_star`: routing at t*,
which is fixed from the backbone alone before any exit is trained (anchors.fix_t_star), never
a threshold picked after seeing the results; `at_lpips_0.1` gives the paper's absolute bar
beside it when the distance is an LPIPS. The per-threshold figures and baselines are defined
in tradeoff.py, the intervals in intervals.py.

Everything after the model and the test distances are loaded is a function of arrays
(`build_report`), so tests and other loaders can call it without a workdir.
"""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from scipy import stats as scipy_stats

from fiancee_jax import parallel
from fiancee_jax import tasks
from fiancee_jax.data import sources
from fiancee_jax.evaluation import intervals
from fiancee_jax.evaluation import plots
from fiancee_jax.evaluation import tradeoff
from fiancee_jax.guidance import database as database_lib
from fiancee_jax.inference import loading
from fiancee_jax.metrics import anchors
from fiancee_jax.metrics import costs
from fiancee_jax.metrics import distances
from fiancee_jax.metrics import exit_distances
from fiancee_jax.metrics import fid
from fiancee_jax.models import factory

LPIPS_REFERENCE = 0.1  # the paper's absolute bar ("about half the compute at LPIPS <= 0.1")
SECOND_DISTANCE = '1-msssim'
route_ids = tradeoff.route_ids  # re-exported: routing decisions of the report's rule


def _json_floats(x: np.ndarray) -> list[float | None]:
  """Floats for report.json; an infinite margin (exit never taken) becomes None."""
  return [float(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64).ravel()]


def report_thresholds(t_star: float, distance: str, *, multiples=(), configured=(),
                      anchor_values=()) -> np.ndarray:
  """The routing table's thresholds, all fixed before any exit is trained.

  `configured` (config.router.thresholds) if given, else t* x `multiples`; t* itself, the
  positive `anchor_values` (the backbone's own distance anchors: they depend on the backbone
  alone) and, for an LPIPS distance, the paper's 0.1 are always included. float64 [T],
  sorted, unique.
  """
  base = list(configured) if len(configured) else [t_star * m for m in multiples]
  base += [t_star] + ([LPIPS_REFERENCE] if distances.is_lpips(distance) else [])
  base += [float(a) for a in anchor_values if a is not None and np.isfinite(a) and a > 0]
  return np.unique(np.asarray(base, np.float64))


def predictor_quality(pred: np.ndarray, true: np.ndarray) -> dict:
  per_exit = []
  for k in range(true.shape[1]):
    rho = scipy_stats.spearmanr(pred[:, k], true[:, k]).statistic
    per_exit.append({'exit': k, 'mae': float(np.abs(pred[:, k] - true[:, k]).mean()),
                     'spearman': float(rho)})
  return {'mae': float(np.abs(pred - true).mean()),
          'spearman': float(min(r['spearman'] for r in per_exit)),
          'per_exit': per_exit}


def build_report(*, distance: str, pred: np.ndarray, true: np.ndarray,
                 true_unguided: np.ndarray | None, second: np.ndarray | None, margins_at,
                 exit_costs: list[dict], exit_gflops_unguided: list[float] | None,
                 predictor_gflops: float, t_star: dict, distance_anchors: dict,
                 target_met: float, thresholds: np.ndarray, resamples: int,
                 bootstrap_seed: int, num_z_average: int) -> dict:
  """The figures of report.json that come from arrays (DESIGN.md section 3).

  Args:
    distance: the distance's name (e.g. 'lpips-alex').
    pred: float [N, E - 1] predicted distances of the early exits on the test samples.
    true: float [N, E - 1] their measured distances (guided exits when guided).
    true_unguided: float [N, E - 1] the unguided exits' distances on the same samples, or None.
    second: float [N, E - 1] the early exits' 1 - MS-SSIM, or None.
    margins_at: threshold -> float [E - 1] calibration margins (FianceeModel.margins_at).
    exit_costs: per exit, the backbone last: {'exit', 'attach_after', 'gflops', 'params'}.
    exit_gflops_unguided: GFLOPs of the unguided exit paths (E - 1), or None.
    predictor_gflops: GFLOPs of the predictor per sample.
    t_star: the t* record (anchors.fix_t_star).
    distance_anchors: {anchor name: mean distance or None} (anchors.anchor_distances).
    target_met: the calibration's target share (the rule the static baseline is held to).
    thresholds: the routing table's thresholds (report_thresholds).
    resamples, bootstrap_seed: the paired bootstrap (intervals.bootstrap_figures).
    num_z_average: z draws of the 'z_average' anchor.

  Returns:
    {'distance', 'distance_anchors', 'distance_anchor_definitions', 'exits', 'routing',
     'routing_uncalibrated', 't_star', 'at_t_star', 'at_lpips_0.1', 'curve_efficiency',
     'curve_efficiency_uncalibrated' (the same predictor with zero margins: what the
     calibration costs), 'efficiency_curves', 'intervals', 'calibration' (margins only)}.
  """
  true = np.asarray(true, np.float64)
  e1 = true.shape[1]
  g = np.asarray([c['gflops'] for c in exit_costs], np.float64)
  t = float(t_star['value'])
  rows = tradeoff.routing_table(pred, true, margins_at, g, predictor_gflops, thresholds,
                                target_met=target_met)
  uncalibrated = tradeoff.routing_table(pred, true, np.zeros(e1, np.float32), g,
                                        predictor_gflops, thresholds, target_met=target_met)
  ids_t = route_ids(pred, t, margins_at(t))
  at_t = tradeoff.routing_row(ids_t, true, g, predictor_gflops, t, target_met)
  ci = intervals.bootstrap_figures(
      true, true_unguided=true_unguided,
      saved=tradeoff.per_sample_saved(ids_t, g, predictor_gflops),
      num_resamples=resamples, seed=bootstrap_seed)
  exits = []
  for k, c in enumerate(exit_costs[:-1]):
    e = {**c, 'gflops_fraction': c['gflops'] / g[-1],
         'mean_distance': float(true[:, k].mean()),
         'mean_distance_ci95': ci['exits'][k]['mean_distance']['ci95'],
         'p95_distance': float(np.percentile(true[:, k], 95)),
         f'mean_distance_{SECOND_DISTANCE.replace("1-", "")}': (
             float(np.mean(second[:, k])) if second is not None else None),
         'difference_to_previous': ci['exits'][k]['difference_to_previous'],
         'mean_distance_no_guidance': None, 'p95_distance_no_guidance': None,
         'gflops_no_guidance': None, 'guidance_gain': None}
    if true_unguided is not None:
      e.update(mean_distance_no_guidance=float(true_unguided[:, k].mean()),
               p95_distance_no_guidance=float(np.percentile(true_unguided[:, k], 95)),
               gflops_no_guidance=(exit_gflops_unguided[k] if exit_gflops_unguided else None),
               guidance_gain=ci['exits'][k]['guidance_gain'])
    exits.append(e)
  curve_efficiency, curves = tradeoff.efficiency(pred, true, margins_at, g, predictor_gflops)
  uncalibrated_efficiency, _ = tradeoff.efficiency(pred, true, np.zeros(e1, np.float32), g,
                                                   predictor_gflops)
  report = {
      'distance': distance,
      'distance_anchors': distance_anchors,
      'distance_anchor_definitions': anchors.anchor_definitions(num_z_average),
      'exits': exits,
      'routing': rows,
      'routing_uncalibrated': uncalibrated,
      't_star': dict(t_star),
      'at_t_star': {**tradeoff.operating_point(at_t),
                    'saved_fraction_ci95': ci['saved_fraction']['ci95']},
      'at_lpips_0.1': None,
      'curve_efficiency': curve_efficiency,
      'curve_efficiency_uncalibrated': uncalibrated_efficiency,
      'efficiency_curves': curves,
      'intervals': {k: ci[k] for k in ('method', 'resamples', 'seed', 'level')},
      'calibration': {
          'margins_per_threshold': [_json_floats(margins_at(r['threshold'])) for r in rows],
          'met_fraction_per_threshold': [r['met_fraction'] for r in rows],
          'met_fraction_uncalibrated': [r['met_fraction'] for r in uncalibrated]},
  }
  if distances.is_lpips(distance):
    ids = route_ids(pred, LPIPS_REFERENCE, margins_at(LPIPS_REFERENCE))
    report['at_lpips_0.1'] = tradeoff.operating_point(tradeoff.routing_row(
        ids, true, g, predictor_gflops, LPIPS_REFERENCE, target_met))
  else:
    report['at_lpips_0.1_note'] = (f'the distance is {distance}, not an LPIPS: the paper\'s '
                                   'absolute LPIPS 0.1 does not apply')
  return report


def backbone_fn(model, batch: int):
  """inputs -> the backbone's outputs float32 [N, H, W, 3], in chunks of `batch` split over
  every device (parallel.map_rows; call on every process) through one compiled path (so t*,
  the anchors' z draws and every call share one executable)."""
  path = model.paths()[-1]
  return lambda inputs: parallel.map_rows(path, tuple(inputs), batch, consts=model.params)


def measure_anchors(config: ml_collections.ConfigDict, model, distance: distances.Distance,
                    inputs: tuple[np.ndarray, ...], images: np.ndarray, backbone) -> dict:
  """anchors.anchor_distances of the backbone's test outputs `images` [N, H, W, 3];
  backbone: `backbone_fn(model, batch)`."""
  task = model.task
  generate, sampler = None, None
  if task.noise_dim:
    data = tuple(inputs[:tasks.num_data(task)])
    generate = lambda z: backbone(tasks.with_noise(task, data, z))
    sampler = lambda key, n: np.asarray(jax.random.normal(key, (n, task.noise_dim)))
  # The anchors' own stream, from the data seed: every seed of a job shares its anchors.
  key = jax.random.fold_in(jax.random.key(config.data.seed), 0xA7C)
  return anchors.anchor_distances(distance.fn, images, key, generate_fn=generate,
                                  z_sampler=sampler, num_average=config.evaluate.z_average,
                                  batch=config.predictor.measure_batch)


def second_distances(outputs: list[np.ndarray], batch: int) -> np.ndarray:
  """float32 [N, E - 1]: 1 - MS-SSIM of every early exit's output to the backbone's."""
  fn = distances.get_distance(SECOND_DISTANCE).fn
  return np.stack([distances.batched(fn, o, outputs[-1], batch) for o in outputs[:-1]], -1)


def evaluate(config: ml_collections.ConfigDict, workdir: str, out: str | None = None, *,
             anchors_of: dict | None = None) -> dict:
  """Writes report.json and the plots to `out` (default WORKDIR/report); returns the report.

  anchors_of: the report of another seed of this job (same backbone, same test inputs), whose
  `distance_anchors` are reused instead of measured again; None measures them.
  """
  n = min(config.router.num_eval, config.data.num_test)
  fid_fn = _fid_feature_fn(config)  # a bad weights file fails here, before any compute
  model = loading.load_model(workdir, config)
  inputs, true = exit_distances.of_model(config, workdir, model, 'test', n)
  no_guide = None
  if model.exit_model.guided and 'unguided' in factory.exit_variants(config):
    unguided = loading.load_model(workdir, config, variant='unguided')
    no_guide = exit_distances.of_model(config, workdir, unguided, 'test', n)[1]
  pred = parallel.map_rows(model.predict_fn(), inputs, config.predictor.measure_batch,
                          consts=model.predictor_params)
  # t* was fixed after the backbone stage; if not, it is measured now, identically (it
  # depends on the backbone and the validation inputs only).
  validation = exit_distances.load_inputs(config, 'validation', config.data.num_validation)
  return evaluate_model(config, workdir, model, inputs, true, no_guide, pred, validation,
                        fid_fn=fid_fn, out=out,
                        known_anchors=(None if anchors_of is None
                                       else anchors_of['distance_anchors']))


def evaluate_model(config: ml_collections.ConfigDict, workdir: str, model,
                   inputs: tuple[np.ndarray, ...], true: np.ndarray,
                   no_guide: np.ndarray | None, pred: np.ndarray,
                   validation: tuple[np.ndarray, ...], *, fid_fn=None,
                   out: str | None = None, known_anchors: dict | None = None) -> dict:
  """The evaluate stage on loaded arrays: the report, written with its plots by process 0.

  Args:
    inputs: the exit paths' inputs of the N test samples (data, then z if any).
    true, no_guide, pred: float [N, E - 1] guided and unguided distances, predictions.
    validation: the exit paths' inputs of the first config.data.num_validation validation
      samples (for t*, if it is not fixed yet).
    out: where report.json and the plots go (default WORKDIR/report).
    known_anchors: distance_anchors measured already on the same backbone and inputs, or
      None.
  """
  batch = config.predictor.measure_batch
  distance = distances.from_config(config)
  backbone = backbone_fn(model, batch)
  t_star = anchors.fix_t_star(config, workdir, lambda: backbone(validation), distance=distance)
  outputs = exit_outputs(model, inputs, batch)
  second = (true if distance.name == SECOND_DISTANCE else second_distances(outputs, batch))
  cstats = costs.exit_stats(config)
  # The costs just compiled, given to the model so that it does not compile them again.
  model = model.replace(exit_gflops=[c['gflops'] for c in cstats],
                        predictor_gflops=costs.predictor_stats(config)['gflops'])
  unguided_gflops = None
  if no_guide is not None:
    unguided_gflops = [c['gflops'] for c in costs.exit_stats(config, guided=False)[:-1]]
  ev = config.evaluate
  anchor_values = known_anchors or measure_anchors(config, model, distance, inputs, outputs[-1],
                                                   backbone)
  thresholds = report_thresholds(t_star['value'], distance.name,
                                 multiples=ev.t_star_multiples,
                                 configured=tuple(config.router.thresholds),
                                 anchor_values=tuple(anchor_values.values()))
  body = build_report(
      distance=distance.name, pred=pred, true=true, true_unguided=no_guide, second=second,
      margins_at=model.margins_at, exit_costs=cstats, exit_gflops_unguided=unguided_gflops,
      predictor_gflops=model.predictor_gflops, t_star=t_star,
      distance_anchors=anchor_values,
      target_met=config.router.target_met, thresholds=thresholds,
      resamples=ev.bootstrap_resamples, bootstrap_seed=ev.bootstrap_seed,
      num_z_average=ev.z_average)
  db = model.params['database']
  h, w = config.data.resolution
  report = {
      'distance': body.pop('distance'),
      'distance_anchors': body.pop('distance_anchors'),
      'num_eval': int(len(true)),
      'resolution': [h, w],
      'seeds': [int(config.seed)],
      'backbone': {**costs.backbone_stats(config),
                   'broadcast_z_share': costs.broadcast_z_share(config)},
      'predictor': {'gflops': model.predictor_gflops, **predictor_quality(pred, true)},
      'database': {'entries': config.database.num_entries,
                   'bytes': database_lib.nbytes(db) if db is not None else 0,
                   'lookup_gflops': costs.lookup_gflops(config)},
      **body,
  }
  report['calibration'] = {
      'method': config.router.calibration, 'target_met': config.router.target_met,
      'margins': (None if model.risk_control is not None
                  else _json_floats(model.margins_at(0.0))),
      **report['calibration']}
  split = sources.load_split(config, 'test', len(true))
  target = split.get('target')
  if target is not None:
    report['ground_truth'] = truth_table(config, model, inputs, outputs, target, pred,
                                         report['routing'])
  if fid_fn is not None:
    report['fid'] = fid_table(fid_fn, outputs, split['image'] if target is None else target)
  if jax.process_index() == 0:
    out = out or os.path.join(workdir, 'report')
    write_report(out, report)
    num = min(8, len(true))
    data = inputs[:tasks.num_data(model.task)]
    plots.write_all(out, report, pred, true,
                    columns=model.task.columns(tuple(x[:num] for x in data)),
                    outputs=[o[:num] for o in outputs],
                    routed_ids=route_ids(pred[:num], t_star['value'],
                                         model.margins_at(t_star['value'])),
                    target=None if target is None else target[:num])
  return report


# Plots of one seed that the aggregated report keeps (they show samples, not figures).
SEED_PLOTS = ('predicted_vs_true.png', 'samples.png')


def write_aggregate(out: str, reports: list[dict], first_seed_dir: str) -> dict:
  """The report over seeds (intervals.aggregate_seed_reports) as out/report.json, its
  quality-vs-compute and exit plots, and the first seed's sample plots; returns it."""
  report = intervals.aggregate_seed_reports(reports)
  if jax.process_index() == 0:
    write_report(out, report)
    plots.distance_vs_gflops(os.path.join(out, 'distance_vs_gflops.png'), report)
    plots.exit_histogram(os.path.join(out, 'exit_histogram.png'), report)
    for name in SEED_PLOTS:
      src = os.path.join(first_seed_dir, name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out, name))
  return report


def write_report(out: str, report: dict) -> None:
  """out/report.json, atomically (JSON has no inf/NaN: such numbers become null)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'report.json.tmp'), 'w') as f:
    json.dump(_finite_or_none(report), f, indent=2, allow_nan=False)
  os.replace(os.path.join(out, 'report.json.tmp'), os.path.join(out, 'report.json'))


def benchmark_thresholds(config: ml_collections.ConfigDict, workdir: str, model) -> list[float]:
  """The benchmark's thresholds: t* and, for an LPIPS distance, 0.1, plus any configured ones
  (config.router.thresholds); all fixed before the results are seen."""
  validation = exit_distances.load_inputs(config, 'validation', config.data.num_validation)
  backbone = backbone_fn(model, config.predictor.measure_batch)
  t_star = anchors.fix_t_star(config, workdir, lambda: backbone(validation))
  return [float(t) for t in report_thresholds(t_star['value'], config.distance.name,
                                              configured=tuple(config.router.thresholds))]


def _fid_feature_fn(config: ml_collections.ConfigDict):
  """The Inception feature function of config.distance.fid_weights, or None if unset."""
  path = config.distance.get('fid_weights', '')
  if not path:
    return None
  return fid.make_feature_fn(fid.load_params(path))


def exit_outputs(model, inputs: tuple[np.ndarray, ...], batch: int) -> list[np.ndarray]:
  """Every exit's images on N inputs, the backbone last: E arrays float32 [N, H, W, 3]
  (split over every device: call on every process)."""

  def f(params, *x):
    images, teacher = model.exit_model.all_exits(params, *x)
    return images + [teacher]

  return parallel.map_rows(f, tuple(inputs), batch, consts=model.params)


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
  dist = distances.from_config(config).fn
  b = config.predictor.measure_batch

  def score(images):  # per-sample distance and L1 to the truth, [N] each
    d = distances.batched(dist, images, target, b)
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
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x
