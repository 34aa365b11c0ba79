"""The predictor stage's cached distances are reused only for the inputs they were measured on."""
import numpy as np

from configs import landscapes
from fiancee_jax.training import predictor


def test_cache_key_tells_apart_inputs_of_the_same_count():
  config = landscapes.get_config('tiny')
  rng = np.random.default_rng(0)
  maps = rng.integers(0, 5, size=(8, 16, 16)).astype(np.int32)
  z = rng.standard_normal((16, 8)).astype(np.float32)
  two_draws = (np.concatenate([maps[:8]] * 2), z)  # 8 maps x 2 draws
  four_draws = (np.concatenate([maps[:4]] * 4), z)  # 4 maps x 4 draws: same count
  key = predictor._inputs_key(config, 'guided', two_draws)
  assert key == predictor._inputs_key(config, 'guided', tuple(x.copy() for x in two_draws))
  assert key != predictor._inputs_key(config, 'guided', four_draws)
  assert key != predictor._inputs_key(config, 'unguided', two_draws)
  with config.unlocked():
    config.distance.name = 'l1'
  assert key != predictor._inputs_key(config, 'guided', two_draws)
