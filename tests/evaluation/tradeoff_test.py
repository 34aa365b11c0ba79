"""Routing figures and baselines on hand-made arrays: the rules of DESIGN.md section 3."""
import numpy as np
import pytest
from scipy import optimize

from fiancee_jax.evaluation import tradeoff

GFLOPS = np.array([1.0, 2.0, 4.0])  # exit 0, exit 1, backbone


def test_met_fraction_counts_the_backbone_and_the_miss_rate_does_not():
  # Samples 0-1 take exit 0 (predicted 0.05); sample 2 exit 1; sample 3 the backbone.
  true = np.array([[0.08, 0.01], [0.20, 0.01], [0.50, 0.30], [0.90, 0.90]])
  pred = np.array([[0.05, 0.0], [0.05, 0.0], [0.50, 0.05], [0.50, 0.50]])
  row = tradeoff.routing_row(tradeoff.route_ids(pred, 0.1, np.zeros(2)), true, GFLOPS, 0.0,
                             0.1, target_met=0.5)
  assert row['exit_histogram'] == [2, 1, 1]
  # Met: sample 0 (0.08) and the backbone sample; sample 1 (0.20) and 2 (0.30) miss.
  assert row['met_fraction'] == pytest.approx(0.5)
  assert row['early_exit_miss_rate'] == pytest.approx(2 / 3)
  assert row['early_exit_fraction'] == pytest.approx(0.75)
  np.testing.assert_allclose(row['mean_distance'], np.mean([0.08, 0.20, 0.30, 0.0]))
  np.testing.assert_allclose(row['p95_distance'], np.percentile([0.08, 0.20, 0.30, 0.0], 95))
  np.testing.assert_allclose(row['saved_fraction'], 1 - (1 + 1 + 2 + 4) / 4 / 4)
  # Oracle: 0 -> exit 0, 1 -> exit 1, 2 and 3 -> backbone.
  np.testing.assert_allclose(row['oracle_saved_fraction'], 1 - (1 + 2 + 4 + 4) / 4 / 4)


def test_no_early_exit_leaves_the_miss_rate_undefined():
  true = np.full((3, 2), 0.5)
  row = tradeoff.routing_row(np.full(3, 2), true, GFLOPS, 0.1, 0.1, target_met=0.9)
  assert row['early_exit_miss_rate'] is None and row['met_fraction'] == 1.0
  assert row['saved_fraction'] < 0  # the predictor's cost with nothing saved


def test_static_baseline_is_held_to_the_per_sample_rule():
  # Exit 0's mean (0.095) is below t = 0.1, yet only 55 % of its samples meet 0.1.
  rng = np.random.default_rng(0)
  exit0 = np.concatenate([rng.uniform(0.06, 0.1, 55), rng.uniform(0.1, 0.15, 45)])
  exit0 *= 0.095 / exit0.mean()
  exit1 = rng.uniform(0.0, 0.09, 100)
  true = np.stack([exit0, exit1], 1)
  assert true[:, 0].mean() <= 0.1 and np.mean(true[:, 0] <= 0.1) < 0.95
  k, saved = tradeoff.best_static(true, GFLOPS, 0.1, target_met=0.95)
  assert k == 1 and saved == pytest.approx(0.5)
  assert tradeoff.best_static(true, GFLOPS, 0.01, target_met=0.95) == (None, 0.0)
  assert tradeoff.best_static(true, GFLOPS, 0.2, target_met=0.95) == (0, pytest.approx(0.75))


@pytest.mark.parametrize('d,expected', [(0.0, 4.0), (0.1, 2.0), (0.15, 1.5), (0.05, 3.0),
                                        (0.3, 1.0)])
def test_random_mixture_by_hand(d, expected):
  # m = (0.2, 0.1, 0), c = (1, 2, 4): at 0.05 half exit 1, half backbone; at 0.15 half/half
  # exits 0 and 1.
  assert tradeoff.random_mix_gflops(np.array([0.2, 0.1]), GFLOPS, d) == pytest.approx(expected)


def test_random_mixture_is_the_linear_program():
  rng = np.random.default_rng(1)
  for _ in range(20):
    m = rng.uniform(0, 0.3, 3)
    c = np.sort(rng.uniform(0.5, 3.0, 4))
    d = rng.uniform(0, 0.35)
    res = optimize.linprog(c, A_ub=[np.append(m, 0.0)], b_ub=[d], A_eq=[np.ones(4)], b_eq=[1],
                           bounds=[(0, 1)] * 4)
    assert tradeoff.random_mix_gflops(m, c, d) == pytest.approx(res.fun, abs=1e-9)


def _exits(n, seed=0):
  """Distances with a per-sample difficulty shared by both exits: routing can learn it."""
  rng = np.random.default_rng(seed)
  hard = rng.uniform(0, 1, n)
  return np.stack([0.02 + 0.2 * hard, 0.01 + 0.1 * hard], 1) * rng.uniform(0.9, 1.1, (n, 2))


def test_curve_efficiency_is_one_for_the_oracle_and_about_zero_for_noise():
  true = _exits(400)
  value, curves = tradeoff.efficiency(true, true, np.zeros(2), GFLOPS, 0.0)
  assert value == pytest.approx(1.0)
  assert set(curves) == {'routed', 'oracle', 'random_mix', 'mean_saved'}
  noise = np.random.default_rng(2).permutation(true)  # predictions of other inputs
  blind, _ = tradeoff.efficiency(noise, true, np.zeros(2), GFLOPS, 0.0)
  assert blind < 0.2
  # A useful but imperfect predictor sits in between.
  rough = true + np.random.default_rng(3).normal(0, 0.01, true.shape)
  mid, _ = tradeoff.efficiency(rough, true, np.zeros(2), GFLOPS, 0.0)
  assert blind < mid < 1.0


def test_curve_efficiency_is_undefined_when_inputs_do_not_matter():
  true = np.tile([0.2, 0.1], (50, 1))  # every input equally hard: nothing to route on
  value, curves = tradeoff.efficiency(true, true, np.zeros(2), GFLOPS, 0.0)
  assert value is None
  saved = curves['mean_saved']
  assert saved['oracle'] <= saved['random_mix'] + tradeoff.MIN_ORACLE_ADVANTAGE


def test_routing_table_uses_the_margin_of_each_threshold():
  true = _exits(50)
  seen = []

  def margins_at(t):
    seen.append(t)
    return np.full(2, np.inf if t < 0.05 else 0.0, np.float32)

  rows = tradeoff.routing_table(true, true, margins_at, GFLOPS, 0.0, [0.04, 0.1],
                                target_met=0.9)
  assert seen == pytest.approx([0.04, 0.1])
  assert rows[0]['exit_histogram'] == [0, 0, 50]  # infinite margins: only the backbone
  assert rows[1]['met_fraction'] == 1.0
  assert set(tradeoff.operating_point(rows[1])) == set(tradeoff.OPERATING_POINT_KEYS)


def test_route_ids_many_is_the_routers_rule_at_every_threshold():
  rng = np.random.default_rng(5)
  scores = rng.uniform(0, 0.3, (64, 3)).astype(np.float32)
  scores[3, 0] = np.nan  # never meets a threshold
  thresholds = np.linspace(0, 0.35, 300)  # more than one chunk of 256
  margins_at = lambda t: np.array([0.05 - t, 0.01, -0.02 * t], np.float32)
  many = tradeoff.route_ids_many(scores, thresholds, margins_at)
  assert many.shape == (300, 64) and many.dtype == np.int32
  for t, ids in zip(thresholds, many):
    np.testing.assert_array_equal(ids, tradeoff.route_ids(scores, t, margins_at(t)))


def test_curve_efficiency_uses_a_grid_dense_enough_to_have_converged():
  """A step curve through few thresholds loses the area between them; the default grid is
  within 0.01 of one four times as dense."""
  true = _exits(400)
  rough = true + np.random.default_rng(3).normal(0, 0.01, true.shape)
  default, curves = tradeoff.efficiency(rough, true, np.zeros(2), GFLOPS, 0.002)
  dense, _ = tradeoff.efficiency(rough, true, np.zeros(2), GFLOPS, 0.002,
                                 num_thresholds=4 * 2048)
  coarse, _ = tradeoff.efficiency(rough, true, np.zeros(2), GFLOPS, 0.002, num_thresholds=12)
  assert default == pytest.approx(dense, abs=0.01)
  assert coarse < default - 0.02
  assert len(curves['routed']) == 128
