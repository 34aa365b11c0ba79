"""Predictors: inputs, ensemble, z path, and folding the target statistics."""
import jax
import numpy as np
import pytest

from configs import avatars
from configs import landscapes
from fiancee_jax.metrics import costs
from fiancee_jax.metrics import exit_distances
from fiancee_jax.models import factory
from fiancee_jax.training import predictor as predictor_training


def _inputs(b=3):
  labels = jax.random.randint(jax.random.key(1), (b, 16, 16), 0, 12)
  return labels, jax.random.normal(jax.random.key(2), (b, 8))


def test_ensemble_is_the_mean_of_its_members_and_sees_z():
  config = landscapes.get_config('tiny')
  model = factory.make_predictor(config)
  labels, z = _inputs()
  variables = model.init(jax.random.key(0), labels, z)
  assert sorted(variables['params']) == ['member_0', 'member_1']
  per = model.apply(variables, labels, z, per_member=True)
  assert per.shape == (2, 3, 2)
  np.testing.assert_allclose(model.apply(variables, labels, z), per.mean(0), atol=1e-6)
  assert not np.allclose(per[0], per[1])  # members are initialised independently
  other = model.apply(variables, labels, -z)
  assert not np.allclose(other, model.apply(variables, labels, z))  # z changes predictions
  with pytest.raises(ValueError, match='use_z=True but got no z'):
    model.apply(variables, labels)


def test_folding_target_stats_maps_standardised_outputs_to_distances():
  config = landscapes.get_config('tiny')
  model = factory.make_predictor(config)
  labels, z = _inputs()
  variables = model.init(jax.random.key(0), labels, z)
  targets = np.random.default_rng(0).gamma(2.0, 0.05, size=(100, 2)).astype(np.float32)
  mean, std = predictor_training.target_stats(targets)
  np.testing.assert_allclose(mean, targets.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, targets.std(0), rtol=1e-4)
  folded = predictor_training.fold_target_stats(variables, mean, std)
  np.testing.assert_allclose(model.apply(folded, labels, z),
                             model.apply(variables, labels, z) * std + mean, atol=1e-6)


def test_pair_predictor_for_reenactment():
  config = avatars.get_config('tiny')
  model = factory.make_predictor(config)
  src = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), src, -src)
  assert model.apply(variables, src, -src).shape == (2, 2)
  assert model.apply(variables, src, -src, per_member=True).shape == (1, 2, 2)
  folded = predictor_training.fold_target_stats(variables, np.float32([0.1, 0.2]),
                                                np.float32([2.0, 3.0]))
  np.testing.assert_allclose(model.apply(folded, src, -src),
                             np.asarray(model.apply(variables, src, -src)) * [2.0, 3.0]
                             + [0.1, 0.2],
                             atol=1e-5)


def test_default_predictor_costs_under_half_a_percent_of_the_backbone():
  config = landscapes.get_config()
  cost = costs.predictor_stats(config)['gflops']
  assert cost < 0.005 * costs.backbone_stats(config)['gflops']


def test_an_ensemble_costs_one_trunk_per_member_on_shared_input_features():
  config = landscapes.get_config()
  cost = {}
  for members in (1, 3):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.predictor.members = members
    cost[members] = costs.predictor_stats(c)['gflops']
  assert 3 - 0.5 < cost[3] / cost[1] < 3


def test_z_draws_repeat_the_maps_with_new_noise(tiny_config):
  inputs = exit_distances.load_inputs(tiny_config, 'train', 4, draws=3)
  labels, z = inputs
  assert labels.shape[0] == z.shape[0] == 12
  np.testing.assert_array_equal(labels[:4], labels[8:])
  np.testing.assert_allclose(z[:4], exit_distances.load_inputs(tiny_config, 'train', 4)[1])
  assert not np.allclose(z[:4], z[4:8])



def test_evaluation_z_is_shared_by_seeds_training_z_is_not(tiny_config):
  other = tiny_config.copy_and_resolve_references()
  with other.unlocked():
    other.seed = tiny_config.seed + 1
  idx = np.arange(4)
  for split in ('validation', 'test'):
    np.testing.assert_array_equal(exit_distances.fixed_z(tiny_config, split, idx),
                                  exit_distances.fixed_z(other, split, idx))
  assert not np.allclose(exit_distances.fixed_z(tiny_config, 'train', idx),
                         exit_distances.fixed_z(other, 'train', idx))
  assert not np.allclose(exit_distances.fixed_z(tiny_config, 'validation', idx),
                         exit_distances.fixed_z(tiny_config, 'test', idx))
