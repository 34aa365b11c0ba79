"""Markdown tables of a finished run, for the README's results section.

  python -m fiancee_jax.evaluation.results_md --workdir=runs/default \
      --backbone_bench=runs/backbone_bench.json > results.md

Reads workdir/report/report.json (one seed, or aggregated over seeds by
intervals.aggregate_seed_reports), workdir/report/bench.json, workdir/timings.jsonl and
the output of `fiancee_jax.evaluation.backbone_bench`; prints markdown. Nothing is typed
by hand: every figure in the README's results section comes from here. Every table is followed
by the distance's anchors; the headline is routing at t*, fixed before any exit was trained.
"""
import json
import os

from absl import app
from absl import flags

from fiancee_jax.evaluation import intervals

_ANCHOR_WORDS = {'blur_sigma1': 'blur sigma 1', 'shift_1px': '1-px shift',
                 'noise_sigma0.03': 'noise sigma 0.03', 'another_z': 'another z'}


def _anchor_words(name: str) -> str:
  if name.startswith('z_average_'):
    return f"mean over {name.removeprefix('z_average_')} z"
  return _ANCHOR_WORDS.get(name, name.replace('_', ' '))


def _fmt(x, digits=3):
  if x is None:
    return 'n/a'
  if isinstance(x, float):
    return f'{x:.{digits}f}'
  return str(x)


def stage_times(workdir: str) -> dict[str, float]:
  """Wall seconds per stage: the last complete run of each stage in timings.jsonl."""
  out = {}
  path = os.path.join(workdir, 'timings.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        out[row['stage']] = row['seconds']
  return out


def _ci(ci) -> str:
  """' (lo-hi)' for a [lo, hi] interval, '' when there is none."""
  if not ci or ci[0] is None:
    return ''
  return f' ({ci[0]:.3f} to {ci[1]:.3f})'


def _figure(r: dict, path: str, value, fallback_ci=None, digits: int = 3) -> str:
  """value with its across-seed interval when the report aggregates seeds, else with
  `fallback_ci` (the paired bootstrap's)."""
  if value is None:
    return 'n/a'
  return _fmt(value, digits) + _ci(intervals.seed_interval(r, path) or fallback_ci)


def _uncalibrated_efficiency(r: dict) -> str:
  return _figure(r, 'curve_efficiency_uncalibrated', r.get('curve_efficiency_uncalibrated'))


def anchors_line(r: dict) -> str:
  """The anchors of the report's distance, for under every table."""
  anchors = r.get('distance_anchors') or {}
  parts = [f'{_anchor_words(k)} {_fmt(v)}' for k, v in anchors.items() if v is not None]
  return (f"Anchors ({r['distance']} from the backbone's output to): " + ', '.join(parts)
          + f"; t* = {_fmt(r['t_star']['value'])}.")


def _operating_point(r: dict, key: str, name: str) -> str:
  p = r[key]
  if p is None:
    return f"{name}: n/a ({r.get(key + '_note', 'not measured')})."
  saved = _figure(r, f'{key}/saved_fraction', p['saved_fraction'], p.get('saved_fraction_ci95'))
  static = p['best_static_saved_fraction']
  static_exit = p.get('best_static_exit')
  per_seed = (r.get('seed_intervals') or {}).get(f'{key}/best_static_exit')
  if static_exit is None:
    static_words = ' (only the backbone qualifies)'
  elif per_seed:  # the seeds' best static exits differ: their mean is no exit
    static_words = f" (exits {', '.join(str(int(v)) for v in per_seed['values'])} by seed)"
  else:
    static_words = f' (exit {static_exit})'
  return (f"{name} (threshold {_fmt(p['threshold'])}): saved {saved}, met "
          f"{_figure(r, f'{key}/met_fraction', p['met_fraction'])}, early-exit miss rate "
          f"{_figure(r, f'{key}/early_exit_miss_rate', p['early_exit_miss_rate'])} "
          f"(on the {_fmt(p['early_exit_fraction'], 2)} of inputs sent to an exit), p95 distance "
          f"{_fmt(p['p95_distance'])}. Saved by the oracle {_fmt(p['oracle_saved_fraction'])}, by "
          f"the best static exit {_fmt(static)}{static_words}"
          f", by a random mixture {_fmt(p['random_mix_saved_fraction'])}.")


def render(workdir: str, backbone_bench: dict | None) -> str:
  with open(os.path.join(workdir, 'report', 'report.json')) as f:
    r = json.load(f)
  bench = None
  if os.path.exists(os.path.join(workdir, 'report', 'bench.json')):
    with open(os.path.join(workdir, 'report', 'bench.json')) as f:
      bench = json.load(f)
  lines = render_report(r)
  if bench is not None:
    lines.append('')
    lines.append('Benchmark (`report/bench.md` has the full tables):')
    lines.append('')
    lines.append(_bench_summary(bench))
  times = stage_times(workdir)
  if times:
    lines.append('')
    lines.append('Wall time per stage (s): ' + ', '.join(f'{k} {v:.0f}' for k, v in times.items())
                 + '.')
  if backbone_bench:
    lines.append('')
    bb = backbone_bench
    lines.append(f"Backbone forward at batch {bb['batch_size']}: {bb['backbone_gflop_per_s']:.1f} "
                 f"GFLOP/s = {bb['ratio']:.0%} of the {bb['matmul_gflop_per_s']:.1f} GFLOP/s a "
                 f"2048^2 `jnp.dot` reached in the same run ({bb['hardware']}).")
  return '\n'.join(lines)


def write_table(out_dir: str, stem: str, result: dict, text: str) -> None:
  """Writes a script's figures as OUT_DIR/STEM.json and their markdown table as
  OUT_DIR/STEM.md (text, newline-terminated), creating OUT_DIR; prints the table."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{stem}.json'), 'w') as f:
    json.dump(result, f, indent=2)
  text = text if text.endswith('\n') else text + '\n'
  with open(os.path.join(out_dir, f'{stem}.md'), 'w') as f:
    f.write(text)
  print(text, end='')


def threshold_label(r: dict, t: float) -> str:
  """Where a routing threshold comes from: 't*', '0.5 t*', an anchor's name, 'LPIPS 0.1'."""
  names = []
  for k, v in (r.get('distance_anchors') or {}).items():
    if v is not None and abs(v - t) <= 1e-9 * max(1.0, abs(t)):
      names.append(_anchor_words(k))
  t_star = r['t_star']['value']
  if abs(t - t_star) <= 1e-9 * max(1.0, t_star):
    names.insert(0, 't*')
  elif not names and t_star > 0 and abs(round(t / t_star, 2) * t_star - t) <= 1e-9 * max(1.0, t):
    names.append(f'{t / t_star:g} t*')
  if r['distance'].startswith('lpips') and abs(t - 0.1) <= 1e-12:
    names.append('LPIPS 0.1')
  return ', '.join(names) or '-'


# Routing rows the README's table leaves to results.md: unnamed thresholds, and anchors far
# below any exit's reach at these scales.
HEADLINE_SKIPS = ('-', _anchor_words('noise_sigma0.03'), _anchor_words('z_average_8'))


def headline(r: dict) -> str:
  """The README's compact table of a report: every exit's cost and distance, then routing at
  each threshold that is not a multiple of t* (t*, the anchors, LPIPS 0.1)."""
  b = r['backbone']
  seeds = r.get('seeds') or []
  lines = [f"{r['distance']} to the backbone's output, {r['num_eval']} test inputs at "
           f"{r['resolution'][0]}x{r['resolution'][1]}, mean over {len(seeds)} seed(s) "
           '(95 % interval across seeds; one seed: paired bootstrap).', '',
           '| exit | GFLOPs (share) | distance | no guidance | minus previous exit |',
           '|---|---|---|---|---|']
  for k, e in enumerate(r['exits']):
    diff = e.get('difference_to_previous')
    mean = _figure(r, f'exits/{k}/mean_distance', e['mean_distance'],
                   e.get('mean_distance_ci95'))
    no_guide = _figure(r, f'exits/{k}/mean_distance_no_guidance',
                       e.get('mean_distance_no_guidance'))
    diff = (_figure(r, f'exits/{k}/difference_to_previous/mean', diff['mean'], diff['ci95'])
            if diff else '-')
    lines.append(f"| {k} | {_fmt(e['gflops'], 3)} ({e['gflops'] / b['gflops']:.0%}) | {mean} | "
                 f'{no_guide} | {diff} |')
  lines.append(f"| backbone | {_fmt(b['gflops'], 3)} (100%) | 0 | - | - |")
  lines += ['', '| threshold | what | routed saved | met | early-exit miss rate | oracle saved | '
            'best static saved | random mixture saved |', '|---|---|---|---|---|---|---|---|']
  for i, row in enumerate(r['routing']):
    what = threshold_label(r, row['threshold'])
    if what in HEADLINE_SKIPS or (what.endswith(' t*') and 'LPIPS' not in what):
      continue
    lines.append(
        f"| {_fmt(row['threshold'])} | {what} | "
        f"{_figure(r, f'routing/{i}/saved_fraction', row['saved_fraction'])} | "
        f"{_fmt(row['met_fraction'])} | {_fmt(row.get('early_exit_miss_rate'))} | "
        f"{_fmt(row['oracle_saved_fraction'])} | {_fmt(row['best_static_saved_fraction'])} | "
        f"{_fmt(row.get('random_mix_saved_fraction'))} |")
  lines += ['', f"Curve efficiency (random mixture 0, oracle 1): "
            f"{_figure(r, 'curve_efficiency', r.get('curve_efficiency'))} (uncalibrated "
            f"{_uncalibrated_efficiency(r)}). " + anchors_line(r)]
  return '\n'.join(lines)


def render_report(r: dict) -> list[str]:
  """Markdown lines of a report.json (one seed, or aggregated over seeds)."""
  lines = []
  b = r['backbone']
  seeds = r.get('seeds') or []
  over = (f"; means over {len(seeds)} seeds ({', '.join(map(str, seeds))}) with 95 % "
          't-intervals across seeds' if len(seeds) > 1 else '')
  ci_note = (' Intervals in parentheses: 95 %, paired bootstrap over the test inputs'
             f" ({r['intervals']['resamples']} resamples)" if 'intervals' in r and len(seeds) < 2
             else '')
  lines.append(f"Distance: **{r['distance']}** (to the backbone's output), {r['num_eval']} "
               f"test inputs at {r['resolution'][0]}x{r['resolution'][1]}{over}.{ci_note}")
  lines.append('')
  lines.append(f"t* = {_fmt(r['t_star']['value'])}: {r['t_star']['definition']}.")
  lines.append('')
  lines.append('| exit | attach after block | GFLOPs | share of backbone | params | mean distance '
               '(guided) | p95 | 1 - MS-SSIM | mean distance (no guidance) | guidance gain | '
               'minus previous exit |')
  lines.append('|---|---|---|---|---|---|---|---|---|---|---|')
  for k, e in enumerate(r['exits']):
    gain = e.get('guidance_gain')
    diff = e.get('difference_to_previous')
    no_guide = _fmt(e.get('mean_distance_no_guidance'))
    if e.get('gflops_no_guidance') is not None:
      no_guide += f" at {_fmt(e['gflops_no_guidance'], 4)} GFLOPs"
    mean = _figure(r, f'exits/{k}/mean_distance', e['mean_distance'],
                   e.get('mean_distance_ci95'))
    gain = (_figure(r, f'exits/{k}/guidance_gain/mean', gain['mean'], gain['ci95'])
            if gain else 'n/a')
    diff = (_figure(r, f'exits/{k}/difference_to_previous/mean', diff['mean'], diff['ci95'])
            if diff else '-')
    lines.append(
        f"| {e['exit']} | {e['attach_after']} | {_fmt(e['gflops'], 4)} | "
        f"{e['gflops'] / b['gflops']:.1%} | {_fmt(e['params'])} | {mean} | "
        f"{_fmt(e.get('p95_distance'))} | {_fmt(e.get('mean_distance_msssim'))} | {no_guide} | "
        f"{gain} | {diff} |")
  lines.append(f"| backbone | - | {_fmt(b['gflops'], 4)} | 100% | {b['params']} | 0 | 0 | 0 | 0 "
               '| - | - |')
  lines.append('')
  lines.append(anchors_line(r))
  lines.append('')
  share = b.get('broadcast_z_share')
  lines.append('Guidance gain: 1 - guided / unguided mean distance (> 0: guidance helps). '
               'Share of the backbone\'s MACs that convolve the broadcast z: '
               f"{'n/a' if share is None else f'{share:.1%}'}.")
  lines.append('')
  p, d = r['predictor'], r['database']
  lines.append(f"Predictor: {_fmt(p['gflops'], 4)} GFLOPs ({p['gflops'] / b['gflops']:.2%} of the "
               f"backbone), MAE {_fmt(p['mae'])}, Spearman per exit "
               + ', '.join(_fmt(x['spearman'], 2) for x in p['per_exit']) + '. '
               f"Database: {d['entries']} entries, {d['bytes'] / 1e6:.2f} MB, lookup "
               f"{_fmt(d['lookup_gflops'], 4)} GFLOPs ({d['lookup_gflops'] / b['gflops']:.2%}).")
  lines.append('')
  lines.append(_operating_point(r, 'at_t_star', '**At t\\***'))
  lines.append('')
  lines.append(_operating_point(r, 'at_lpips_0.1', 'At the paper\'s LPIPS 0.1'))
  lines.append('')
  saved = (r.get('efficiency_curves') or {}).get('mean_saved')
  areas = ('' if not saved else f" (mean saved over the range of mean distances: routed "
           f"{_fmt(saved['routed'])}, oracle {_fmt(saved['oracle'])}, random mixture "
           f"{_fmt(saved['random_mix'])})")
  lines.append(f"Curve efficiency (area under saved vs mean distance; random mixture 0, oracle "
               f"1): {_figure(r, 'curve_efficiency', r.get('curve_efficiency'))}{areas}; "
               f"with zero margins (no calibration): {_uncalibrated_efficiency(r)}.")
  lines.append('')
  c = r['calibration']
  per_threshold = c.get('margins_per_threshold')
  if c.get('margins') is not None:
    margins = 'margins ' + ', '.join(_fmt(m) for m in c['margins'])
  else:
    margins = 'a margin per threshold'
  lines.append(f"Routing on the test split (calibration: {c['method']}, target share "
               f"{c['target_met']}, {margins}); thresholds fixed before any exit was trained "
               "(multiples of t*, the backbone's own anchors, and 0.1 for LPIPS):")
  lines.append('')
  lines.append('| threshold | what | margin | met | early-exit miss rate | p95 distance | saved | '
               'oracle saved | best static saved | random mixture saved | exit histogram |')
  lines.append('|---|---|---|---|---|---|---|---|---|---|---|')
  for i, row in enumerate(r['routing']):
    m = per_threshold[i] if per_threshold else c['margins']
    m = ', '.join('inf' if x is None else _fmt(x) for x in m)
    lines.append(f"| {_fmt(row['threshold'])} | {threshold_label(r, row['threshold'])} | {m} | "
                 f"{_fmt(row['met_fraction'])} | "
                 f"{_fmt(row.get('early_exit_miss_rate'))} | {_fmt(row.get('p95_distance'))} | "
                 f"{_fmt(row['saved_fraction'])} | {_fmt(row['oracle_saved_fraction'])} | "
                 f"{_fmt(row['best_static_saved_fraction'])} | "
                 f"{_fmt(row.get('random_mix_saved_fraction'))} | "
                 f"{' / '.join(str(round(x)) for x in row['exit_histogram'])} |")
  lines.append('')
  lines.append(anchors_line(r))
  if 'ground_truth' in r:
    lines.append('')
    lines.append(_truth_table(r['ground_truth']))
  if 'fid' in r:
    lines.append('')
    lines.append(f"FID against {r['fid']['num_images']} real test images: " + ', '.join(
        f"{'backbone' if e['exit'] == len(r['fid']['exits']) - 1 else 'exit %d' % e['exit']} "
        f"{e['fid']:.1f}" for e in r['fid']['exits']) + '.')
  return lines


def _truth_table(gt: dict) -> str:
  """Distances to the ground truth (reenactment cross pairs) and the copy baselines."""
  out = [f"Against the ground truth ({gt['num_eval']} cross pairs, {gt['distance']} and L1):", '',
         '| output | distance to truth | L1 to truth |', '|---|---|---|']
  n = len(gt['exits'])
  for e in gt['exits']:
    name = 'backbone' if e['exit'] == n - 1 else f"exit {e['exit']}"
    out.append(f"| {name} | {e['distance']:.3f} | {e['l1']:.3f} |")
  for key in ('copy_source', 'copy_driver'):
    out.append(f"| {key.replace('_', ' ')} | {gt[key]['distance']:.3f} | {gt[key]['l1']:.3f} |")
  out += ['', f"The backbone is closer to the truth than copying the source on "
          f"{gt['backbone_better_than_copy_source_fraction']:.0%} of the pairs."]
  return '\n'.join(out)


def _bench_summary(bench: dict) -> str:
  """Headline tables of bench.json (keys as written by evaluation/benchmark.py)."""
  out = [f"Hardware: {bench['hardware']}; matmul {bench['matmul_gflops_per_s']:.0f} GFLOP/s "
         f"in the same run; batch {bench['batch_size']}.", '',
         '| exit | GFLOPs | batch 1 median (p90) ms | batch median (p90) ms | images/s |',
         '|---|---|---|---|---|']
  for e in bench['exits']:
    name = 'backbone' if e.get('is_backbone') else str(e['exit'])
    out.append(f"| {name} | {e['gflops']:.4f} | {e['batch1']['median_ms']:.2f} "
               f"({e['batch1']['p90_ms']:.2f}) | {e['batch']['median_ms']:.2f} "
               f"({e['batch']['p90_ms']:.2f}) | {e['images_per_s']:.0f} |")
  out += ['', '| threshold | routed images/s | backbone images/s | measured speedup | '
          'FLOPs-predicted speedup | measured / predicted | latency-model speedup | '
          'measured / latency model | exit histogram |',
          '|---|---|---|---|---|---|---|---|---|']
  for r in bench['routing']:
    lat = r.get('latency_speedup')  # bench.json files from before the latency model lack it
    lat_cols = (f"{lat:.2f} | {r['measured_speedup'] / lat:.2f}" if lat else '- | -')
    out.append(f"| {r['threshold']:.3f} | {r['images_per_s']:.0f} | "
               f"{r['backbone_images_per_s']:.0f} "
               f"| {r['measured_speedup']:.2f} | {r['flops_speedup']:.2f} | "
               f"{r['measured_speedup'] / r['flops_speedup']:.2f} | {lat_cols} | "
               f"{' / '.join(str(x) for x in r['exit_histogram'])} |")
  if bench.get('exit_parts'):
    out += ['', f"Where each exit's time goes at batch {bench['batch_size']} (each part "
            'compiled and timed alone; ms, GFLOP/s):', '']
    for x in bench['exit_parts']:
      name = 'backbone' if x['exit'] == len(bench['exit_parts']) - 1 else f"exit {x['exit']}"
      out.append(f'- {name}: ' + ', '.join(
          f"{p['part']} {p['ms']:.0f} ms ({p['gflop_per_s']:.0f} GFLOP/s)" for p in x['parts']))
  sw = bench['switch']['per_exit']
  v = bench['vmap_switch']
  out += ['', 'Batch-1 `lax.switch` over calling the exit directly: '
          + ', '.join(f"exit {x['exit']} x{x['overhead_ratio']:.3f}"
                      + (' ({:.3f}-{:.3f})'.format(*x['overhead_ratio_ci95'])
                         if 'overhead_ratio_ci95' in x else '') for x in sw)
          + (f" (median of {bench['protocol']['switch_rounds']} interleaved rounds, 95 % "
             'interval)' if 'switch_rounds' in bench['protocol'] else '')
          + f". vmap of a per-sample switch: {v['ratio_to_backbone']:.2f}x the backbone's time "
          f"({v['gflops']:.3f} vs {v['backbone_gflops']:.3f} GFLOPs: every exit runs for every "
          'sample).']
  ab = bench.get('kernels', {}).get('ab')
  if ab:
    used = ', '.join(f'{op} {impl}' for op, impl in bench['kernels']['model'].items() if impl)
    ref = ', '.join(f'{op} {impl}' for op, impl in bench['kernels']['reference'].items() if impl)
    out += ['', f"Kernels (`ops/kernels.py`): the model ran on {used}; each exit path at batch "
            f"{bench['batch_size']} built a second time on {ref} and timed interleaved over "
            f"{ab[0]['rounds']} rounds:", '',
            '| exit | reference ms | ms | speedup (95 % interval) | GFLOPs reference / model '
            '| efficiency vs backbone, reference / model |', '|---|---|---|---|---|---|']
    for r in ab:
      out.append(f"| {r['exit']} | {r['reference_ms']:.1f} | {r['ms']:.1f} | {r['speedup']:.2f} "
                 '({:.2f}-{:.2f}) | '.format(*r['speedup_ci95'])
                 + f"{r['reference_gflops']:.2f} / {r['gflops']:.2f} | "
                 f"{r['reference_efficiency']:.2f} / {r['efficiency']:.2f} |")
    out += ['', "Efficiency: the exit's GFLOP/s over the backbone's, i.e. the measured over the "
            'FLOPs-predicted speedup of sending every sample to that exit (predictor and '
            'router aside).']
  return '\n'.join(out)


def main(argv):
  del argv
  bb = None
  if _BB.value:
    with open(_BB.value) as f:
      bb = json.load(f)
  print(render(_WORKDIR.value, bb))


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A finished workdir.', required=True)
  _BB = flags.DEFINE_string('backbone_bench', '', 'JSON written by backbone_bench --out.')
  app.run(main)
