"""Tests of the reenactment backbone: staged interface, generic exits, paper sizes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import avatars as avatars_config
from configs import megaportraits_256
from fiancee_jax.metrics import costs
from fiancee_jax.models import exits
from fiancee_jax.models import reenact


@pytest.fixture(scope='module')
def setup():
  """(config, generator, variables with a non-zero motion head, source, driver)."""
  config = avatars_config.get_config('tiny')
  g = reenact.make_generator(config)
  keys = jax.random.split(jax.random.key(1), 2)
  source, driver = (jax.random.uniform(k, (3, 32, 32, 3), minval=-1, maxval=1) for k in keys)
  # An 'rbg' key: threefry draws for every parameter compile ~3x slower on XLA:CPU.
  init = jax.jit(g.init)(jax.random.key(0, impl='rbg'), source, driver)

  def with_motion_kernel(kernel):
    params = jax.tree.map(lambda x: x, init['params'])
    params['motion']['out']['kernel'] = kernel
    return {**init, 'params': params}

  shape = init['params']['motion']['out']['kernel'].shape
  # Large motion so that warps are far from the identity; zero motion (no rotation,
  # translation or expression) so that they are the identity.
  moving = with_motion_kernel(0.3 * jax.random.normal(jax.random.key(5), shape))
  still = with_motion_kernel(jnp.zeros(shape))
  return config, g, moving, still, source, driver


@pytest.fixture(scope='module')
def outputs(setup):
  """What the staged-interface tests compare: two compiled functions, several calls."""
  _, g, variables, fresh, source, driver = setup

  @jax.jit
  def staged(v, s, d):
    cond = g.apply(v, s, d, method='conditioning')
    hs = [g.apply(v, cond, method='stem')]
    for i in range(g.num_blocks):
      hs.append(g.apply(v, hs[-1], cond, method=lambda m, h, c, i=i: m.block(i, h, c)))
    vol, _ = g.apply(v, s, method=lambda m, s: m.appearance(s))
    return {'cond': cond, 'stages': hs, 'staged': g.apply(v, hs[-1], method='head'),
            'canonical': g.apply(v, vol, method=lambda m, c: m.g3d[0](c)),
            'driven': g.apply(v, s, d, method='driven_volume')}

  forward = jax.jit(g.apply)
  out = staged(variables, source, driver)
  out.update(full=forward(variables, source, driver),
             same_driver=forward(variables, source, source),
             other_first=forward(variables, source.at[0].set(-source[0]),
                                 driver.at[0].set(driver[2])))
  return out, staged(fresh, source, driver)


def test_zero_motion_warps_are_the_identity(outputs):
  # With zero motion codes, and the flows' zero init, the driven volume is the canonical
  # one, which is the source volume after G3D (a residual block).
  trained, fresh = outputs
  np.testing.assert_allclose(fresh['driven'], fresh['canonical'], atol=1e-5)
  assert float(jnp.abs(trained['driven'] - trained['canonical']).mean()) > 1e-4


def test_staged_composition_equals_the_full_forward(setup, outputs):
  g = setup[1]
  out, _ = outputs
  assert out['cond'].shape == (3, 32, 32, 6)
  assert [h.shape for h in out['stages']] == [(3, 8, 8, 16), (3, 8, 8, 16), (3, 8, 8, 16),
                                              (3, 16, 16, 8), (3, 32, 32, 4)]
  assert g.widths == (16, 16, 16, 8, 4) and g.num_blocks == 4
  full = out['full']
  np.testing.assert_allclose(out['staged'], full, atol=1e-5)
  assert full.shape == (3, 32, 32, 3) and float(jnp.abs(full).max()) <= 1.0
  # The driver matters, and inference is per example (no batch statistics).
  assert float(jnp.abs(full - out['same_driver']).mean()) > 1e-4
  np.testing.assert_allclose(out['other_first'][1:], full[1:], atol=1e-5)
  assert float(jnp.abs(out['other_first'][0] - full[0]).mean()) > 1e-4


def test_generic_exit_model_runs_every_exit(setup, outputs):
  _, g, variables, _, source, driver = setup
  # Exit 0: light ResBlock 1 and light upsampling blocks 2, 3; exit 1: the backbone.
  model = exits.ExitModel(backbone=g, attach_after=(0,), width_mult=0.25, guided=False,
                          key_block=0)
  ex = jax.jit(lambda k, v, s, d: model.init_exits(k, v, None, s, d))(
      jax.random.key(2, impl='rbg'), variables, source, driver)
  # Branches carry batch_stats (spectral-norm sigmas), as the exits trainer expects.
  assert len(ex) == 1 and jax.tree.leaves(ex[0]['batch_stats'])
  params = {'backbone': variables, 'exits': ex, 'database': None}
  costs = []
  for k in range(model.num_exits):
    compiled = jax.jit(model.exit_path(k)).lower(params, source, driver).compile()
    out = compiled(params, source, driver)
    assert out.shape == (3, 32, 32, 3) and np.isfinite(np.asarray(out)).all()
    cost = compiled.cost_analysis()
    costs.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']))
  # The last exit is the backbone itself, and costs more.
  np.testing.assert_allclose(out, outputs[0]['full'], atol=1e-5)
  assert costs[0] < costs[1], costs


def test_source_skip_feeds_g2d_the_source_only(setup):
  config, g, variables, _, source, driver = setup
  assert config.backbone.source_skip and g.source_skip
  feats = jax.random.normal(jax.random.key(3), (3, 8, 8, 16))
  g2d = jax.jit(lambda v, f, s: g.apply(v, f, s, method='g2d'))
  out = g2d(variables, feats, source)
  # G2D reads the source (here a different source with the same volume features) ...
  assert float(jnp.abs(g2d(variables, feats, driver) - out).mean()) > 1e-4
  with pytest.raises(ValueError, match='source_skip'):
    jax.eval_shape(lambda v, f: g.apply(v, f, method='g2d'), variables, feats)
  # ... and light blocks see the source, never the driver: its identity must not leak.
  cond = jnp.concatenate([source, driver], axis=-1)
  np.testing.assert_array_equal(g.light_factory.condition(cond), source)
  block = g.light_factory.block(g.num_blocks - 1, 0.5, name='b')
  h = jnp.zeros((3, 16, 16, g.widths[-2]))
  bv = block.init(jax.random.key(4), h, source)
  y = block.apply(bv, h, source)
  assert y.shape == (3, 32, 32, 2)
  assert float(jnp.abs(block.apply(bv, h, -source) - y).mean()) > 1e-4
  # Without the skip the blocks ignore cond (the OASIS-like contract).
  plain = dataclasses.replace(g.light_factory, source_skip=False)
  np.testing.assert_array_equal(plain.condition(cond), cond)


def test_image_head_without_norm_keeps_flat_colours():
  # With a channel per group, GroupNorm removes each image's channel means: a flat region's
  # colour (a shift of h) cannot reach the output. Without the norm it does.
  h = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  shift = jnp.array([0.0, 3.0])[:, None, None, None]
  for norm, changes in ((True, False), (False, True)):
    head = reenact.ImageHead(norm)
    v = head.init(jax.random.key(1), h)
    assert ('norm' in v['params']) == norm
    diff = float(jnp.abs(head.apply(v, h + shift) - head.apply(v, h))[1].mean())
    assert (diff > 1e-2) == changes, (norm, diff)


def test_light_blocks_keep_the_upsampling():
  g = reenact.make_generator(avatars_config.get_config())
  f = g.light_factory
  assert f.num_blocks == g.num_blocks == 6
  assert g.block_factors == (1, 1, 1, 1, 2, 2)
  x = jnp.zeros((1, 16, 16, 5))
  for j, size in ((3, 16), (4, 32), (5, 64)):
    block = f.block(j, 0.25, name='b')
    y, _ = jax.eval_shape(block.init_with_output, jax.random.key(0),
                          x if j != 5 else jnp.zeros((1, 32, 32, 5)), None)
    assert y.shape == (1, size, size, max(1, round(g.widths[j + 1] * 0.25)))


def test_megaportraits_g2d_has_the_paper_sizes():
  config = megaportraits_256.get_config()
  assert not config.backbone.source_skip and config.backbone.head_norm  # the paper's G2D
  g = reenact.make_generator(config)
  assert g.widths == (512,) * 9 + (256, 128, 64) and g.num_blocks == 11
  img = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(g.init, jax.random.key(0), img, img)
  params = variables['params']
  assert params['g2d_in']['kernel'].shape == (1, 1, 96 * 16, 512)
  conv = lambda k, i, o, bias=True: k * k * i * o + (o if bias else 0)
  gn = lambda c: 2 * c

  def block(i, o):
    return (gn(i) + conv(3, i, o) + gn(o) + conv(3, o, o)
            + (conv(1, i, o, bias=False) if i != o else 0))

  expected = (conv(1, 1536, 512) + 8 * block(512, 512) + block(512, 256) + block(256, 128)
              + block(128, 64) + gn(64) + conv(3, 64, 3))
  assert costs.g2d_param_count(params) == expected == 41_060_163
  h = jax.eval_shape(lambda v, x: g.apply(v, x, method='g2d'), variables,
                     jax.ShapeDtypeStruct((1, 64, 64, 1536), jnp.float32))
  assert h.shape == (1, 256, 256, 3)


@pytest.mark.parametrize('source,driver,match', [
    (jnp.zeros((2, 32, 32)), jnp.zeros((2, 32, 32)), r'float32 \[B, H, W, 3\]'),
    (jnp.zeros((2, 32, 32, 4)), jnp.zeros((2, 32, 32, 4)), r'float32 \[B, H, W, 3\]'),
    (jnp.zeros((2, 32, 32, 3), jnp.uint8), jnp.zeros((2, 32, 32, 3), jnp.uint8), '127.5'),
    (jnp.zeros((2, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)), 'same shape'),
    (jnp.zeros((1, 34, 34, 3)), jnp.zeros((1, 34, 34, 3)), r"config\.data\.resolution"),
])
def test_bad_inputs_name_the_fix(setup, source, driver, match):
  _, g, variables, _, _, _ = setup
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(g.apply, variables, source, driver)


def test_inconsistent_encoder_depth_is_refused():
  config = avatars_config.get_config('tiny')
  with config.unlocked():
    config.backbone.enc_widths = (8, 16)
  g = reenact.make_generator(config)
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r'enc_widths'):
    jax.eval_shape(g.init, jax.random.key(0), x, x)
  with config.unlocked():
    config.backbone.name = 'oasis'
  with pytest.raises(ValueError, match='reenact'):
    reenact.make_generator(config)
