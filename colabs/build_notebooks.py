"""Writes the Colabs (colabs/*.ipynb) from the cell sources below, outputs stripped.

  python colabs/build_notebooks.py

Edit the cells here, not in the .ipynb files: tests/colabs_test.py checks that the stored
notebooks are exactly what this script writes (no outputs, null execution counts, fixed cell
ids), then executes them top to bottom on the tests' tiny workdir.
"""
import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
# Setup. On Colab: clone fiancee-jax and install it with its pinned requirements (pyproject.toml
# declares no dependencies, requirements.txt pins them). The project has no public URL yet:
# set REPO_URL to the git URL you cloned it from (your fork or mirror). Locally: nothing, run
# from a checkout installed with `pip install -r requirements.txt -e .`.
import os
import sys

REPO_URL = ''  # @param {type:"string"}
IN_COLAB = 'google.colab' in sys.modules
if IN_COLAB:
  if not REPO_URL:
    raise ValueError('set REPO_URL (the form field above) to the git URL of fiancee-jax')
  if not os.path.exists('fiancee-jax'):
    !git clone -q --depth 1 {REPO_URL} fiancee-jax
  %cd fiancee-jax
  !pip install -q -r requirements.txt -e .
  sys.path.insert(0, os.getcwd())'''

CONFIG = '''\
# BACKBONE: 'landscapes' (OASIS, label map -> image) or 'avatars' (MegaPortraits-style face
# reenactment: source face + driver face -> the source with the driver's motion).
# Quick mode: the `tiny` config trains every stage in a few minutes on a CPU runtime.
# QUICK = False selects the 64x64 default config (a much longer run; see configs/).
# FIANCEE_WORKDIR names a finished job to load instead of training (CI sets it, with
# FIANCEE_CONFIG and FIANCEE_DATA_DIR, the TFDS data_dir that job used).
BACKBONE = 'landscapes'  # @param ["landscapes", "avatars"]
QUICK = True  # @param {type:"boolean"}

import json
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import fiancee_jax
from configs import avatars
from configs import landscapes
from fiancee_jax import pipeline
from fiancee_jax.data import sources

BACKBONE = os.environ.get('FIANCEE_CONFIG', BACKBONE)
config = {'landscapes': landscapes, 'avatars': avatars}[BACKBONE].get_config(
    'tiny' if QUICK else None)
if os.environ.get('FIANCEE_DATA_DIR'):
  with config.unlocked():
    config.data.data_dir = os.environ['FIANCEE_DATA_DIR']
WORKDIR = os.environ.get('FIANCEE_WORKDIR') or os.path.abspath(
    f"runs/colab_{BACKBONE}_{'tiny' if QUICK else 'default'}")
print('jax', jax.__version__, jax.devices())
print('workdir', WORKDIR)


def show(fig):
  """Displays a figure once (and only once: it is closed, so inline mode does not repeat it)."""
  display(fig)
  plt.close(fig)'''

TRAIN_OR_LOAD = '''\
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
%matplotlib inline

model = fiancee_jax.load_model(WORKDIR)  # with the config the job stored (config.json)
with open(os.path.join(WORKDIR, 'report', 'report.json')) as f:
  report = json.load(f)
with open(os.path.join(WORKDIR, 'report', 'bench.json')) as f:
  bench = json.load(f)
print(f'{model.task.name}: {model.num_exits} exits (the last is the backbone), distance: '
      f'{model.distance}, resolution {model.resolution[0]}x{model.resolution[1]}, data '
      f'{model.task.data_keys}')'''


def _demo_cells():
  md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
  return [
      md('''\
# FIANCEE: conditional early exits for a GAN generator, in JAX

[FIANCEE](https://arxiv.org/abs/2304.10306) (Karpikova et al., CVPR 2023) makes a trained
generator cheaper on easy inputs. Lightweight **exit branches** finish the image from an
intermediate stage of the backbone, a **guiding database** of backbone output patches lifts
their quality, and a small **predictor** estimates, from the input alone, how far each exit's
image will be from the full backbone's. At inference you set a distance threshold; every input
takes the cheapest exit predicted to meet it. Two backbones: OASIS (label map -> image, on
procedural landscapes) and a MegaPortraits-style face reenactment model (source + driver ->
image, on procedural avatars; exits on its 2D decoder G2D). Pick one with `BACKBONE`.

This notebook trains the whole job on an embedded procedural dataset (nothing to download),
then shows:

1. one input through every exit, with each exit's GFLOPs;
2. a threshold slider that routes a batch and shows the exits taken and the compute saved;
3. the distance-vs-GFLOPs curve of the evaluation report;
4. the compiled latency of every exit and of routed batches from the benchmark.

Quick mode runs in a few minutes on a CPU runtime. `compiled_exit_latency.ipynb` goes deeper
into how compiled exits turn into latency.'''),
      code(SETUP),
      code(CONFIG),
      md('''\
## Train or load

`pipeline.run` is what `python -m fiancee_jax.main` calls: backbone (adversarial),
guiding database, exit branches (distilled from the frozen backbone), predictor (regresses each
exit's measured distance), evaluate (`report/report.json`) and benchmark (`report/bench.json`).
The tiny config is too small to make good images; it shows the mechanics, not the quality.
Training prints nothing until it is done: follow `WORKDIR/metrics.jsonl`, or TensorBoard on
`WORKDIR`.'''),
      code(TRAIN_OR_LOAD),
      code('''\
# What each exit costs (XLA cost analysis of its own compiled path at batch 1, database lookup
# included) and how far its images are from the backbone's on the test split.
backbone_gflops = report['backbone']['gflops']
rows = ['| exit | attached after block | GFLOPs | share of backbone | params | mean distance |',
        '|---|---|---|---|---|---|']
for e in report['exits']:
  rows.append(f"| {e['exit']} | {e['attach_after']} | {e['gflops']:.4g} | "
              f"{e['gflops'] / backbone_gflops:.0%} | {e['params']:,} | "
              f"{e['mean_distance']:.3f} |")
rows.append(f"| backbone | - | {backbone_gflops:.4g} | 100% | "
            f"{report['backbone']['params']:,} | 0 |")
display(Markdown('\\n'.join(rows)))
p, db = report['predictor'], report['database']
print(f"predictor: {p['gflops']:.3g} GFLOPs, MAE {p['mae']:.3f}; database: {db['entries']} "
      f"entries, lookup {db['lookup_gflops']:.3g} GFLOPs (counted in every guided exit)")'''),
      md('''\
## One input, every exit

Each exit is its own jitted function `path_k(params, *inputs)` (inputs `(labels, z)` for OASIS,
`(source, driver)` for reenactment): the exit index is static, so
each one compiles to its own, smaller executable. Under each image: the predictor's distance
estimate (the router adds the calibration margin of the threshold before comparing).'''),
      code('''\
from fiancee_jax.data import visualize
data = sources.load_data(config, 'test', 4)  # (labels,) or (source, driver)
inputs = model.make_inputs(data, jax.random.key(0))  # adds one z per image for OASIS
images = [np.asarray(jax.jit(path)(model.params, *inputs)) for path in model.paths()]
predicted = np.asarray(jax.jit(model.predict_fn())(model.predictor_params, *inputs))  # [4, E - 1]
pictures = model.task.columns(data)  # uint8 [4, H, W, 3] per data array

n, num_exits, c = len(data[0]), model.num_exits, len(pictures)
fig, axes = plt.subplots(n, num_exits + c, figsize=(2.2 * (num_exits + c), 2.3 * n),
                         squeeze=False)
for i in range(n):
  for j in range(c):
    axes[i, j].imshow(pictures[j][i])
  for k in range(num_exits):
    ax = axes[i, k + c]
    ax.imshow(visualize.images_to_uint8(images[k][i]))
    if k < num_exits - 1:
      ax.set_xlabel(f'predicted {predicted[i, k]:.3f}', fontsize=8)
for k in range(num_exits):
  name = 'backbone' if k == num_exits - 1 else f'exit {k}'
  axes[0, k + c].set_title(f'{name}\\n{model.exit_gflops[k]:.3g} GFLOPs '
                           f'({model.exit_gflops[k] / model.backbone_gflops:.0%})', fontsize=9)
for j, key in enumerate(model.task.data_keys):
  axes[0, j].set_title(key, fontsize=9)
for ax in axes.ravel():
  ax.set_xticks([])
  ax.set_yticks([])
fig.tight_layout()
show(fig)'''),
      md('''\
## Route a batch with a threshold

`fiancee_jax.generate(model, data, threshold=t)` runs the predictor, sends each sample to the
cheapest exit with `predicted + margin <= t` (else the backbone), and runs each group through
that exit's compiled path (bucketed batches: no `vmap` of a `switch`, no recompiles).
`show_routing` is the slider's callback; it is called once directly below, so the cell works
without a widget front end too.'''),
      code('''\
import ipywidgets as widgets

batch_data = sources.load_data(config, 'test', 8)
report_thresholds = [row['threshold'] for row in report['routing']]
t_max = max(report_thresholds)
# Start at the lowest threshold of the report at which some test inputs took an early exit.
default_threshold = next((row['threshold'] for row in report['routing']
                          if sum(row['exit_histogram'][:-1])), t_max)


def show_routing(threshold):
  """Routes `batch_data` at `threshold`; shows exits taken, images and compute saved."""
  out = fiancee_jax.generate(model, batch_data, threshold=threshold, seed=0)
  rows = model.task.columns(batch_data) + [visualize.images_to_uint8(out['images'])]
  n, r = len(batch_data[0]), len(rows)
  fig, axes = plt.subplots(r, n, figsize=(1.7 * n, 2.05 * r), squeeze=False)
  for i in range(n):
    k = int(out['exit_ids'][i])
    for j in range(r):
      axes[j, i].imshow(rows[j][i])
    axes[-1, i].set_xlabel('backbone' if k == model.num_exits - 1 else f'exit {k}', fontsize=9)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"threshold {threshold:.3f} ({model.distance}): "
               f"{out['mean_gflops']:.3g} of {model.backbone_gflops:.3g} GFLOPs per image, "
               f"{out['saved_fraction']:.0%} compute saved", fontsize=10)
  fig.tight_layout()
  show(fig)
  histogram = np.bincount(out['exit_ids'], minlength=model.num_exits)
  print('samples per exit (last = backbone):', histogram.tolist(),
        f"| compute saved: {out['saved_fraction']:.1%} (predictor included)")


show_routing(default_threshold)  # a direct call: what CI runs

slider = widgets.FloatSlider(value=default_threshold, min=0.0, max=round(1.5 * t_max, 4),
                             step=round(1.5 * t_max / 100, 5), description='threshold',
                             readout_format='.3f', continuous_update=False)
widgets.interact(show_routing, threshold=slider);'''),
      md('''\
## Quality vs compute (report.json)

The evaluate stage routes the test split at a range of thresholds. Left: mean distance to the
backbone against mean GFLOPs per image, for routing with the predictor, oracle routing (true
distances) and every exit alone. Right: the compute saved at each threshold, and the share of
samples that really met it (the calibration target is `config.router.target_met`).'''),
      code('''\
routing = report['routing']
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
ax0.plot([r['mean_gflops'] for r in routing], [r['mean_distance'] for r in routing], 'o-',
         label='routed (predictor)')
ax0.plot([(1 - r['oracle_saved_fraction']) * backbone_gflops for r in routing],
         [r['oracle_mean_distance'] for r in routing], 's--', label='oracle routing')
for e in report['exits']:
  ax0.plot(e['gflops'], e['mean_distance'], 'k^')
  ax0.annotate(f" exit {e['exit']}", (e['gflops'], e['mean_distance']), fontsize=8)
  if e.get('mean_distance_no_guidance') is not None:
    ax0.plot(e['gflops'], e['mean_distance_no_guidance'], 'rv')
ax0.plot([], [], 'k^', label='exit alone (guided)')
ax0.plot([], [], 'rv', label='exit alone (no guidance)')
ax0.plot([backbone_gflops], [0.0], 'k*', markersize=10, label='backbone')
ax0.set_xlabel('GFLOPs per image')
ax0.set_ylabel(f"mean {report['distance']} to the backbone")
ax0.legend(fontsize=8)
ax0.grid(alpha=0.3)
t = [r['threshold'] for r in routing]
ax1.plot(t, [r['saved_fraction'] for r in routing], 'o-', label='saved (predictor)')
ax1.plot(t, [r['oracle_saved_fraction'] for r in routing], 's--', label='saved (oracle)')
ax1.plot(t, [r['best_static_saved_fraction'] for r in routing], 'x:',
         label='saved (best single exit)')
ax1.plot(t, [r['met_fraction'] for r in routing], 'd-', color='grey', label='met threshold')
ax1.set_xlabel(f"threshold ({report['distance']})")
ax1.set_ylabel('fraction')
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3)
fig.tight_layout()
show(fig)

rows = ['| threshold | GFLOPs/image | saved | met | oracle saved | best single exit saved | '
        'samples per exit |', '|---|---|---|---|---|---|---|']
for r in routing:
  rows.append(f"| {r['threshold']:.3f} | {r['mean_gflops']:.3g} | {r['saved_fraction']:.0%} | "
              f"{r['met_fraction']:.0%} | {r['oracle_saved_fraction']:.0%} | "
              f"{r['best_static_saved_fraction']:.0%} | "
              f"{' / '.join(map(str, r['exit_histogram']))} |")
display(Markdown('\\n'.join(rows)))'''),
      md('''\
## Against the ground truth (reenactment)

Procedural avatars give cross-reenactment a ground truth: the source's identity rendered with
the driver's motion. The evaluate stage measures every exit, the backbone and the routed output
against it, next to two baselines that need no model: copying the source and copying the
driver. (Label-map synthesis has no single right image, so there the report measures distances
to the backbone only.)'''),
      code('''\
if 'ground_truth' in report:
  gt = report['ground_truth']
  rows = [f"| output | {gt['distance']} to truth | L1 to truth |", '|---|---|---|']
  for e in gt['exits']:
    name = 'backbone' if e['exit'] == len(gt['exits']) - 1 else f"exit {e['exit']}"
    rows.append(f"| {name} | {e['distance']:.3f} | {e['l1']:.3f} |")
  for name in ('copy_source', 'copy_driver'):
    rows.append(f"| {name.replace('_', ' ')} | {gt[name]['distance']:.3f} | "
                f"{gt[name]['l1']:.3f} |")
  display(Markdown('\\n'.join(rows)))
  print(f"backbone closer to the truth than copying the source on "
        f"{gt['backbone_better_than_copy_source_fraction']:.0%} of {gt['num_eval']} pairs")
else:
  print(f'{model.task.name}: no ground truth for an output; distances are to the backbone')'''),
      md('''\
## Latency (bench.json)

The benchmark stage compiles every exit ahead of time, warms up, and times it with
`time.perf_counter()` around `block_until_ready()` (median and p90). Routed throughput is end to
end (predictor, host-side grouping, padding, transfers). On the tiny config the exits are so
small that fixed per-call costs dominate, so measured speedups sit far below the FLOPs ones;
the 64x64 config on an accelerator is where they meet.'''),
      code('''\
b = bench['batch_size']
lines = [f"**{bench['hardware']}**, jax {bench['device']['jax']}; matmul "
         f"{bench['matmul_gflops_per_s']:.3g} GFLOP/s; {bench['protocol']['iters']} timed calls "
         f"after {bench['protocol']['warmup']} warm-up calls; median (p90) ms.", '',
         f'| exit | GFLOPs | batch 1 ms | batch {b} ms | images/s |', '|---|---|---|---|---|']
for x in bench['exits']:
  lines.append(f"| {'backbone' if x['is_backbone'] else x['exit']} | {x['gflops']:.3g} | "
               f"{x['batch1']['median_ms']:.3g} ({x['batch1']['p90_ms']:.3g}) | "
               f"{x['batch']['median_ms']:.3g} ({x['batch']['p90_ms']:.3g}) | "
               f"{x['images_per_s']:.4g} |")
lines += ['', f'| threshold | routed images/s (batch {b}) | measured speedup | FLOPs speedup | '
          'samples per exit |', '|---|---|---|---|---|']
for r in bench['routing']:
  lines.append(f"| {r['threshold']:.3f} | {r['images_per_s']:.4g} | "
               f"{r['measured_speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
               f"{' / '.join(map(str, r['exit_histogram']))} |")
vm = bench['vmap_switch']
lines += ['', f"`vmap` of a per-sample `lax.switch` at batch {b}: {vm['ms']:.3g} ms, "
          f"{vm['ratio_to_backbone']:.2f}x the backbone's time ({vm['gflops']:.3g} vs "
          f"{vm['backbone_gflops']:.3g} XLA GFLOPs): every exit runs for every sample."]
display(Markdown('\\n'.join(lines)))'''),
      md('''\
## Next

* `colabs/compiled_exit_latency.ipynb`: each exit's executable, its cost and memory analysis,
  and `lax.switch` vs bucketed routing vs `vmap` of a switch, measured.
* The CLI: `python -m fiancee_jax.main --config=configs/landscapes.py --workdir=runs/default`
  runs the same stages; `python -m fiancee_jax.stats --config=configs/landscapes.py` prints the
  cost of every exit without training.'''),
  ]


def _latency_cells():
  md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
  return [
      md('''\
# Compiled early exits: from FLOPs to latency

For researchers who want to know what an early exit costs once XLA has compiled it. FIANCEE
saves FLOPs by sending easy inputs to cheap exits; whether that becomes wall-clock time depends
on how the exits are compiled and dispatched. Three JAX facts decide it:

* `jax.lax.switch` on a **scalar** index compiles to an XLA conditional: only the taken branch
  runs (batch of one).
* Under `jax.vmap` with a **per-sample** index the switch becomes a select: **every branch runs
  for every sample**. Batched routing must not vmap a switch.
* `cost_analysis()` of a switch with a runtime index reports the largest branch, so per-exit
  FLOPs come from compiling each exit on its own.

This notebook compiles every exit ahead of time, prints XLA's cost and memory analysis and the
HLO size, then times batch-1 `lax.switch` dispatch, bucketed batch routing (what
`fiancee_jax.generate` uses) and the vmap-of-switch counter-example. Every timing follows the
project's latency protocol (`fiancee_jax.metrics.latency`): compiled ahead of time, warmed up,
`perf_counter` around `block_until_ready`, median and p90, and a timed loop that recompiles
raises.'''),
      code(SETUP),
      code(CONFIG),
      code(TRAIN_OR_LOAD),
      code('''\
import jax.numpy as jnp

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
exit_names = [f'exit {k}' for k in range(E - 1)] + ['backbone']'''),
      md('''\
## Every exit, compiled ahead of time

`latency.compile_aot(path_k, params, *inputs)` lowers and compiles exit `k`'s path for one
batch shape; nothing runs. `cost_and_memory` reads the executable's `cost_analysis()` (FLOPs,
bytes accessed) and `memory_analysis()` (argument, output and temporary buffers, generated
code), and the size of its optimized HLO text.'''),
      code('''\
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
display(Markdown('\\n'.join(rows)))
print('model.exit_gflops (batch 1, what routing counts):',
      [round(g, 6) for g in model.exit_gflops])
print('Every exit recomputes the backbone prefix it is attached to, so each executable holds '
      'that prefix plus its branch; the backbone executable holds no branch.')'''),
      code('''\
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
show(fig)'''),
      md('''\
## Latency of every exit

Each executable is timed on device-resident inputs. If latency were proportional to FLOPs the
points would sit on the dashed line through the backbone; at small sizes a fixed per-call cost
(dispatch, small kernels that do not fill the machine) keeps cheap exits above it.'''),
      code('''\
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
display(Markdown('\\n'.join(rows)))

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
show(fig)'''),
      md('''\
## Batch of one: `lax.switch`

`SwitchRouter` compiles the predictor, the routing rule and a `lax.switch` over every exit path
into one executable. Because the index is a scalar, XLA emits a conditional and runs only the
taken branch. Below: the switch executable with the index given at run time against each exit's
own executable (the overhead of the conditional), and XLA's cost analysis of the switch, which
reports the most expensive branch, not the one taken.'''),
      code('''\
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
display(Markdown('\\n'.join(rows)))

fig, ax = plt.subplots(figsize=(6, 3.4))
x = np.arange(E)
ax.bar(x - 0.2, direct_ms, 0.4, label="exit's own executable")
ax.bar(x + 0.2, switch_ms, 0.4, label='lax.switch, index at run time')
ax.set_xticks(x, exit_names)
ax.set_ylabel('median ms, batch 1')
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)'''),
      md('''\
## Batches: bucketed routing

`BucketedRouter` runs the predictor on the device, groups the samples by exit on the host,
covers each group with bucket-sized chunks (by default powers of two up to the batch, largest
first, so 41 samples run as 32 + 8 + 1; only a remainder below the smallest bucket is padded)
and calls that exit's own executable at each size, then scatters the images back in order.
`warmup()` compiles every
(exit, bucket) pair once; after it, no call compiles (`time_fn` would raise if one did).'''),
      code('''\
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

rows = [f'| threshold | samples per exit | exit calls | padded samples | routed ms (p90) | '
        f'backbone ms | measured speedup | FLOPs speedup |', '|' + '---|' * 8]
for r in bucket_rows:
  rows.append(f"| {r['threshold']:.3f} | {' / '.join(map(str, r['histogram']))} | "
              f"{r['calls']} | {r['padded']} | {r['ms']:.3g} ({r['p90_ms']:.3g}) | "
              f"{backbone_ms:.3g} | {backbone_ms / r['ms']:.2f}x | "
              f"{r['flops_speedup']:.2f}x |")
display(Markdown('\\n'.join(rows)))
print('Routed times are end to end from host arrays (predictor, grouping, padding, '
      'transfers); the backbone time is its executable on device-resident inputs.')'''),
      md('''\
## The counter-example: `vmap` of a per-sample `switch`

`router.vmap_switch_fn(model)` is the tempting way to route a batch: `vmap` over samples of
`lax.switch(exit_id, paths, ...)`. With a batched index, the conditional becomes a select, so
XLA computes every exit for every sample, whatever the routing (it may share the backbone
prefix the exits have in common, so the cost is that of all exits together, not their sum).
Below, every sample is sent to the cheapest exit; the bucketed router runs exit 0 only, the
vmapped switch still runs them all (and takes the same time for any assignment).'''),
      code('''\
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
display(Markdown('\\n'.join(rows)))'''),
      code('''\
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
show(fig)'''),
      md('''\
## Reading the numbers

* Per-exit FLOPs come from each exit's own executable; the switch's cost analysis only gives an
  upper bound.
* At batch 1 the conditional costs little next to the exit it runs; the predictor is paid on
  every request.
* Batched routing pays for host-side grouping, padding and one call per used exit; it wins when
  the exits are large enough that compute, not dispatch, dominates (the 64x64 config on an
  accelerator, not the tiny one on a CPU).
* `vmap` of a switch never saves compute. The benchmark stage writes the same comparison to
  `report/bench.json` for every run.'''),
  ]


def _notebook(cells, name):
  for i, cell in enumerate(cells):
    cell['id'] = f'{name}-{i:02d}'  # fixed ids, so regenerating gives identical files
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata = {
      'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
      'language_info': {'name': 'python'},
      'colab': {'provenance': [], 'toc_visible': True},
  }
  nbformat.validate(nb)
  return nb


def notebooks() -> dict[str, nbformat.NotebookNode]:
  """{file name: notebook} of every Colab, outputs stripped."""
  return {'fiancee_demo.ipynb': _notebook(_demo_cells(), 'demo'),
          'compiled_exit_latency.ipynb': _notebook(_latency_cells(), 'latency')}


def main():
  for name, nb in notebooks().items():
    path = os.path.join(HERE, name)
    with open(path, 'w', encoding='utf-8') as f:
      nbformat.write(nb, f)
    print('wrote', path)


if __name__ == '__main__':
  main()
