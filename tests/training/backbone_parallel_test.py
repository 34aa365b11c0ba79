"""Data parallel over 4 fake CPU devices computes what 1 device does (same global batch).

Compared: losses at every step, generator and discriminator outputs after 3 steps and every
conv/dense kernel. Biases directly followed by batch norm are left out of the parameter
comparison: their exact gradient is zero, and Adam (b1 = 0) turns the rounding noise of a
different reduction order into lr-sized steps; they do not change any output (checked).
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from configs import landscapes
    from fiancee_jax import parallel
    from fiancee_jax.models import factory
    from fiancee_jax.training import backbone
    assert jax.device_count() == 4, jax.devices()
    config = landscapes.get_config('tiny')
    g, d = factory.make_generator(config), factory.make_discriminator(config)
    key = jax.random.key(0)
    batches = [{'labels': jax.random.randint(jax.random.fold_in(key, i), (8, 16, 16), 0, 12),
                'image': jax.random.uniform(jax.random.fold_in(key, 100 + i), (8, 16, 16, 3),
                                            minval=-1, maxval=1)} for i in range(3)]
    probe_z = jax.random.normal(jax.random.key(5), (8, config.backbone.z_dim))
    results = []
    init = jax.jit(lambda k: backbone.init_state(config, k))(key)  # one init compile for both
    for n in (1, 4):
      mesh = parallel.make_mesh(n)
      repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
      state = jax.device_put(init, repl)
      step = jax.jit(backbone.make_train_step(config), in_shardings=(repl, data),
                     out_shardings=(repl, repl))
      losses = []
      for b in batches:
        state, m = step(state, jax.device_put(b, data))
        losses.append(jax.device_get(m))
      fake = g.apply({'params': state.g_params, 'batch_stats': state.g_stats},
                     batches[0]['labels'], probe_z, train=True, mutable=['batch_stats'])[0]
      logits = d.apply({'params': state.d_params, 'batch_stats': state.d_stats},
                       batches[0]['image'])
      kernels = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
          (state.g_params, state.d_params, state.ema_params))[0] if 'kernel' in str(p[-1])}
      results.append(jax.device_get((losses, fake, logits, kernels)))
    (l1, f1, d1, k1), (l4, f4, d4, k4) = results
    for a, b in zip(l1, l4):
      for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(f1, f4, atol=1e-4)
    np.testing.assert_allclose(d1, d4, atol=1e-4)
    assert len(k1) > 20
    for name in k1:
      np.testing.assert_allclose(k1[name], k4[name], atol=2e-5, err_msg=name)
    print('WORST', max(float(np.abs(k1[n] - k4[n]).max()) for n in k1))
''')


def test_four_devices_match_one_device():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '')
                        + ' --xla_force_host_platform_device_count=4'))
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr[-4000:]
  assert 'WORST' in out.stdout
