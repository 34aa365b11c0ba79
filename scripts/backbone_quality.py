"""Backbone quality against the real images: a Frechet distance on LPIPS features.

  python scripts/backbone_quality.py --out=docs/results/backbone_quality \
      --run=shipped:runs/default --run=300_steps:runs/bb300

FID's Inception weights cannot be fetched here, so the distance is a stated substitute:
the Frechet distance between Gaussians fitted to the LPIPS-AlexNet trunk features
(`metrics/lpips.Features`: each tap channel-normalised as LPIPS compares them, spatially
averaged, 1152-d) of two image sets. Each run's backbone artifact generates images for the
first N validation label maps (each with its fixed z) and is compared with the first N
real test images; the floor is the real validation images against the same real test
images (N = min(num_validation, num_test) of the first run's config). Every set has N
images, so the estimator's bias (N < 1152 features) is the same in every row: compare rows,
not absolute values with FID. Writes OUT/backbone_quality.json and OUT/backbone_quality.md.
"""
from collections.abc import Sequence

import numpy as np
from absl import app
from absl import flags

from fiancee_jax import workdir as workdir_lib
from fiancee_jax.data import sources
from fiancee_jax.evaluation import results_md
from fiancee_jax.metrics import exit_distances
from fiancee_jax.metrics import fid
from fiancee_jax.metrics import lpips
from fiancee_jax.training import artifact_io
from fiancee_jax.training import t_star

_RUNS = flags.DEFINE_multi_string('run', [], 'NAME:WORKDIR of a run with a backbone artifact.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_BATCH = 32


def _fd(feature_fn, a: np.ndarray, b_stats) -> float:
  mu, sigma = fid.statistics(fid.compute_features(feature_fn, a, batch=_BATCH))
  return float(fid.frechet_distance(mu, sigma, *b_stats))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _RUNS.value or not _OUT.value:
    raise app.UsageError('give --out and at least one --run=NAME:WORKDIR')
  runs = []
  for spec in _RUNS.value:
    name, sep, workdir = spec.partition(':')
    if not sep or not name or not workdir:
      raise app.UsageError(f'--run={spec!r}: expected NAME:WORKDIR')
    runs.append((name, workdir, workdir_lib.read_config(workdir)))
  first = runs[0][2]
  n = min(first.data.num_validation, first.data.num_test)
  net, feature_fn = lpips.make_feature_fn()
  real_test = sources.load_split(first, 'test', n)['image']
  test_stats = fid.statistics(fid.compute_features(feature_fn, real_test, batch=_BATCH))
  rows = [{'name': 'real validation (floor)',
           'fd': _fd(feature_fn, sources.load_split(first, 'validation', n)['image'],
                     test_stats)}]
  for name, workdir, config in runs:
    backbone = artifact_io.load_backbone(config, workdir)
    inputs = exit_distances.load_inputs(config, 'validation', n)
    images = t_star.backbone_outputs(config, backbone.tree, inputs, _BATCH)
    rows.append({'name': name, 'backbone_fingerprint': backbone.fingerprint,
                 'fd': _fd(feature_fn, images, test_stats)})
  result = {'metric': f'Frechet distance on LPIPS-{net} trunk features (1152-d)',
            'num_images': int(n), 'reference': f'first {n} real test images', 'rows': rows}
  lines = [f"{result['metric']}, {n} images against the {result['reference']} "
           '(lower is closer; the floor is real against real).', '',
           '| images | FD-LPIPS |', '|---|---|']
  lines += [f"| {r['name']} | {r['fd']:.4f} |" for r in rows]
  results_md.write_table(_OUT.value, 'backbone_quality', result, '\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
