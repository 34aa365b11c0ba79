"""Intervals: a paired bootstrap over test samples, and a t-interval across seeds.

Paired bootstrap. Every figure of the report is a function of per-sample columns measured on
the same N test samples (each exit's distance, the unguided exits' distances for the same
inputs and z, the GFLOPs each sample's routing saved). One resample draws N sample indices
with replacement and recomputes every figure from the means of the columns over them; the
same draw serves every column, so differences (exit k+1 minus exit k, guided vs unguided) are
paired and their intervals are much narrower than the two marginal intervals suggest. The
interval is the percentile interval (2.5th and 97.5th percentiles of B resamples) around the
figure on the full sample. What it covers: the sampling of test inputs (and their z), with
the trained exits, predictor and calibration held fixed; training noise is what the seeds
measure.

Across seeds. With config.evaluate.seeds = S > 1 the pipeline repeats the database, the exits
and the predictor per seed on the one trained backbone and writes one report per seed;
`aggregate_seed_reports` turns them into one report whose numbers are the means over seeds,
with `seed_intervals[path] = {'ci95': [lo, hi], 'std', 'values'}` for every number that varies
across seeds: mean +- t_{0.975, S-1} s / sqrt(S) (Student t; None for S = 1).
"""
import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


def check_seeds(value: Any) -> int:
  """config.evaluate.seeds: an integer >= 1, else ValueError."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'config.evaluate.seeds={value!r} must be an integer >= 1 (the number of '
                     'database/exits/predictor repetitions on the one backbone).')
  return int(value)


def evaluation_seeds(base_seed: int, num_seeds: int) -> list[int]:
  """The seeds of the repeated stages: base_seed, base_seed + 1, ... (num_seeds of them)."""
  return [int(base_seed) + i for i in range(check_seeds(num_seeds))]


def check_resamples(value: Any) -> int:
  """config.evaluate.bootstrap_resamples: an integer >= 10."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 10:
    raise ValueError(f'config.evaluate.bootstrap_resamples={value!r} must be an integer >= 10 '
                     '(1000 is usual).')
  return int(value)


# ----------------------------------------------------------------------------------------------
# Paired bootstrap over test samples.

def resample_weights(n: int, *, num_resamples: int, seed: int) -> np.ndarray:
  """float64 [B, n]: per resample, how often each sample is drawn, divided by n (rows sum to 1).

  The mean of a column x over resample b is weights[b] @ x.
  """
  if n < 1:
    raise ValueError('the bootstrap needs at least one sample')
  rng = np.random.default_rng(seed)
  counts = rng.multinomial(n, np.full(n, 1.0 / n), size=check_resamples(num_resamples))
  return counts / n


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float | None]:
  """[lo, hi]: the (1 - level) / 2 and (1 + level) / 2 quantiles of the finite values."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return [None, None]
  lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return [float(lo), float(hi)]


def _figure(point: float, resampled: np.ndarray, level: float) -> dict:
  return {'mean': float(point), 'ci95': percentile_interval(resampled, level)}


def relative_gain(guided: np.ndarray, unguided: np.ndarray) -> np.ndarray:
  """1 - guided / unguided (mean distances): > 0 when guidance brings an exit closer."""
  guided, unguided = np.asarray(guided, np.float64), np.asarray(unguided, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(unguided > 0, 1.0 - guided / unguided, np.nan)


def bootstrap_figures(true: np.ndarray, *, true_unguided: np.ndarray | None = None,
                      saved: np.ndarray | None = None, num_resamples: int = 1000,
                      seed: int = 0, level: float = LEVEL) -> dict:
  """Paired-bootstrap intervals of the report's per-sample figures.

  Args:
    true: float [N, E - 1] each early exit's distance to the backbone.
    true_unguided: float [N, E - 1] the same for the unguided exits (same inputs and z), or
      None.
    saved: float [N] the share of the backbone's GFLOPs each sample's routing saved at t*
      (1 - (exit GFLOPs + predictor GFLOPs) / backbone GFLOPs), or None.
    num_resamples: B.
    seed: seed of the resampling.
    level: coverage of the intervals.

  Returns:
    {'exits': [{'mean_distance', 'difference_to_previous', 'guidance_gain'}] (each a
    {'mean': point estimate, 'ci95': [lo, hi]}, the last two None where they do not apply),
    'saved_fraction': {'mean', 'ci95'} or None, 'method', 'resamples', 'seed', 'level'}.
  """
  true = np.asarray(true, np.float64)
  if true.ndim != 2:
    raise ValueError(f'true must be [N, E - 1] distances, got shape {true.shape}')
  n, e1 = true.shape
  columns = [true]
  if true_unguided is not None:
    true_unguided = np.asarray(true_unguided, np.float64)
    if true_unguided.shape != true.shape:
      raise ValueError(f'true_unguided has shape {true_unguided.shape}, true {true.shape}: '
                       'they must be measured on the same samples')
    columns.append(true_unguided)
  if saved is not None:
    saved = np.asarray(saved, np.float64).reshape(-1)
    if saved.shape != (n,):
      raise ValueError(f'saved must be [N] = [{n}], got shape {saved.shape}')
    columns.append(saved[:, None])
  x = np.concatenate(columns, axis=1)  # [N, K]
  w = resample_weights(n, num_resamples=num_resamples, seed=seed)
  means = w @ x  # [B, K]
  point = x.mean(axis=0)
  exits = []
  for k in range(e1):
    row = {'mean_distance': _figure(point[k], means[:, k], level),
           'difference_to_previous': None, 'guidance_gain': None}
    if k:
      row['difference_to_previous'] = _figure(point[k] - point[k - 1],
                                              means[:, k] - means[:, k - 1], level)
    if true_unguided is not None:
      row['guidance_gain'] = _figure(relative_gain(point[k], point[e1 + k]),
                                     relative_gain(means[:, k], means[:, e1 + k]), level)
    exits.append(row)
  return {
      'exits': exits,
      'saved_fraction': _figure(point[-1], means[:, -1], level) if saved is not None else None,
      'method': 'paired bootstrap over test samples (percentile interval)',
      'resamples': int(num_resamples), 'seed': int(seed), 'level': level,
  }


# ----------------------------------------------------------------------------------------------
# Across seeds.

def t_interval(values: Sequence[float], level: float = LEVEL) -> list[float | None]:
  """[lo, hi] of mean +- t_{(1 + level) / 2, S - 1} s / sqrt(S); [None, None] for S < 2."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return [None, None]
  half = scipy_stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
  return [float(v.mean() - half), float(v.mean() + half)]


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _aggregate(values: list[Any], path: str, intervals: dict, level: float) -> Any:
  first = values[0]
  if isinstance(first, dict):
    keys = list(first)
    for v in values[1:]:
      if not isinstance(v, dict) or set(v) != set(keys):
        raise ValueError(f'seed reports differ in the keys of {path or "the top level"}; they '
                         'must come from the same config')
    return {k: _aggregate([v[k] for v in values], f'{path}/{k}' if path else k, intervals,
                          level) for k in keys}
  if isinstance(first, list):
    if any(not isinstance(v, list) or len(v) != len(first) for v in values):
      raise ValueError(f'seed reports differ in the length of {path}; they must come from the '
                       'same config (same thresholds, same exits)')
    return [_aggregate([v[i] for v in values], f'{path}/{i}', intervals, level)
            for i in range(len(first))]
  if all(_is_number(v) for v in values):
    arr = np.asarray(values, np.float64)
    if np.all(arr == arr[0]):
      return first
    intervals[path] = {'ci95': t_interval(arr, level), 'std': float(arr.std(ddof=1)),
                       'values': [float(v) for v in arr]}
    return float(arr.mean())
  if any(v is None for v in values):
    finite = [v for v in values if _is_number(v)]
    if finite:  # e.g. a miss rate undefined in one seed (no early exits there)
      intervals[path] = {'ci95': t_interval(finite, level), 'values': list(values),
                         'std': float(np.std(finite, ddof=1)) if len(finite) > 1 else None}
      return float(np.mean(finite))
    return None
  if any(v != first for v in values):
    raise ValueError(f'seed reports differ at {path}: {values!r}; they must come from the same '
                     'config and distance')
  return first


def aggregate_seed_reports(reports: Sequence[dict], level: float = LEVEL) -> dict:
  """One report from the per-seed reports of one config (same keys, same list lengths).

  Returns:
    The first report's structure with every number replaced by its mean over seeds;
    'seeds' is the concatenation of the reports' seeds; 'seed_intervals' maps the
    '/'-joined path of every number that varies across seeds (e.g. 'exits/0/mean_distance',
    'at_t_star/saved_fraction') to {'ci95': [lo, hi] (Student t), 'std', 'values'}.

  Raises:
    ValueError: no reports, or reports that differ in structure, strings or distance.
  """
  if not reports:
    raise ValueError('aggregate_seed_reports needs at least one report')
  stripped = []
  for r in reports:
    r = copy.deepcopy(dict(r))
    r.pop('seed_intervals', None)
    r['seeds'] = None
    stripped.append(r)
  intervals: dict[str, dict] = {}
  out = _aggregate(stripped, '', intervals, level)
  out['seeds'] = [int(s) for r in reports for s in r.get('seeds', [])]
  out['seed_intervals'] = intervals
  out['num_seeds'] = len(reports)
  return out


def seed_interval(report: dict, path: str) -> list[float | None] | None:
  """The across-seed ci95 of the number at `path` ('exits/0/mean_distance'), if any."""
  entry = report.get('seed_intervals', {}).get(path)
  return entry['ci95'] if entry else None
