"""Paired bootstrap over test samples and the t-interval across seeds."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from fiancee_jax.evaluation import intervals


def test_bootstrap_interval_of_a_mean_has_the_normal_width():
  rng = np.random.default_rng(0)
  x = rng.normal(0.1, 0.02, (2000, 1))
  got = intervals.bootstrap_figures(x, num_resamples=2000, seed=0)['exits'][0]['mean_distance']
  assert got['mean'] == pytest.approx(x.mean())
  lo, hi = got['ci95']
  half = 1.96 * x.std() / np.sqrt(len(x))
  assert lo < x.mean() < hi
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_pairing_narrows_the_difference_of_correlated_exits():
  rng = np.random.default_rng(1)
  hard = rng.uniform(0, 1, 500)
  true = np.stack([0.1 * hard + 0.01 * rng.normal(size=500),
                   0.1 * hard + 0.003 + 0.01 * rng.normal(size=500)], 1)
  got = intervals.bootstrap_figures(true, num_resamples=1000, seed=0)['exits']
  diff = got[1]['difference_to_previous']
  assert diff['mean'] == pytest.approx(true[:, 1].mean() - true[:, 0].mean())
  width = diff['ci95'][1] - diff['ci95'][0]
  marginal = sum(e['mean_distance']['ci95'][1] - e['mean_distance']['ci95'][0] for e in got)
  assert width < 0.3 * marginal
  assert diff['ci95'][0] > 0  # the paired difference is resolved; the marginals overlap
  assert got[0]['mean_distance']['ci95'][1] > got[1]['mean_distance']['ci95'][0]
  assert got[0]['difference_to_previous'] is None


def test_guidance_gain_and_saved_fraction():
  rng = np.random.default_rng(2)
  unguided = rng.uniform(0.05, 0.15, (300, 2))
  guided = unguided * 0.8  # guidance removes 20 % of every distance
  saved = rng.uniform(0.2, 0.6, 300)
  got = intervals.bootstrap_figures(guided, true_unguided=unguided, saved=saved,
                                    num_resamples=200, seed=3)
  for e in got['exits']:
    assert e['guidance_gain']['mean'] == pytest.approx(0.2)
    assert e['guidance_gain']['ci95'] == pytest.approx([0.2, 0.2])
  assert got['saved_fraction']['mean'] == pytest.approx(saved.mean())
  lo, hi = got['saved_fraction']['ci95']
  assert lo < saved.mean() < hi
  again = intervals.bootstrap_figures(guided, true_unguided=unguided, saved=saved,
                                      num_resamples=200, seed=3)
  assert again == got  # seeded
  assert intervals.bootstrap_figures(guided, num_resamples=200)['saved_fraction'] is None


def test_bootstrap_refuses_unpaired_columns():
  with pytest.raises(ValueError, match='same samples'):
    intervals.bootstrap_figures(np.zeros((5, 2)), true_unguided=np.zeros((4, 2)))
  with pytest.raises(ValueError, match='bootstrap_resamples=3'):
    intervals.bootstrap_figures(np.zeros((5, 2)), num_resamples=3)


def _report(seed, value, histogram):
  return {'distance': 'lpips-alex', 'seeds': [seed], 'num_eval': 64,
          'exits': [{'exit': 0, 'mean_distance': value, 'early_exit_miss_rate': None}],
          'routing': [{'threshold': 0.05, 'exit_histogram': histogram}],
          'at_t_star': {'saved_fraction': value * 2, 'early_exit_miss_rate': (
              None if seed == 0 else value)}}


def test_aggregate_seed_reports_gives_means_and_t_intervals():
  values = [0.07, 0.08, 0.075]
  reports = [_report(s, v, [s, 64 - s]) for s, v in enumerate(values)]
  agg = intervals.aggregate_seed_reports(reports)
  assert agg['seeds'] == [0, 1, 2] and agg['num_seeds'] == 3
  assert agg['distance'] == 'lpips-alex' and agg['num_eval'] == 64  # constants kept
  assert agg['exits'][0]['mean_distance'] == pytest.approx(np.mean(values))
  entry = agg['seed_intervals']['exits/0/mean_distance']
  half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
  assert entry['ci95'] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
  assert entry['values'] == pytest.approx(values)
  assert intervals.seed_interval(agg, 'at_t_star/saved_fraction') == pytest.approx(
      [2 * (np.mean(values) - half), 2 * (np.mean(values) + half)])
  assert agg['routing'][0]['exit_histogram'] == [1.0, 63.0]
  assert 'exits/0/exit' not in agg['seed_intervals']
  assert agg['exits'][0]['early_exit_miss_rate'] is None
  # Undefined in one seed: the mean of the others, flagged in the interval's values.
  assert agg['at_t_star']['early_exit_miss_rate'] == pytest.approx(np.mean(values[1:]))
  assert agg['seed_intervals']['at_t_star/early_exit_miss_rate']['values'][0] is None
  one = intervals.aggregate_seed_reports(reports[:1])
  assert one['exits'][0]['mean_distance'] == 0.07 and one['seed_intervals'] == {}


def test_aggregate_refuses_reports_of_different_configs():
  a, b = _report(0, 0.07, [1, 63]), _report(1, 0.08, [2, 62])
  b['distance'] = '1-msssim'
  with pytest.raises(ValueError, match=r"differ at distance: \['lpips-alex', '1-msssim'\]"):
    intervals.aggregate_seed_reports([a, b])
  b = _report(1, 0.08, [2, 62])
  b['routing'].append(b['routing'][0])
  with pytest.raises(ValueError, match='length of routing'):
    intervals.aggregate_seed_reports([a, b])
  with pytest.raises(ValueError, match='at least one'):
    intervals.aggregate_seed_reports([])


@pytest.mark.parametrize('bad', [0, -1, 1.5, True, '3', None])
def test_seeds_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match=r'config\.evaluate\.seeds=.*integer >= 1'):
    intervals.check_seeds(bad)


def test_evaluation_seeds():
  assert intervals.evaluation_seeds(5, 3) == [5, 6, 7]
  assert intervals.check_seeds(np.int64(2)) == 2
