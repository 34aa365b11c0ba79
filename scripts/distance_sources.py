"""How much of an exit's distance is a property of the input? Read from a run's own targets.

  python scripts/distance_sources.py --workdir=runs/default --out=docs/results/distance_sources

The predictor stage measures every exit's distance to the backbone on
config.predictor.num_train training label maps, each under config.predictor.z_draws draws of
z (WORKDIR/cache/distances_train_*.npz). Per seed (the workdir for seed 0, WORKDIR/seeds/S
for the others) and exit:

- ICC: the share of the distance's variance that lies between label maps (one-way random
  effects ICC(1) over the draws): what a predictor that sees the map but not z can explain
  at most;
- Spearman between two draws: how well the distance under one z ranks the distance under
  another, for the same maps (a map-only predictor's ranking ceiling, roughly);
- the predictor's Spearman on the test split (WORKDIR/seeds/S/report/report.json), which
  sees map and z.

And for routing as a whole (tradeoff.efficiency, zero margins, the run's exit and predictor
GFLOPs): the curve efficiency of a map-only oracle, which predicts each draw's distances by
the mean over the map's other draws (the best a predictor that cannot foresee z's effect
does, up to the noise of that mean), beside the run's predictor on test, uncalibrated and
calibrated.

Writes OUT/distance_sources.json and OUT/distance_sources.md.
"""
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app
from absl import flags
from scipy import stats

from fiancee_jax import replicates
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import intervals
from fiancee_jax.evaluation import results_md
from fiancee_jax.evaluation import tradeoff

FLAGS = flags.FLAGS


def icc1(x: np.ndarray) -> float:
  """ICC(1) of x [draws, maps]: between-map variance share, one-way random effects."""
  k, n = x.shape
  grand = x.mean()
  msb = k * np.sum((x.mean(0) - grand) ** 2) / (n - 1)
  msw = np.sum((x - x.mean(0)) ** 2) / (n * (k - 1))
  return float((msb - msw) / (msb + (k - 1) * msw))


def map_only_efficiency(x: np.ndarray, exit_gflops: np.ndarray,
                        predictor_gflops: float) -> float | None:
  """Mean over held-out draws d of tradeoff.efficiency (zero margins) with predictions = the
  mean of the map's other draws; x [draws, maps, E - 1], exit_gflops [E] (backbone last)."""
  values = [tradeoff.efficiency(np.delete(x, d, 0).mean(0), x[d],
                                np.zeros(x.shape[2], np.float32), exit_gflops,
                                predictor_gflops)[0] for d in range(x.shape[0])]
  return None if None in values else float(np.mean(values))


def seed_figures(workdir: str, report_dir: str) -> dict:
  """The figures of one seed's workdir; report_dir: that seed's own report directory (the
  run's report/ aggregates the seeds)."""
  config = workdir_lib.read_config(workdir)
  p = config.predictor
  draws, n = p.z_draws, p.num_train
  if draws < 2:
    raise SystemExit(f'{workdir}: config.predictor.z_draws={draws}; two draws are needed')
  variant = 'guided' if config.exits.guided else 'unguided'
  path = os.path.join(workdir, 'cache', f'distances_train_{variant}.npz')
  with np.load(path) as f:
    d = f['distances']
  if d.shape[0] != draws * n:
    raise SystemExit(f'{path} holds {d.shape[0]} rows, expected z_draws x num_train = '
                     f'{draws * n}')
  seed = int(config.seed)
  with open(os.path.join(report_dir, 'report.json')) as f:
    report = json.load(f)
  per_exit = {e['exit']: e['spearman'] for e in report['predictor']['per_exit']}
  x = d.reshape(draws, n, -1)  # draw j of map i at row j * n + i
  g = np.asarray([e['gflops'] for e in report['exits']] + [report['backbone']['gflops']])
  routing = {'map_only_oracle': map_only_efficiency(x, g, report['predictor']['gflops']),
             'predictor_uncalibrated': report.get('curve_efficiency_uncalibrated'),
             'predictor_calibrated': report.get('curve_efficiency'),
             'predictor_gflops_fraction': report['predictor']['gflops'] / g[-1]}
  return {'seed': seed, 'curve_efficiency': routing, 'exits': [
      {'exit': k, 'icc': icc1(x[:, :, k]),
       'spearman_between_draws': float(stats.spearmanr(x[0, :, k], x[1, :, k])[0]),
       'predictor_spearman_test': per_exit.get(k)} for k in range(x.shape[2])]}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('give --workdir and --out')
  config = workdir_lib.read_config(FLAGS.workdir)
  seeds = [seed_figures(replicates.seed_workdir(config, FLAGS.workdir, s),
                        replicates.report_dir(FLAGS.workdir, s))
           for s in replicates.seeds(config)]
  rows = []
  for k in range(len(seeds[0]['exits'])):
    row = {'exit': k}
    for key in ('icc', 'spearman_between_draws', 'predictor_spearman_test'):
      v = [s['exits'][k][key] for s in seeds if s['exits'][k][key] is not None]
      row[key] = {'mean': float(np.mean(v)), 'ci95': intervals.t_interval(v)}
    rows.append(row)
  efficiency = {}
  for key in seeds[0]['curve_efficiency']:
    v = [s['curve_efficiency'][key] for s in seeds if s['curve_efficiency'][key] is not None]
    efficiency[key] = {'mean': float(np.mean(v)), 'ci95': intervals.t_interval(v)} if v else None
  result = {'workdir': FLAGS.workdir, 'distance': config.distance.name,
            'num_maps': config.predictor.num_train, 'z_draws': config.predictor.z_draws,
            'rows': rows, 'curve_efficiency': efficiency, 'seeds': seeds}

  def cell(v):
    lo, hi = v['ci95']
    return f"{v['mean']:.3f}" + ('' if lo is None else f' ({lo:.3f} to {hi:.3f})')

  lines = [f"Each exit's {result['distance']} to the backbone on {result['num_maps']} training "
           f"label maps x {result['z_draws']} z draws (the predictor's targets), seeds "
           f"{[s['seed'] for s in seeds]}; mean over seeds (95 % t-interval).", '',
           '| exit | share of variance between maps (ICC) | Spearman, one z vs another | '
           'predictor Spearman on test (map and z) |', '|---|---|---|---|']
  lines += [f"| {r['exit']} | {cell(r['icc'])} | {cell(r['spearman_between_draws'])} | "
            f"{cell(r['predictor_spearman_test'])} |" for r in rows]
  e = efficiency
  show = lambda key: 'n/a' if e[key] is None else cell(e[key])
  lines += ['', f"Curve efficiency (random mixture 0, oracle 1), the predictor costing "
            f"{e['predictor_gflops_fraction']['mean']:.2%} of the backbone's GFLOPs:", '',
            '| predictor | curve efficiency |', '|---|---|',
            f"| map-only oracle: each map's mean distance over its other z draws, zero margins "
            f"(training maps) | {show('map_only_oracle')} |",
            f"| the run's predictor, zero margins (test) | {show('predictor_uncalibrated')} |",
            f"| the run's predictor, calibrated (test) | {show('predictor_calibrated')} |"]
  results_md.write_table(FLAGS.out, 'distance_sources', result, '\n'.join(lines))


if __name__ == '__main__':
  # Defined only when run as a program, so that importing the module adds no flags.
  flags.DEFINE_string('workdir', None, 'A finished run (predictor stage done).')
  flags.DEFINE_string('out', None, 'Output directory.')
  app.run(main)
