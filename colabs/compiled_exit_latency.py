# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Compiled early exits: from FLOPs to latency
#
# For researchers who want to know what an early exit costs once XLA has compiled it. FIANCEE
# saves FLOPs by sending easy inputs to cheap exits; whether that becomes wall-clock time depends
# on how the exits are compiled and dispatched. Three JAX facts decide it:
#
# * `jax.lax.switch` on a **scalar** index compiles to an XLA conditional: only the taken branch
#   runs (batch of one).
# * Under `jax.vmap` with a **per-sample** index the switch becomes a select: **every branch runs
#   for every sample**. Batched routing must not vmap a switch.
# * `cost_analysis()` of a switch with a runtime index reports the largest branch, so per-exit
#   FLOPs come from compiling each exit on its own.
#
# This notebook compiles every exit ahead of time, prints XLA's cost and memory analysis and the
# HLO size, then times batch-1 `lax.switch` dispatch, bucketed batch routing (what
# `fiancee_jax.generate` uses) and the vmap-of-switch counter-example. Every timing follows the
# project's latency protocol (`fiancee_jax.metrics.latency`): compiled ahead of time, warmed up,
# `perf_counter` around `block_until_ready`, median and p90, and a timed loop that recompiles
# raises.

# %% tags=["parameters"]
# @title Parameters
# REPO_URL: the git URL of fiancee-jax, cloned when the notebook runs outside a checkout (on
# Colab). Inside a checkout the notebook uses that checkout.
# BACKBONE: 'landscapes' (OASIS, label map -> image) or 'avatars' (MegaPortraits-style face
# reenactment: source face + driver face -> the source with the driver's motion).
# QUICK: the `tiny` config trains every stage in a few minutes on a CPU runtime; QUICK = False
# selects the 64x64 default config (a much longer run; see configs/).
REPO_URL = ''  # @param {type:"string"}
BACKBONE = 'landscapes'  # @param ["landscapes", "avatars"]
QUICK = True  # @param {type:"boolean"}
# WORKDIR: where the job is trained, or loaded from once finished ('' = runs/colab_BACKBONE_tiny
# or _default in the checkout: both notebooks use it, so the second loads the first's job).
# DATA_DIR: the TFDS data_dir the embedded datasets are generated into ('' = TFDS's default).
WORKDIR = ''  # @param {type:"string"}
DATA_DIR = ''  # @param {type:"string"}

# %%
# Setup. Inside a fiancee-jax checkout (the notebook opened from it, or run with the current
# directory in it) the notebook uses that checkout; on Colab it clones REPO_URL. When the
# package is not installed in the kernel, it installs it from the checkout with its `colab`
# extra only: the runtime's own jax and jaxlib stay when they satisfy the package's ranges
# (pyproject.toml).
import os
import subprocess
import sys
from importlib import metadata


def find_checkout(start):
  """The nearest directory at or above `start` with pyproject.toml and fiancee_jax/, or None."""
  path = os.path.abspath(start)
  while True:
    if (os.path.isfile(os.path.join(path, 'pyproject.toml'))
        and os.path.isdir(os.path.join(path, 'fiancee_jax'))):
      return path
    if os.path.dirname(path) == path:
      return None
    path = os.path.dirname(path)


def installed_version(name):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


IN_COLAB = 'google.colab' in sys.modules
ROOT = find_checkout(os.getcwd())
if ROOT is None and IN_COLAB:
  ROOT = os.path.abspath('fiancee-jax')
  if not os.path.isdir(ROOT):
    if not REPO_URL:
      raise ValueError('set REPO_URL (the Parameters cell) to the git URL of fiancee-jax')
    subprocess.run(['git', 'clone', '-q', '--depth', '1', REPO_URL, ROOT], check=True)
elif ROOT is None:
  raise RuntimeError('open this notebook from a fiancee-jax checkout installed with '
                     '`pip install -r requirements.txt -e .`, or on Colab')
if installed_version('fiancee-jax') is None:
  # Packages already imported by the runtime keep their old version until a restart.
  loaded = {name: installed_version(name) for name in ('jax', 'jaxlib', 'numpy', 'ipywidgets')
            if name in sys.modules}
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', '.[colab]'], cwd=ROOT,
                 check=True)
  changed = [name for name, version in loaded.items() if installed_version(name) != version]
  if changed:
    print(f'pip replaced {changed}, already imported: restart the kernel (on Colab: Runtime > '
          'Restart session), then run all cells again')
os.chdir(ROOT)
sys.path.insert(0, ROOT)  # configs/ is read from the checkout, not installed

# %%
import json
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown
from IPython.display import display

import fiancee_jax
from configs import avatars
from configs import landscapes
from fiancee_jax import pipeline
from fiancee_jax.data import sources

config = {'landscapes': landscapes, 'avatars': avatars}[BACKBONE].get_config(
    'tiny' if QUICK else None)
if DATA_DIR:
  config.data.data_dir = DATA_DIR
WORKDIR = os.path.abspath(WORKDIR or f"runs/colab_{BACKBONE}_{'tiny' if QUICK else 'default'}")
print('jax', jax.__version__, jax.devices())
print('workdir', WORKDIR)


def show(fig):
  """Displays a figure once (and only once: it is closed, so inline mode does not repeat it)."""
  display(fig)
  plt.close(fig)


# %%
# Train every stage, or load the finished job. Each stage resumes from its own checkpoint, so an
# interrupted run continues where it stopped.
STAGES = 'backbone,database,exits,predictor,evaluate,benchmark'
if os.path.exists(os.path.join(WORKDIR, 'report', 'bench.json')):
  print('loading the finished job in', WORKDIR)
else:
  start = time.perf_counter()
  pipeline.run(config, WORKDIR, STAGES)
  print(f'all stages done in {time.perf_counter() - start:.0f} s')
# The evaluate stage draws its PNGs with matplotlib's Agg backend; back to inline figures.
# %matplotlib inline

model = fiancee_jax.load_model(WORKDIR)  # with the config the job stored (config.json)
with open(os.path.join(WORKDIR, 'report', 'report.json')) as f:
  report = json.load(f)
with open(os.path.join(WORKDIR, 'report', 'bench.json')) as f:
  bench = json.load(f)
print(f'{model.task.name}: {model.num_exits} exits (the last is the backbone), distance: '
      f'{model.distance}, resolution {model.resolution[0]}x{model.resolution[1]}, data '
      f'{model.task.data_keys}')

# %%
from fiancee_jax.metrics import latency
from fiancee_jax.routing import router

# Quick mode times few calls; raise ITERS for numbers you want to quote.
WARMUP, ITERS = (2, 5) if QUICK else (5, 50)
BATCH = config.benchmark.batch_size  # the batch for throughput numbers (8 in quick mode)

print(latency.hardware_string())
matmul_n = 512 if QUICK else 2048
print(f'float32 matmul {matmul_n}x{matmul_n}: '
      f'{latency.matmul_gflops(matmul_n, iters=ITERS, warmup=WARMUP):.1f} GFLOP/s')

# The exit paths' inputs: (labels, z) for OASIS, (source, driver) for reenactment.
inputs_np = tuple(np.asarray(x) for x in model.make_inputs(
    sources.load_data(config, 'test', BATCH), jax.random.key(config.seed)))
# Device-resident copies, so executables are timed without host-to-device transfers.
inputs_d = jax.device_put(inputs_np)
one_d = jax.device_put(tuple(x[:1] for x in inputs_np))
params = model.params
E = model.num_exits
exit_names = [f'exit {k}' for k in range(E - 1)] + ['backbone']

# %% [markdown]
# ## Every exit, compiled ahead of time
#
# `latency.compile_aot(path_k, params, *inputs)` lowers and compiles exit `k`'s path for one
# batch shape; nothing runs. `cost_and_memory` reads the executable's `cost_analysis()` (FLOPs,
# bytes accessed) and `memory_analysis()` (argument, output and temporary buffers, generated
# code), and the size of its optimized HLO text.

# %%
compiled = {}  # (exit, batch) -> jax.stages.Compiled
costs = {}
for k, path in enumerate(model.paths()):
  for b, args in ((1, one_d), (BATCH, inputs_d)):
    start = time.perf_counter()
    compiled[k, b] = latency.compile_aot(path, params, *args)
    costs[k, b] = dict(latency.cost_and_memory(compiled[k, b]),
                       compile_s=time.perf_counter() - start)

rows = ['| exit | batch | compile s | XLA GFLOPs | GFLOPs / image | MB accessed | '
        'args KB | output KB | temp KB | code KB | HLO KB | HLO lines | convolutions |',
        '|' + '---|' * 13]
for (k, b), c in costs.items():
  hlo = compiled[k, b].as_text()  # optimized HLO, after fusion
  rows.append(f"| {exit_names[k]} | {b} | {c['compile_s']:.2f} | {c['gflops']:.4g} | "
              f"{c['gflops'] / b:.4g} | {c['bytes_accessed'] / 1e6:.3g} | "
              f"{c['argument_bytes'] / 1e3:.4g} | {c['output_bytes'] / 1e3:.4g} | "
              f"{c['temp_bytes'] / 1e3:.4g} | {c['generated_code_bytes'] / 1e3:.4g} | "
              f"{c['hlo_text_bytes'] / 1e3:.4g} | {len(hlo.splitlines())} | "
              f"{hlo.count(' convolution(')} |")
display(Markdown('\n'.join(rows)))
print('model.exit_gflops (batch 1, what routing counts):',
      [round(g, 6) for g in model.exit_gflops])
print('Every exit recomputes the backbone prefix it is attached to, so each executable holds '
      'that prefix plus its branch; the backbone executable holds no branch.')

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
x = np.arange(E)
for i, b in enumerate((1, BATCH)):
  off = (i - 0.5) * 0.4
  axes[0].bar(x + off, [costs[k, b]['gflops'] / b for k in range(E)], 0.4,
              label=f'batch {b}')
  axes[1].bar(x + off, [costs[k, b]['temp_bytes'] / 1e3 for k in range(E)], 0.4,
              label=f'batch {b}')
  axes[2].bar(x + off, [costs[k, b]['hlo_text_bytes'] / 1e3 for k in range(E)], 0.4,
              label=f'batch {b}')
for ax, title in zip(axes, ('XLA GFLOPs per image', 'temporary buffers (KB)',
                            'optimized HLO text (KB)')):
  ax.set_xticks(x, exit_names)
  ax.set_title(title)
  ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Latency of every exit
#
# Each executable is timed on device-resident inputs. If latency were proportional to FLOPs the
# points would sit on the dashed line through the backbone; at small sizes a fixed per-call cost
# (dispatch, small kernels that do not fill the machine) keeps cheap exits above it.

# %%
timings = {}
for (k, b), c in compiled.items():
  args = (params, *one_d) if b == 1 else (params, *inputs_d)
  timings[k, b] = latency.time_compiled(c, *args, warmup=WARMUP, iters=ITERS)

rows = ['| exit | GFLOPs | batch 1 ms (p90) | batch %d ms (p90) | images/s at batch %d |'
        % (BATCH, BATCH), '|---|---|---|---|---|']
for k in range(E):
  t1, tb = timings[k, 1], timings[k, BATCH]
  rows.append(f"| {exit_names[k]} | {model.exit_gflops[k]:.4g} | {t1['median_ms']:.3g} "
              f"({t1['p90_ms']:.3g}) | {tb['median_ms']:.3g} ({tb['p90_ms']:.3g}) | "
              f"{BATCH / (tb['median_ms'] * 1e-3):.4g} |")
display(Markdown('\n'.join(rows)))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
g = np.asarray(model.exit_gflops)
for ax, b in zip(axes, (1, BATCH)):
  ms = np.asarray([timings[k, b]['median_ms'] for k in range(E)])
  p90 = np.asarray([timings[k, b]['p90_ms'] for k in range(E)])
  ax.errorbar(g, ms, yerr=[np.zeros(E), p90 - ms], fmt='o', capsize=3)
  for k in range(E):
    ax.annotate(' ' + exit_names[k], (g[k], ms[k]), fontsize=8)
  ax.plot([0, g[-1]], [0, ms[-1]], 'k--', alpha=0.5, label='proportional to FLOPs')
  ax.set_xlabel('GFLOPs per image (batch 1 cost)')
  ax.set_ylabel('median ms per call (bar: p90)')
  ax.set_title(f'batch {b}')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Batch of one: `lax.switch`
#
# `SwitchRouter` compiles the predictor, the routing rule and a `lax.switch` over every exit path
# into one executable. Because the index is a scalar, XLA emits a conditional and runs only the
# taken branch. Below: the switch executable with the index given at run time against each exit's
# own executable (the overhead of the conditional), and XLA's cost analysis of the switch, which
# reports the most expensive branch, not the one taken.

# %%
switch = router.SwitchRouter(model)
dispatch = switch.compiled_dispatch()  # (params, exit_id int32 [], *inputs) -> image
routed = switch.compiled_routed()  # (params, predictor params, margins, threshold, *inputs)
switch_cost = latency.cost_and_memory(dispatch)
print(f"cost_analysis of the switch: {switch_cost['gflops']:.4g} GFLOPs "
      f"(largest branch: {max(costs[k, 1]['gflops'] for k in range(E)):.4g}, "
      f"cheapest: {min(costs[k, 1]['gflops'] for k in range(E)):.4g})")

switch_ms, direct_ms = [], []
for k in range(E):
  ts = latency.time_compiled(dispatch, params, jax.device_put(np.int32(k)), *one_d,
                             warmup=WARMUP, iters=ITERS)
  switch_ms.append(ts['median_ms'])
  direct_ms.append(timings[k, 1]['median_ms'])

thresholds = sorted({row['threshold'] for row in report['routing']})
if QUICK and len(thresholds) > 4:  # the lowest, two in between and the highest
  thresholds = [thresholds[i] for i in np.linspace(0, len(thresholds) - 1, 4).astype(int)]
routed_rows = []
for t in thresholds:
  margins_d = jax.device_put(model.margins_at(t))  # the calibration margin of this threshold
  args = (params, model.predictor_params, margins_d, jax.device_put(np.float32(t)), *one_d)
  k = int(routed(*args)[1])
  tr = latency.time_compiled(routed, *args, warmup=WARMUP, iters=ITERS)
  routed_rows.append((t, k, tr['median_ms']))

rows = ['| exit | switch ms | own executable ms | ratio |', '|---|---|---|---|']
rows += [f'| {exit_names[k]} | {switch_ms[k]:.3g} | {direct_ms[k]:.3g} | '
         f'{switch_ms[k] / direct_ms[k]:.2f} |' for k in range(E)]
rows += ['', '| threshold | exit taken (first sample) | routed ms (predictor + switch) | '
         'that exit alone ms |', '|---|---|---|---|']
rows += [f'| {t:.3f} | {exit_names[k]} | {ms:.3g} | {direct_ms[k]:.3g} |'
         for t, k, ms in routed_rows]
display(Markdown('\n'.join(rows)))

fig, ax = plt.subplots(figsize=(6, 3.4))
x = np.arange(E)
ax.bar(x - 0.2, direct_ms, 0.4, label="exit's own executable")
ax.bar(x + 0.2, switch_ms, 0.4, label='lax.switch, index at run time')
ax.set_xticks(x, exit_names)
ax.set_ylabel('median ms, batch 1')
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Batches: bucketed routing
#
# `BucketedRouter` runs the predictor on the device, groups the samples by exit on the host,
# covers each group with bucket-sized chunks (by default powers of two up to the batch, largest
# first, so 41 samples run as 32 + 8 + 1; only a remainder below the smallest bucket is padded)
# and calls that exit's own executable at each size, then scatters the images back in order.
# `warmup()` compiles every
# (exit, bucket) pair once; after it, no call compiles (`time_fn` would raise if one did).

# %%
# Quick mode compiles two bucket sizes (a remainder below 2 is padded); the full mode compiles
# powers of two up to BATCH, as `fiancee_jax.generate` does.
buckets = (2, BATCH) if QUICK else router.default_buckets(BATCH)
bucketed = router.BucketedRouter(model, buckets)
start = time.perf_counter()
num_compiles = bucketed.warmup()
print(f'warm-up: {num_compiles} executables (buckets {bucketed.bucket_sizes}) in '
      f'{time.perf_counter() - start:.1f} s')

backbone_ms = timings[E - 1, BATCH]['median_ms']
bucket_rows = []
for t in thresholds:
  res = bucketed(inputs_np, t)
  plan = bucketed.plan(res.exit_ids)
  tb = latency.time_fn(bucketed, inputs_np, t, warmup=WARMUP, iters=ITERS)
  mean_gflops = float(np.mean(res.gflops))
  bucket_rows.append(dict(
      threshold=t, ms=tb['median_ms'], p90_ms=tb['p90_ms'],
      histogram=np.bincount(res.exit_ids, minlength=E).tolist(), calls=len(plan),
      padded=sum(b - n for _, b, _, n in plan),
      flops_speedup=model.backbone_gflops / mean_gflops))
assert bucketed.num_compiles == num_compiles, 'the router compiled after warm-up'

rows = ['| threshold | samples per exit | exit calls | padded samples | routed ms (p90) | '
        'backbone ms | measured speedup | FLOPs speedup |', '|' + '---|' * 8]
for r in bucket_rows:
  rows.append(f"| {r['threshold']:.3f} | {' / '.join(map(str, r['histogram']))} | "
              f"{r['calls']} | {r['padded']} | {r['ms']:.3g} ({r['p90_ms']:.3g}) | "
              f"{backbone_ms:.3g} | {backbone_ms / r['ms']:.2f}x | "
              f"{r['flops_speedup']:.2f}x |")
display(Markdown('\n'.join(rows)))
print('Routed times are end to end from host arrays (predictor, grouping, padding, '
      'transfers); the backbone time is its executable on device-resident inputs.')

# %% [markdown]
# ## The counter-example: `vmap` of a per-sample `switch`
#
# `router.vmap_switch_fn(model)` is the tempting way to route a batch: `vmap` over samples of
# `lax.switch(exit_id, paths, ...)`. With a batched index, the conditional becomes a select, so
# XLA computes every exit for every sample, whatever the routing (it may share the backbone
# prefix the exits have in common, so the cost is that of all exits together, not their sum).
# Below, every sample is sent to the cheapest exit; the bucketed router runs exit 0 only, the
# vmapped switch still runs them all (and takes the same time for any assignment).

# %%
vmap_fn = router.vmap_switch_fn(model)
cheapest = np.zeros(BATCH, np.int32)  # every sample to exit 0
mixed = np.arange(BATCH, dtype=np.int32) % E  # every exit used
vm = latency.compile_aot(vmap_fn, params, cheapest, *inputs_d)
vm_cost = latency.cost_and_memory(vm)

t_vm = {name: latency.time_compiled(vm, params, jax.device_put(ids), *inputs_d,
                                    warmup=WARMUP, iters=ITERS)['median_ms']
        for name, ids in (('cheapest', cheapest), ('mixed', mixed))}
t_bucket = {name: latency.time_fn(bucketed.run_exits, ids, inputs_np, warmup=WARMUP,
                                  iters=ITERS)['median_ms']
            for name, ids in (('cheapest', cheapest), ('mixed', mixed))}

same = np.max(np.abs(np.asarray(vm(params, jax.device_put(mixed), *inputs_d))
                     - bucketed.run_exits(mixed, inputs_np)))
sum_gflops = sum(costs[k, BATCH]['gflops'] for k in range(E))
print(f"XLA GFLOPs at batch {BATCH}: vmap(switch) {vm_cost['gflops']:.4g} (all exits run; "
      f"their own executables add up to {sum_gflops:.4g}, each with its copy of the shared "
      f"prefix); backbone {costs[E - 1, BATCH]['gflops']:.4g}; exit 0 "
      f"{costs[0, BATCH]['gflops']:.4g}")
print(f'same images from both dispatchers (mixed exits): max |difference| = {same:.2e}')

rows = [f'| batch {BATCH}, median ms | every sample to exit 0 | mixed exits |', '|---|---|---|',
        f"| bucketed routing (own executables) | {t_bucket['cheapest']:.3g} | "
        f"{t_bucket['mixed']:.3g} |",
        f"| vmap of lax.switch | {t_vm['cheapest']:.3g} | {t_vm['mixed']:.3g} |",
        f'| backbone alone | {backbone_ms:.3g} | {backbone_ms:.3g} |']
display(Markdown('\n'.join(rows)))

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={'width_ratios': [3, 2]})
names = ([f"bucketed t={r['threshold']:.3f}" for r in bucket_rows]
         + ['bucketed, all exit 0', 'vmap(switch), all exit 0', 'vmap(switch), mixed',
            'backbone'])
values = ([r['ms'] for r in bucket_rows]
          + [t_bucket['cheapest'], t_vm['cheapest'], t_vm['mixed'], backbone_ms])
colors = ['C0'] * (len(bucket_rows) + 1) + ['C3', 'C3', 'k']
ax0.barh(names, values, color=colors)
ax0.invert_yaxis()
ax0.set_xlabel(f'median ms per batch of {BATCH}')
ax0.set_title('batched dispatch')
ax1.bar(['exit 0', 'backbone', 'vmap(switch)'],
        [costs[0, BATCH]['gflops'], costs[E - 1, BATCH]['gflops'], vm_cost['gflops']],
        color=['C0', 'k', 'C3'])
ax1.set_ylabel(f'XLA GFLOPs at batch {BATCH}')
ax1.set_title('what XLA compiled')
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Reading the numbers
#
# * Per-exit FLOPs come from each exit's own executable; the switch's cost analysis only gives an
#   upper bound.
# * At batch 1 the conditional costs little next to the exit it runs; the predictor is paid on
#   every request.
# * Batched routing pays for host-side grouping, padding and one call per used exit; it wins when
#   the exits are large enough that compute, not dispatch, dominates (the 64x64 config on an
#   accelerator, not the tiny one on a CPU).
# * `vmap` of a switch never saves compute. The benchmark stage writes the same comparison to
#   `report/bench.json` for every run.
