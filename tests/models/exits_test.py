import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax.guidance import database
from fiancee_jax.metrics import costs
from fiancee_jax.models import exits
from fiancee_jax.models import factory


@pytest.fixture(scope='module')
def setup():
  config = landscapes.get_config('tiny')
  model = factory.make_exit_model(config, guided=True)
  labels = jax.random.randint(jax.random.key(1), (3, 16, 16), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(2), (3, config.backbone.z_dim))
  bb = model.backbone.init(jax.random.key(0), labels, z)
  spec = factory.database_spec(config)
  rng = np.random.default_rng(0)
  db = database.fit(spec, rng.normal(size=(128, spec.feature_width)).astype(np.float32),
                    rng.uniform(-1, 1, (128, spec.value_dim)).astype(np.float32),
                    jax.random.key(0), 2)
  ex = model.init_exits(jax.random.key(3), bb, db, labels, z)
  return config, model, {'backbone': bb, 'exits': ex, 'database': db}, labels, z


def test_each_exit_path_matches_the_shared_pass(setup):
  config, model, params, labels, z = setup
  images, teacher = model.all_exits(params, labels, z)
  assert len(images) == model.num_exits - 1
  for k in range(model.num_exits):
    out = jax.jit(model.exit_path(k))(params, labels, z)
    assert out.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(out, images[k] if k < len(images) else teacher, atol=1e-5)


def test_guidance_changes_the_exit_output(setup):
  config, model, params, labels, z = setup
  outs, cond, teacher, guide = model.backbone_pass(params, labels, z)
  a, _ = model.branch_outputs(params['exits'], outs, cond, guide)
  b, _ = model.branch_outputs(params['exits'], outs, cond, guide * 0 + 0.5)
  assert float(jnp.abs(a[0] - b[0]).mean()) > 1e-5
  with pytest.raises(ValueError, match='guided but got no guide'):
    model.branch_outputs(params['exits'], outs, cond, None)


def test_default_config_exits_span_the_compute_range():
  # Issue 3 target: earliest exit <= 35 % and latest <= 70 % of the backbone (lookup incl.).
  config = landscapes.get_config()
  s = costs.compute_stats(config)
  frac = [e['gflops'] / s['backbone']['gflops'] for e in s['exits'][:-1]]
  assert frac[0] <= 0.35 and frac[-1] <= 0.70, frac
  assert s['database']['lookup_gflops'] <= 0.03 * s['backbone']['gflops']
  assert s['predictor']['gflops'] <= 0.02 * s['backbone']['gflops']


def test_bad_attach_points_are_refused():
  config = landscapes.get_config('tiny')
  g = factory.make_generator(config)
  with pytest.raises(ValueError, match='attach_after'):
    exits.ExitModel(g, (2, 1), 0.25, False, 0)
  with pytest.raises(ValueError, match='attach_after'):
    exits.ExitModel(g, (1, 3), 0.25, False, 0)
  with pytest.raises(ValueError, match='key_block'):
    exits.ExitModel(g, (1, 2), 0.25, True, 2)
