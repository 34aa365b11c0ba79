"""Routing rule, switch and bucketed dispatch, and `generate` on a tiny 16x16 model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import landscapes
from fiancee_jax import model as model_lib
from fiancee_jax import tasks
from fiancee_jax.inference import generate as generate_lib
from fiancee_jax.metrics import latency
from fiancee_jax.models import exits as exits_lib
from fiancee_jax.models import factory
from fiancee_jax.routing import router

BUCKETS = (1, 2, 4)


class MeanPoolPredictor(nn.Module):
  """Test predictor: class shares of the label map -> Dense -> sigmoid, [B, E - 1]."""
  num_classes: int
  num_outputs: int

  @nn.compact
  def __call__(self, labels: jax.Array, z: jax.Array) -> jax.Array:
    del z
    x = jax.nn.one_hot(labels, self.num_classes).mean(axis=(1, 2))
    return nn.sigmoid(nn.Dense(self.num_outputs)(x * 4.0))


def _numpy_init(shapes, seed: int):
  """Random variables with the right tree from `eval_shape` (no XLA compile of the init)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('var', 'sigma'):
      return np.ones(leaf.shape, leaf.dtype)
    if name == 'mean':
      return np.zeros(leaf.shape, leaf.dtype)
    if name == 'kernel':
      fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def tiny_model() -> model_lib.FianceeModel:
  """A 3-exit 16x16 FianceeModel (2 branches + backbone), built once per test process."""
  config = landscapes.get_config('tiny')
  g = factory.make_generator(config)
  h, w = config.data.resolution
  labels = jnp.zeros((1, h, w), jnp.int32)
  z = jnp.zeros((1, config.backbone.z_dim), jnp.float32)
  key = jax.random.key(0)
  bb = _numpy_init(jax.eval_shape(g.init, key, labels, z), 1)
  em = exits_lib.ExitModel(backbone=g, attach_after=(1, 2), width_mult=0.25, guided=False,
                           key_block=0)
  ex = _numpy_init(jax.eval_shape(lambda b: em.init_exits(key, b, None, labels, z), bb), 2)
  pred = MeanPoolPredictor(config.data.num_classes, em.num_exits - 1)
  pp = _numpy_init(jax.eval_shape(pred.init, key, labels, z), 3)
  # Device arrays, as a restored checkpoint gives (numpy params would be copied every call).
  params, pp = jax.device_put(({'backbone': bb, 'exits': ex, 'database': None}, pp))
  return model_lib.FianceeModel(
      exit_model=em, params=params, predictor=pred, predictor_params=pp,
      margins=np.zeros(em.num_exits - 1, np.float32),
      exit_gflops=(1.0, 2.0, 4.0), predictor_gflops=0.25,
      task=tasks.Synthesis(num_classes=config.data.num_classes, resolution=(h, w),
                           z_dim=config.backbone.z_dim),
      distance='test')


def tiny_labels(n: int, seed: int = 0) -> np.ndarray:
  """int32 [n, 16, 16] maps, each dominated by its own class so predictions differ."""
  rng = np.random.default_rng(seed)
  main = rng.integers(0, 12, size=(n, 1, 1))
  noise = rng.integers(0, 12, size=(n, 16, 16))
  share = rng.uniform(0.3, 0.95, size=(n, 1, 1))
  return np.where(rng.uniform(size=(n, 16, 16)) < share, main, noise).astype(np.int32)


def tiny_z(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed + 100).standard_normal((n, 8)).astype(np.float32)


@functools.cache
def bucketed() -> router.BucketedRouter:
  r = router.BucketedRouter(tiny_model(), BUCKETS)
  r.warmup()
  return r


@functools.cache
def switch() -> router.SwitchRouter:
  r = router.SwitchRouter(tiny_model())
  r.warmup()
  return r


def _route_reference(pred, threshold, margins):
  ids = []
  for row in pred:
    ok = [k for k in range(len(row)) if row[k] + margins[k] <= threshold]
    ids.append(ok[0] if ok else len(row))
  return np.array(ids)


# --- route -----------------------------------------------------------------------------------


@pytest.mark.parametrize('pred, threshold, margins, expected', [
    ([[0.05, 0.01]], 0.1, [0.0, 0.0], [0]),  # cheapest exit meets it
    ([[0.2, 0.05]], 0.1, [0.0, 0.0], [1]),  # first fails, second meets
    ([[0.2, 0.3]], 0.1, [0.0, 0.0], [2]),  # none meets -> backbone
    ([[0.05, 0.05]], 0.1, [0.06, 0.0], [1]),  # margin pushes exit 0 out
    ([[0.1, 0.5]], 0.1, [0.0, 0.0], [0]),  # equality meets (<=)
    ([[np.nan, 0.0]], 0.1, [0.0, 0.0], [1]),  # NaN never meets
    ([[0.0, 0.0]], 0.1, [np.inf, np.inf], [2]),  # uncertified exits are never taken
])
def test_route_cases(pred, threshold, margins, expected):
  out = router.route(jnp.asarray(pred, jnp.float32), threshold, jnp.asarray(margins))
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, expected)


def test_route_matches_reference_and_jits():
  rng = np.random.default_rng(0)
  pred = rng.uniform(0, 0.3, size=(64, 3)).astype(np.float32)
  margins = np.array([0.02, 0.0, 0.01], np.float32)
  jitted = jax.jit(router.route)
  for t in (0.0, 0.05, 0.15, 0.4):
    np.testing.assert_array_equal(jitted(pred, t, margins), _route_reference(pred, t, margins))


def test_route_rejects_bad_margins():
  with pytest.raises(ValueError, match='margins has shape'):
    router.route(jnp.zeros((2, 3)), 0.1, jnp.zeros(2))


# --- switch ----------------------------------------------------------------------------------


def test_switch_router_equals_direct_paths():
  m, sw = tiny_model(), switch()
  labels, z = tiny_labels(1), tiny_z(1)
  for k in range(m.num_exits):
    direct = np.asarray(sw.direct(k)(labels, z))
    np.testing.assert_allclose(np.asarray(sw.dispatch(k, (labels, z))), direct, atol=1e-6)
  # The routed executable takes the exit the rule picks and returns that exit's image.
  pred = np.asarray(m.predict_fn()(m.predictor_params, labels, z))
  for t in (0.0, float(pred[0].min()), 1.0):
    image, k = sw((labels, z), t)
    assert int(k) == _route_reference(pred, t, m.margins)[0]
    np.testing.assert_allclose(np.asarray(image), np.asarray(sw.direct(int(k))(labels, z)),
                               atol=1e-6)
  # Exits really differ, so the equalities above are not vacuous.
  assert not np.allclose(np.asarray(sw.direct(0)(labels, z)), np.asarray(sw.direct(2)(labels, z)))
  assert sw.num_compiles == 2 + m.num_exits


def test_switch_router_rejects_batches():
  with pytest.raises(ValueError, match='batch of one'):
    switch()((tiny_labels(2), tiny_z(2)), 0.1)


def test_switch_is_a_conditional_not_a_select():
  sw = switch()
  cost = latency.cost_and_memory(sw.compiled_dispatch())['gflops']
  costs = [latency.cost_and_memory(sw.compiled_direct(k))['gflops'] for k in range(3)]
  # XLA reports the largest branch for a conditional, not the sum of all branches.
  assert cost < 0.99 * sum(costs)
  assert cost == pytest.approx(max(costs), rel=0.1)


# --- bucketed --------------------------------------------------------------------------------


def test_bucketed_router_matches_per_exit_reference_and_never_recompiles():
  m, r = tiny_model(), bucketed()
  assert r.num_compiles == len(BUCKETS) * (m.num_exits + 1)
  labels, z = tiny_labels(4, seed=1), tiny_z(4, seed=1)
  full = [np.asarray(r.compiled_exit(k, 4)(m.params, labels, z)) for k in range(m.num_exits)]
  pred = np.asarray(m.predict_fn()(m.predictor_params, labels, z))
  before = r.num_compiles
  seen = set()
  with latency.RecompileGuard(what='bucketed router'):
    for t in (0.0, float(np.median(pred[:, 0])), float(np.median(pred)), 1.0):
      images, ids, gflops = r((labels, z), t)
      np.testing.assert_array_equal(ids, _route_reference(pred, t, m.margins))
      expected = np.stack([full[k][i] for i, k in enumerate(ids)])
      np.testing.assert_allclose(images, expected, atol=1e-5)
      np.testing.assert_allclose(gflops, np.asarray(m.exit_gflops)[ids] + 0.25)
      seen.add(tuple(ids))
  assert len(seen) >= 3  # all-backbone, mixed, all-exit-0 at least
  assert r.num_compiles == before


def test_bucketed_router_chunks_and_pads_without_recompiling():
  m, r = tiny_model(), bucketed()
  labels, z = tiny_labels(11, seed=2), tiny_z(11, seed=2)  # > max bucket, not a bucket size
  ids = np.array([0, 2, 2, 1, 0, 0, 0, 0, 0, 0, 2], np.int32)
  before = r.num_compiles
  with latency.RecompileGuard(what='bucketed router'):
    images = r.run_exits(ids, (labels, z))
    for n in (1, 3, 5):
      r((labels[:n], z[:n]), 0.3)
  assert r.num_compiles == before
  plan = r.plan(ids)
  # Largest bucket first, no padding with buckets 1, 2, 4: 7 = 4 + 2 + 1, 3 = 2 + 1.
  assert sorted((k, b, n) for k, b, _, n in plan) == [(0, 1, 1), (0, 2, 2), (0, 4, 4),
                                                      (1, 1, 1), (2, 1, 1), (2, 2, 2)]
  covered = np.concatenate([p[:n] for _, _, p, n in plan])
  assert sorted(covered.tolist()) == list(range(11))
  # Without a bucket of 1, a remainder is padded (with its own sample) up to the smallest.
  plan = router.BucketedRouter(m, (2, 4)).plan(ids)  # plans compile nothing
  assert sorted((k, b, n) for k, b, _, n in plan) == [(0, 2, 1), (0, 2, 2), (0, 4, 4),
                                                      (1, 2, 1), (2, 2, 1), (2, 2, 2)]
  for k, b, padded, n in plan:
    assert len(padded) == b and np.all(ids[padded] == k)
  sw = switch()
  for i in (0, 1, 3, 10):
    np.testing.assert_allclose(images[i], np.asarray(sw.direct(ids[i])(labels[i:i + 1],
                                                                       z[i:i + 1]))[0],
                               atol=1e-5)


def test_bucketed_router_validates():
  m = tiny_model()
  with pytest.raises(ValueError, match='strictly increasing'):
    router.BucketedRouter(m, (4, 2))
  with pytest.raises(ValueError, match='class id 12'):
    bucketed()((np.full((2, 16, 16), 12, np.int32), tiny_z(2)), 0.1)
  with pytest.raises(ValueError, match='z must be'):
    bucketed()((tiny_labels(2), tiny_z(3)), 0.1)
  no_pred = m.replace(predictor=None)
  with pytest.raises(ValueError, match='no predictor'):
    router.BucketedRouter(no_pred)


def test_vmap_switch_matches_routed_images_and_runs_every_branch():
  m, r = tiny_model(), bucketed()
  labels, z = tiny_labels(4, seed=3), tiny_z(4, seed=3)
  ids = np.array([2, 0, 1, 0], np.int32)
  compiled = latency.compile_aot(router.vmap_switch_fn(m), m.params, ids, labels, z)
  np.testing.assert_allclose(np.asarray(compiled(m.params, ids, labels, z)),
                             r.run_exits(ids, (labels, z)), atol=1e-5)
  vm = latency.cost_and_memory(compiled)['gflops']
  per_exit = [latency.cost_and_memory(r.compiled_exit(k, 4))['gflops'] for k in range(3)]
  assert vm > 1.1 * per_exit[-1]  # more than the backbone: the branches run too


# --- generate --------------------------------------------------------------------------------


def test_generate_validates_before_any_compute():
  m = tiny_model()
  with latency.CompileCounter() as c:
    with pytest.raises(ValueError, match='threshold'):
      generate_lib.generate(m, tiny_labels(2), threshold=-0.1)
    with pytest.raises(ValueError, match='threshold'):
      generate_lib.generate(m, tiny_labels(2), threshold=float('nan'))
    with pytest.raises(ValueError, match='class id 12'):
      generate_lib.generate(m, np.full((2, 16, 16), 12), threshold=0.1)
    with pytest.raises(ValueError, match='add a batch axis'):
      generate_lib.generate(m, tiny_labels(1)[0], threshold=0.1)
  assert c.total == 0


def test_generate_batch_and_single():
  m, r = tiny_model(), bucketed()
  labels = tiny_labels(3, seed=4)
  out = generate_lib.generate(m, labels, threshold=0.5, seed=1, router=r)
  assert out['images'].shape == (3, 16, 16, 3) and out['images'].dtype == np.float32
  assert out['exit_ids'].dtype == np.int32 and out['exit_ids'].shape == (3,)
  np.testing.assert_allclose(out['gflops'], np.asarray(m.exit_gflops)[out['exit_ids']] + 0.25)
  assert out['mean_gflops'] == pytest.approx(out['gflops'].mean())
  assert out['saved_fraction'] == pytest.approx(1 - out['mean_gflops'] / 4.0)
  assert np.all(np.abs(out['images']) <= 1.0)
  # Batch of one goes through the cached switch router; same result as the bucketed router.
  one = generate_lib.generate(m, labels[:1], threshold=0.5, seed=1)
  ref = generate_lib.generate(m, labels[:1], threshold=0.5, seed=1, router=r)
  np.testing.assert_array_equal(one['exit_ids'], ref['exit_ids'])
  np.testing.assert_allclose(one['images'], ref['images'], atol=1e-5)
  other = m.replace()
  with pytest.raises(ValueError, match='different FianceeModel'):
    generate_lib.generate(other, labels, threshold=0.1, router=r)


def test_routers_take_the_risk_control_margin_of_each_threshold():
  from fiancee_jax.routing import calibration  # pylint: disable=g-import-not-at-top
  base = tiny_model()
  labels, z = tiny_labels(8, seed=3), tiny_z(8, seed=3)
  pred = np.asarray(base.predict_fn()(base.predictor_params, labels, z), np.float64)
  # Calibration data whose exits are worse than predicted by a threshold-dependent amount.
  rng = np.random.default_rng(0)
  cal_pred = rng.uniform(0, 1, size=(200, 2))
  cal_true = cal_pred + rng.uniform(0, 0.2, size=(200, 2))
  rc = calibration.RiskControl(0.9, cal_pred, cal_true)
  m = base.replace(risk_control=rc)
  r = router.BucketedRouter(m, BUCKETS)
  s = router.SwitchRouter(m)
  margins = set()
  for t in (0.1, float(np.median(pred)), 0.9):
    expected = _route_reference(pred, t, rc.margins(t))
    np.testing.assert_array_equal(r.predict_and_route((labels, z), t)[0], expected)
    _, k = s((labels[:1], z[:1]), t)
    assert int(k) == expected[0]
    margins.add(float(m.margins_at(t)[0]))
  assert len(margins) == 3  # one margin per threshold, not one for all
