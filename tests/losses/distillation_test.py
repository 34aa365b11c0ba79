import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.losses import distillation


def test_l1_on_hand_made_images():
  x = jnp.zeros((2, 2, 2, 3))
  y = x.at[0, 0, 0, :].set(1.0).at[1, 1, 1, 0].set(-0.6)
  # |diff| sums to 3 + 0.6 over 24 entries.
  assert float(distillation.l1(x, y)) == pytest.approx(3.6 / 24)
  assert float(distillation.l1(y, y)) == 0.0
  with pytest.raises(ValueError, match='one shape'):
    distillation.l1(x, y[:1])


def test_perceptual_is_the_batch_mean_of_the_distance():
  x = jnp.zeros((3, 4, 4, 3))
  fn = lambda a, b: jnp.array([0.1, 0.2, 0.6])  # a fixed per-sample distance
  assert float(distillation.perceptual(fn, x, x)) == pytest.approx(0.3)


def test_feature_distillation_values():
  t = {2: jnp.full((1, 2, 2, 4), 2.0), 3: jnp.ones((1, 4, 4, 2))}
  # l2: mean (p - t)^2 / mean t^2 -> (1 / 4) for block 2, 0 for block 3; mean over taps.
  p = {2: jnp.full((1, 2, 2, 4), 3.0), 3: jnp.ones((1, 4, 4, 2))}
  assert float(distillation.feature_distillation(p, t, 'l2')) == pytest.approx(0.125)
  # l1: mean |p - t| / mean |t| -> 1 / 2 for block 2.
  assert float(distillation.feature_distillation(p, t, 'l1')) == pytest.approx(0.25)
  # Only the tapped blocks count; the teacher may hold more.
  assert float(distillation.feature_distillation({3: p[3]}, t)) == 0.0
  # No gradient into the teacher.
  g = jax.grad(lambda t2: distillation.feature_distillation(p, {**t, 2: t2}))(t[2])
  assert float(jnp.abs(g).sum()) == 0.0
  with pytest.raises(ValueError, match='differ'):
    distillation.feature_distillation({2: jnp.ones((1, 2, 2, 3))}, t)
  with pytest.raises(ValueError, match='norm'):
    distillation.feature_distillation(p, t, 'l3')
  with pytest.raises(ValueError, match='block 5'):
    distillation.feature_distillation({5: p[3]}, t)


def test_projections_map_student_to_teacher_shapes():
  student = {2: jnp.ones((2, 8, 8, 3)), 3: jnp.ones((2, 16, 16, 1))}
  teacher = {1: jnp.ones((2, 4, 4, 16)), 2: jnp.ones((2, 8, 8, 8)),
             3: jnp.ones((2, 16, 16, 4))}
  params = distillation.init_projections(jax.random.key(0), teacher, student)
  assert jax.tree_util.tree_map(jnp.shape, params) == {
      'proj_2': {'kernel': (1, 1, 3, 8), 'bias': (8,)},
      'proj_3': {'kernel': (1, 1, 1, 4), 'bias': (4,)}}
  widths = distillation.projection_widths(teacher, student)
  out = distillation.FeatureProjections(widths).apply({'params': params}, student)
  assert {j: v.shape for j, v in out.items()} == {2: (2, 8, 8, 8), 3: (2, 16, 16, 4)}
  assert np.isfinite(float(distillation.feature_distillation(out, teacher)))


def test_exit_loss_weights_its_terms():
  img, teacher = jnp.zeros((2, 4, 4, 3)), jnp.full((2, 4, 4, 3), 0.5)
  fn = lambda a, b: jnp.array([0.2, 0.4])
  proj, tf = {1: jnp.zeros((2, 4, 4, 2))}, {1: jnp.ones((2, 4, 4, 2))}
  loss, terms = distillation.exit_loss(img, teacher, distance_fn=fn, l1_weight=2.0,
                                       perceptual_weight=3.0, feature_weight=0.5,
                                       projected=proj, teacher_features=tf)
  assert terms['l1'] == pytest.approx(0.5) and terms['perceptual'] == pytest.approx(0.3)
  assert terms['features'] == pytest.approx(1.0)
  assert float(loss) == pytest.approx(2 * 0.5 + 3 * 0.3 + 0.5 * 1.0)
  loss, terms = distillation.exit_loss(img, teacher, distance_fn=None, l1_weight=1.0,
                                       perceptual_weight=0.0)
  assert set(terms) == {'l1'} and float(loss) == pytest.approx(0.5)
  with pytest.raises(ValueError, match='projected'):
    distillation.exit_loss(img, teacher, distance_fn=fn, l1_weight=1.0,
                           perceptual_weight=1.0, feature_weight=1.0)
  with pytest.raises(ValueError, match='feature_weight'):
    distillation.check_weights(1.0, 1.0, -1.0, 'l2')
  with pytest.raises(ValueError, match='feature_loss'):
    distillation.check_weights(1.0, 1.0, 1.0, 'huber')
