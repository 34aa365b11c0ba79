"""Quality vs compute of routing and of its baselines, from arrays (DESIGN.md section 3).

Inputs everywhere: `true` float [N, E - 1], the measured distance of every early exit's output
to the backbone's on N test samples; `exit_gflops` float [E], GFLOPs of each exit path at batch
1 (database lookup included), the backbone last; the backbone's distance to itself is 0.

Per threshold t (all shares over the N samples unless said otherwise):
- `saved_fraction` = 1 - mean routed GFLOPs (predictor included) / backbone GFLOPs.
- `met_fraction`: share of ALL samples whose routed output's true distance <= t. Samples
  routed to the backbone meet any t >= 0, so this share flatters routing that sends many
  samples to the backbone; hence also
- `early_exit_miss_rate`: among the samples sent to an early exit, the share that miss t
  (None when none is), and `early_exit_fraction`, the share sent to an early exit.
- `p95_distance`, `mean_distance`: of the routed outputs' true distances.
- `oracle_saved_fraction`: every sample takes the cheapest exit whose true distance meets t
  (no predictor, no predictor cost).
- `best_static_saved_fraction`: the cheapest single exit that meets t on at least `target_met`
  of the samples (the rule routing is calibrated to); 0 if only the backbone does.
- `random_mix_saved_fraction`: routing that ignores the input. A fixed mixture of exits, each
  sample drawn independently, has mean distance sum_k w_k m_k (m_k an exit's mean distance)
  and mean cost sum_k w_k c_k; this is the most a mixture can save at the routed outputs' mean
  distance (a linear program: the lower convex hull of the points (m_k, c_k), backbone (0, B)
  included). Routing that does not beat it has learnt nothing about its inputs.

`curve_efficiency` summarises the whole trade-off: on a dense grid of thresholds, the routed and
the oracle saved fractions are taken as step functions of the mean distance (the most saved at a
mean distance <= D), the random mixture as above, each integrated over D in [0, max_k m_k];
efficiency = (A_routed - A_random) / (A_oracle - A_random): 0 = no better than ignoring the
input, 1 = the oracle (neither is a bound: it can leave [0, 1]). When the oracle itself saves
less than MIN_ORACLE_ADVANTAGE more than the random mixture on average over that range, the
ratio has no meaning and is None; the three areas (as mean saved fractions) are reported too.
The grid must be dense: a step curve through few operating points loses the area between them
(docs/results/predictor_ensemble, seed 0: -0.33 from 48 thresholds, 0.19 from 1024 to 4096).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.routing import router

MIN_ORACLE_ADVANTAGE = 0.005  # of the backbone's GFLOPs, averaged over the mean-distance range
Margins = np.ndarray | Callable[[float], np.ndarray]  # [E - 1], or threshold -> [E - 1]
OPERATING_POINT_KEYS = ('threshold', 'saved_fraction', 'met_fraction', 'early_exit_miss_rate',
                        'early_exit_fraction', 'p95_distance', 'mean_distance', 'mean_gflops',
                        'oracle_saved_fraction', 'best_static_saved_fraction',
                        'best_static_exit', 'random_mix_saved_fraction', 'exit_histogram')


def route_ids(scores: np.ndarray, threshold: float, margins: np.ndarray) -> np.ndarray:
  """Cheapest exit whose score + margin <= threshold, else the backbone: int32 [N]."""
  return np.asarray(router.route(jnp.asarray(scores, jnp.float32), threshold,
                                 jnp.asarray(margins, jnp.float32)))


def _margins_at(margins: Margins) -> Callable[[float], np.ndarray]:
  return margins if callable(margins) else (lambda t: np.asarray(margins))


def with_backbone(true: np.ndarray) -> np.ndarray:
  """[N, E]: `true` with the backbone's distance to itself (0) appended."""
  true = np.asarray(true, np.float64)
  return np.concatenate([true, np.zeros((len(true), 1))], axis=1)


def oracle_ids(true: np.ndarray, threshold: float) -> np.ndarray:
  """int32 [N]: the cheapest exit whose true distance <= threshold (the backbone if none)."""
  return route_ids(true, threshold, np.zeros(np.shape(true)[1], np.float32))


def per_sample_saved(ids: np.ndarray, exit_gflops: np.ndarray,
                     predictor_gflops: float) -> np.ndarray:
  """float64 [N]: 1 - (GFLOPs of the exit taken + predictor) / backbone GFLOPs."""
  g = np.asarray(exit_gflops, np.float64)
  return 1.0 - (g[np.asarray(ids)] + predictor_gflops) / g[-1]


def best_static(true: np.ndarray, exit_gflops: np.ndarray, threshold: float,
                target_met: float) -> tuple[int | None, float]:
  """(exit, saved fraction) of the cheapest early exit meeting `threshold` on at least
  `target_met` of the samples; (None, 0.0) if only the backbone does."""
  g = np.asarray(exit_gflops, np.float64)
  met = np.mean(np.asarray(true) <= threshold, axis=0)  # [E - 1]
  ok = [k for k in np.argsort(g[:-1], kind='stable') if met[k] >= target_met]
  if not ok:
    return None, 0.0
  return int(ok[0]), float(1.0 - g[ok[0]] / g[-1])


def random_mix_gflops(mean_distances: np.ndarray, exit_gflops: np.ndarray,
                      mean_distance: float) -> float:
  """Least mean GFLOPs of an input-ignoring mixture of exits with mean distance <= the given.

  Args:
    mean_distances: float [E - 1] each early exit's mean distance (the backbone's is 0).
    exit_gflops: float [E], the backbone last.
    mean_distance: the budget on the mixture's mean distance (>= 0).

  Returns:
    min sum_k w_k c_k s.t. sum_k w_k m_k <= mean_distance, w a distribution over the E exits.
    An optimal mixture needs at most two exits (two constraints), so all pairs are tried.
  """
  m = np.concatenate([np.asarray(mean_distances, np.float64), [0.0]])
  c = np.asarray(exit_gflops, np.float64)
  d = max(float(mean_distance), 0.0)
  best = float(np.min(c[m <= d])) if np.any(m <= d) else c[-1]
  for i in range(len(m)):  # i below the budget, j above it: the mix that spends it exactly
    for j in range(len(m)):
      if m[i] <= d < m[j]:
        w = (m[j] - d) / (m[j] - m[i])  # weight of i
        best = min(best, w * c[i] + (1 - w) * c[j])
  return float(best)


def routing_row(ids: np.ndarray, true: np.ndarray, exit_gflops: np.ndarray,
                predictor_gflops: float, threshold: float, target_met: float) -> dict:
  """Every per-threshold figure (module docstring) for routing decisions `ids` int [N]."""
  true = np.asarray(true, np.float64)
  n, e1 = true.shape
  g = np.asarray(exit_gflops, np.float64)
  ids = np.asarray(ids)
  t = float(threshold)
  chosen = with_backbone(true)[np.arange(n), ids]
  early = ids < e1
  oracle = oracle_ids(true, t)
  static_exit, static_saved = best_static(true, g, t, target_met)
  mean_gflops = float(g[ids].mean() + predictor_gflops)
  return {
      'threshold': t,
      'mean_gflops': mean_gflops,
      'saved_fraction': 1.0 - mean_gflops / g[-1],
      'met_fraction': float(np.mean(chosen <= t)),
      'early_exit_miss_rate': float(np.mean(chosen[early] > t)) if early.any() else None,
      'early_exit_fraction': float(early.mean()),
      'p95_distance': float(np.percentile(chosen, 95)),
      'mean_distance': float(chosen.mean()),
      'oracle_saved_fraction': float(1.0 - g[oracle].mean() / g[-1]),
      'oracle_mean_distance': float(with_backbone(true)[np.arange(n), oracle].mean()),
      'best_static_saved_fraction': static_saved,
      'best_static_exit': static_exit,
      'random_mix_saved_fraction': 1.0 - random_mix_gflops(true.mean(axis=0), g,
                                                            chosen.mean()) / g[-1],
      'exit_histogram': np.bincount(ids, minlength=e1 + 1).astype(int).tolist(),
  }


def routing_table(pred: np.ndarray, true: np.ndarray, margins: Margins,
                  exit_gflops: np.ndarray, predictor_gflops: float, thresholds: np.ndarray,
                  *, target_met: float) -> list[dict]:
  """`routing_row` at each threshold, routing by `pred` [N, E - 1] + margins (the deployed
  rule, `router.route`). margins: [E - 1], or threshold -> [E - 1] (FianceeModel.margins_at)."""
  margins_at = _margins_at(margins)
  return [routing_row(route_ids(pred, float(t), margins_at(float(t))), true, exit_gflops,
                      predictor_gflops, float(t), target_met) for t in np.ravel(thresholds)]


def operating_point(row: dict) -> dict:
  """The headline subset of a routing row (at_t_star, at_lpips_0.1)."""
  return {k: row[k] for k in OPERATING_POINT_KEYS}


def route_ids_many(scores: np.ndarray, thresholds: np.ndarray,
                   margins: Margins) -> np.ndarray:
  """int32 [T, N]: `route_ids` at each of T thresholds (router.route vmapped over them)."""
  margins_at = _margins_at(margins)
  t = np.asarray(thresholds, np.float32).ravel()
  m = np.stack([np.asarray(margins_at(float(x)), np.float32) for x in t])  # [T, E - 1]
  route = jax.vmap(router.route, in_axes=(None, 0, 0))
  scores = jnp.asarray(scores, jnp.float32)
  return np.concatenate([np.asarray(route(scores, t[i:i + 256], m[i:i + 256]))
                         for i in range(0, len(t), 256)])  # [256, N, E - 1] at a time


def _step_curve(d: np.ndarray, s: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """The most saved among points with mean distance <= each grid value (-inf before any)."""
  order = np.argsort(d, kind='stable')
  d, best = d[order], np.maximum.accumulate(s[order])
  idx = np.searchsorted(d, grid, side='right') - 1
  return np.where(idx >= 0, best[np.maximum(idx, 0)], -np.inf)


def efficiency(pred: np.ndarray, true: np.ndarray, margins: Margins, exit_gflops: np.ndarray,
               predictor_gflops: float, *, num_thresholds: int = 2048,
               grid_size: int = 257, stored_points: int = 128) -> tuple[float | None, dict]:
  """curve_efficiency (module docstring) and the three curves.

  The thresholds run evenly from 0 to the largest true distance (a grid to integrate over,
  not a choice of operating point); `stored_points` of each curve's points are returned.

  Returns:
    (efficiency, or None when the oracle is hardly better than the random mixture,
     {'routed': [[mean distance, saved], ...], 'oracle': [...], 'random_mix': [...],
      'mean_saved': {'routed', 'oracle', 'random_mix'}: each area / the range's width}).
  """
  true = np.asarray(true, np.float64)
  g = np.asarray(exit_gflops, np.float64)
  n = len(true)
  margins_at = _margins_at(margins)
  thresholds = np.linspace(0.0, float(true.max()) * (1 + 1e-6) + 1e-12, num_thresholds)
  full = with_backbone(true)
  rows = np.arange(n)
  routed_ids = route_ids_many(pred, thresholds, margins_at)
  oracle_ids_ = route_ids_many(true, thresholds, np.zeros(true.shape[1], np.float32))
  routed = [(full[rows, ids].mean(), per_sample_saved(ids, g, predictor_gflops).mean())
            for ids in routed_ids]
  oracle = [(full[rows, ids].mean(), 1.0 - g[ids].mean() / g[-1]) for ids in oracle_ids_]
  routed_a, oracle_a = np.asarray(routed), np.asarray(oracle)
  means = true.mean(axis=0)
  d_grid = np.linspace(0.0, float(means.max()), grid_size)
  mix = np.array([1.0 - random_mix_gflops(means, g, d) / g[-1] for d in d_grid])
  curves = {name: _step_curve(a[:, 0], a[:, 1], d_grid) for name, a in
            (('routed', routed_a), ('oracle', oracle_a))}
  # Before its first point a curve has nothing: count it as the backbone (saves 0).
  curves = {k: np.where(np.isfinite(v), v, 0.0) for k, v in curves.items()}
  width = max(float(d_grid[-1]), 1e-12)
  mean_saved = lambda y: float(np.trapezoid(y, d_grid) / width) if d_grid[-1] > 0 else 0.0
  a_mix, a_routed, a_oracle = mean_saved(mix), mean_saved(curves['routed']), mean_saved(
      curves['oracle'])
  span = a_oracle - a_mix
  value = float((a_routed - a_mix) / span) if span >= MIN_ORACLE_ADVANTAGE else None
  every = max(1, num_thresholds // stored_points)
  points = {'routed': routed_a[::every].tolist(), 'oracle': oracle_a[::every].tolist(),
            'random_mix': np.stack([d_grid, mix], 1)[::max(1, grid_size // 32)].tolist(),
            'mean_saved': {'routed': a_routed, 'oracle': a_oracle, 'random_mix': a_mix}}
  return value, points
