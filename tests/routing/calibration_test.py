"""Split-conformal margins: finite-sample coverage on held-out data, validation."""
import math

import numpy as np
import pytest

from fiancee_jax.routing import calibration

SEEDS = range(10)
N_CAL, N_TEST = 400, 4000


def _synthetic(n: int, rng: np.random.Generator, noise=(0.03, 0.06, 0.02)):
  """Exchangeable samples: true distances grow with exit cheapness; pred = true + noise."""
  difficulty = rng.uniform(0, 1, size=(n, 1))
  base = np.array([0.12, 0.07, 0.03])  # exit 0 is the cheapest and worst
  true = np.clip(base * (0.5 + difficulty) + 0.02 * rng.standard_normal((n, 3)), 0, None)
  # Heavy-ish tails (Student t) so a Gaussian-quantile shortcut would not be enough.
  pred = true + np.asarray(noise) * rng.standard_t(4, size=(n, 3))
  return pred, true


def _tol(p: float, repeats: int = 1) -> float:
  """3 standard deviations of an achieved share around p.

  Conditional on the calibration split, coverage is Beta-distributed with variance
  ~p(1 - p) / (N_CAL + 2) (Angelopoulos & Bates 2021, Sec. 3.2); the test split adds binomial
  noise p(1 - p) / N_TEST; `repeats` independent seeds average both.
  """
  return 3.0 * math.sqrt(p * (1 - p) * (1 / (N_CAL + 2) + 1 / N_TEST) / repeats)


@pytest.mark.parametrize('method', calibration.METHODS)
def test_per_exit_coverage_on_held_out_split(method):
  target = 0.9
  covs = []
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    pred, true = _synthetic(N_CAL + N_TEST, rng)
    margins = calibration.calibrate(pred[:N_CAL], true[:N_CAL], target=target, method=method)
    cov = calibration.coverage(pred[N_CAL:], true[N_CAL:], margins)
    assert np.all(cov >= target - _tol(target)), (seed, cov)
    covs.append(cov)
  # The guarantee is marginal over calibration draws: their average meets the target.
  assert np.all(np.mean(covs, axis=0) >= target - _tol(target, len(SEEDS)))


@pytest.mark.parametrize('method', ['bonferroni', 'max_score'])
@pytest.mark.parametrize('target', [0.8, 0.95])
def test_routed_share_meets_target_at_every_threshold(method, target):
  thresholds = (0.02, 0.05, 0.08, 0.12, 0.2)
  shares = []
  for seed in SEEDS:
    rng = np.random.default_rng(100 + seed)
    pred, true = _synthetic(N_CAL + N_TEST, rng)
    margins = calibration.calibrate(pred[:N_CAL], true[:N_CAL], target=target, method=method)
    row = calibration.met_fractions(pred[N_CAL:], true[N_CAL:], thresholds, margins)
    assert min(row) >= target - _tol(target), (seed, row)
    shares.append(row)
  assert np.min(np.mean(shares, axis=0)) >= target - _tol(target, len(SEEDS))


def test_uncalibrated_routing_misses_the_target():
  """The guarantee is not free: zero margins with a noisy predictor fall short."""
  rng = np.random.default_rng(0)
  pred, true = _synthetic(4000, rng)
  assert calibration.met_fraction(pred, true, 0.08, np.zeros(3)) < 0.85


def test_max_score_is_tight_in_joint_coverage():
  """Joint coverage <= 1 - alpha + 1 / (n_quantile + 1) in expectation (no ties)."""
  target, joint = 0.9, []
  for seed in SEEDS:
    rng = np.random.default_rng(200 + seed)
    pred, true = _synthetic(N_CAL + N_TEST, rng)
    m = calibration.calibrate(pred[:N_CAL], true[:N_CAL], target=target, method='max_score')
    joint.append(np.mean(np.all(true[N_CAL:] <= pred[N_CAL:] + m, axis=1)))
  n_q = N_CAL - round(0.3 * N_CAL)
  tol = 3.0 * math.sqrt(target * (1 - target) * (1 / (n_q + 2) + 1 / N_TEST) / len(SEEDS))
  assert target - tol <= np.mean(joint) <= target + 1 / (n_q + 1) + tol


@pytest.mark.parametrize('method', calibration.METHODS)
def test_exact_predictor_gives_zero_margins(method):
  rng = np.random.default_rng(0)
  true = rng.uniform(0, 0.3, size=(200, 3))
  margins = calibration.calibrate(true, true, target=0.95, method=method)
  np.testing.assert_allclose(margins, 0.0, atol=1e-9)
  assert calibration.met_fraction(true, true, 0.1, margins) == 1.0


def test_margins_follow_a_constant_bias():
  rng = np.random.default_rng(0)
  true = rng.uniform(0, 0.3, size=(300, 2))
  margins = calibration.calibrate(true - 0.05, true, target=0.9)
  np.testing.assert_allclose(margins, 0.05, atol=1e-6)
  margins = calibration.calibrate(true + 0.05, true, target=0.9)
  np.testing.assert_allclose(margins, -0.05, atol=1e-6)  # over-estimates earn negative margins


def test_conformal_quantile_rank():
  scores = np.arange(1, 20, dtype=float)  # n = 19
  assert calibration.conformal_quantile(scores, 0.1) == 18.0  # ceil(20 * 0.9) = 18
  assert calibration.conformal_quantile(scores, 0.05) == 19.0  # ceil(20 * 0.95) = 19
  assert calibration.conformal_quantile(scores, 0.04) == math.inf  # rank 20 > n


def test_small_split_warns_and_disables_exits():
  rng = np.random.default_rng(0)
  pred, true = _synthetic(16, rng)
  with pytest.warns(RuntimeWarning, match='too small'):
    margins = calibration.calibrate(pred, true, target=0.95)
  assert np.all(np.isinf(margins))
  assert calibration.met_fraction(pred, true, 0.0, margins) == 1.0  # all to the backbone
  assert calibration.min_samples(0.95, 3) == 59
  pred, true = _synthetic(59, rng)
  assert np.all(np.isfinite(calibration.calibrate(pred, true, target=0.95)))


@pytest.mark.parametrize('kwargs, match', [
    (dict(pred=np.zeros((5, 2)), true=np.zeros((5, 3)), target=0.9), 'both be'),
    (dict(pred=np.zeros(5), true=np.zeros(5), target=0.9), 'both be'),
    (dict(pred=np.full((5, 2), np.nan), true=np.zeros((5, 2)), target=0.9), 'non-finite'),
    (dict(pred=np.zeros((5, 2)), true=np.zeros((5, 2)), target=1.0), r'\(0, 1\)'),
    (dict(pred=np.zeros((5, 2)), true=np.zeros((5, 2)), target=0.0), r'\(0, 1\)'),
    (dict(pred=np.zeros((5, 2)), true=np.zeros((5, 2)), target='high'), r'\(0, 1\)'),
    (dict(pred=np.zeros((5, 2)), true=np.zeros((5, 2)), target=0.9, method='lrt'), 'unknown'),
])
def test_calibrate_validates(kwargs, match):
  with pytest.raises(ValueError, match=match):
    calibration.calibrate(**kwargs)


def test_met_fraction_validates_margins():
  with pytest.raises(ValueError, match='margins has 3 values'):
    calibration.met_fraction(np.zeros((4, 2)), np.zeros((4, 2)), 0.1, np.zeros(3))


# -- Risk control: margins set per threshold. --


def _routed_miss(pred, true, threshold, margin):
  """Reference router in float64: cheapest exit with pred + margin <= t misses t?"""
  ok = pred + margin <= threshold
  k = np.where(ok.any(axis=1), ok.argmax(axis=1), pred.shape[1])
  routed = np.where(k < pred.shape[1], true[np.arange(len(k)), np.minimum(k, pred.shape[1] - 1)],
                    0.0)
  return routed > threshold


def test_risk_control_scores_are_the_largest_missing_margin():
  rng = np.random.default_rng(3)
  pred, true = _synthetic(300, rng)
  rc = calibration.RiskControl(0.9, pred, true)
  t = 0.08
  s = rc.scores(t)
  grid = np.linspace(-0.4, 0.4, 1601)
  misses = np.stack([_routed_miss(pred, true, t, lam) for lam in grid])  # [G, N]
  for i in range(len(s)):
    if np.isfinite(s[i]):
      # Misses just below its score (exactly at it, float rounding of pred + (t - pred)
      # decides) ...
      assert _routed_miss(pred[i:i + 1], true[i:i + 1], t, s[i] - 1e-9)[0]
      assert not misses[grid > s[i] + 1e-12, i].any()  # and never above it
    else:
      assert not misses[:, i].any()
  # The real loss is not monotone: some samples miss at a margin, meet the threshold at a
  # smaller one, and miss again below; the scores bound it from above.
  assert (misses[:-1] & ~misses[1:]).any() and (~misses[:-1] & misses[1:]).any()


@pytest.mark.parametrize('target', [0.8, 0.95])
def test_risk_control_meets_target_at_every_threshold(target):
  thresholds = (0.02, 0.05, 0.08, 0.12, 0.2)
  shares = []
  for seed in SEEDS:
    rng = np.random.default_rng(300 + seed)
    pred, true = _synthetic(N_CAL + N_TEST, rng)
    rc = calibration.fit_risk_control(pred[:N_CAL], true[:N_CAL], target=target)
    row = [calibration.met_fraction(pred[N_CAL:], true[N_CAL:], t, rc.margins(t))
           for t in thresholds]
    assert min(row) >= target - _tol(target), (seed, row)
    shares.append(row)
  assert np.min(np.mean(shares, axis=0)) >= target - _tol(target, len(SEEDS))


def test_risk_control_routes_earlier_than_threshold_free_margins():
  """It spends the error budget at the threshold asked for, so more samples exit early."""
  rng = np.random.default_rng(7)
  pred, true = _synthetic(N_CAL + N_TEST, rng)
  target, t = 0.9, 0.08
  rc = calibration.fit_risk_control(pred[:N_CAL], true[:N_CAL], target=target)
  fixed = calibration.calibrate(pred[:N_CAL], true[:N_CAL], target=target, method='max_score')
  from fiancee_jax.routing import router  # pylint: disable=g-import-not-at-top
  ids_rc = np.asarray(router.route(pred[N_CAL:].astype(np.float32), t, rc.margins(t)))
  ids_fixed = np.asarray(router.route(pred[N_CAL:].astype(np.float32), t, fixed))
  assert np.mean(ids_rc < 3) > np.mean(ids_fixed < 3) + 0.1
  # ... and is just tight: the achieved share is near the target, not near 1.
  assert calibration.met_fraction(pred[N_CAL:], true[N_CAL:], t, rc.margins(t)) < target + 0.05


def test_risk_control_edge_cases_and_storage():
  rng = np.random.default_rng(0)
  pred, true = _synthetic(16, rng)
  with pytest.warns(RuntimeWarning, match='too small'):
    rc = calibration.fit_risk_control(pred, true, target=0.95)
  assert np.all(np.isinf(rc.margins(0.1)))  # only the backbone
  # With an exact predictor the error budget is spent on purpose: a negative margin sends
  # some samples that miss to early exits, up to the allowed share (on this split: at most
  # (n + 1) * alpha - 1 = 9.1 of 100 miss).
  true = rng.uniform(0, 0.3, size=(100, 3))
  rc = calibration.RiskControl(0.9, true, true)
  m = rc.margins(0.1)
  assert np.all(np.isfinite(m)) and m.dtype == np.float32 and np.all(m < 0)
  assert calibration.met_fraction(true, true, 0.1, m) == 0.91
  assert calibration.met_fraction(true, true, 0.1, np.zeros(3)) == 1.0
  back = calibration.RiskControl.from_dict(rc.to_dict())
  np.testing.assert_array_equal(back.margins(0.05), rc.margins(0.05))
  with pytest.raises(ValueError, match='malformed'):
    calibration.RiskControl.from_dict({'target': 0.9})
  with pytest.raises(ValueError, match='threshold'):
    rc.margins(-0.1)
  with pytest.raises(ValueError, match=r'\(0, 1\)'):
    calibration.RiskControl(1.5, true, true)
