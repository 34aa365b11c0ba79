"""Would a predictor that reads the backbone's features route better than one on inputs alone?

  python scripts/feature_predictor_probe.py --workdir=runs/default \
      --out=docs/results/feature_predictor

Every exit path runs the stem and backbone blocks up to the first attach point, so a
predictor that reads that block's output costs only its own layers: routing would run that
shared prefix, predict, then finish each sample on its exit. This probe measures whether such
a predictor would be worth that restructuring. Per seed (the workdir for seed 0,
WORKDIR/seeds/S for the others) it trains two predictors on the run's own targets
(config.predictor.num_train maps x z_draws, the predictor stage's cache), with the same
trunk, loss, optimizer, steps and learning rate as config.predictor:

- `map+z`: the input-only predictor (class fractions and boundary density per cell, z by
  FiLM), as the predictor stage trains it;
- `map+z+features`: the same, plus the first attach point's features, average-pooled to the
  same cells.

On the test split: Spearman per exit, curve efficiency (tradeoff.efficiency) with zero
margins and calibrated (risk control on the validation split, config.router.target_met), and
the predictor's GFLOPs. Differences are paired by seed. Writes OUT/feature_predictor.json
and OUT/feature_predictor.md.
"""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import linen as nn
from scipy import stats

from fiancee_jax import replicates
from fiancee_jax import workdir as workdir_lib
from fiancee_jax.evaluation import intervals
from fiancee_jax.evaluation import results_md
from fiancee_jax.evaluation import tradeoff
from fiancee_jax.inference import loading
from fiancee_jax.metrics import flops
from fiancee_jax.models import predictor as predictor_lib
from fiancee_jax.routing import calibration
from fiancee_jax.training import predictor as predictor_training

FLAGS = flags.FLAGS
VARIANTS = ('map+z', 'map+z+features')
_BATCH = 64


class FeaturePredictor(nn.Module):
  """labels int32 [B, H, W], z [B, Z], feats [B, h, w, C] or None -> [B, num_outputs]."""
  num_classes: int
  num_outputs: int
  width: int
  pool: int

  @nn.compact
  def __call__(self, labels: jax.Array, z: jax.Array, feats: jax.Array | None) -> jax.Array:
    b, h, w = labels.shape
    gh, gw = h // self.pool, w // self.pool
    x = predictor_lib.label_features(labels, self.num_classes, self.pool)
    if feats is not None:
      fh, fw = feats.shape[1:3]
      if fh % gh or fw % gw:
        raise ValueError(f'features {fh}x{fw} cannot be pooled to the predictor grid {gh}x{gw}')
      f = feats.reshape(b, gh, fh // gh, gw, fw // gw, -1).mean((2, 4))
      x = jnp.concatenate([x, f.astype(x.dtype)], -1)
    film = nn.Dense(self.width, name='z_film')(z)
    return predictor_lib.trunk(x, self.width, self.num_outputs, film)


def _features(model, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
  """The first attach point's block output for every input: float32 [N, h, w, C]."""
  em, bb = model.exit_model, model.params['backbone']
  a0 = em.attach_after[0]
  f = jax.jit(lambda *x: em.prefix(bb, x, a0)[2][a0].astype(jnp.float32))
  return np.concatenate([np.asarray(f(*(x[s:s + _BATCH] for x in inputs)))
                         for s in range(0, len(inputs[0]), _BATCH)])


def _fit(config, module: FeaturePredictor, train: dict, use_features: bool,
         seed: int) -> Any:
  """Variables fitted on standardised train targets as the predictor stage fits them."""
  p = config.predictor
  mean, std = predictor_training.target_stats(train['d'])
  y = jnp.asarray((train['d'] - mean) / std)
  labels, z = (jnp.asarray(x) for x in train['inputs'])
  feats = jnp.asarray(train['feats']) if use_features else None
  n = len(y)
  params = module.init(jax.random.key(seed), labels[:1], z[:1],
                       None if feats is None else feats[:1])
  tx = predictor_training.optimizer(config)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, idx):
    def loss_fn(params):
      pred = module.apply(params, labels[idx], z[idx], None if feats is None else feats[idx])
      return predictor_training.prediction_loss(config, pred, y[idx])
    grads = jax.grad(loss_fn)(params)
    upd, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, upd), opt

  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  pos = 0
  for _ in range(p.num_steps):
    if pos + p.batch_size > n:
      order, pos = rng.permutation(n), 0
    params, opt = step(params, opt, jnp.asarray(order[pos:pos + p.batch_size]))
    pos += p.batch_size
  return predictor_training.fold_target_stats(params, mean, std)


def _predict(module, params, split: dict, use_features: bool) -> np.ndarray:
  labels, z = split['inputs']
  f = jax.jit(lambda l, z, x: module.apply(params, l, z, x))
  out = [f(labels[s:s + _BATCH], z[s:s + _BATCH],
           split['feats'][s:s + _BATCH] if use_features else None)
         for s in range(0, len(labels), _BATCH)]
  return np.concatenate([np.asarray(o) for o in out])


def probe_seed(seed_dir: str) -> dict:
  config = workdir_lib.read_config(seed_dir)
  p = config.predictor
  model = loading.load_model(seed_dir, config, variant='unguided')
  splits = {}
  for name, n, draws in (('train', p.num_train, p.z_draws),
                         ('validation', config.data.num_validation, 1),
                         ('test', config.router.num_eval, 1)):
    inputs, d = predictor_training.split_distances(config, seed_dir, name, n,
                                                   variant='unguided', draws=draws)
    inputs = tuple(np.asarray(x) for x in inputs)
    splits[name] = {'inputs': inputs, 'd': np.asarray(d), 'feats': _features(model, inputs)}
  e1 = splits['test']['d'].shape[1]
  module = FeaturePredictor(num_classes=config.data.num_classes, num_outputs=e1,
                            width=p.width, pool=p.pool)
  g = np.asarray(model.exit_gflops, np.float64)
  test = splits['test']
  result = {'seed': int(config.seed), 'exit_gflops': g.tolist(),
            'feature_shape': list(test['feats'].shape[1:]), 'variants': {}}
  for i, name in enumerate(VARIANTS):
    use = name.endswith('features')
    params = _fit(config, module, splits['train'], use, seed=int(config.seed) * 10 + i)
    one = tuple(x[:1] for x in test['inputs']) + ((test['feats'][:1] if use else None),)
    gflops = flops.gflops(lambda v, *x: module.apply(v, *x), params, *one)
    pred = _predict(module, params, test, use)
    val_pred = _predict(module, params, splits['validation'], use)
    rc = calibration.fit_risk_control(val_pred, splits['validation']['d'],
                                      target=config.router.target_met)
    zero = tradeoff.efficiency(pred, test['d'], np.zeros(e1, np.float32), g, gflops)[0]
    calibrated = tradeoff.efficiency(pred, test['d'], rc.margins, g, gflops)[0]
    result['variants'][name] = {
        'gflops': float(gflops), 'gflops_share': float(gflops / g[-1]),
        'spearman': [float(stats.spearmanr(pred[:, k], test['d'][:, k])[0]) for k in range(e1)],
        'efficiency_zero_margins': zero, 'efficiency_calibrated': calibrated}
  return result


FIGURES = (('gflops_share', 'predictor GFLOPs / backbone'),
           ('efficiency_calibrated', 'curve efficiency, calibrated'),
           ('efficiency_zero_margins', 'curve efficiency, zero margins'))


def summarise(workdir: str, seeds: list[dict]) -> dict:
  """Mean over seeds (95 % t-interval) per variant and figure; differences paired by seed."""
  rows = []
  e1 = len(seeds[0]['variants'][VARIANTS[0]]['spearman'])
  figures = list(FIGURES) + [(('spearman', k), f'Spearman, exit {k}') for k in range(e1)]
  for key, label in figures:
    def get(s, v, key=key):
      x = s['variants'][v]
      return x[key[0]][key[1]] if isinstance(key, tuple) else x[key]
    ref = [get(s, VARIANTS[0]) for s in seeds]
    for v in VARIANTS:
      vals = [get(s, v) for s in seeds]
      diff = [a - b for a, b in zip(vals, ref)]
      rows.append({'variant': v, 'figure': label, 'mean': float(np.mean(vals)),
                   'ci95': intervals.t_interval(vals),
                   'change': float(np.mean(diff)),
                   'change_ci95': intervals.t_interval(diff)})
  return {'workdir': workdir, 'seeds': seeds, 'rows': rows}


def render(result: dict) -> str:
  s0 = result['seeds'][0]
  lines = [f"Predictors trained on the targets of `{result['workdir']}`, seeds "
           f"{[s['seed'] for s in result['seeds']]}; features of the first attach point "
           f"{s0['feature_shape']} pooled to the predictor's cells. Mean over seeds (95 % "
           f"t-interval); change against `{VARIANTS[0]}` paired by seed.", '',
           '| predictor | figure | value | change |', '|---|---|---|---|']
  for r in result['rows']:
    lo, hi = r['ci95']
    clo, chi = r['change_ci95']
    change = ('reference' if r['variant'] == VARIANTS[0] else
              f"{r['change']:+.3f} ({clo:+.3f} to {chi:+.3f})")
    lines.append(f"| {r['variant']} | {r['figure']} | {r['mean']:.4f} ({lo:.4f} to "
                 f"{hi:.4f}) | {change} |")
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('give --workdir and --out')
  config = workdir_lib.read_config(FLAGS.workdir)
  dirs = [replicates.seed_workdir(config, FLAGS.workdir, s) for s in replicates.seeds(config)]
  result = summarise(FLAGS.workdir, [probe_seed(d) for d in dirs])
  results_md.write_table(FLAGS.out, 'feature_predictor', result, render(result))


if __name__ == '__main__':
  # Defined only when run as a program, so that importing the module adds no flags.
  flags.DEFINE_string('workdir', None, 'A finished run (predictor stage done).')
  flags.DEFINE_string('out', None, 'Output directory.')
  app.run(main)
