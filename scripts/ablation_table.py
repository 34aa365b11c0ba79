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
support. With --routing, a second table gives the routing figures the same way: the
predictor's share of the backbone's GFLOPs and Spearman per exit, curve_efficiency (calibrated
and with zero margins) and the saved fraction at t* and at LPIPS 0.1. Writes
OUT/ablations.json and OUT/ablations.md.
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
from fiancee_jax.evaluation import results_md

_VARIANTS = flags.DEFINE_multi_string('variant', [], 'NAME:DIR with report_seed*.json.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_ROUTING = flags.DEFINE_bool('routing', False, 'Add the routing table.')

# (label, path into report.json) of the --routing table's scalar figures.
ROUTING_FIGURES = (
    ('predictor GFLOPs / backbone', 'predictor_gflops_fraction'),
    ('curve efficiency', 'curve_efficiency'),
    ('curve efficiency, zero margins', 'curve_efficiency_uncalibrated'),
    ('saved at t*', 'at_t_star/saved_fraction'),
    ('saved at LPIPS 0.1', 'at_lpips_0.1/saved_fraction'),
)


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


def _check(variants: Sequence[tuple[str, dict[int, dict]]]) -> list[int]:
  """The reference's seeds, after checking every variant has them and the same distance."""
  ref_name, ref = variants[0]
  seeds = sorted(ref)
  for name, reports in variants:
    if sorted(reports) != seeds:
      raise ValueError(f'{name} has seeds {sorted(reports)}, the reference {seeds}')
    if {r['distance'] for r in reports.values()} != {ref[seeds[0]]['distance']}:
      raise ValueError(f'{name} measures another distance than {ref_name}')
  return seeds


def _paired(values: Sequence[float], reference: Sequence[float] | None) -> dict:
  """Mean and t-interval over seeds; with `reference` (same seeds), the paired difference."""
  v = np.asarray(values, np.float64)
  out = {'mean': float(v.mean()), 'ci95': intervals.t_interval(v.tolist())}
  if reference is not None:
    diff = v - np.asarray(reference, np.float64)
    out.update(difference=float(diff.mean()), difference_ci95=intervals.t_interval(diff.tolist()))
  return out


def table(variants: Sequence[tuple[str, dict[int, dict]]]) -> dict:
  """The ablation figures of `variants` [(name, {seed: report})]; the first is the reference."""
  ref_name, ref = variants[0]
  seeds = _check(variants)
  rows = []
  for name, reports in variants:
    exits = []
    for k in range(len(reports[seeds[0]]['exits'])):
      distances = lambda rs: [rs[s]['exits'][k]['mean_distance'] for s in seeds]
      exits.append({'exit': k, 'gflops_fraction': reports[seeds[0]]['exits'][k]['gflops_fraction'],
                    **_paired(distances(reports), None if name == ref_name else distances(ref))})
    rows.append({'variant': name, 'exits': exits})
  return {'distance': ref[seeds[0]]['distance'], 'seeds': seeds, 'reference': ref_name,
          'rows': rows}


def figure(report: dict, path: str) -> float | None:
  """The number at a '/'-joined path of report.json ('at_t_star/saved_fraction'); the
  derived 'predictor_gflops_fraction' and 'predictor_spearman/K' too; None if absent."""
  if path == 'predictor_gflops_fraction':
    return report['predictor']['gflops'] / report['backbone']['gflops']
  if path.startswith('predictor_spearman/'):
    return report['predictor']['per_exit'][int(path.split('/')[1])]['spearman']
  value = report
  for part in path.split('/'):
    if not isinstance(value, dict) or value.get(part) is None:
      return None
    value = value[part]
  return float(value)


def routing_table(variants: Sequence[tuple[str, dict[int, dict]]]) -> list[dict]:
  """Per variant, ROUTING_FIGURES and each exit's predictor Spearman: the mean over seeds
  with a t-interval and, but for the reference (the first), the difference paired by seed."""
  ref_name, ref = variants[0]
  seeds = _check(variants)
  num_exits = len(ref[seeds[0]]['exits'])
  paths = list(ROUTING_FIGURES) + [(f'predictor Spearman, exit {k}', f'predictor_spearman/{k}')
                                   for k in range(num_exits)]
  rows = []
  for name, reports in variants:
    figures = []
    for label, path in paths:
      values = [figure(reports[s], path) for s in seeds]
      base = [figure(ref[s], path) for s in seeds]
      if None in values:
        figures.append({'figure': label, 'path': path, 'mean': None})
        continue
      paired = name != ref_name and None not in base
      figures.append({'figure': label, 'path': path,
                      **_paired(values, base if paired else None)})
    rows.append({'variant': name, 'figures': figures})
  return rows


def markdown(result: dict) -> str:
  def ci(v, digits=3):
    return f'({v[0]:.{digits}f} to {v[1]:.{digits}f})' if v and None not in v else ''
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
  if result.get('routing'):
    lines += ['', f"Routing on the test split, over the same seeds; change against "
              f"{result['reference']} paired by seed.", '',
              '| variant | figure | value | change |', '|---|---|---|---|']
    for row in result['routing']:
      for f in row['figures']:
        if f['mean'] is None:
          lines.append(f"| {row['variant']} | {f['figure']} | n/a | |")
          continue
        change = (f"{f['difference']:+.3f} {ci(f['difference_ci95'])}" if 'difference' in f
                  else ('reference' if row['variant'] == result['reference'] else ''))
        lines.append(f"| {row['variant']} | {f['figure']} | {f['mean']:.4f} "
                     f"{ci(f['ci95'], 4)} | {change} |")
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
  if _ROUTING.value:
    result['routing'] = routing_table(variants)
  results_md.write_table(_OUT.value, 'ablations', result, markdown(result))


if __name__ == '__main__':
  app.run(main)
