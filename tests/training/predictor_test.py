"""The predictor's training losses: quantile (pinball) against the median and the mean."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax.models import factory
from fiancee_jax.training import predictor as predictor_training


def _with_loss(loss: str, quantile: float = 0.5):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.predictor.update(loss=loss, quantile=quantile)
  return config


@pytest.mark.parametrize('q', [0.1, 0.5, 0.9])
def test_pinball_is_minimised_at_the_quantile(q):
  targets = np.random.default_rng(0).gamma(2.0, 0.05, size=4000).astype(np.float32)
  grid = np.linspace(0, 0.4, 801, dtype=np.float32)
  losses = [float(jnp.mean(predictor_training.pinball(targets - c, q))) for c in grid]
  assert grid[int(np.argmin(losses))] == pytest.approx(np.quantile(targets, q), abs=1e-3)


def test_quantile_one_half_is_half_the_l1_loss_and_differs_from_mse():
  rng = np.random.default_rng(1)
  pred, targets = rng.normal(size=(2, 3, 8, 2)).astype(np.float32)
  l1 = float(predictor_training.prediction_loss(_with_loss('l1'), pred, targets))
  half = float(predictor_training.prediction_loss(_with_loss('quantile', 0.5), pred, targets))
  assert half == pytest.approx(l1 / 2, rel=1e-6)
  q9 = float(predictor_training.prediction_loss(_with_loss('quantile', 0.9), pred, targets))
  assert q9 != pytest.approx(half)
  mse = float(predictor_training.prediction_loss(_with_loss('mse'), pred, targets))
  assert mse == pytest.approx(float(np.mean((pred - targets) ** 2)), rel=1e-6)


def test_quantile_training_covers_its_share_of_the_targets():
  """Trained on noisy targets, the q-predictor sits above about a share q of them."""
  n = 64
  labels = jax.random.randint(jax.random.key(0), (n, 16, 16), 0, 12)
  z = jax.random.normal(jax.random.key(1), (n, 8))
  targets = jax.random.normal(jax.random.key(2), (n, 2))  # standardised, input-blind
  cover = {}
  for q in (0.2, 0.8):
    config = _with_loss('quantile', q)
    with config.unlocked():
      config.predictor.update(num_steps=300, lr=1e-2)
    state = predictor_training.init_state(config, jax.random.key(3))
    step = jax.jit(predictor_training.make_train_step(config, (labels, z), targets))
    for i in range(config.predictor.num_steps):
      idx = np.random.default_rng(i).choice(n, 16, replace=False).astype(np.int32)
      state, _ = step(state, {'index': idx})
    pred = factory.make_predictor(config).apply(state.params, labels, z)
    cover[q] = float(np.mean(np.asarray(targets) <= np.asarray(pred)))
  assert cover[0.2] < 0.4 and cover[0.8] > 0.6, cover
