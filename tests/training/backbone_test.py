"""The backbone trainer's state and step for a discriminator without spectral norm."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import landscapes
from fiancee_jax import checkpoint
from fiancee_jax.training import backbone


def test_a_discriminator_without_spectral_norm_has_no_state_to_keep(tmp_path):
  # Spectral norm is the only state of the discriminator: without it there is none.
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.backbone.spectral_norm = False
  state = jax.eval_shape(lambda: backbone.init_state(config, jax.random.key(0)))
  assert state.d_stats == {}
  h, w = config.data.resolution
  batch = {'labels': jax.ShapeDtypeStruct((8, h, w), jnp.int32),
           'image': jax.ShapeDtypeStruct((8, h, w, 3), jnp.float32)}
  new, m = jax.eval_shape(backbone.make_train_step(config), state, batch)  # traced only
  assert new.d_stats == {} and set(m) >= {'g/loss', 'd/loss'}
  # An empty collection round-trips through a checkpoint.
  tree = {'d_params': {'w': jnp.arange(3.0)}, 'd_stats': {}}
  with checkpoint.Checkpointer(str(tmp_path / 'ckpt')) as ckpt:
    ckpt.save(1, tree, force=True)
    restored, _ = ckpt.restore(jax.eval_shape(lambda: tree))
  assert restored['d_stats'] == {}
  np.testing.assert_array_equal(restored['d_params']['w'], tree['d_params']['w'])
