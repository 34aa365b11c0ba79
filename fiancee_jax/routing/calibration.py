"""Calibration margins for routing, by split conformal prediction.

The router takes exit k < E - 1 only if pred_k + margin_k <= threshold. If the margins are
upper confidence bounds on the predictor's residuals, true_k <= pred_k + margin_k, then every
early exit the router takes meets the threshold, whatever the threshold is. The margins are
therefore *threshold-free*: one vector serves a whole threshold grid.

Procedure: split conformal prediction (Vovk, Gammerman & Shafer, "Algorithmic Learning in a
Random World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction and
Distribution-Free Uncertainty Quantification", 2021, Sec. 1-2). On a calibration split of n
samples that the predictor was not trained on, with nonconformity scores s_i, the margin is the
finite-sample quantile

  q = the ceil((n + 1)(1 - alpha))-th smallest score  (+inf if that rank exceeds n),

which gives P(s_test <= q) >= 1 - alpha for a new sample exchangeable with the calibration
split (and <= 1 - alpha + 1 / (n + 1) when scores have no ties).

Methods (alpha = 1 - target):

- 'bonferroni' (default): per exit, scores r_ik = true_ik - pred_ik at level alpha / (E - 1).
  A routed sample misses the threshold only if the exit it took under-covers; by the union
  bound, P(routed sample meets the threshold) >= target, for every threshold simultaneously.
- 'max_score': joint coverage with one score per sample, s_i = max_k r_ik / scale_k, at level
  alpha; scale_k (mean absolute residual) comes from a first part of the calibration split
  (`scale_fraction`; shuffle the split first if its order carries information) and the
  quantile from the rest, so exchangeability is preserved. It gives the same routed guarantee
  and is tighter than Bonferroni when exits' residuals are correlated; it uses fewer samples
  for the quantile.
- 'per_exit': per exit at level alpha. Each exit on its own covers with probability >= target,
  P(true_k <= pred_k + margin_k) >= target, but the routed choice is NOT guaranteed: the router
  selects exits by their predictions, so the share of routed samples that meet the threshold
  can be lower than the target.

- 'risk_control': threshold-dependent margins (`RiskControl`), for when only the routed
  share matters. The router takes exit k if pred_k + lam <= t; for one fixed threshold t,
  the loss of sample i at lam is 1 if its routed exit misses t. That loss is not monotone in
  lam (a larger margin can move a sample from an exit that meets t to a later one that does
  not), so it is monotonised: lam*_i is the largest lam at which sample i misses (-inf if it
  never does), and the monotone loss is 1[lam <= lam*_i], an upper bound of the real one.
  Conformal risk control (Angelopoulos, Bates, Fisch, Lei & Schuster, "Conformal Risk
  Control", ICLR 2024, Thm. 1 and Sec. 2.3 on monotonising) with a binary loss reduces to a
  split-conformal quantile of the scores lam*_i: lam_hat(t) is just above the
  ceil((n + 1)(1 - alpha))-th smallest lam*_i, and then P(routed sample misses t) <= alpha
  for a new sample, marginally, at that threshold. Every margin above lam_hat keeps the
  bound (the monotone loss only falls), which is why rounding up is safe. Unlike the
  threshold-free methods it spends the whole error budget on the samples that take early
  exits at this threshold, so it routes far more samples early at the same target; the
  price is that the guarantee is per threshold, not simultaneous over all thresholds.

What is guaranteed, and what is not:
- Marginal over the draw of calibration split and test sample, not conditional on the input
  (some kinds of label maps can fail more often than others) and not per batch.
- Only under exchangeability: a test distribution unlike the calibration split voids it.
- The backbone (exit E - 1) has distance 0 by definition, so it always meets a threshold >= 0;
  the share is over all samples, and among the samples that took an early exit it can be lower.
- 'bonferroni' and 'max_score' bound the chance that *any* exit under-covers, so the routed
  guarantee holds for every threshold at once, including one chosen after looking at the
  calibration results (but not one chosen per test input from its own outcome).
- The distances must be measured as at deployment (same distance, same z distribution).
- Small calibration splits give +inf margins (that exit is never taken): certifying level
  alpha needs n >= 1 / alpha - 1 samples, times (E - 1) for 'bonferroni'.
"""
import dataclasses
import math
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax.routing import router

METHODS = ('bonferroni', 'max_score', 'per_exit')  # threshold-free margins
ALL_METHODS = METHODS + ('risk_control', 'none')


def _check(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
  pred = np.asarray(pred, np.float64)
  true = np.asarray(true, np.float64)
  if pred.ndim != 2 or pred.shape != true.shape:
    raise ValueError(f'pred and true must both be [N, E - 1] distances per early exit, got '
                     f'pred {pred.shape} and true {true.shape}')
  if pred.shape[0] < 1 or pred.shape[1] < 1:
    raise ValueError(f'need at least one calibration sample and one early exit, got {pred.shape}')
  for name, arr in (('pred', pred), ('true', true)):
    if not np.all(np.isfinite(arr)):
      bad = np.argwhere(~np.isfinite(arr))[0]
      raise ValueError(f'{name} has a non-finite value at sample {bad[0]}, exit {bad[1]}; '
                       'drop or recompute those samples before calibrating')
  return pred, true


def _check_target(target: Any) -> float:
  try:
    t = float(target)
  except (TypeError, ValueError):
    raise ValueError(f'target must be a share in (0, 1), got {target!r}') from None
  if not 0.0 < t < 1.0:
    raise ValueError(f'target must be a share in (0, 1) (e.g. 0.95), got {target!r}')
  return t


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
  """The ceil((n + 1)(1 - alpha))-th smallest of n scores; +inf if that rank exceeds n.

  For an exchangeable new score s, P(s <= quantile) >= 1 - alpha (Angelopoulos & Bates 2021,
  Theorem D.1).
  """
  scores = np.sort(np.asarray(scores, np.float64).reshape(-1))
  n = scores.size
  if not 0.0 < alpha < 1.0:
    raise ValueError(f'alpha must be in (0, 1), got {alpha}')
  # Rounding guard: (n + 1)(1 - alpha) is often an integer up to float error.
  rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
  if rank > n:
    return math.inf
  return float(scores[max(rank, 1) - 1])


def min_samples(target: float, num_early_exits: int, method: str = 'bonferroni') -> int:
  """Smallest calibration split for which `calibrate` returns finite margins."""
  alpha = 1.0 - _check_target(target)
  if method == 'bonferroni':
    alpha /= num_early_exits
  # rank = ceil((n + 1)(1 - alpha)) <= n  <=>  n >= (1 - alpha) / alpha
  n = math.ceil((1.0 - alpha) / alpha - 1e-9)
  return n


def calibrate(pred: Any, true: Any, *, target: float, method: str = 'bonferroni',
              scale_fraction: float = 0.3) -> np.ndarray:
  """Margins that make routing meet the threshold on a `target` share of new samples.

  Args:
    pred: float [N, E - 1] predicted distance of each early exit (calibration split, not seen
      by the predictor's training).
    true: float [N, E - 1] measured distance of each early exit to the backbone.
    target: share in (0, 1) of samples that must meet the threshold (1 - alpha).
    method: 'bonferroni' | 'max_score' | 'per_exit' (see the module docstring for what each
      guarantees).
    scale_fraction: 'max_score' only: share of the split used to estimate per-exit scales.

  Returns:
    float32 [E - 1] margins (may be negative when the predictor over-estimates; +inf when the
    split is too small to certify that exit at this target).

  Raises:
    ValueError: on shape mismatch, non-finite values, target outside (0, 1) or unknown method.
  """
  pred, true = _check(pred, true)
  target = _check_target(target)
  if method not in METHODS:
    raise ValueError(f'unknown calibration method {method!r} (known: {", ".join(METHODS)})')
  alpha = 1.0 - target
  resid = true - pred  # [N, E - 1]; coverage means resid <= margin
  n, e1 = resid.shape
  if method in ('bonferroni', 'per_exit'):
    level = alpha / e1 if method == 'bonferroni' else alpha
    margins = np.array([conformal_quantile(resid[:, k], level) for k in range(e1)])
  else:
    if not 0.0 < scale_fraction < 1.0:
      raise ValueError(f'scale_fraction must be in (0, 1), got {scale_fraction}')
    n_scale = int(round(n * scale_fraction))
    if n_scale < 1 or n - n_scale < 1:
      raise ValueError(f"method='max_score' needs calibration samples for both the scales and "
                       f'the quantile; got N={n} with scale_fraction={scale_fraction}')
    scale = np.mean(np.abs(resid[:n_scale]), axis=0)
    # A perfect predictor has zero residuals; a floor keeps scores finite (margins stay 0).
    scale = np.maximum(scale, 1e-6 * max(float(np.max(scale)), 1e-6))
    q = conformal_quantile(np.max(resid[n_scale:] / scale, axis=1), alpha)
    margins = q * scale
  if not np.all(np.isfinite(margins)):
    needed = (min_samples(target, e1, method) if method != 'max_score'
              else min_samples(target, e1, 'per_exit') + n_scale)
    warnings.warn(
        f'a calibration split of {n} samples is too small to certify target {target} with '
        f'method={method!r} ({needed} are needed); exits with an infinite margin will never '
        'be taken', RuntimeWarning, stacklevel=2)
  return _round_up_f32(margins)


def met_fraction(pred: Any, true: Any, threshold: float, margins: Any) -> float:
  """Share of samples whose routed exit's true distance is <= threshold.

  Routes with `router.route` (the deployed rule, in float32); a sample routed to the backbone
  (exit E - 1, distance 0) always meets the threshold.

  Args:
    pred, true: float [N, E - 1] predicted and measured distances of the early exits.
    threshold: distance budget.
    margins: float [E - 1].

  Returns:
    float in [0, 1].
  """
  pred, true = _check(pred, true)
  margins = np.asarray(margins, np.float32).reshape(-1)
  if margins.shape != pred.shape[1:]:
    raise ValueError(f'margins has {margins.size} values but pred has {pred.shape[1]} early exits')
  t = float(threshold)
  ids = np.asarray(router.route(jnp.asarray(pred, jnp.float32), t, jnp.asarray(margins)))
  e1 = pred.shape[1]
  routed_true = np.where(ids < e1, true[np.arange(len(ids)), np.minimum(ids, e1 - 1)], 0.0)
  return float(np.mean(routed_true <= t))


def met_fractions(pred: Any, true: Any, thresholds: Any, margins: Any) -> np.ndarray:
  """float64 [T]: `met_fraction` at each threshold of a grid (one margin vector serves all)."""
  return np.array([met_fraction(pred, true, t, margins) for t in np.asarray(thresholds).ravel()])


def coverage(pred: Any, true: Any, margins: Any) -> np.ndarray:
  """float [E - 1]: per exit, the share of samples with true_k <= pred_k + margin_k."""
  pred, true = _check(pred, true)
  margins = np.asarray(margins, np.float64).reshape(-1)
  return np.mean(true <= pred + margins[None, :], axis=0)


def _round_up_f32(x: np.ndarray) -> np.ndarray:
  """float64 -> float32, never rounding down (margins keep their float64 guarantee)."""
  x = np.asarray(x, np.float64)
  out = x.astype(np.float32)
  low = out.astype(np.float64) < x
  out[low] = np.nextafter(out[low], np.float32(np.inf))
  return out


_SLACK = 1e-6  # distance units


@dataclasses.dataclass(frozen=True)
class RiskControl:
  """Threshold-dependent routing margins by conformal risk control (module docstring).

  Attributes:
    target: share in (0, 1) of samples whose routed output must meet the threshold.
    pred: float64 [n, E - 1] predicted distances of the calibration split.
    true: float64 [n, E - 1] their measured distances.
  """
  target: float
  pred: np.ndarray
  true: np.ndarray

  def __post_init__(self):
    pred, true = _check(self.pred, self.true)
    object.__setattr__(self, 'pred', pred)
    object.__setattr__(self, 'true', true)
    object.__setattr__(self, 'target', _check_target(self.target))

  @property
  def num_early_exits(self) -> int:
    return self.pred.shape[1]

  def scores(self, threshold: float) -> np.ndarray:
    """float64 [n]: per calibration sample, the largest margin at which its routed exit
    misses `threshold` (-inf if it never misses)."""
    t = float(threshold)
    bound = t - self.pred  # exit k qualifies iff margin <= bound[:, k]
    before = np.maximum.accumulate(
        np.concatenate([np.full((len(bound), 1), -np.inf), bound[:, :-1]], axis=1), axis=1)
    # Exit k is the routed one for margins in (max bound of exits before it, bound_k].
    reachable = bound > before
    miss = self.true > t
    return np.max(np.where(reachable & miss, bound, -np.inf), axis=1)

  def margin(self, threshold: float) -> float:
    """lam_hat(threshold): the margin added to every prediction (+inf: only the backbone)."""
    t = model_lib.check_threshold(threshold)
    s = self.scores(t)
    q = conformal_quantile(s, 1.0 - self.target)
    if q == -math.inf:
      # No sample at this rank ever misses, so any finite margin keeps the bound (-inf would
      # too, but report.json holds finite numbers). One distance unit below the smallest
      # bound sends every calibration sample to exit 0 and new samples too unless their
      # prediction is far outside the calibration range.
      q = float(np.min(t - self.pred[:, 0])) - 1.0
    # Strictly above q, with room for the float32 rounding of pred, margin and threshold in
    # the deployed router (~1e-8 at distances ~0.1): the sample at rank q must stay out.
    return q + _SLACK

  def margins(self, threshold: float) -> np.ndarray:
    """float32 [E - 1] margins for routing at `threshold` (rounded up)."""
    return _round_up_f32(np.full(self.num_early_exits, self.margin(threshold)))

  def to_dict(self) -> dict[str, Any]:
    return {'target': self.target, 'pred': self.pred.tolist(), 'true': self.true.tolist()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'RiskControl':
    try:
      return cls(d['target'], np.asarray(d['pred'], np.float64),
                 np.asarray(d['true'], np.float64))
    except (KeyError, TypeError) as e:
      raise ValueError(f'stored risk-control calibration is malformed ({e!r}); run the '
                       'predictor stage again') from None


def fit_risk_control(pred: Any, true: Any, *, target: float) -> RiskControl:
  """`RiskControl` margins from a calibration split (pred, true: float [N, E - 1])."""
  rc = RiskControl(target, pred, true)
  n = rc.pred.shape[0]
  needed = min_samples(target, 1, 'per_exit')
  if n < needed:
    warnings.warn(
        f'a calibration split of {n} samples is too small to certify target {target} with '
        f"method='risk_control' ({needed} are needed); only the backbone will be taken",
        RuntimeWarning, stacklevel=2)
  return rc
