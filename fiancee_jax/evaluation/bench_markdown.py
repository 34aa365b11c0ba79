"""bench.json (evaluation/benchmark.py) rendered as markdown tables: `render_markdown`."""
from collections.abc import Sequence
from typing import Any


def _fmt(x: Any, nd: int = 3) -> str:
  if isinstance(x, float):
    return f'{x:.{nd}g}' if abs(x) < 1e3 else f'{x:.0f}'
  return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _interval(ci: Sequence[float] | None) -> str:
  return '-' if ci is None else f'{ci[0]:.3f} - {ci[1]:.3f}'


def _matmul(bench: dict[str, Any]) -> str:
  """'X GFLOP/s float32, Y GFLOP/s bfloat16' (float32 alone in an older bench.json)."""
  by_dtype = bench.get('matmul_gflops_per_s_by_dtype') or {
      'float32': bench['matmul_gflops_per_s']}
  return ', '.join(f'{_fmt(v)} GFLOP/s {d}' for d, v in by_dtype.items())


def _switch_protocol(bench: dict[str, Any]) -> str:
  rounds = bench['protocol'].get('switch_rounds')
  if rounds is None:  # bench.json from before interleaved timing
    return (f"Switch and direct timed in separate loops of {bench['protocol']['iters']} calls; "
            'ratio of their medians.')
  return (f'Each pair timed interleaved over {rounds} rounds; ratio: median of the per-round '
          'ratios, with its 95 % interval.')


def _parts_markdown(bench: dict[str, Any]) -> list[str]:
  if not bench.get('exit_parts'):  # not measured, or written before the breakdown existed
    return []
  rows = [[x['exit'], p['part'], p['ms'], p['gflops'], p['gflop_per_s']]
          for x in bench['exit_parts'] for p in x['parts']]
  return [f"### Where each exit's time goes (batch {bench['batch_size']}, each part timed alone)",
          '', _table(['exit', 'part', 'ms', 'XLA GFLOPs', 'GFLOP/s'], rows), '',
          'Exits run at fewer GFLOP/s than the backbone where their thin branches dominate: '
          'that, not routing, is the gap between the FLOPs-predicted and measured speedups.',
          '']


def _source(op_name: str) -> str:
  """The JAX operation of an HLO instruction without the outer `jit(fn)/` (model path kept)."""
  parts = op_name.split('/')
  return '/'.join(parts[1:] if len(parts) > 1 and parts[0].startswith('jit(') else parts) or '-'


def _profile_markdown(bench: dict[str, Any]) -> list[str]:
  profile = bench.get('profile')
  if not profile or not profile.get('exits'):  # written before profiles were recorded
    return []
  b = bench['batch_size']
  where = []
  if profile.get('hlo_dir'):
    where.append(f"optimised HLO and memory analysis in `{profile['hlo_dir']}/`")
  if profile.get('trace_dir'):
    where.append(f"profiler traces in `{profile['trace_dir']}/` (TensorBoard Profile tab, "
                 'or Perfetto on the `*.trace.json.gz` files)')
  out = [f'### Inside each exit (batch {b})', '']
  if where:
    out += ['Per exit: ' + '; '.join(where) + '.', '']
  rows = []
  for x in profile['exits']:
    p = x['batch']
    peak = p['memory'].get('peak_memory_in_bytes') or p['memory'].get('temp_size_in_bytes', 0)
    if profile.get('top_ops_source') == 'trace':
      rows += [[x['exit'], o['op'], o['opcode'], _source(o['source']), o['ms'],
                f"{100 * o['share']:.0f} %", _fmt(peak / 2**20)] for o in p['top_ops']]
    else:
      rows += [[x['exit'], o['opcode'], o['count'], _fmt(peak / 2**20)] for o in p['op_counts']]
  if profile.get('top_ops_source') == 'trace':
    out += [_table(['exit', 'HLO op', 'opcode', 'JAX op', 'ms per call', 'share',
                    'peak MiB'], rows), '',
            "Top ops by time, from each exit's profiler trace (the XLA runtime's events per "
            'HLO instruction, summed over the traced calls); share: of all traced op time.', '']
  else:
    out += [_table(['exit', 'opcode', 'count', 'peak MiB'], rows), '',
            "Most frequent ops in each exit's optimised HLO (not traced: "
            'config.benchmark.trace_dir is empty).', '']
  return out


def _kernels_markdown(bench: dict[str, Any]) -> list[str]:
  kernels = bench.get('kernels')
  if not kernels:  # written before kernels were recorded
    return []
  used = ', '.join(f'{op} {impl}' for op, impl in kernels['model'].items() if impl)
  out = ["## Kernels (ops/kernels.py)", '',
         f'Every figure above ran on: {used or "-"}.', '']
  if kernels.get('config') is not None:
    asked = ', '.join(f'{op} {impl}' for op, impl in kernels['config'].items()) or 'all auto'
    out += [f"config.kernels: {asked}; 'auto' resolved for the {kernels['platform']} "
            'backend.', '']
  rows = kernels['ab']
  if not rows:  # the model runs the reference kernels, or the A/B was not measured
    return out
  ref = ', '.join(f'{op} {impl}' for op, impl in kernels['reference'].items() if impl)
  return out + [
      f"Against {ref} (batch {bench['batch_size']}):", '',
      _table(['exit', 'reference ms', 'ms', 'speedup', '95 % interval', 'reference GFLOPs',
              'GFLOPs', 'efficiency vs backbone (reference / model)'],
             [[r['exit'], r['reference_ms'], r['ms'], r['speedup'],
               _interval(r['speedup_ci95']), r['reference_gflops'], r['gflops'],
               f"{r['reference_efficiency']:.2f} / {r['efficiency']:.2f}"] for r in rows]), '',
      f"Each exit path built on both kernel sets and timed interleaved over "
      f"{rows[0]['rounds']} rounds; efficiency: the exit's GFLOP/s over the backbone's on the "
      'same kernels (the measured over the FLOPs-predicted speedup of sending every sample '
      'to it).', '']


def _precision_markdown(bench: dict[str, Any]) -> list[str]:
  grid = bench.get('precision')
  if not grid:  # not measured, or written before the grid existed
    return []
  dtypes = grid['dtypes']
  cells = {(r['batch'], r['exit'], r['dtype']): r for r in grid['rows']}
  flops = {r['exit']: r['flops_speedup'] for r in grid['rows']}
  ratio = [d for d in dtypes if d != 'float32'] if 'float32' in dtypes else []
  header = ['batch', 'exit', *(f'{d} ms' for d in dtypes),
            *(f'{d} vs backbone' for d in dtypes), 'FLOPs-predicted vs backbone',
            *(f'{d} / float32' for d in ratio)]
  rows = []
  for b in grid['batch_sizes']:
    for k in range(bench['num_exits']):
      row = [cells.get((b, k, d)) for d in dtypes]
      if not any(row):
        continue
      name = 'backbone' if k == bench['num_exits'] - 1 else k
      rows.append([b, name,
                   *(f"{_fmt(r['median_ms'])} ({_fmt(r['p90_ms'])})" if r else 'skipped'
                     for r in row),
                   *(_fmt(r['measured_speedup']) if r and r['measured_speedup'] else '-'
                     for r in row),
                   _fmt(flops[k]),
                   *(_fmt(cells[(b, k, d)]['speedup_vs_float32'])
                     if (b, k, d) in cells and cells[(b, k, d)]['speedup_vs_float32'] else '-'
                     for d in ratio)])
  out = [f"## Precision: every exit in {', '.join(dtypes)}", '',
         _table(header, rows), '',
         f"Each cell its own executable on the same float32 parameters, timed alone "
         f"({grid['iters']} calls after {grid['warmup']} warm-up); median (p90) ms. "
         "vs backbone: the backbone's time over the exit's, in the same dtype at the same "
         'batch, to set against the FLOPs-predicted speedup; '
         + (f'{ratio[0]} / float32: the float32 time over the {ratio[0]} one.' if ratio
            else ''), '']
  if grid['skipped']:
    out += ['Skipped (did not compile or run):', '']
    out += [f"- {c['dtype']}, batch {c['batch']}, exit {c['exit']}: {c['reason']}"
            for c in grid['skipped']]
    out.append('')
  return out


def render_markdown(bench: dict[str, Any]) -> str:
  """bench.json as markdown tables."""
  b = bench['batch_size']
  parts = [
      '# Benchmark',
      '',
      f"Hardware: {bench['hardware']}; jax {bench['device']['jax']}, jaxlib "
      f"{bench['device']['jaxlib']}, flax {bench['device']['flax']}. Matmul "
      f"({bench['matmul_n']}^2): {_matmul(bench)}. "
      f"Resolution {bench['resolution'][0]}x{bench['resolution'][1]}; "
      f"{bench['protocol']['iters']} timed calls after {bench['protocol']['warmup']} warm-up "
      f"calls; median (p90) in ms; computed in {bench.get('dtype', 'float32')} (the "
      'precision grid aside).',
      '',
      '## Exits',
      '',
      _table(['exit', 'attach after', 'GFLOPs', 'batch 1 ms', f'batch {b} ms', 'images/s'],
             [[x['exit'], 'backbone' if x['is_backbone'] else x['attach_after'], x['gflops'],
               f"{_fmt(x['batch1']['median_ms'])} ({_fmt(x['batch1']['p90_ms'])})",
               f"{_fmt(x['batch']['median_ms'])} ({_fmt(x['batch']['p90_ms'])})",
               x['images_per_s']] for x in bench['exits']]),
      '',
      *_profile_markdown(bench),
      *_parts_markdown(bench),
      f"Predictor: {_fmt(bench['predictor']['gflops'])} GFLOPs, batch 1 "
      f"{_fmt(bench['predictor']['batch1']['median_ms'])} ms, batch {b} "
      f"{_fmt(bench['predictor']['batch']['median_ms'])} ms.",
      '',
      f'## Routing (batch {b}, end to end)',
      '',
      _table(['threshold', 'images/s', 'backbone images/s', 'measured speedup',
              'FLOPs speedup', 'latency-model speedup', 'saved', 'exit histogram'],
             [[r['threshold'], r['images_per_s'], r['backbone_images_per_s'],
               r['measured_speedup'], r['flops_speedup'], r.get('latency_speedup', '-'),
               r['saved_fraction'], ' / '.join(map(str, r['exit_histogram']))]
              for r in bench['routing']]),
      '',
      'FLOPs speedup: backbone GFLOPs / mean routed GFLOPs. Latency-model speedup: backbone '
      'time / (predictor + every exit call of the routed batch, each executable timed alone); '
      'measured below it is router overhead, FLOPs above it is exits running at fewer '
      'GFLOP/s than the backbone.',
      '',
      '## lax.switch at batch 1',
      '',
      _switch_protocol(bench),
      '',
      _table(['exit', 'switch ms', 'direct ms', 'overhead ratio', '95 % interval'],
             [[s['exit'], s['switch_ms'], s['direct_ms'], s['overhead_ratio'],
               _interval(s.get('overhead_ratio_ci95'))]
              for s in bench['switch']['per_exit']]),
      '',
      _table(['threshold', 'exit', 'routed ms (predictor + switch)', 'direct ms', 'ratio',
              '95 % interval'],
             [[s['threshold'], s['exit'], s['routed_ms'], s['direct_ms'], s['ratio'],
               _interval(s.get('ratio_ci95'))]
              for s in bench['switch']['routed']]),
      '',
      f'## Counter-example: vmap of a per-sample switch (batch {b})',
      '',
      _table(['variant', 'ms', 'XLA GFLOPs'],
             [['vmap(switch)', bench['vmap_switch']['ms'], bench['vmap_switch']['gflops']],
              ['backbone', bench['vmap_switch']['backbone_ms'],
               bench['vmap_switch']['backbone_gflops']]]),
      '',
      f"vmap(switch) / backbone time: {_fmt(bench['vmap_switch']['ratio_to_backbone'])}; "
      'every exit runs for every sample.',
      '',
      *_kernels_markdown(bench),
      *_precision_markdown(bench),
  ]
  return '\n'.join(parts)
