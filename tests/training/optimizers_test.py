import numpy as np
import optax
import pytest

from fiancee_jax.training import optimizers


@pytest.mark.parametrize('kind, warmup, expected', [
    ('constant', 0, [1.0, 1.0, 1.0, 1.0]),
    ('constant', 2, [0.0, 0.5, 1.0, 1.0]),
    ('cosine', 0, [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.0]),
    ('cosine', 2, [0.0, 0.5, 1.0, 0.0]),
])
def test_learning_rate_schedules(kind, warmup, expected):
  sched = optimizers.schedule(1.0, 4, kind, warmup)
  steps = [0, 1, 2, 4]
  np.testing.assert_allclose([float(sched(s)) for s in steps], expected, atol=1e-6)
  assert isinstance(optimizers.adam(sched, 0.5, 0.999), optax.GradientTransformation)


def test_bad_schedules_are_refused():
  with pytest.raises(ValueError, match='schedule'):
    optimizers.schedule(1.0, 10, 'linear')
  with pytest.raises(ValueError, match='warmup_steps'):
    optimizers.schedule(1.0, 10, 'cosine', 10)
