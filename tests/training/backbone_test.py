"""The backbone trainer's state and step for a discriminator without spectral norm."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import landscapes
from fiancee_jax import checkpoint
from fiancee_jax.training import backbone


def test_a_discriminator_without_spectral_norm_trains_and_checkpoints(tmp_path):
  # Spectral norm is the only state of the discriminator: without it there is none to keep.
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.backbone.spectral_norm = False
  state = backbone.init_state(config, jax.random.key(0))
  assert state.d_stats == {}
  h, w = config.data.resolution
  batch = {'labels': jax.ShapeDtypeStruct((8, h, w), jnp.int32),
           'image': jax.ShapeDtypeStruct((8, h, w, 3), jnp.float32)}
  new, m = jax.eval_shape(backbone.make_train_step(config), state, batch)  # traced only
  assert new.d_stats == {} and set(m) >= {'g/loss', 'd/loss'}
  with checkpoint.Checkpointer(str(tmp_path / 'ckpt')) as ckpt:
    ckpt.save(1, state, force=True)
    restored, _ = ckpt.restore(jax.eval_shape(lambda: state))
  assert restored.d_stats == {}
  plain = lambda t: jax.tree.map(  # noqa: E731
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, t)
  for a, b in zip(jax.tree.leaves(plain(restored)), jax.tree.leaves(plain(state)), strict=True):
    np.testing.assert_array_equal(a, b)
