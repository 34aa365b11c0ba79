"""Plots of the evaluate stage (matplotlib, Agg): PNGs under workdir/report/.

Every plot is a function of report.json's content and of arrays the caller computed; nothing
here runs a model or imports the report module.
"""
import os

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

from fiancee_jax.data import visualize
from fiancee_jax.evaluation import intervals

ANCHOR_LABELS = {'blur_sigma1': 'blur σ=1', 'shift_1px': '1-px shift',
                 'noise_sigma0.03': 'noise σ=0.03', 'another_z': 'another z'}


def write_all(out: str, report: dict, pred: np.ndarray, true: np.ndarray, *,
              columns: list[np.ndarray], outputs: list[np.ndarray], routed_ids: np.ndarray,
              target: np.ndarray | None = None) -> None:
  """distance_vs_gflops.png, exit_histogram.png, predicted_vs_true.png, samples.png.

  Args:
    out: the report directory.
    report: the report (report.json's content).
    pred, true: float [N, E - 1] predicted and measured distances.
    columns: uint8 [M, H, W, 3] images showing the M samples' data (Task.columns).
    outputs: E arrays float [M, H, W, 3], every exit's output, the backbone last.
    routed_ids: int [M] the exit routing takes at t*.
    target: float [M, H, W, 3] ground truth, or None.
  """
  distance_vs_gflops(os.path.join(out, 'distance_vs_gflops.png'), report)
  exit_histogram(os.path.join(out, 'exit_histogram.png'), report)
  predicted_vs_true(os.path.join(out, 'predicted_vs_true.png'), pred, true, report['distance'])
  sample_grid(os.path.join(out, 'samples.png'), columns, outputs, routed_ids, target)


def _yerr(value: float, ci: list | None) -> np.ndarray | None:
  if not ci or ci[0] is None:
    return None
  return np.array([[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]])


def _interval(report: dict, path: str, fallback: list | None) -> list | None:
  """The across-seed interval of `path` when the report aggregates seeds, else `fallback`."""
  return intervals.seed_interval(report, path) or fallback


def distance_vs_gflops(path: str, report: dict) -> None:
  """Quality vs compute: routed, oracle, random mixture, each exit with its 95 % interval,
  t* and the anchors as horizontal lines."""
  backbone = report['backbone']['gflops']
  fig = Figure(figsize=(6.5, 4.5))
  ax = fig.subplots()
  r = report['routing']
  ax.plot([x['mean_gflops'] for x in r], [x['mean_distance'] for x in r], 'o-', ms=4,
          label='routed (predictor)')
  ax.plot([(1 - x['oracle_saved_fraction']) * backbone for x in r],
          [x['oracle_mean_distance'] for x in r], 's--', ms=4, label='oracle routing')
  mix = np.asarray(report.get('efficiency_curves', {}).get('random_mix', []), float)
  if len(mix):
    ax.plot((1 - mix[:, 1]) * backbone, mix[:, 0], ':', color='gray',
            label='random mixture (ignores the input)')
  at = report['at_t_star']
  saved_ci = _interval(report, 'at_t_star/saved_fraction', at.get('saved_fraction_ci95'))
  x = at['mean_gflops']
  xerr = None
  if saved_ci and saved_ci[0] is not None:
    lo, hi = (1 - saved_ci[1]) * backbone, (1 - saved_ci[0]) * backbone
    xerr = np.array([[max(x - lo, 0.0)], [max(hi - x, 0.0)]])
  ax.errorbar([x], [at['mean_distance']], xerr=xerr, fmt='D', color='C3', ms=7, capsize=3,
              label=f"routed at t* = {at['threshold']:.3g}")
  for k, e in enumerate(report['exits']):
    ci = _interval(report, f'exits/{k}/mean_distance', e.get('mean_distance_ci95'))
    ax.errorbar([e['gflops']], [e['mean_distance']], yerr=_yerr(e['mean_distance'], ci),
                fmt='k^', capsize=3)
    ax.annotate(f" exit {e['exit']}", (e['gflops'], e['mean_distance']), fontsize=8)
    if e.get('mean_distance_no_guidance') is not None:
      ax.plot(e.get('gflops_no_guidance') or e['gflops'], e['mean_distance_no_guidance'], 'rv')
  ax.plot([backbone], [0.0], 'k*', markersize=10, label='backbone')
  ax.plot([], [], 'k^', label='exit alone (guided, 95 % interval)')
  ax.plot([], [], 'rv', label='exit alone (no guidance)')
  ax.axhline(report['t_star']['value'], color='C3', lw=0.8, ls='--')
  left, right = ax.get_xlim()
  ax.annotate('t*', (left, report['t_star']['value']), fontsize=7, color='C3', ha='left',
              va='bottom')
  for name, value in report.get('distance_anchors', {}).items():
    if value is None:
      continue
    ax.axhline(value, color='0.6', lw=0.6, ls=':')
    label = ANCHOR_LABELS.get(name, name.replace('z_average_', 'mean over ') +
                              (' z' if name.startswith('z_average_') else ''))
    ax.annotate(label, (right, value), fontsize=6, color='0.4', ha='right', va='bottom')
  ax.set_xlabel('GFLOPs per image')
  ax.set_ylabel(f"mean {report['distance']} to backbone")
  ax.legend(fontsize=7)
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


def sample_grid(path: str, columns: list[np.ndarray], outputs: list[np.ndarray],
                routed_ids: np.ndarray, target: np.ndarray | None = None) -> None:
  """data | exit 0 | ... | backbone [| ground truth], the exit routing takes at t* framed in
  red."""
  cols = list(columns)
  for k, o in enumerate(outputs):
    img = visualize.images_to_uint8(np.asarray(o))
    chosen = np.asarray(routed_ids) == k
    img[chosen, :2] = img[chosen, -2:] = img[chosen, :, :2] = img[chosen, :, -2:] = (255, 0, 0)
    cols.append(img)
  if target is not None:
    cols.append(visualize.images_to_uint8(target))
  visualize.save_grid(cols, path)
