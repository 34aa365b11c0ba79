"""The benchmark stage: compiled latency of every exit and of routing, in one run (bench.json).

Every number follows the latency protocol (metrics/latency.py): executables are compiled ahead
of time, warmed up, timed with `perf_counter` around `block_until_ready`, and timed loops fail
on recompiles. All ratios in one bench.json come from the same process and machine state, next
to a matmul GFLOP/s measured in the same run, so they can be compared across machines.

Measured (`run_benchmark` calls one function per item):
- per exit: latency (median, p90) at batch 1 and at `batch_size`, XLA GFLOPs and memory
  (`exit_latencies`);
- per exit, where its time goes at `batch_size`: the shared backbone prefix (conditioning,
  stem, blocks up to the attach point), the database lookup and the branch, each compiled and
  timed alone with its XLA GFLOPs, so that the gap between measured and FLOPs-predicted
  speedups can be read off as GFLOP/s per part (`exit_parts`);
- the predictor alone (`predictor_latency`);
- per threshold: end-to-end routed throughput through `BucketedRouter` (predictor, host
  grouping, padding, transfers included) vs the backbone's compiled throughput; measured and
  FLOPs-predicted speedups; exit histogram (`routed_throughput`);
- batch 1: `lax.switch` with the index given vs each exit's own path (the switch overhead), and
  the full routed executable (predictor + switch) vs the chosen exit's path
  (`switch_overheads`);
- the counter-example: vmap of a per-sample switch vs the backbone at `batch_size`
  (`vmap_counterexample`);
- the kernels (ops/kernels.py): the implementations the model runs, and every exit path at
  `batch_size` built a second time on the plain XLA kernels and timed interleaved against the
  model's own (`kernel_ab`): what the kernel choice buys, and how close each exit then runs
  to the backbone's GFLOP/s;
- every exit path in every compute dtype (float32, bfloat16) at every batch size of
  `config.benchmark.batch_sizes`: its latency, its measured speedup over the backbone next to
  the FLOPs-predicted one, and bfloat16's speedup over float32 (precision_grid.py; a cell
  that does not compile or run, e.g. out of memory, is skipped with the error as its reason);
- inside every exit (`profiling.exit_profiles`): its optimised HLO and memory analysis at
  batch 1 and `batch_size` written to files, a profiler trace of it at `batch_size` (run after
  its timed loop, so no timing includes the profiler), and its top ops by time from that
  trace (by count from the HLO when not traced).

`bench_markdown.render_markdown` renders the result; `write_bench` writes both files.
"""
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax import parallel
from fiancee_jax.evaluation import bench_markdown
from fiancee_jax.evaluation import precision_grid
from fiancee_jax.evaluation import profiling
from fiancee_jax.evaluation import report
from fiancee_jax.inference import loading
from fiancee_jax.metrics import exit_distances
from fiancee_jax.metrics import latency
from fiancee_jax.ops import kernels as kernels_lib
from fiancee_jax.routing import router as router_lib

_TIMING_KEYS = ('median_ms', 'p90_ms', 'mean_ms', 'min_ms', 'iters')
# Seconds the other processes of a multi-process run wait for process 0's benchmark.
BENCHMARK_WAIT = 6 * 3600


def _timing(stats: dict[str, float]) -> dict[str, float]:
  return {k: stats[k] for k in _TIMING_KEYS}


def model_kernels(model: model_lib.FianceeModel) -> dict[str, str | None]:
  """The kernel implementations the model's exit paths run: {'conv': backbone's `conv_impl`,
  'top_k': the lookup's `top_k_impl`}; None where the model has no such choice (an unguided
  model has no top-k)."""
  em = model.exit_model
  return {'conv': getattr(em.backbone, 'conv_impl', None),
          'top_k': getattr(em.lookup, 'top_k_impl', None)}


def with_kernels(model: model_lib.FianceeModel,
                 kernels: Mapping[str, str]) -> model_lib.FianceeModel:
  """The same model (same parameters) built on other kernel implementations.

  Args:
    model: a FianceeModel.
    kernels: concrete implementations for every op (ops/kernels.py), e.g. kernels.XLA.

  Returns:
    A FianceeModel whose backbone (light blocks included) and lookup run `kernels`; the
    parts without a choice (`model_kernels` None) are kept.
  """
  kernels = kernels_lib.check_concrete(kernels)
  em = model.exit_model
  have = model_kernels(model)
  backbone = (em.backbone if have['conv'] is None
              else em.backbone.clone(conv_impl=kernels['conv']))
  lookup = (em.lookup if have['top_k'] is None
            else dataclasses.replace(em.lookup, top_k_impl=kernels['top_k']))
  return model.replace(exit_model=dataclasses.replace(em, backbone=backbone, lookup=lookup))


def _check_arguments(model, data, thresholds, batch_size, warmup, iters, switch_rounds,
                     lowering_rounds, bucketed, switch):
  """(data, thresholds) validated; ValueError before anything is compiled."""
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
  return data, thresholds


def exit_latencies(model: model_lib.FianceeModel, switch: router_lib.SwitchRouter,
                   bucketed: router_lib.BucketedRouter, one: Sequence[Any],
                   batch: Sequence[Any], *, warmup: int, iters: int) -> list[dict[str, Any]]:
  """Per exit: batch-1 latency (the switch router's direct path) and batch latency (the
  bucketed router's executable at len(batch)), on device-resident inputs `one` and `batch`.

  Returns:
    Per exit: {'exit', 'attach_after' (None for the backbone), 'is_backbone', 'gflops'
    (counted, batch 1), 'batch1', 'batch' (timings), 'images_per_s', 'cost_batch1',
    'cost_batch' (XLA cost and memory of each executable)}.
  """
  e, b = model.num_exits, int(batch[0].shape[0])
  out = []
  for k in range(e):
    c1 = switch.compiled_direct(k)
    cb = bucketed.compiled_exit(k, b)
    t1 = latency.time_compiled(c1, model.params, *one, warmup=warmup, iters=iters)
    tb = latency.time_compiled(cb, model.params, *batch, warmup=warmup, iters=iters)
    out.append({
        'exit': k,
        'attach_after': (int(model.exit_model.attach_after[k]) if k < e - 1 else None),
        'is_backbone': k == e - 1,
        'gflops': float(model.exit_gflops[k]),
        'batch1': _timing(t1),
        'batch': _timing(tb),
        'images_per_s': b / (tb['median_ms'] * 1e-3),
        'cost_batch1': latency.cost_and_memory(c1),
        'cost_batch': latency.cost_and_memory(cb),
    })
  return out


def exit_parts(model: model_lib.FianceeModel, inputs: Sequence[Any], *, warmup: int,
               iters: int) -> list[dict[str, Any]]:
  """Time and XLA GFLOPs of each part of every exit, each part compiled and timed alone.

  Args:
    model: a FianceeModel.
    inputs: the model's inputs at the timed batch (device arrays).
    warmup, iters: the timing protocol.

  Returns:
    Per exit: {'exit', 'parts': [{'part': 'prefix' | 'lookup' | 'branch' | 'residual' (the
    retrieved residual added, 'residual' guidance) | 'head', 'ms',
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
      record, run_branch = part('branch', lambda v, h, c, g: branch.apply(v, h, c, g),
                                params['exits'][k], outs[last], cond, em.branch_guide(guide))
      parts.append(record)
      if em.guided and em.guidance == 'residual':
        image = run_branch(params['exits'][k], outs[last], cond, em.branch_guide(guide))
        parts.append(part('residual', lambda img, g, k=k: em.finish(k, img, g), image,
                          guide)[0])
    out.append({'exit': k, 'parts': parts, 'sum_ms': sum(p['ms'] for p in parts)})
  return out


def predictor_latency(model: model_lib.FianceeModel, bucketed: router_lib.BucketedRouter,
                      threshold: float, one: Sequence[Any], batch: Sequence[Any], *,
                      warmup: int, iters: int) -> dict[str, Any]:
  """The predictor (with margins and routing decision) alone at batch 1 and len(batch):
  {'gflops' (counted, batch 1), 'batch1', 'batch' (timings)}."""
  dev_margins, dev_t = jax.device_put((model.margins_at(threshold), np.float32(threshold)))
  out = {'gflops': float(model.predictor_gflops)}
  for name, x in (('batch1', one), ('batch', batch)):
    cp = bucketed.compiled_predict(int(x[0].shape[0]))
    out[name] = _timing(latency.time_compiled(cp, model.predictor_params, dev_margins, dev_t,
                                              *x, warmup=warmup, iters=iters))
  return out


def routed_throughput(model: model_lib.FianceeModel, bucketed: router_lib.BucketedRouter,
                      host_batch: Sequence[np.ndarray], batch: Sequence[Any],
                      thresholds: Sequence[float], exits: Sequence[dict[str, Any]],
                      predictor_batch_ms: float, *, warmup: int,
                      iters: int) -> list[dict[str, Any]]:
  """Routed throughput at each threshold, end to end from host arrays, against the backbone.

  The latency model: each (exit, bucket) executable a routed batch calls, timed alone. Its sum
  (plus the predictor) is what routing costs if the router added nothing; the FLOPs model
  assumes every exit runs at the backbone's GFLOP/s, this one does not.

  Args:
    host_batch / batch: the timed batch on the host / on the device.
    exits: `exit_latencies` of the same batch (their batch timings are reused).
    predictor_batch_ms: the predictor's median time at this batch.

  Returns:
    Per threshold: {'threshold', 'images_per_s', 'backbone_images_per_s', 'measured_speedup',
    'flops_speedup', 'latency_model_ms', 'latency_speedup', 'mean_gflops', 'saved_fraction',
    'exit_histogram', 'exit_calls', 'padded_samples', 'latency'}.
  """
  e, b = model.num_exits, int(batch[0].shape[0])
  backbone = exits[-1]
  backbone_gflops = float(model.backbone_gflops)
  routed = [(t, bucketed(host_batch, t)) for t in thresholds]
  plans = [bucketed.plan(res.exit_ids) for _, res in routed]
  call_ms = {}
  for k, n in sorted({(k, n) for plan in plans for k, n, _, _ in plan}):
    call_ms[(k, n)] = (exits[k]['batch']['median_ms'] if n == b else
                       latency.time_compiled(bucketed.compiled_exit(k, n), model.params,
                                             *(x[:n] for x in batch), warmup=warmup,
                                             iters=iters)['median_ms'])
  rows = []
  for (t, res), plan in zip(routed, plans):
    stats = latency.time_fn(lambda t=t: bucketed(host_batch, t), warmup=warmup, iters=iters)
    ips = b / (stats['median_ms'] * 1e-3)
    mean_gflops = float(np.mean(res.gflops))
    model_ms = predictor_batch_ms + sum(call_ms[(k, n)] for k, n, _, _ in plan)
    rows.append({
        'threshold': t,
        'images_per_s': ips,
        'backbone_images_per_s': backbone['images_per_s'],
        'measured_speedup': ips / backbone['images_per_s'],
        'flops_speedup': backbone_gflops / mean_gflops,
        'latency_model_ms': model_ms,
        'latency_speedup': backbone['batch']['median_ms'] / model_ms,
        'mean_gflops': mean_gflops,
        'saved_fraction': 1.0 - mean_gflops / backbone_gflops,
        'exit_histogram': np.bincount(res.exit_ids, minlength=e).astype(int).tolist(),
        'exit_calls': len(plan),
        'padded_samples': int(sum(n - m for _, n, _, m in plan)),
        'latency': _timing(stats),
    })
  return rows


def switch_overheads(model: model_lib.FianceeModel, switch: router_lib.SwitchRouter,
                     thresholds: Sequence[float], one: Sequence[Any], *, warmup: int,
                     rounds: int) -> dict[str, Any]:
  """Batch 1: `lax.switch` vs each exit's own path, and the routed executable (predictor +
  switch) vs the exit it chose, per threshold.

  All are bare executables on device-resident arguments, so Python wrappers and host-to-device
  copies do not enter the ratios. Overheads of a few % are below the drift between two timing
  loops on a shared machine, so each pair is timed interleaved (latency.time_paired) and the
  ratio is the median of per-round ratios with its 95 % interval.

  Returns:
    {'per_exit': [{'exit', 'switch_ms', 'direct_ms', 'overhead_ratio', 'overhead_ratio_ci95',
    'rounds'}], 'routed': [{'threshold', 'exit', 'routed_ms', 'direct_ms', 'ratio',
    'ratio_ci95', 'rounds'}], 'note'}.
  """
  params = model.params
  dispatch, routed_exe = switch.compiled_dispatch(), switch.compiled_routed()

  def paired(fa, aa, fb, ab):
    return latency.time_paired(fa, aa, fb, ab, warmup=warmup, rounds=rounds)

  per_exit = []
  for k in range(model.num_exits):
    p = paired(dispatch, (params, jax.device_put(np.int32(k)), *one),
               switch.compiled_direct(k), (params, *one))
    per_exit.append({'exit': k, 'switch_ms': p['a']['median_ms'],
                     'direct_ms': p['b']['median_ms'], 'overhead_ratio': p['ratio'],
                     'overhead_ratio_ci95': list(p['ratio_ci95']), 'rounds': p['rounds']})
  routed = []
  for t in thresholds:
    args = (params, model.predictor_params, jax.device_put(model.margins_at(t)),
            jax.device_put(np.float32(t)), *one)
    k = int(routed_exe(*args)[1])
    p = paired(routed_exe, args, switch.compiled_direct(k), (params, *one))
    routed.append({'threshold': t, 'exit': k, 'routed_ms': p['a']['median_ms'],
                   'direct_ms': p['b']['median_ms'], 'ratio': p['ratio'],
                   'ratio_ci95': list(p['ratio_ci95']), 'rounds': p['rounds']})
  return {'per_exit': per_exit, 'routed': routed,
          'note': 'switch_ms: lax.switch on a scalar index given at run time; '
                  "routed_ms: predictor + route + switch in one executable; "
                  "direct_ms: the exit's own path; all at batch 1, timed "
                  'interleaved; ratios are medians of per-round ratios'}


def vmap_counterexample(model: model_lib.FianceeModel, bucketed: router_lib.BucketedRouter,
                        host_batch: Sequence[np.ndarray], batch: Sequence[Any],
                        threshold: float, backbone: dict[str, Any], *, warmup: int,
                        iters: int) -> dict[str, Any]:
  """vmap of a per-sample switch at len(batch), routed at `threshold`, against the backbone
  (`backbone`: its `exit_latencies` row): every exit runs for every sample."""
  ids = np.asarray(bucketed.predict_and_route(host_batch, threshold)[0], np.int32)
  vm = latency.compile_aot(router_lib.vmap_switch_fn(model), model.params, ids, *host_batch)
  tv = latency.time_compiled(vm, model.params, jax.device_put(ids), *batch, warmup=warmup,
                             iters=iters)
  backbone_ms = backbone['batch']['median_ms']
  return {
      'ms': tv['median_ms'], 'p90_ms': tv['p90_ms'],
      'backbone_ms': backbone_ms,
      'ratio_to_backbone': tv['median_ms'] / backbone_ms,
      'gflops': latency.cost_and_memory(vm)['gflops'],
      'backbone_gflops': backbone['cost_batch']['gflops'],
      'exit_histogram': np.bincount(ids, minlength=model.num_exits).astype(int).tolist(),
      'note': 'vmap turns the per-sample switch into a select: every exit runs for every sample',
  }


def kernel_ab(model: model_lib.FianceeModel, inputs: Sequence[Any], *, warmup: int,
              rounds: int, reference: Mapping[str, str] = kernels_lib.XLA,
              compiled: Sequence[Any] | None = None) -> dict[str, Any]:
  """The model's kernels against `reference` kernels: every exit path, built on each, timed
  interleaved at len(inputs[0]).

  Args:
    model: a FianceeModel.
    inputs: the model's inputs at the timed batch (device arrays).
    warmup, rounds: untimed calls, and interleaved rounds (latency.time_paired); rounds 0
      measures nothing.
    reference: concrete kernels of the second model (`with_kernels`), by default plain XLA.
    compiled: the model's exit executables at this batch, if already compiled.

  Returns:
    {'model': `model_kernels(model)` (what every other bench.json figure ran with),
    'reference': the reference kernels, 'ab': per exit {'exit', 'ms', 'reference_ms'
    (medians), 'speedup' (median over rounds of reference / model time), 'speedup_ci95',
    'gflops', 'reference_gflops' (XLA, whole batch), 'efficiency', 'reference_efficiency'
    (the exit's GFLOP/s over the backbone's on the same kernels: the measured over the
    FLOPs-predicted speedup of sending every sample to this exit), 'rounds'}}. 'ab' is []
    when rounds is 0 or the model already runs the reference kernels.
  """
  used = model_kernels(model)
  other = with_kernels(model, reference)
  out = {'model': used, 'reference': model_kernels(other), 'ab': []}
  if not rounds or out['reference'] == used:
    return out
  args = (model.params, *inputs)
  for k in range(model.num_exits):
    ours = (compiled[k] if compiled is not None
            else latency.compile_aot(model.exit_model.exit_path(k), *args))
    ref = latency.compile_aot(other.exit_model.exit_path(k), *args)
    p = latency.time_paired(ref, args, ours, args, warmup=warmup, rounds=rounds)
    out['ab'].append({
        'exit': k, 'ms': p['b']['median_ms'], 'reference_ms': p['a']['median_ms'],
        'speedup': p['ratio'], 'speedup_ci95': list(p['ratio_ci95']),
        'gflops': latency.cost_and_memory(ours)['gflops'],
        'reference_gflops': latency.cost_and_memory(ref)['gflops'], 'rounds': int(rounds)})
  bb = out['ab'][-1]
  for r in out['ab']:
    for pre in ('reference_', ''):
      r[f'{pre}efficiency'] = ((r[f'{pre}gflops'] / bb[f'{pre}gflops'])
                               / (r[f'{pre}ms'] / bb[f'{pre}ms']))
  return out


def _header(model: model_lib.FianceeModel, *, batch_size: int, warmup: int, iters: int,
            seed: int, switch_rounds: int, lowering_rounds: int, matmul_n: int,
            dtypes: Sequence[str]) -> dict[str, Any]:
  """Hardware, protocol and sizes, and the matmul GFLOP/s measured now (in every dtype)."""
  info = latency.device_info()
  matmul = {d: latency.matmul_gflops(matmul_n, iters=max(iters // 2, 1), warmup=min(warmup, 2),
                                     dtype=d)
            for d in dict.fromkeys(('float32', *dtypes))}
  return {
      'hardware': latency.hardware_string(info),
      'device': info,
      'protocol': {'warmup': int(warmup), 'iters': int(iters), 'seed': int(seed),
                   'switch_rounds': int(switch_rounds),
                   'lowering_rounds': int(lowering_rounds),
                   'timer': 'time.perf_counter around jax.block_until_ready, AOT-compiled',
                   'statistic': 'median and p90 over iters timed calls'},
      'batch_size': int(batch_size),
      'resolution': list(model.resolution),
      'num_exits': int(model.num_exits),
      'distance': model.distance,
      'matmul_n': int(matmul_n),
      'matmul_gflops_per_s': matmul['float32'],
      'matmul_gflops_per_s_by_dtype': matmul,
  }


def run_benchmark(model: model_lib.FianceeModel, data: Any, *, batch_size: int = 64,
                  thresholds: Sequence[float], warmup: int = 3, iters: int = 20,
                  seed: int = 0, matmul_n: int = 2048, switch_rounds: int = 100,
                  parts: bool = True, lowering_rounds: int = 20,
                  bucketed: router_lib.BucketedRouter | None = None,
                  switch: router_lib.SwitchRouter | None = None,
                  hlo_dir: str | None = None, trace_dir: str | None = None,
                  dtypes: Sequence[str] = ('float32', 'bfloat16'),
                  batch_sizes: Sequence[int] = (), grid_warmup: int = 1,
                  grid_iters: int = 3) -> dict[str, Any]:
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
    lowering_rounds: interleaved rounds of `kernel_ab` per exit (0: not measured).
    seed: seed of z.
    matmul_n: size of the [n, n] matmul that measures the machine's GFLOP/s.
    bucketed: a BucketedRouter for `model` whose buckets include `batch_size`, to reuse its
      executables (default: a new one with buckets 1, 2, 4, ..., batch_size).
    switch: a SwitchRouter for `model` to reuse (default: a new one).
    hlo_dir: where every exit's optimised HLO and memory analysis go (exit{k}_b{b}.hlo.txt,
      .memory.json, at batch 1 and batch_size); None: not written.
    trace_dir: where a profiler trace of every exit at batch_size goes (trace_dir/exit{k}_b{b},
      `iters` calls each); None: not traced.
    dtypes: compute dtypes of the precision grid (and of the matmul GFLOP/s).
    batch_sizes: batch sizes of the precision grid (`precision_grid`); () = not measured.
    grid_warmup, grid_iters: untimed and timed calls per cell of the grid.

  Returns:
    A JSON-serialisable dict (bench_markdown.render_markdown renders it). Keys: 'hardware',
    'device', 'protocol', 'batch_size', 'resolution', 'num_exits', 'distance', 'matmul_n',
    'matmul_gflops_per_s', 'matmul_gflops_per_s_by_dtype', 'dtype' (the compute dtype of
    every figure outside the grid), 'exits', 'profile', 'exit_parts', 'backbone',
    'predictor', 'routing', 'switch', 'vmap_switch', 'kernels', 'precision' (None when
    batch_sizes is empty), 'router_compiles'.

  Raises:
    ValueError: bad data, thresholds or sizes (before anything is compiled).
  """
  data, thresholds = _check_arguments(model, data, thresholds, batch_size, warmup, iters,
                                      switch_rounds, lowering_rounds, bucketed, switch)
  dtypes = precision_grid.check_grid(dtypes, batch_sizes or [1], grid_warmup, grid_iters)[0]
  timing = dict(warmup=warmup, iters=iters)
  batch = tuple(np.asarray(x) for x in model.make_inputs(
      tuple(x[:batch_size] for x in data), jax.random.key(seed)))
  one = tuple(x[:1] for x in batch)
  out = _header(model, batch_size=batch_size, seed=seed, switch_rounds=switch_rounds,
                lowering_rounds=lowering_rounds, matmul_n=matmul_n, dtypes=dtypes, **timing)
  out['dtype'] = precision_grid.model_dtype(model)

  # One bucket set serves both the router and the per-exit batch latencies.
  bucketed = bucketed or router_lib.BucketedRouter(model, router_lib.default_buckets(batch_size))
  bucketed.warmup()
  switch = switch or router_lib.SwitchRouter(model)
  switch.warmup()
  compiles_after_warmup = bucketed.num_compiles + switch.num_compiles

  # Executables' latencies run on device-resident inputs; the routed numbers start from host
  # arrays, as a served request does.
  one_d, batch_d = jax.device_put((one, batch))
  exits = exit_latencies(model, switch, bucketed, one_d, batch_d, **timing)
  out['exits'] = exits
  out['profile'] = {
      'hlo_dir': hlo_dir, 'trace_dir': trace_dir,
      'top_ops_source': 'trace' if trace_dir else 'hlo_op_counts',
      'exits': profiling.exit_profiles(model, switch, bucketed, one_d, batch_d, hlo_dir=hlo_dir,
                                       trace_dir=trace_dir, calls=iters)}
  out['exit_parts'] = exit_parts(model, batch_d, **timing) if parts else []
  out['backbone'] = {'gflops': float(model.backbone_gflops),
                     'images_per_s': exits[-1]['images_per_s'],
                     'batch_median_ms': exits[-1]['batch']['median_ms']}
  out['predictor'] = predictor_latency(model, bucketed, thresholds[0], one_d, batch_d, **timing)
  out['routing'] = routed_throughput(model, bucketed, batch, batch_d, thresholds, exits,
                                     out['predictor']['batch']['median_ms'], **timing)
  out['switch'] = switch_overheads(model, switch, thresholds, one_d, warmup=warmup,
                                   rounds=switch_rounds)
  out['vmap_switch'] = vmap_counterexample(model, bucketed, batch, batch_d, thresholds[0],
                                           exits[-1], **timing)
  out['kernels'] = kernel_ab(
      model, batch_d, warmup=warmup, rounds=lowering_rounds,
      compiled=[bucketed.compiled_exit(k, batch_size) for k in range(model.num_exits)])
  out['precision'] = None
  if batch_sizes:
    # The routers' executables are the model's own dtype at the bucket sizes: not compiled
    # a second time.
    def routers_exe(d, k, b):
      return (bucketed.compiled_exit(k, b)
              if d == out['dtype'] and b in bucketed.bucket_sizes else None)

    out['precision'] = precision_grid.precision_grid(
        model, data, dtypes=dtypes, batch_sizes=batch_sizes, warmup=grid_warmup,
        iters=grid_iters, seed=seed, compiled=routers_exe)

  recompiles = bucketed.num_compiles + switch.num_compiles - compiles_after_warmup
  if recompiles:
    raise RuntimeError(f'routers compiled {recompiles} executables after warm-up; the '
                       'routed timings would include compilation')
  out['router_compiles'] = {'bucketed': bucketed.num_compiles, 'switch': switch.num_compiles,
                            'after_warmup': recompiles,
                            'buckets': list(bucketed.bucket_sizes)}
  return out


def write_bench(bench: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """Writes `bench.json` and `bench.md` into out_dir (created if needed); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'bench.json')
  md_path = os.path.join(out_dir, 'bench.md')
  with open(json_path, 'w') as f:
    json.dump(bench, f, indent=2, allow_nan=False)
  with open(md_path, 'w') as f:
    f.write(bench_markdown.render_markdown(bench))
  return json_path, md_path


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage `benchmark`: report/bench.json and report/bench.md of the workdir's artifacts,
  timed on the test split's first min(router.num_eval, data.num_test) examples; every exit's
  HLO and memory analysis in report/hlo/, its profiler trace under config.benchmark.trace_dir
  (relative to report/; '' = not traced).

  Latency is a per-host measurement: in a multi-process run, process 0 times on its own
  devices and writes the files, while the others (after loading the model with it: artifact
  reads are collective) wait for it, up to BENCHMARK_WAIT seconds, and return what it wrote.
  """
  model = loading.load_model(workdir, config)
  report_dir = os.path.join(workdir, 'report')
  # t* and fixed thresholds only: a threshold picked from the evaluate stage's results would
  # always favour 'everyone to the earliest exit'.
  thresholds = report.benchmark_thresholds(config, workdir, model)
  if jax.process_index() != 0:
    parallel.barrier('fiancee_benchmark', timeout=BENCHMARK_WAIT)
    with open(os.path.join(report_dir, 'bench.json')) as f:
      return json.load(f)
  trace_dir = config.benchmark.get('trace_dir', '')
  n = min(config.router.num_eval, config.data.num_test)
  inputs = exit_distances.load_inputs(config, 'test', n)
  b = config.benchmark
  bench = run_benchmark(model, inputs[:len(model.task.data_keys)], batch_size=b.batch_size,
                        thresholds=thresholds, warmup=b.warmup, iters=b.iters,
                        switch_rounds=b.switch_rounds, parts=b.exit_parts,
                        lowering_rounds=b.lowering_rounds, seed=config.seed,
                        hlo_dir=os.path.join(report_dir, 'hlo'),
                        trace_dir=os.path.join(report_dir, trace_dir) if trace_dir else None,
                        dtypes=tuple(b.dtypes), batch_sizes=tuple(b.batch_sizes),
                        grid_warmup=b.grid_warmup, grid_iters=b.grid_iters)
  # What config.kernels asked for, and the backend 'auto' was resolved on (ops/kernels.py).
  bench['kernels'].update(config=dict(config.get('kernels') or {}),
                          platform=jax.default_backend())
  # Paths relative to report/, so that bench.json does not depend on where the workdir is.
  for key in ('hlo_dir', 'trace_dir'):
    if bench['profile'][key]:
      bench['profile'][key] = os.path.relpath(bench['profile'][key], report_dir)
  write_bench(bench, report_dir)
  parallel.barrier('fiancee_benchmark', timeout=BENCHMARK_WAIT)
  return bench
