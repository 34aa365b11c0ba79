"""bfloat16 training (config.train.dtype): a step agrees with the float32 step, computes in
bfloat16, and keeps parameters, optimizer state and statistics in float32.

The tolerance. One training step in bfloat16 and one in float32, from the same state on the
same batch, give parameter updates whose relative L2 difference (over all parameters of a
model) must be below BATCH_NOISE_SHARE x the relative difference between two float32 updates
on two batches of the same size. Minibatch noise is the error that SGD tolerates by design,
so rounding must stay well below it. Measured here, bfloat16 moves the updates of the tiny
generator, discriminator and predictor by 16 %, 1 % and 0.4 % (the generator's by 9-16 %
over 8 draws of the batch), against 101 %, 16 % and 184 % between two batches: the
generator's sits at half the bound, whose 0.3 allows for the spread over draws and
machines; a bias gradient summed in bfloat16 instead of float32 (models/precision.py) moves
the discriminator's by 48 %, three times its bound. The steps run with plain SGD so that an
update is the gradient (Adam divides every element by its own size, which turns gradients
that batch norm cancels -- 0 in exact arithmetic, rounding noise in either precision -- into
full-size steps). bfloat16 must also change the update (above UPDATE_MIN): a model that still
computed in float32 differs by ~1e-7.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import avatars
from configs import landscapes
from fiancee_jax import config_checks
from fiancee_jax import tasks
from fiancee_jax.models import factory
from fiancee_jax.training import backbone as backbone_training
from fiancee_jax.training import exits as exits_training
from fiancee_jax.training import optimizers
from fiancee_jax.training import predictor as predictor_training
from fiancee_jax.training import reenact as reenact_training

# One worker runs the module: its compiled fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group('precision')

BATCH_NOISE_SHARE = 0.3
UPDATE_MIN = 1e-3
DTYPES = ('float32', 'bfloat16')


def _with_dtype(config, dtype):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.dtype = dtype
  return config


def _relative(new_a, new_b, old):
  """||(a - old) - (b - old)|| / ||b - old|| over every leaf."""
  da = jax.tree.leaves(jax.tree.map(lambda n, o: n - o, new_a, old))
  db = jax.tree.leaves(jax.tree.map(lambda n, o: n - o, new_b, old))
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(da, db))
  return (num / sum(float(jnp.sum(y ** 2)) for y in db)) ** 0.5


def _sgd(*_args, **_kwargs):
  return optax.sgd(0.1), optax.sgd(0.1)


def _landscapes_batch(config, seed):
  h, w = config.data.resolution
  rng = np.random.default_rng(seed)
  return {'labels': jnp.asarray(rng.integers(0, 12, (8, h, w)), jnp.int32),
          'image': jnp.asarray(rng.uniform(-1, 1, (8, h, w, 3)), jnp.float32)}


def _bf16_convolutions(text: str) -> tuple[int, int]:
  """(bfloat16, other) convolutions in StableHLO text."""
  convs = [line for line in text.splitlines() if 'stablehlo.convolution' in line]
  bf16 = sum('bf16' in line for line in convs)
  return bf16, len(convs) - bf16


def _check_abstract_step(step_fn, state, batch):
  """The step traced in float32 and bfloat16: bfloat16 convs only in the latter, and the new
  state has the old one's dtypes (float32 parameters and optimizer state)."""
  for dtype, config_step in step_fn.items():
    lowered = jax.jit(config_step).lower(state, batch)  # traced, not compiled
    new_state, _ = lowered.out_info
    assert jax.tree.map(lambda s: s.dtype, new_state) == jax.tree.map(lambda s: s.dtype, state)
    bf16, other = _bf16_convolutions(lowered.as_text())
    if dtype == 'bfloat16':
      assert bf16 > other, (bf16, other)  # the database lookup and losses may stay float32
    else:
      assert bf16 == 0 and other > 0


@pytest.fixture(scope='module')
def backbone_steps():
  """(state, {dtype: (new state, measurements, StableHLO text)}, float32 new state on another
  batch): one SGD step each, each step traced and compiled once."""
  config = landscapes.get_config('tiny')
  batch, other = _landscapes_batch(config, 0), _landscapes_batch(config, 1)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(optimizers, 'gan_optimizers', _sgd)
    state = backbone_training.init_state(config, jax.random.key(0))
    out = {}
    for d in DTYPES:
      lowered = jax.jit(backbone_training.make_train_step(_with_dtype(config, d))).lower(
          state, batch)
      step = lowered.compile()
      out[d] = (*step(state, batch), lowered.as_text())
      if d == 'float32':
        other_state = step(state, other)[0]
  return state, out, other_state


def test_one_bfloat16_backbone_step_agrees_with_the_float32_step(backbone_steps):
  state, out, other = backbone_steps
  (s32, m32, _), (s16, m16, _) = out['float32'], out['bfloat16']
  for key in ('g/loss', 'd/loss', 'd/fake', 'd/real'):
    # Losses are computed in float32 from outputs rounded once to bfloat16.
    assert float(m16[key]) == pytest.approx(float(m32[key]), rel=2e-3), key
  for part in ('g_params', 'd_params'):
    old = getattr(state, part)
    r = _relative(getattr(s16, part), getattr(s32, part), old)
    noise = _relative(getattr(other, part), getattr(s32, part), old)
    assert UPDATE_MIN < r < BATCH_NOISE_SHARE * noise, (part, r, noise)
  # Batch-norm statistics and spectral-norm sigmas agree.
  for a, b in zip(jax.tree.leaves(s16.g_stats), jax.tree.leaves(s32.g_stats)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)


def test_backbone_step_computes_in_bfloat16_with_float32_state(backbone_steps):
  state, out, _ = backbone_steps
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  for d, (new_state, _, text) in out.items():
    # Parameters, optimizer state and statistics keep their float32.
    assert jax.tree.map(lambda x: x.dtype, new_state) == dtypes
    bf16, other = _bf16_convolutions(text)
    assert (bf16 > 0 and other == 0) if d == 'bfloat16' else (bf16 == 0 and other > 0), d


def test_exits_step_computes_in_bfloat16_with_float32_state():
  config = landscapes.get_config('tiny')  # guided and unguided exits
  with config.unlocked():
    config.distance.name = 'l1'  # what is traced, not the distance, is under test
  bb = factory.variable_templates(config, 'backbone')
  db = factory.variable_templates(config, 'database')
  state = jax.eval_shape(lambda b, d: exits_training.init_state(config, jax.random.key(0), b, d),
                         bb, db)
  # The frozen backbone and database are constants of the step: zeros of their shapes.
  bb, db = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (bb, db))
  _check_abstract_step({d: exits_training.make_train_step(_with_dtype(config, d), bb, None, db)
                        for d in DTYPES}, state, _landscapes_batch(config, 0))


def test_reenact_step_computes_in_bfloat16_with_float32_state():
  config = avatars.get_config('tiny')
  with config.unlocked():
    config.distance.name = 'l1'
  h, w = config.data.resolution
  batch = {k: jax.ShapeDtypeStruct((4, h, w, 3), jnp.float32)
           for k in ('source', 'driver', 'target', 'swap')}
  state = jax.eval_shape(lambda: reenact_training.init_state(config, jax.random.key(0)))
  _check_abstract_step({d: reenact_training.make_train_step(_with_dtype(config, d))
                        for d in DTYPES}, state, batch)


def test_one_bfloat16_predictor_step_agrees_with_the_float32_step():
  config = landscapes.get_config('tiny')
  task = factory.get_task(config)
  n = 16
  labels = _landscapes_batch(config, 0)['labels']
  inputs = tuple(tasks.make_inputs(task, (jnp.concatenate([labels, labels[::-1]]),),
                                   jax.random.key(1)))
  targets = jax.random.normal(jax.random.key(2), (n, len(config.exits.attach_after)))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(predictor_training, 'optimizer', lambda _: optax.sgd(0.1))
    state = predictor_training.init_state(config, jax.random.key(0))
    steps = {d: jax.jit(predictor_training.make_train_step(_with_dtype(config, d), inputs,
                                                           targets)) for d in DTYPES}
    first, second = {'index': jnp.arange(8)}, {'index': jnp.arange(8, 16)}
    (s32, m32), (s16, m16) = (steps[d](state, first) for d in DTYPES)
    other, _ = steps['float32'](state, second)
  assert float(m16['predictor/loss']) == pytest.approx(float(m32['predictor/loss']), rel=2e-3)
  r = _relative(s16.params, s32.params, state.params)
  noise = _relative(other.params, s32.params, state.params)
  assert UPDATE_MIN < r < BATCH_NOISE_SHARE * noise, (r, noise)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16))


def test_train_dtype_is_checked_before_compute():
  config = landscapes.get_config('tiny')
  config_checks.check_train(config)  # the default, float32
  assert factory.train_dtype(config) == 'float32'
  for bad in ('float16', 'bf16', None):
    with config.unlocked():
      config.train.dtype = bad
    with pytest.raises(config_checks.ConfigError, match="use one of 'float32', 'bfloat16'"):
      config_checks.check_train(config)
  with config.unlocked():
    del config.train['dtype']  # a config.json written before the key: float32
  assert factory.train_dtype(config) == 'float32'
