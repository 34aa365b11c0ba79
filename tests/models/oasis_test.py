import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import landscapes
from configs import oasis_ade20k
from fiancee_jax.metrics import costs
from fiancee_jax.models import factory
from fiancee_jax.models import layers
from fiancee_jax.models import oasis
from fiancee_jax.models import spade


def _init(config, batch=2):
  g = factory.make_generator(config)
  h, w = config.data.resolution
  labels = jax.random.randint(jax.random.key(1), (batch, h, w), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(2), (batch, config.backbone.z_dim))
  return g, g.init(jax.random.key(0), labels, z), labels, z


def test_ade20k_generator_matches_official_size_and_compute():
  s = costs.backbone_stats(oasis_ade20k.get_config())
  assert abs(s['params'] - 74.31e6) / 74.31e6 < 0.01
  assert abs(s['gflops'] - 388.8) / 388.8 < 0.03


def test_small_generator_matches_design_numbers():
  # DESIGN.md: ch 16 / hidden 32 at 64x64 (151 classes, OASIS's z_dim 64) is 5.76 M params,
  # 1.52 GMACs.
  config = landscapes.get_config()
  with config.unlocked():
    config.data.num_classes = 151
    config.backbone.update(ch=16, spade_hidden=32, z_dim=64)
  s = costs.backbone_stats(config)
  assert abs(s['params'] - 5.76e6) / 5.76e6 < 0.01
  assert abs(s['gflops'] - 3.04) / 3.04 < 0.05


def test_stages_compose_to_full_forward():
  config = landscapes.get_config('tiny')
  g, v, labels, z = _init(config)
  full = g.apply(v, labels, z)
  seg = g.apply(v, labels, z, method='conditioning')
  h = g.apply(v, seg, method='stem')
  lo = oasis.lowest_resolution(config.data.resolution, g.num_blocks)
  assert h.shape == (2, *lo, g.widths[0])
  for i in range(g.num_blocks):
    h = g.apply(v, h, seg, method=lambda m, h, s, i=i: m.block(i, h, s))
    assert h.shape[-1] == g.widths[i + 1]
  img = g.apply(v, h, method='head')
  np.testing.assert_allclose(img, full, atol=1e-6)
  assert full.shape == (2, 16, 16, 3)
  assert float(jnp.abs(full).max()) <= 1.0


def test_z_changes_output_and_label_map_matters():
  config = landscapes.get_config('tiny')
  g, v, labels, z = _init(config)
  a = g.apply(v, labels, z)
  b = g.apply(v, labels, z + 1.0)
  c = g.apply(v, (labels + 1) % config.data.num_classes, z)
  assert float(jnp.abs(a - b).mean()) > 1e-4
  assert float(jnp.abs(a - c).mean()) > 1e-4


def test_discriminator_has_c_plus_1_outputs_per_pixel():
  config = landscapes.get_config('tiny')
  d = factory.make_discriminator(config)
  x = jnp.zeros((2, 16, 16, 3))
  v = d.init(jax.random.key(0), x)
  out = d.apply(v, x)
  assert out.shape == (2, 16, 16, config.data.num_classes + 1)


def test_unreachable_resolution_is_refused():
  with pytest.raises(ValueError, match='divisible by 32'):
    oasis.lowest_resolution((48, 64), 6)


def test_spectral_norm_estimates_largest_singular_value():
  conv = layers.SNConv(8, 3)
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 4))
  v = conv.init(jax.random.key(1), x)
  for _ in range(30):
    _, upd = conv.apply(v, x, train=True, mutable=['batch_stats'])
    v = {'params': v['params'], 'batch_stats': upd['batch_stats']}
  true = np.linalg.svd(np.asarray(v['params']['kernel']).reshape(-1, 8), compute_uv=False)[0]
  np.testing.assert_allclose(float(v['batch_stats']['sigma']), true, rtol=1e-3)


def test_param_free_batch_norm_uses_global_batch_and_recomputes_mean():
  bn = spade.ParamFreeBatchNorm()
  xs = [jax.random.normal(jax.random.key(i), (4, 3, 3, 2)) * (i + 1) + i for i in range(3)]
  v = bn.init(jax.random.key(0), xs[0], train=True)
  y = bn.apply(v, xs[0], train=True, mutable=['batch_stats'])[0]
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  stats = v['batch_stats']
  for i, x in enumerate(xs):
    _, upd = bn.apply({'batch_stats': stats}, x, train=True, momentum=i / (i + 1),
                      mutable=['batch_stats'])
    stats = upd['batch_stats']
  expect = np.mean([np.asarray(x).mean(axis=(0, 1, 2)) for x in xs], axis=0)
  np.testing.assert_allclose(stats['mean'], expect, rtol=1e-5)
