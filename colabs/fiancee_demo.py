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
# # FIANCEE: conditional early exits for a GAN generator, in JAX
#
# [FIANCEE](https://arxiv.org/abs/2304.10306) (Karpikova et al., CVPR 2023) makes a trained
# generator cheaper on easy inputs. Lightweight **exit branches** finish the image from an
# intermediate stage of the backbone, a **guiding database** of backbone output patches lifts
# their quality, and a small **predictor** estimates, from the input alone, how far each exit's
# image will be from the full backbone's. At inference you set a distance threshold; every input
# takes the cheapest exit predicted to meet it. Two backbones: OASIS (label map -> image, on
# procedural landscapes) and a MegaPortraits-style face reenactment model (source + driver ->
# image, on procedural avatars; exits on its 2D decoder G2D). Pick one with `BACKBONE`.
#
# This notebook trains the whole job on an embedded procedural dataset (nothing to download),
# then shows:
#
# 1. one input through every exit, with each exit's GFLOPs;
# 2. a threshold slider that routes a batch and shows the exits taken and the compute saved;
# 3. the distance-vs-GFLOPs curve of the evaluation report;
# 4. the compiled latency of every exit and of routed batches from the benchmark.
#
# Quick mode runs in a few minutes on a CPU runtime. `compiled_exit_latency.ipynb` goes deeper
# into how compiled exits turn into latency.

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


# %% [markdown]
# ## Train or load
#
# `pipeline.run` is what `python -m fiancee_jax.main` calls: backbone (adversarial),
# guiding database, exit branches (distilled from the frozen backbone), predictor (regresses each
# exit's measured distance), evaluate (`report/report.json`) and benchmark (`report/bench.json`).
# The tiny config is too small to make good images; it shows the mechanics, not the quality.
# Training prints nothing until it is done: follow `WORKDIR/metrics.jsonl`, or TensorBoard on
# `WORKDIR`.

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
display(Markdown('\n'.join(rows)))
p, db = report['predictor'], report['database']
print(f"predictor: {p['gflops']:.3g} GFLOPs, MAE {p['mae']:.3f}; database: {db['entries']} "
      f"entries, lookup {db['lookup_gflops']:.3g} GFLOPs (counted in every guided exit)")

# %% [markdown]
# ## One input, every exit
#
# Each exit is its own jitted function `path_k(params, *inputs)` (inputs `(labels, z)` for OASIS,
# `(source, driver)` for reenactment): the exit index is static, so
# each one compiles to its own, smaller executable. Under each image: the predictor's distance
# estimate (the router adds the calibration margin of the threshold before comparing).

# %%
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
  axes[0, k + c].set_title(f'{name}\n{model.exit_gflops[k]:.3g} GFLOPs '
                           f'({model.exit_gflops[k] / model.backbone_gflops:.0%})', fontsize=9)
for j, key in enumerate(model.task.data_keys):
  axes[0, j].set_title(key, fontsize=9)
for ax in axes.ravel():
  ax.set_xticks([])
  ax.set_yticks([])
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Route a batch with a threshold
#
# `fiancee_jax.generate(model, data, threshold=t)` runs the predictor, sends each sample to the
# cheapest exit with `predicted + margin <= t` (else the backbone), and runs each group through
# that exit's compiled path (bucketed batches: no `vmap` of a `switch`, no recompiles).
# `show_routing` is the slider's callback; it is called once directly below, so the cell works
# without a widget front end too.

# %%
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
_ = widgets.interact(show_routing, threshold=slider)

# %% [markdown]
# ## Quality vs compute (report.json)
#
# The evaluate stage routes the test split at a range of thresholds. Left: mean distance to the
# backbone against mean GFLOPs per image, for routing with the predictor, oracle routing (true
# distances) and every exit alone. Right: the compute saved at each threshold, and the share of
# samples that really met it (the calibration target is `config.router.target_met`).

# %%
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
display(Markdown('\n'.join(rows)))

# %% [markdown]
# ## Against the ground truth (reenactment)
#
# Procedural avatars give cross-reenactment a ground truth: the source's identity rendered with
# the driver's motion. The evaluate stage measures every exit, the backbone and the routed output
# against it, next to two baselines that need no model: copying the source and copying the
# driver. (Label-map synthesis has no single right image, so there the report measures distances
# to the backbone only.)

# %%
if 'ground_truth' in report:
  gt = report['ground_truth']
  rows = [f"| output | {gt['distance']} to truth | L1 to truth |", '|---|---|---|']
  for e in gt['exits']:
    name = 'backbone' if e['exit'] == len(gt['exits']) - 1 else f"exit {e['exit']}"
    rows.append(f"| {name} | {e['distance']:.3f} | {e['l1']:.3f} |")
  for name in ('copy_source', 'copy_driver'):
    rows.append(f"| {name.replace('_', ' ')} | {gt[name]['distance']:.3f} | "
                f"{gt[name]['l1']:.3f} |")
  display(Markdown('\n'.join(rows)))
  print(f"backbone closer to the truth than copying the source on "
        f"{gt['backbone_better_than_copy_source_fraction']:.0%} of {gt['num_eval']} pairs")
else:
  print(f'{model.task.name}: no ground truth for an output; distances are to the backbone')

# %% [markdown]
# ## Latency (bench.json)
#
# The benchmark stage compiles every exit ahead of time, warms up, and times it with
# `time.perf_counter()` around `block_until_ready()` (median and p90). Routed throughput is end to
# end (predictor, host-side grouping, padding, transfers). On the tiny config the exits are so
# small that fixed per-call costs dominate, so measured speedups sit far below the FLOPs ones;
# the 64x64 config on an accelerator is where they meet.

# %%
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
display(Markdown('\n'.join(lines)))

# %% [markdown]
# ## Next
#
# * `colabs/compiled_exit_latency.ipynb`: each exit's executable, its cost and memory analysis,
#   and `lax.switch` vs bucketed routing vs `vmap` of a switch, measured.
# * The CLI: `python -m fiancee_jax.main --config=configs/landscapes.py --workdir=runs/default`
#   runs the same stages; `python -m fiancee_jax.stats --config=configs/landscapes.py` prints the
#   cost of every exit without training.
