"""The benchmark stage: compiled latency of every exit and of routing, in one run (bench.json).

Every number follows the latency protocol (metrics/latency.py): executables are compiled ahead
of time, warmed up, timed with `perf_counter` around `block_until_ready`, and timed loops fail
on recompiles. All ratios in one bench.json come from the same process and machine state, next
to a matmul GFLOP/s measured in the same run, so they can be compared across machines.

Measured:
- per exit: latency (median, p90) at batch 1 and at `batch_size`, XLA GFLOPs and memory;
- per threshold: end-to-end routed throughput through `BucketedRouter` (predictor, host
  grouping, padding, transfers included) vs the backbone's compiled throughput; measured and
  FLOPs-predicted speedups; exit histogram;
- batch 1: `lax.switch` with the index given vs each exit's own path (the switch overhead), and
  the full routed executable (predictor + switch) vs the chosen exit's path;
- per exit, where its time goes at `batch_size`: the shared backbone prefix (conditioning,
  stem, blocks up to the attach point), the database lookup and the branch, each compiled and
  timed alone with its XLA GFLOPs, so that the gap between measured and FLOPs-predicted
  speedups can be read off as GFLOP/s per part;
- the counter-example: vmap of a per-sample switch vs the backbone at `batch_size`;
- on the CPU, every exit path at `batch_size` with and without the CPU lowerings
  (models/conv.py: block-Toeplitz convs on 2x2 maps, even input widths; the database's
  two-stage top-k), timed interleaved: what they buy, and how close each exit then runs to
  the backbone's GFLOP/s.
"""
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax.evaluation import report
from fiancee_jax.inference import loading
from fiancee_jax.metrics import exit_distances
from fiancee_jax.metrics import latency
from fiancee_jax.models import conv
from fiancee_jax.routing import router as router_lib

_TIMING_KEYS = ('median_ms', 'p90_ms', 'mean_ms', 'min_ms', 'iters')


def _timing(stats: dict[str, float]) -> dict[str, float]:
  return {k: stats[k] for k in _TIMING_KEYS}


def exit_parts(model: model_lib.FianceeModel, inputs: Sequence[Any], *, warmup: int,
               iters: int) -> list[dict[str, Any]]:
  """Time and XLA GFLOPs of each part of every exit, each part compiled and timed alone.

  Args:
    model: a FianceeModel.
    inputs: the model's inputs at the timed batch (device arrays).
    warmup, iters: the timing protocol.

  Returns:
    Per exit: {'exit', 'parts': [{'part': 'prefix' | 'lookup' | 'branch' | 'head', 'ms',
    'gflops' (XLA, whole batch), 'gflop_per_s'}], 'sum_ms'}. The prefix is conditioning, stem
    and blocks 0..attach point; the backbone exit is its prefix (every block) and its head.
  """
  em, params = model.exit_model, model.params
  bb = params['backbone']
  b = len(em.attach_after)
  full = jax.jit(lambda p, *x: em.prefix(p, x, em.backbone.num_blocks - 1))
  _, cond, outs = full(bb, *inputs)

  def part(name, fn, *args):
    compiled = latency.compile_aot(fn, *args)
    gflops = latency.cost_and_memory(compiled)['gflops']
    ms = latency.time_compiled(compiled, *args, warmup=warmup, iters=iters)['median_ms']
    record = {'part': name, 'ms': ms, 'gflops': gflops, 'gflop_per_s': gflops / (ms * 1e-3)}
    return record, compiled

  out = []
  for k in range(model.num_exits):
    last = em.last_block(k)
    # The prefix returns the full-resolution conditioning too, as the exit's branch reads it.
    parts = [part('prefix', lambda p, *x, last=last: em.prefix(p, x, last)[:2], bb, *inputs)[0]]
    if k == b:
      parts.append(part('head', lambda p, h: em.backbone.apply(p, h, method='head'), bb,
                        outs[last])[0])
    else:
      guide = None
      if em.guided:
        keys = {em.key_block: outs[em.key_block]}
        record, lookup = part('lookup', lambda p, o: em.guide(p, o, cond.shape[1:3]), params,
                              keys)
        parts.append(record)
        guide = lookup(params, keys)  # the executable just timed, not a second compile
      branch = em.branches[k]
      parts.append(part('branch', lambda v, h, c, g: branch.apply(v, h, c, g),
                        params['exits'][k], outs[last], cond, guide)[0])
    out.append({'exit': k, 'parts': parts, 'sum_ms': sum(p['ms'] for p in parts)})
  return out


def lowering_ab(model: model_lib.FianceeModel, inputs: Sequence[Any], *, warmup: int,
                rounds: int) -> list[dict[str, Any]]:
  """Every exit path with the CPU lowerings off ('xla') and on, timed interleaved.

  Args:
    model: a FianceeModel.
    inputs: the model's inputs at the timed batch (device arrays).
    warmup, rounds: untimed calls, and interleaved rounds (latency.time_paired).

  Returns:
    [] off the CPU (nothing to compare). Else per exit: {'exit', 'xla_ms', 'ms' (medians),
    'speedup' (median over rounds of xla / lowered time) and 'speedup_ci95', 'xla_gflops',
    'gflops' (XLA, whole batch), 'xla_efficiency', 'efficiency' (the exit's GFLOP/s over the
    backbone's, from the same form's timings: the measured over the FLOPs-predicted speedup
    of sending every sample to this exit), 'rounds'}.
  """
  if not conv.cpu_lowerings_active():
    return []
  params = model.params
  args = (params, *inputs)
  out = []
  for k in range(model.num_exits):
    path = model.exit_model.exit_path(k)
    # New function objects: jit would reuse a trace of the same one across the switch.
    lowered = latency.compile_aot(lambda *a, path=path: path(*a), *args)
    with conv.cpu_lowerings(False):
      plain = latency.compile_aot(lambda *a, path=path: path(*a), *args)
    p = latency.time_paired(plain, args, lowered, args, warmup=warmup, rounds=rounds)
    out.append({'exit': k, 'xla_ms': p['a']['median_ms'], 'ms': p['b']['median_ms'],
                'speedup': p['ratio'], 'speedup_ci95': list(p['ratio_ci95']),
                'xla_gflops': latency.cost_and_memory(plain)['gflops'],
                'gflops': latency.cost_and_memory(lowered)['gflops'], 'rounds': int(rounds)})
  bb = out[-1]
  for r in out:
    for pre in ('xla_', ''):
      r[f'{pre}efficiency'] = ((r[f'{pre}gflops'] / bb[f'{pre}gflops'])
                               / (r[f'{pre}ms'] / bb[f'{pre}ms']))
  return out


def run_benchmark(model: model_lib.FianceeModel, data: Any, *, batch_size: int = 64,
                  thresholds: Sequence[float], warmup: int = 3, iters: int = 20,
                  seed: int = 0, matmul_n: int = 2048, switch_rounds: int = 100,
                  parts: bool = True, lowering_rounds: int = 20,
                  bucketed: router_lib.BucketedRouter | None = None,
                  switch: router_lib.SwitchRouter | None = None) -> dict[str, Any]:
  """Measures exits, routing and dispatch overheads; returns the bench.json content.

  Args:
    model: a FianceeModel with a predictor and margins.
    data: test data (model.task): int [N, H, W] label maps, or (source, driver) float32
      [N, H, W, 3]; the first `batch_size` form the timed batch and the first one the
      batch-1 input.
    batch_size: batch for throughput numbers (the router's largest bucket).
    thresholds: distance budgets to route at.
    warmup: untimed calls before each measurement.
    iters: timed calls per measurement.
    switch_rounds: interleaved rounds of each batch-1 switch-vs-direct comparison.
    parts: also time every exit's parts alone (`exit_parts`; 'exit_parts' is [] if not).
    lowering_rounds: interleaved rounds of `lowering_ab` per exit (0: not measured,
      'cpu_lowerings' is []).
    seed: seed of z.
    matmul_n: size of the [n, n] matmul that measures the machine's GFLOP/s.
    bucketed: a BucketedRouter for `model` whose buckets include `batch_size`, to reuse its
      executables (default: a new one with buckets 1, 2, 4, ..., batch_size).
    switch: a SwitchRouter for `model` to reuse (default: a new one).

  Returns:
    A JSON-serialisable dict; see `write_bench` for a readable rendering. Keys: 'hardware',
    'device', 'protocol', 'batch_size', 'resolution', 'num_exits', 'matmul_gflops_per_s',
    'predictor', 'exits', 'exit_parts', 'backbone', 'routing', 'switch', 'vmap_switch',
    'cpu_lowerings', 'router_compiles'.

  Raises:
    ValueError: bad data, thresholds or sizes (before anything is compiled).
  """
  data = model.check_data(data)
  thresholds = [model_lib.check_threshold(t) for t in thresholds]
  if not thresholds:
    raise ValueError('thresholds is empty; pass at least one distance budget')
  if batch_size < 1 or data[0].shape[0] < batch_size:
    raise ValueError(f'batch_size={batch_size} needs at least that many test samples, got '
                     f'{data[0].shape[0]}; lower batch_size or pass more data')
  if iters < 1 or warmup < 0 or switch_rounds < 1 or lowering_rounds < 0:
    raise ValueError(f'need iters >= 1, switch_rounds >= 1, lowering_rounds >= 0 and '
                     f'warmup >= 0, got iters={iters}, switch_rounds={switch_rounds}, '
                     f'lowering_rounds={lowering_rounds}, warmup={warmup}')
  for name, r in (('bucketed', bucketed), ('switch', switch)):
    if r is not None and r.model is not model:
      raise ValueError(f'the {name} router was built for a different FianceeModel')
  if bucketed is not None and batch_size not in bucketed.bucket_sizes:
    raise ValueError(f'batch_size={batch_size} is not one of the bucketed router\'s bucket sizes '
                     f'{bucketed.bucket_sizes}; add it or pass bucketed=None')
  e = model.num_exits
  batch = tuple(np.asarray(x) for x in model.make_inputs(
      tuple(x[:batch_size] for x in data), jax.random.key(seed)))
  one = tuple(x[:1] for x in batch)
  params = model.params
  timeit = lambda fn, *a: latency.time_fn(fn, *a, warmup=warmup, iters=iters)  # noqa: E731

  info = latency.device_info()
  out: dict[str, Any] = {
      'hardware': latency.hardware_string(info),
      'device': info,
      'protocol': {'warmup': int(warmup), 'iters': int(iters), 'seed': int(seed),
                   'switch_rounds': int(switch_rounds),
                   'lowering_rounds': int(lowering_rounds),
                   'timer': 'time.perf_counter around jax.block_until_ready, AOT-compiled',
                   'statistic': 'median and p90 over iters timed calls'},
      'batch_size': int(batch_size),
      'resolution': list(model.resolution),
      'num_exits': int(e),
      'distance': model.distance,
  }
  out['matmul_n'] = int(matmul_n)
  out['matmul_gflops_per_s'] = latency.matmul_gflops(matmul_n, iters=max(iters // 2, 1),
                                                      warmup=min(warmup, 2))

  # One bucket set serves both the router and the per-exit batch latencies.
  bucketed = bucketed or router_lib.BucketedRouter(model, router_lib.default_buckets(batch_size))
  bucketed.warmup()
  switch = switch or router_lib.SwitchRouter(model)
  switch.warmup()
  compiles_after_warmup = bucketed.num_compiles + switch.num_compiles

  # Per exit: batch 1 (the switch router's direct path) and batch_size (the router's bucket),
  # on device-resident inputs: this is the executables' latency. (The routed numbers below
  # start from host arrays, as a served request does.)
  one_d, batch_d = jax.device_put((one, batch))
  exits = []
  for k in range(e):
    c1 = switch.compiled_direct(k)
    cb = bucketed.compiled_exit(k, batch_size)
    t1 = latency.time_compiled(c1, params, *one_d, warmup=warmup, iters=iters)
    tb = latency.time_compiled(cb, params, *batch_d, warmup=warmup, iters=iters)
    exits.append({
        'exit': k,
        'attach_after': (int(model.exit_model.attach_after[k]) if k < e - 1 else None),
        'is_backbone': k == e - 1,
        'gflops': float(model.exit_gflops[k]),
        'batch1': _timing(t1),
        'batch': _timing(tb),
        'images_per_s': batch_size / (tb['median_ms'] * 1e-3),
        'cost_batch1': latency.cost_and_memory(c1),
        'cost_batch': latency.cost_and_memory(cb),
    })
  out['exits'] = exits
  out['exit_parts'] = (exit_parts(model, batch_d, warmup=warmup, iters=iters) if parts
                       else [])
  backbone = exits[-1]
  backbone_ips = backbone['images_per_s']
  out['backbone'] = {'gflops': float(model.backbone_gflops), 'images_per_s': backbone_ips,
                     'batch_median_ms': backbone['batch']['median_ms']}

  # Predictor alone, batch 1 and batch_size.
  margins = model.margins_at(thresholds[0])
  dev_margins, dev_t0 = jax.device_put((margins, np.float32(thresholds[0])))
  pb = {}
  for name, b, x in (('batch1', 1, one_d), ('batch', batch_size, batch_d)):
    cp = bucketed.compiled_predict(b)
    pb[name] = _timing(latency.time_compiled(cp, model.predictor_params, dev_margins, dev_t0,
                                             *x, warmup=warmup, iters=iters))
  out['predictor'] = {'gflops': float(model.predictor_gflops), **pb}

  # Routed throughput at each threshold, end to end.
  routed = [(t, bucketed(batch, t)) for t in thresholds]
  plans = [bucketed.plan(res.exit_ids) for _, res in routed]
  # The latency model: each (exit, bucket) executable a routed batch calls, timed alone.
  # Its sum (plus the predictor) is what routing costs if the router added nothing; the
  # FLOPs model assumes every exit runs at the backbone's GFLOP/s, this one does not.
  call_ms = {}
  for k, b in sorted({(k, b) for plan in plans for k, b, _, _ in plan}):
    call_ms[(k, b)] = (exits[k]['batch']['median_ms'] if b == batch_size else
                       latency.time_compiled(bucketed.compiled_exit(k, b), params,
                                             *(x[:b] for x in batch_d), warmup=warmup,
                                             iters=iters)['median_ms'])
  routing = []
  for (t, res), plan in zip(routed, plans):
    stats = timeit(lambda t=t: bucketed(batch, t))
    ips = batch_size / (stats['median_ms'] * 1e-3)
    mean_gflops = float(np.mean(res.gflops))
    model_ms = pb['batch']['median_ms'] + sum(call_ms[(k, b)] for k, b, _, _ in plan)
    routing.append({
        'threshold': t,
        'images_per_s': ips,
        'backbone_images_per_s': backbone_ips,
        'measured_speedup': ips / backbone_ips,
        'flops_speedup': float(model.backbone_gflops) / mean_gflops,
        'latency_model_ms': model_ms,
        'latency_speedup': backbone['batch']['median_ms'] / model_ms,
        'mean_gflops': mean_gflops,
        'saved_fraction': 1.0 - mean_gflops / float(model.backbone_gflops),
        'exit_histogram': np.bincount(res.exit_ids, minlength=e).astype(int).tolist(),
        'exit_calls': len(plan),
        'padded_samples': int(sum(b - n for _, b, _, n in plan)),
        'latency': _timing(stats),
    })
  out['routing'] = routing

  # Batch 1: switch overhead per exit, and the routed executable vs its chosen exit. All three
  # are bare executables on device-resident arguments, so Python wrappers and host-to-device
  # copies do not enter the ratios. Overheads of a few % are below the drift between two
  # timing loops on a shared machine, so each pair is timed interleaved (latency.time_paired)
  # and the ratio is the median of per-round ratios with its 95 % interval.
  dispatch, routed_exe = switch.compiled_dispatch(), switch.compiled_routed()
  paired = lambda fa, aa, fb, ab: latency.time_paired(  # noqa: E731
      fa, aa, fb, ab, warmup=warmup, rounds=switch_rounds)
  per_exit = []
  for k in range(e):
    p = paired(dispatch, (params, jax.device_put(np.int32(k)), *one_d),
               switch.compiled_direct(k), (params, *one_d))
    per_exit.append({'exit': k, 'switch_ms': p['a']['median_ms'],
                     'direct_ms': p['b']['median_ms'], 'overhead_ratio': p['ratio'],
                     'overhead_ratio_ci95': list(p['ratio_ci95']), 'rounds': p['rounds']})
  routed1 = []
  for t in thresholds:
    args = (params, model.predictor_params, jax.device_put(model.margins_at(t)),
            jax.device_put(np.float32(t)), *one_d)
    k = int(routed_exe(*args)[1])
    p = paired(routed_exe, args, switch.compiled_direct(k), (params, *one_d))
    routed1.append({'threshold': t, 'exit': k, 'routed_ms': p['a']['median_ms'],
                    'direct_ms': p['b']['median_ms'], 'ratio': p['ratio'],
                    'ratio_ci95': list(p['ratio_ci95']), 'rounds': p['rounds']})
  out['switch'] = {'per_exit': per_exit, 'routed': routed1,
                   'note': 'switch_ms: lax.switch on a scalar index given at run time; '
                           "routed_ms: predictor + route + switch in one executable; "
                           "direct_ms: the exit's own path; all at batch 1, timed "
                           'interleaved; ratios are medians of per-round ratios'}

  # The counter-example: vmap of a per-sample switch at batch_size (every exit runs).
  vm_ids = np.asarray(bucketed.predict_and_route(batch, thresholds[0])[0], np.int32)
  vm = latency.compile_aot(router_lib.vmap_switch_fn(model), params, vm_ids, *batch)
  tv = latency.time_compiled(vm, params, jax.device_put(vm_ids), *batch_d, warmup=warmup,
                             iters=iters)
  vm_cost = latency.cost_and_memory(vm)
  out['vmap_switch'] = {
      'ms': tv['median_ms'], 'p90_ms': tv['p90_ms'],
      'backbone_ms': backbone['batch']['median_ms'],
      'ratio_to_backbone': tv['median_ms'] / backbone['batch']['median_ms'],
      'gflops': vm_cost['gflops'],
      'backbone_gflops': backbone['cost_batch']['gflops'],
      'exit_histogram': np.bincount(vm_ids, minlength=e).astype(int).tolist(),
      'note': 'vmap turns the per-sample switch into a select: every exit runs for every sample',
  }

  out['cpu_lowerings'] = (lowering_ab(model, batch_d, warmup=warmup, rounds=lowering_rounds)
                          if lowering_rounds else [])

  recompiles = bucketed.num_compiles + switch.num_compiles - compiles_after_warmup
  if recompiles:
    raise RuntimeError(f'routers compiled {recompiles} executables after warm-up; the '
                       'routed timings would include compilation')
  out['router_compiles'] = {'bucketed': bucketed.num_compiles, 'switch': switch.num_compiles,
                            'after_warmup': recompiles,
                            'buckets': list(bucketed.bucket_sizes)}
  return out


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


def _lowerings_markdown(bench: dict[str, Any]) -> list[str]:
  rows = bench.get('cpu_lowerings')
  if not rows:  # not on the CPU, not measured, or written before the comparison existed
    return []
  return [f"## CPU lowerings (batch {bench['batch_size']}, models/conv.py)", '',
          _table(['exit', 'XLA ms', 'lowered ms', 'speedup', '95 % interval', 'XLA GFLOPs',
                  'lowered GFLOPs', 'efficiency vs backbone (XLA / lowered)'],
                 [[r['exit'], r['xla_ms'], r['ms'], r['speedup'], _interval(r['speedup_ci95']),
                   r['xla_gflops'], r['gflops'],
                   f"{r['xla_efficiency']:.2f} / {r['efficiency']:.2f}"] for r in rows]), '',
          f"Each exit path compiled twice and timed interleaved over {rows[0]['rounds']} "
          'rounds; efficiency: the exit\'s GFLOP/s over the backbone\'s in the same form (the '
          'measured over the FLOPs-predicted speedup of sending every sample to it).', '']


def render_markdown(bench: dict[str, Any]) -> str:
  """bench.json as markdown tables."""
  b = bench['batch_size']
  parts = [
      '# Benchmark',
      '',
      f"Hardware: {bench['hardware']}; jax {bench['device']['jax']}, jaxlib "
      f"{bench['device']['jaxlib']}, flax {bench['device']['flax']}. Matmul "
      f"({bench['matmul_n']}^2, float32): {_fmt(bench['matmul_gflops_per_s'])} GFLOP/s. "
      f"Resolution {bench['resolution'][0]}x{bench['resolution'][1]}; "
      f"{bench['protocol']['iters']} timed calls after {bench['protocol']['warmup']} warm-up "
      'calls; median (p90) in ms.',
      '',
      '## Exits',
      '',
      _table(['exit', 'attach after', 'GFLOPs', 'batch 1 ms', f'batch {b} ms', 'images/s'],
             [[x['exit'], 'backbone' if x['is_backbone'] else x['attach_after'], x['gflops'],
               f"{_fmt(x['batch1']['median_ms'])} ({_fmt(x['batch1']['p90_ms'])})",
               f"{_fmt(x['batch']['median_ms'])} ({_fmt(x['batch']['p90_ms'])})",
               x['images_per_s']] for x in bench['exits']]),
      '',
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
      *_lowerings_markdown(bench),
  ]
  return '\n'.join(parts)


def write_bench(bench: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """Writes `bench.json` and `bench.md` into out_dir (created if needed); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'bench.json')
  md_path = os.path.join(out_dir, 'bench.md')
  with open(json_path, 'w') as f:
    json.dump(bench, f, indent=2, allow_nan=False)
  with open(md_path, 'w') as f:
    f.write(render_markdown(bench))
  return json_path, md_path


def stage_thresholds(config: ml_collections.ConfigDict, workdir: str,
                     measured: Callable[[], np.ndarray]) -> list[float]:
  """The thresholds the benchmark stage times: config.router.thresholds if set; else about
  four of the evaluate stage's sweep plus its operating point (report/report.json); else
  four spread over the distances `measured()` returns (float32 [N, E - 1])."""
  if config.router.thresholds:
    return [float(t) for t in config.router.thresholds]
  report_path = os.path.join(workdir, 'report', 'report.json')
  if os.path.exists(report_path):
    with open(report_path) as f:
      rep = json.load(f)
    rows = rep['routing']
    thresholds = {rows[i]['threshold'] for i in range(0, len(rows), max(1, len(rows) // 4))}
    if rep['headline'].get('threshold') is not None:
      thresholds.add(rep['headline']['threshold'])
    return sorted(thresholds)
  return [float(t) for t in report.default_thresholds(measured(), num=4)]


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage `benchmark`: report/bench.json and report/bench.md of the workdir's artifacts,
  timed on the test split's first min(router.num_eval, data.num_test) examples."""
  model = loading.load_model(workdir, config)
  n = min(config.router.num_eval, config.data.num_test)
  inputs = exit_distances.load_inputs(config, 'test', n)
  thresholds = stage_thresholds(
      config, workdir, lambda: exit_distances.of_model(config, workdir, model, 'test', n)[1])
  b = config.benchmark
  bench = run_benchmark(model, inputs[:len(model.task.data_keys)], batch_size=b.batch_size,
                        thresholds=thresholds, warmup=b.warmup, iters=b.iters,
                        switch_rounds=b.switch_rounds, parts=b.exit_parts,
                        lowering_rounds=b.lowering_rounds, seed=config.seed)
  if jax.process_index() == 0:
    write_bench(bench, os.path.join(workdir, 'report'))
  return bench
