"""Can retrieval guide an exit? Residual guidance probed on trained unguided exits.

  python scripts/guidance_probe.py --workdir=runs/default --out=docs/results/guidance_probe

Here the retrieved entries carry what an exit cannot compute: the residual between the
backbone's image and exit 0's, for the same patch. For each seed's unguided exits (the
workdir for seed 0, WORKDIR/seeds/S for the others), a database is made of every patch of
the first `--num_images` training inputs (each with its fixed z): value = backbone image minus
exit 0's image over the patch (config.database.grid), key = the patch's pooled features of the
block exit 0 attaches to, concatenated with z (each part standardised, the z part weighted to
the features' total variance; `--keys` also tries features alone). On the test split, each
patch's top-k keys (Euclidean) give a retrieved residual (their mean) and:

- retrieval quality: mean absolute error of the retrieved residual against the true one,
  beside a random entry's and zero's (no correction);
- guided exit 0: exit 0's image + g x the retrieved residuals, g in [0, 1] fitted on the
  calibration split; its distance (config.distance) to the backbone against exit 0's, per
  test image, the change's 95 % interval across seeds (t) and within each seed (bootstrap).
  A perfect patch-mean correction (the true residual averaged over each patch) bounds what
  coarse values can give.

Equal compute: the lookup's GFLOPs (XLA's cost analysis of the key standardisation, the
distance matmul, top-k, blend and add, per image) are reported beside exit 0's; with
`--equal_compute_workdir=W`, an unguided run of the same config whose exit 0 is widened to
cost at least exit 0 plus the lookup, exit 0 of W's matching seed is scored on the same test
inputs and every row adds the guided exit's difference to it, paired by seed.

By default the database holds every patch (no k-means, any size): the most this retrieval
can offer at this num_images, at a lookup cost far above an exit's. With `--entries=N` it
holds N k-means centroids of the keys, each with the mean residual of its patches: the size
of a shipped database of num_entries = N (its lookup costs N x key width MACs per patch).
Writes OUT/guidance_probe.json and OUT/guidance_probe.md.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from fiancee_jax import replicates
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import intervals
from fiancee_jax.evaluation import results_md
from fiancee_jax.guidance import database
from fiancee_jax.inference import loading
from fiancee_jax.metrics import distances
from fiancee_jax.metrics import exit_distances
from fiancee_jax.metrics import flops

FLAGS = flags.FLAGS
_GAINS = (0.0, 0.25, 0.5, 0.75, 1.0)
_BATCH = 64
_QUERY_CHUNK = 1024


def _patch_pass(model, grid):
  """f(labels, z) -> (pooled features [B, gh*gw, C], exit 0 [B, H, W, 3], teacher)."""
  em, params = model.exit_model, model.params
  a0 = em.attach_after[0]

  @jax.jit
  def f(*inputs):
    outs, cond, teacher, guide = em.backbone_pass(params, *inputs)
    images, _ = em.branch_outputs(params['exits'], outs, cond, guide)
    pooled = database.pool(outs[a0].astype(jnp.float32), grid)
    return pooled.reshape(pooled.shape[0], -1, pooled.shape[-1]), images[0], teacher

  return f


def _run(f, inputs):
  outs = [f(*(x[s:s + _BATCH] for x in inputs)) for s in range(0, len(inputs[0]), _BATCH)]
  return tuple(np.concatenate([np.asarray(o[i]) for o in outs]) for i in range(3))


def _keys(pooled, z, kind, stats=None):
  """Keys [B * P, D] of pooled features [B, P, C] (+ z [B, Z]); stats from the database."""
  b, p, c = pooled.shape
  feats = pooled.reshape(b * p, c)
  parts = [feats]
  if kind == 'features+z':
    parts.append(np.repeat(z, p, axis=0))
  if stats is None:
    stats = [(x.mean(0), x.std(0) + 1e-6) for x in parts]
  out = [(x - m) / s for x, (m, s) in zip(parts, stats)]
  if len(out) == 2:
    out[1] = out[1] * np.sqrt(out[0].shape[1] / out[1].shape[1])
  return np.concatenate(out, axis=1).astype(np.float32), stats


@functools.partial(jax.jit, static_argnums=2)
def _nearest(q, keys, k):
  d = jnp.sum(keys * keys, 1)[None] - 2 * q @ keys.T
  return jax.lax.top_k(-d, k)[1]


def _retrieve(queries, keys, k):
  """Indices [Q, k] of each query's k nearest keys (Euclidean), nearest first."""
  idx = [np.asarray(_nearest(jnp.asarray(queries[s:s + _QUERY_CHUNK]), jnp.asarray(keys), k))
         for s in range(0, len(queries), _QUERY_CHUNK)]
  return np.concatenate(idx)


def _cluster(keys: np.ndarray, values: np.ndarray, n: int, key: jax.Array,
             iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """(centroids [n, D], mean value per centroid [n, V]) of k-means over keys [M, D]."""
  x = jnp.asarray(keys)
  cent = x[jax.random.choice(key, len(keys), (n,), replace=False)]

  @jax.jit
  def assign(cent):
    return jnp.argmin(jnp.sum(cent * cent, 1)[None] - 2 * x @ cent.T, axis=1)

  def means(a, v, old):
    count = jax.ops.segment_sum(jnp.ones(len(a)), a, n)
    total = jax.ops.segment_sum(v, a, n)
    return jnp.where(count[:, None] > 0, total / jnp.maximum(count, 1)[:, None], old)

  for _ in range(iters):
    cent = means(assign(cent), x, cent)
  a = assign(cent)
  return np.asarray(cent), np.asarray(means(a, jnp.asarray(values),
                                            jnp.zeros((n, values.shape[1]))))


def _image(spec, patches, b):
  """Patch values [B * P, ph * pw * 3] -> images [B, H, W, 3]."""
  gh, gw = spec.grid
  ph, pw = spec.patch
  x = patches.reshape(b, gh, gw, ph, pw, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * ph, gw * pw, 3)


def lookup_gflops(spec, queries: np.ndarray, keys: np.ndarray, values: np.ndarray,
                  k: int) -> float:
  """GFLOPs per image of retrieving and adding the guide: one image's standardised queries
  [P, D] -> squared distances to keys [N, D], top-k, mean of their values [N, V], tiled and
  added to an exit image (the queries' pooling and standardisation, a few P x D operations,
  left out)."""

  def lookup(q, keys, values, image):
    d = jnp.sum(keys * keys, 1)[None] - 2 * q @ keys.T
    idx = jax.lax.top_k(-d, k)[1]
    gh, gw = spec.grid
    ph, pw = spec.patch
    v = values[idx].mean(1).reshape(1, gh, gw, ph, pw, 3).transpose(0, 1, 3, 2, 4, 5)
    return image + v.reshape(image.shape)

  image = jnp.zeros((1, *spec.resolution, 3), jnp.float32)
  return flops.gflops(lookup, jnp.asarray(queries, jnp.float32), jnp.asarray(keys),
                      jnp.asarray(values), image)


def probe_seed(seed_dir: str, rng: np.random.Generator, wide_dir: str | None = None) -> dict:
  config = workdir_lib.read_config(seed_dir)
  model = loading.load_model(seed_dir, config, variant='unguided')
  spec = database.DatabaseSpec(
      resolution=tuple(config.data.resolution), grid=tuple(config.database.grid),
      key_block=model.exit_model.attach_after[0], feature_width=1, key_dim=1, num_entries=1,
      num_classes=config.data.num_classes)
  f = _patch_pass(model, spec.grid)
  dist = distances.from_config(config)
  dist_fn = jax.jit(dist.fn)

  def distance(x, y):
    return np.concatenate([np.asarray(dist_fn(x[s:s + _BATCH], y[s:s + _BATCH]))
                           for s in range(0, len(x), _BATCH)])

  split = {}
  for name, n in (('train', FLAGS.num_images), ('validation', FLAGS.num_calibration),
                  ('test', FLAGS.num_test)):
    inputs = exit_distances.load_inputs(config, name, n)
    pooled, exit0, teacher = _run(f, inputs)
    residual = database.patches_of(spec, teacher - exit0)  # [B * P, V]
    split[name] = dict(z=np.asarray(inputs[-1]), pooled=pooled, exit0=exit0, teacher=teacher,
                       residual=np.asarray(residual))
  db = split['train']
  result = {'seed': int(config.seed), 'num_entries': int(len(db['residual'])), 'rows': []}
  base = {s: distance(split[s]['exit0'], split[s]['teacher']) for s in ('validation', 'test')}
  test = split['test']
  b = len(test['exit0'])
  # A perfect patch-mean correction: the true residual averaged over each patch.
  res = test['residual'].reshape(len(test['residual']), -1, 3)
  coarse = np.repeat(res.mean(1, keepdims=True), res.shape[1], axis=1).reshape(res.shape[0], -1)
  perfect = distance(np.clip(test['exit0'] + _image(spec, coarse, b), -1, 1), test['teacher'])
  result['exit0'] = float(base['test'].mean())
  result['perfect_patch_mean'] = float(perfect.mean())
  result['exit0_gflops'] = float(model.exit_gflops[0])
  wide = None
  if wide_dir is not None:  # exit 0 of a wider unguided run, on the same test inputs
    wide_config = workdir_lib.read_config(wide_dir)
    if int(wide_config.seed) != int(config.seed):
      raise SystemExit(f'{wide_dir} has seed {wide_config.seed}, {seed_dir} has {config.seed}')
    wide_model = loading.load_model(wide_dir, wide_config, variant='unguided')
    _, wide_exit0, wide_teacher = _run(_patch_pass(wide_model, spec.grid),
                                       exit_distances.load_inputs(wide_config, 'test',
                                                                  FLAGS.num_test))
    np.testing.assert_allclose(wide_teacher, test['teacher'], atol=1e-5,
                               err_msg=f'{wide_dir} has another backbone or test inputs')
    wide = distance(wide_exit0, test['teacher'])
    result['wide_exit0'] = float(wide.mean())
    result['wide_exit0_gflops'] = float(wide_model.exit_gflops[0])
  for kind in FLAGS.keys:
    keys, stats = _keys(db['pooled'], db['z'], kind)
    values = db['residual']
    if FLAGS.entries:  # k-means centroids, each holding the mean residual of its patches
      keys, values = _cluster(keys, values, FLAGS.entries, jax.random.key(result['seed']))
    result['num_entries'] = int(len(values))
    idx = {s: _retrieve(_keys(split[s]['pooled'], split[s]['z'], kind, stats)[0], keys,
                        max(FLAGS.top_k)) for s in ('validation', 'test')}
    for k in FLAGS.top_k:
      retrieved = {s: values[idx[s][:, :k]].mean(1) for s in idx}
      random_entry = values[rng.integers(0, len(values), len(test['residual']))]
      mae = lambda v: float(np.abs(v - test['residual']).mean())  # noqa: E731

      def corrected(s, g):
        n = len(split[s]['exit0'])
        return np.clip(split[s]['exit0'] + g * _image(spec, retrieved[s], n), -1, 1)

      calib = [float(distance(corrected('validation', g), split['validation']['teacher']).mean())
               for g in _GAINS]
      g = _GAINS[int(np.argmin(calib))]
      guided = distance(corrected('test', g), test['teacher'])
      change = guided - base['test']
      boot = rng.integers(0, b, (1000, b))
      result['rows'].append({
          'keys': kind, 'top_k': k, 'gain': g,
          'mae_retrieved': mae(retrieved['test']), 'mae_random': mae(random_entry),
          'mae_zero': mae(np.zeros_like(test['residual'])),
          'guided': float(guided.mean()), 'change': float(change.mean()),
          'change_ci95_bootstrap': [float(np.percentile(change[boot].mean(1), 2.5)),
                                    float(np.percentile(change[boot].mean(1), 97.5))],
          'change_at_gain_1': float(
              (distance(corrected('test', 1.0), test['teacher']) - base['test']).mean()),
          'lookup_gflops': lookup_gflops(
              spec, _keys(test['pooled'][:1], test['z'][:1], kind, stats)[0], keys, values, k),
          'minus_wide': None if wide is None else float((guided - wide).mean()),
      })
  return result


def _fmt(v):
  return f'{v:+.4f}' if isinstance(v, float) else str(v)


def render(result: dict) -> str:
  seeds = result['seeds']
  lines = [f"Residual guidance probed on exit 0 of `{result['workdir']}`, {result['distance']}, "
           f"seeds {[s['seed'] for s in seeds]}; database: every {result['grid']} patch of "
           f"{result['num_images']} training inputs ({seeds[0]['num_entries']} entries"
           f"{', k-means centroids holding mean residuals' if result['entries'] else ''}); "
           f"{result['num_test']} test inputs. Mean over seeds (95 % t-interval across seeds).",
           '', f"Exit 0 alone: {result['exit0']['mean']:.4f} at {result['exit0_gflops']:.4f} "
           f"GFLOPs; with a perfect patch-mean correction: "
           f"{result['perfect_patch_mean']['mean']:.4f}.", '']
  wide = 'wide_exit0' in result
  if wide:
    lo, hi = result['wide_exit0']['ci95']
    lines += [f"Compute spent on width instead: exit 0 of `{result['equal_compute_workdir']}` "
              f"(unguided, wider) costs {result['wide_exit0_gflops']:.4f} GFLOPs (exit 0 plus "
              f"a lookup below: {result['exit0_gflops']:.4f} plus its lookup GFLOPs) and scores "
              f"{result['wide_exit0']['mean']:.4f} ({lo:.4f} to {hi:.4f}).", '']
  lines += [
            '| keys | top-k | MAE retrieved | MAE random entry | MAE zero | gain g | '
            'guided exit 0 | change | change at g = 1 | lookup GFLOPs (share of exit 0) |'
            + (' minus the equal-compute exit 0 |' if wide else ''),
            '|---|---|---|---|---|---|---|---|---|---|' + ('---|' if wide else '')]
  for r in result['rows']:
    lo, hi = r['change_ci95']
    line = (f"| {r['keys']} | {r['top_k']} | {r['mae_retrieved']:.4f} | {r['mae_random']:.4f} | "
            f"{r['mae_zero']:.4f} | {r['gains']} | {r['guided']:.4f} | {r['change']:+.4f} "
            f"({_fmt(lo)} to {_fmt(hi)}) | {r['change_at_gain_1']:+.4f} | "
            f"{r['lookup_gflops']:.4f} ({r['lookup_gflops'] / result['exit0_gflops']:.0%}) |")
    if wide:
      wlo, whi = r['minus_wide_ci95']
      line += f" {r['minus_wide']:+.4f} ({_fmt(wlo)} to {_fmt(whi)}) |"
    lines.append(line)
  return '\n'.join(lines) + '\n'


def summarise(workdir: str, seeds: list[dict], config) -> dict:
  def over(values):
    return {'mean': float(np.mean(values)), 'ci95': intervals.t_interval(values)}

  rows = []
  for i, r in enumerate(seeds[0]['rows']):
    per = [s['rows'][i] for s in seeds]
    change = [p['change'] for p in per]
    minus_wide = [p['minus_wide'] for p in per]
    rows.append({'keys': r['keys'], 'top_k': r['top_k'],
                 'gains': [p['gain'] for p in per],
                 **{k: float(np.mean([p[k] for p in per]))
                    for k in ('mae_retrieved', 'mae_random', 'mae_zero', 'guided',
                              'change_at_gain_1', 'lookup_gflops')},
                 'change': float(np.mean(change)), 'change_ci95': intervals.t_interval(change),
                 **({} if None in minus_wide else {
                     'minus_wide': float(np.mean(minus_wide)),
                     'minus_wide_ci95': intervals.t_interval(minus_wide)})})
  return {'workdir': workdir, 'distance': config.distance.name,
          'grid': list(config.database.grid), 'num_images': FLAGS.num_images,
          'entries': FLAGS.entries,
          'num_test': FLAGS.num_test, 'num_calibration': FLAGS.num_calibration,
          'exit0': over([s['exit0'] for s in seeds]),
          'exit0_gflops': seeds[0]['exit0_gflops'],
          **({'wide_exit0': over([s['wide_exit0'] for s in seeds]),
              'wide_exit0_gflops': seeds[0]['wide_exit0_gflops'],
              'equal_compute_workdir': FLAGS.equal_compute_workdir}
             if 'wide_exit0' in seeds[0] else {}),
          'perfect_patch_mean': over([s['perfect_patch_mean'] for s in seeds]),
          'rows': rows, 'seeds': seeds}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('give --workdir and --out')
  config = workdir_lib.read_config(FLAGS.workdir)
  dirs = [replicates.seed_workdir(config, FLAGS.workdir, s) for s in replicates.seeds(config)]
  rng = np.random.default_rng(0)
  wide_dirs = [None] * len(dirs)
  if FLAGS.equal_compute_workdir:
    wide_config = workdir_lib.read_config(FLAGS.equal_compute_workdir)
    wide_dirs = [replicates.seed_workdir(wide_config, FLAGS.equal_compute_workdir, s)
                 for s in replicates.seeds(config)]
  per_seed = [probe_seed(d, rng, w) for d, w in zip(dirs, wide_dirs)]
  result = summarise(FLAGS.workdir, per_seed, config)
  results_md.write_table(FLAGS.out, 'guidance_probe', result, render(result))


if __name__ == '__main__':
  # Defined only when run as a program, so that importing the module adds no flags.
  flags.DEFINE_string('workdir', None, 'A finished run (unguided exits, config.evaluate.seeds).')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('num_images', 1024, 'Training inputs in the database.')
  flags.DEFINE_integer('num_test', 256, 'Test inputs.')
  flags.DEFINE_integer('num_calibration', 128, 'Calibration inputs (fit g).')
  flags.DEFINE_multi_integer('top_k', [1, 16], 'Entries averaged per query.')
  flags.DEFINE_multi_string('keys', ['features+z', 'features'], 'Key variants.')
  flags.DEFINE_integer('entries', 0, '0: every patch is an entry; N: N k-means centroids, '
                       'each holding the mean residual of its patches (the lookup cost of a '
                       'database of N entries).')
  flags.DEFINE_string('equal_compute_workdir', None,
                      'An unguided run of the same config and seeds whose exit 0 costs at '
                      'least exit 0 plus the lookup (e.g. wider).')
  app.run(main)
