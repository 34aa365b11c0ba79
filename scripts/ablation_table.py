"""Ablation table over seeds: each exit's distance per variant, and each variant's change
against the first (the reference), paired by seed.

  python scripts/ablation_table.py --out=docs/results/ablations \
      --variant='z-aware (default):docs/results/landscapes' \
      --variant='z-blind:docs/results/ablation_zblind'

A variant is NAME:DIR, DIR holding report_seed{S}.json files (`scripts/publish_results.py`
writes them), all with the same seeds, test inputs and distance. Per exit: the mean over seeds
of the exit's mean test distance with a 95 % t-interval across seeds, and for every variant
but the reference, its difference to the reference seed by seed (same seed = same data order
and test z) with a t-interval; an interval that excludes 0 is a difference the seeds
support. Writes OUT/ablations.json and OUT/ablations.md.
"""
import glob
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from absl import app
from absl import flags

from fiancee_jax.evaluation import intervals

_VARIANTS = flags.DEFINE_multi_string('variant', [], 'NAME:DIR with report_seed*.json.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')


def read_seed_reports(directory: str) -> dict[int, dict]:
  """{seed: report} from DIR/report_seed{S}.json."""
  reports = {}
  for path in glob.glob(os.path.join(directory, 'report_seed*.json')):
    seed = int(re.search(r'report_seed(\d+)\.json$', path).group(1))
    with open(path) as f:
      reports[seed] = json.load(f)
  if not reports:
    raise ValueError(f'no report_seed*.json in {directory}')
  return reports


def table(variants: Sequence[tuple[str, dict[int, dict]]]) -> dict:
  """The ablation figures of `variants` [(name, {seed: report})]; the first is the reference."""
  ref_name, ref = variants[0]
  seeds = sorted(ref)
  for name, reports in variants:
    if sorted(reports) != seeds:
      raise ValueError(f'{name} has seeds {sorted(reports)}, the reference {seeds}')
    if {r['distance'] for r in reports.values()} != {ref[seeds[0]]['distance']}:
      raise ValueError(f'{name} measures another distance than {ref_name}')
  rows = []
  for name, reports in variants:
    exits = []
    for k in range(len(reports[seeds[0]]['exits'])):
      d = np.asarray([reports[s]['exits'][k]['mean_distance'] for s in seeds])
      g = reports[seeds[0]]['exits'][k]['gflops_fraction']
      row = {'exit': k, 'gflops_fraction': g, 'mean': float(d.mean()),
             'ci95': intervals.t_interval(d.tolist())}
      if name != ref_name:
        diff = d - np.asarray([ref[s]['exits'][k]['mean_distance'] for s in seeds])
        row.update(difference=float(diff.mean()),
                   difference_ci95=intervals.t_interval(diff.tolist()))
      exits.append(row)
    rows.append({'variant': name, 'exits': exits})
  return {'distance': ref[seeds[0]]['distance'], 'seeds': seeds, 'reference': ref_name,
          'rows': rows}


def markdown(result: dict) -> str:
  def ci(v):
    return f'({v[0]:.3f} to {v[1]:.3f})' if v and None not in v else ''
  lines = [f"Mean {result['distance']} of each exit to the backbone on the test split, over "
           f"seeds {result['seeds']} (95 % t-interval); change against "
           f"{result['reference']} paired by seed.", '',
           '| variant | exit | share of backbone GFLOPs | distance | change |',
           '|---|---|---|---|---|']
  for row in result['rows']:
    for e in row['exits']:
      change = (f"{e['difference']:+.3f} {ci(e['difference_ci95'])}" if 'difference' in e
                else 'reference')
      lines.append(f"| {row['variant']} | {e['exit']} | {e['gflops_fraction']:.0%} | "
                   f"{e['mean']:.3f} {ci(e['ci95'])} | {change} |")
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if len(_VARIANTS.value) < 2 or not _OUT.value:
    raise app.UsageError('give --out and at least two --variant=NAME:DIR')
  variants = []
  for spec in _VARIANTS.value:
    name, sep, directory = spec.rpartition(':')
    if not sep or not name:
      raise app.UsageError(f'--variant={spec!r}: expected NAME:DIR')
    variants.append((name, read_seed_reports(directory)))
  result = table(variants)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, 'ablations.json'), 'w') as f:
    json.dump(result, f, indent=2)
  text = markdown(result)
  with open(os.path.join(_OUT.value, 'ablations.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  app.run(main)
