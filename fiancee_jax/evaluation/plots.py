"""Plots of the evaluate stage (matplotlib, Agg): PNGs under workdir/report/."""
import os

import jax
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

from fiancee_jax.data import visualize


def write_all(out: str, report: dict, pred: np.ndarray, true: np.ndarray, model,
              inputs: tuple[np.ndarray, ...], target: np.ndarray | None = None) -> None:
  """distance_vs_gflops.png, exit_histogram.png, predicted_vs_true.png, samples.png."""
  distance_vs_gflops(os.path.join(out, 'distance_vs_gflops.png'), report)
  exit_histogram(os.path.join(out, 'exit_histogram.png'), report)
  predicted_vs_true(os.path.join(out, 'predicted_vs_true.png'), pred, true, report['distance'])
  sample_grid(os.path.join(out, 'samples.png'), report, model, inputs, target)


def distance_vs_gflops(path: str, report: dict) -> None:
  backbone = report['backbone']['gflops']
  fig = Figure(figsize=(5.5, 4))
  ax = fig.subplots()
  r = report['routing']
  ax.plot([x['mean_gflops'] for x in r], [x['mean_distance'] for x in r], 'o-',
          label='routed (predictor)')
  ax.plot([(1 - x['oracle_saved_fraction']) * backbone for x in r],
          [x['oracle_mean_distance'] for x in r], 's--', label='oracle routing')
  for e in report['exits']:
    ax.plot(e['gflops'], e['mean_distance'], 'k^')
    ax.annotate(f"exit {e['exit']}", (e['gflops'], e['mean_distance']))
    if e.get('mean_distance_no_guidance') is not None:
      ax.plot(e['gflops'], e['mean_distance_no_guidance'], 'rv')
  ax.plot([backbone], [0.0], 'k*', markersize=10, label='backbone')
  ax.plot([], [], 'k^', label='exit alone (guided)')
  ax.plot([], [], 'rv', label='exit alone (no guidance)')
  ax.set_xlabel('GFLOPs per image')
  ax.set_ylabel(f"mean {report['distance']} to backbone")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def exit_histogram(path: str, report: dict) -> None:
  r = report['routing']
  hist = np.asarray([x['exit_histogram'] for x in r], float)
  hist = hist / hist.sum(axis=1, keepdims=True)
  fig = Figure(figsize=(5.5, 3.5))
  ax = fig.subplots()
  bottom = np.zeros(len(r))
  labels = [f'{x["threshold"]:.3f}' for x in r]
  for k in range(hist.shape[1]):
    name = 'backbone' if k == hist.shape[1] - 1 else f'exit {k}'
    ax.bar(labels, hist[:, k], bottom=bottom, label=name)
    bottom += hist[:, k]
  ax.set_xlabel('threshold')
  ax.set_ylabel('share of inputs')
  ax.tick_params(axis='x', rotation=60, labelsize=7)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def predicted_vs_true(path: str, pred: np.ndarray, true: np.ndarray, distance: str) -> None:
  e = true.shape[1]
  fig = Figure(figsize=(3.2 * e, 3.2))
  axes = fig.subplots(1, e, squeeze=False)
  for k in range(e):
    ax = axes[0, k]
    ax.scatter(true[:, k], pred[:, k], s=4, alpha=0.5)
    lim = [0, max(true[:, k].max(), pred[:, k].max()) * 1.05]
    ax.plot(lim, lim, 'k--', lw=0.8)
    ax.set_title(f'exit {k}')
    ax.set_xlabel(f'true {distance}')
    ax.set_ylabel('predicted')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def sample_grid(path: str, report: dict, model, inputs: tuple[np.ndarray, ...],
                target: np.ndarray | None = None, num: int = 8) -> None:
  """data | exit 0 | ... | backbone [| ground truth], the routed choice at the headline
  threshold framed in red."""
  from fiancee_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  num = min(num, len(inputs[0]))
  inputs = tuple(x[:num] for x in inputs)
  paths = model.paths()
  outs = [np.asarray(jax.jit(p)(model.params, *inputs)) for p in paths]
  t = report['headline'].get('threshold')
  if t is None:
    t = report['routing'][len(report['routing']) // 2]['threshold']
  pred = np.asarray(jax.jit(model.predict_fn())(model.predictor_params, *inputs))
  ids = report_lib.route_ids(pred, t, model.margins_at(t))
  cols = model.task.columns(inputs[:len(model.task.data_keys)])
  for k, o in enumerate(outs):
    img = ((o + 1) * 127.5).clip(0, 255).astype(np.uint8)
    chosen = ids == k
    img[chosen, :2] = img[chosen, -2:] = img[chosen, :, :2] = img[chosen, :, -2:] = (255, 0, 0)
    cols.append(img)
  if target is not None:
    cols.append(visualize.images_to_uint8(target[:num]))
  visualize.save_grid(cols, path)
