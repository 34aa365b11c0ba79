"""Inside the compiled exits: optimised HLO, memory analysis and profiler traces.

  files = write_hlo(compiled, 'WORKDIR/report/hlo', 'exit0_b64')  # .hlo.txt, .memory.json
  log_dir = trace_calls(compiled, args, 'WORKDIR/report/trace/exit0_b64', calls=10)
  top = top_ops_from_trace(log_dir, compiled.as_text(), calls=10)  # ms per call, per HLO op

A trace directory is a TensorBoard log directory (`tensorboard --logdir=WORKDIR/report/trace`,
Profile tab) and its `plugins/profile/*/*.trace.json.gz` opens in Perfetto (ui.perfetto.dev).
The top ops come from that trace file, read offline with the standard library: every event the
XLA runtime records for an HLO instruction carries `args.hlo_op` and `args.hlo_module` (CPU
thunks and GPU kernels alike), and the compiled module's HLO text names each instruction's
opcode and the JAX operation it came from. Without a trace, `op_counts` counts the HLO
instructions the executable runs, by opcode.
"""
import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from fiancee_jax import model as model_lib
from fiancee_jax.routing import router as router_lib

# `  %name = type opcode(...)` or `  ROOT name = (tuple, type) opcode(...)`.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([^\s=]+) = (?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\(')
_COMPUTATION = re.compile(r'^\s*(ENTRY\s+)?%?([^\s(]+) \(.*\{\s*$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r'kind=(k\w+)')
_MODULE = re.compile(r'^HloModule ([^\s,]+)', re.MULTILINE)
# Instructions that are bookkeeping, not work: left out of op counts.
_NOT_WORK = frozenset({'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'})


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Every instruction of an HLO module's text.

  Returns:
    {instruction name: {'opcode': str ('fusion:kLoop' for fusions), 'source': the JAX
    operation it came from (metadata op_name, '' if none), 'fused': bool (inside a fusion's
    computation, so never run on its own)}}.
  """
  out, fused = {}, False
  for line in hlo_text.splitlines():
    comp = _COMPUTATION.match(line)
    if comp:
      fused = comp.group(1) is None and 'fused' in comp.group(2)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    opcode = m.group(2)
    kind = _FUSION_KIND.search(line) if opcode == 'fusion' else None
    source = _OP_NAME.search(line)
    out[m.group(1)] = {'opcode': f'{opcode}:{kind.group(1)}' if kind else opcode,
                       'source': source.group(1) if source else '', 'fused': fused}
  return out


def module_name(hlo_text: str) -> str:
  """The HloModule name of a module's text ('' if absent)."""
  m = _MODULE.search(hlo_text)
  return m.group(1) if m else ''


def op_counts(hlo_text: str, top: int = 5) -> list[dict[str, Any]]:
  """The `top` most frequent opcodes among the instructions the executable runs (outside
  fusion computations; parameters, constants and tuples left out): [{'opcode', 'count'}]."""
  counts = collections.Counter(i['opcode'] for i in hlo_instructions(hlo_text).values()
                               if not i['fused'] and i['opcode'] not in _NOT_WORK)
  return [{'opcode': op, 'count': n} for op, n in counts.most_common(top)]


def memory_analysis(compiled: jax.stages.Compiled) -> dict[str, int]:
  """`compiled.memory_analysis()` as {field: bytes} (every integer field the backend reports;
  {} where it reports none)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  return {k: int(getattr(mem, k)) for k in dir(mem)
          if not k.startswith('_') and isinstance(getattr(mem, k, None), int)}


def write_hlo(compiled: jax.stages.Compiled, out_dir: str, stem: str) -> dict[str, str]:
  """Writes out_dir/{stem}.hlo.txt (optimised HLO) and {stem}.memory.json.

  Returns:
    {'hlo': path, 'memory': path}.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {'hlo': os.path.join(out_dir, f'{stem}.hlo.txt'),
           'memory': os.path.join(out_dir, f'{stem}.memory.json')}
  with open(paths['hlo'], 'w') as f:
    f.write(compiled.as_text() or '')
  with open(paths['memory'], 'w') as f:
    json.dump(memory_analysis(compiled), f, indent=2)
  return paths


def trace_calls(compiled: jax.stages.Compiled, args: Sequence[Any], log_dir: str, *,
                calls: int) -> str:
  """Runs `compiled(*args)` `calls` times (each to completion) under `jax.profiler.trace`.

  Call it after warm-up: the trace then holds execution only. Returns log_dir.
  """
  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(log_dir):
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
  return log_dir


def trace_files(log_dir: str) -> list[str]:
  """The Chrome-format trace files (`*.trace.json.gz`) under a profiler log directory."""
  return sorted(glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', '*.trace.json.gz')))


def top_ops_from_trace(log_dir: str, hlo_text: str, *, calls: int,
                       top: int = 5) -> list[dict[str, Any]]:
  """The HLO instructions of one executable that took the most time in its trace.

  Args:
    log_dir: a `trace_calls` directory holding only this executable's calls.
    hlo_text: the executable's optimised HLO (`compiled.as_text()`).
    calls: how many calls the trace holds.
    top: rows to return.

  Returns:
    [{'op': instruction name, 'opcode', 'source' (JAX operation), 'ms' (per call, summed over
    the op's events), 'share' (of the time of every traced op of the module)}], longest first;
    [] if the trace holds no event of this module.

  Raises:
    FileNotFoundError: log_dir holds no trace file.
  """
  files = trace_files(log_dir)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz under {log_dir}/plugins/profile; trace the '
                            'executable first (trace_calls)')
  instructions, module = hlo_instructions(hlo_text), module_name(hlo_text)
  micros = collections.Counter()
  for path in files:
    with gzip.open(path, 'rt') as f:
      events = json.load(f).get('traceEvents', [])
    for e in events:
      a = e.get('args') or {}
      if e.get('ph') == 'X' and 'hlo_op' in a and a.get('hlo_module', module) == module:
        micros[a['hlo_op']] += float(e.get('dur', 0.0))
  total = sum(micros.values())
  rows = []
  for op, us in micros.most_common(top):
    info = instructions.get(op, {'opcode': '?', 'source': ''})
    rows.append({'op': op, 'opcode': info['opcode'], 'source': info['source'],
                 'ms': us / 1e3 / max(calls, 1), 'share': us / total if total else 0.0})
  return rows


def profile_executable(compiled: jax.stages.Compiled, args: Sequence[Any], stem: str, *,
                       hlo_dir: str | None, trace_dir: str | None, calls: int,
                       top: int = 5) -> dict[str, Any]:
  """HLO and memory files, and optionally a trace, of one warmed-up executable.

  Args:
    compiled: the executable (already called, so nothing compiles while tracing).
    args: its arguments (device arrays).
    stem: file and trace-directory name, e.g. 'exit0_b64'.
    hlo_dir: where `write_hlo` writes; None: no files.
    trace_dir: where the trace goes (trace_dir/stem); None: not traced.
    calls: calls to trace.
    top: op rows.

  Returns:
    {'stem', 'hlo_file', 'memory_file' (file names in hlo_dir; None when not written),
    'trace' (the trace's directory name in trace_dir; None when not traced), 'memory'
    (bytes per field), 'top_ops' (by time from the trace, else []), 'op_counts' (by opcode
    from the HLO)}.
  """
  text = compiled.as_text() or ''
  out = {'stem': stem, 'hlo_file': None, 'memory_file': None, 'trace': None,
         'memory': memory_analysis(compiled), 'top_ops': [], 'op_counts': op_counts(text, top)}
  if hlo_dir:
    files = write_hlo(compiled, hlo_dir, stem)
    out.update(hlo_file=os.path.basename(files['hlo']),
               memory_file=os.path.basename(files['memory']))
  if trace_dir:
    log_dir = trace_calls(compiled, args, os.path.join(trace_dir, stem), calls=calls)
    out['trace'] = stem
    out['top_ops'] = top_ops_from_trace(log_dir, text, calls=calls, top=top)
  return out


def exit_profiles(model: model_lib.FianceeModel, switch: router_lib.SwitchRouter,
                  bucketed: router_lib.BucketedRouter, one: Sequence[Any],
                  batch: Sequence[Any], *, hlo_dir: str | None, trace_dir: str | None,
                  calls: int, top: int = 5) -> list[dict[str, Any]]:
  """Per exit, `profile_executable` of its own path at batch 1 and at len(batch).

  The executables are the routers' (the ones the benchmark times), warmed up; only the
  len(batch) one is traced, `calls` times, in its own loop after the timed one, so the
  profiler's overhead never enters a timing.

  Args:
    model: the benchmarked FianceeModel.
    switch, bucketed: its warmed-up routers (bucketed has len(batch) as a bucket).
    one, batch: device-resident inputs at batch 1 and at the benchmark batch.
    hlo_dir: where exit{k}_b{b}.hlo.txt / .memory.json go; None: not written.
    trace_dir: where traces go (trace_dir/exit{k}_b{b}); None: not traced.
    calls: traced calls per exit.
    top: op rows per exit.

  Returns:
    Per exit: {'exit', 'batch1', 'batch'} with `profile_executable` records.
  """
  b = int(batch[0].shape[0])
  out = []
  for k in range(model.num_exits):
    out.append({
        'exit': k,
        'batch1': profile_executable(switch.compiled_direct(k), (model.params, *one),
                                     f'exit{k}_b1', hlo_dir=hlo_dir, trace_dir=None,
                                     calls=calls, top=top),
        'batch': profile_executable(bucketed.compiled_exit(k, b), (model.params, *batch),
                                    f'exit{k}_b{b}', hlo_dir=hlo_dir, trace_dir=trace_dir,
                                    calls=calls, top=top)})
  return out
