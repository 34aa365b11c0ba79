import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import landscapes
from fiancee_jax.guidance import database
from fiancee_jax.metrics import costs
from fiancee_jax.models import exits
from fiancee_jax.models import factory


@pytest.fixture(scope='module')
def setup():
  config = landscapes.get_config('tiny')
  model = factory.make_exit_model(config, guided=True)
  labels = jax.random.randint(jax.random.key(1), (3, 16, 16), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(2), (3, config.backbone.z_dim))
  bb = model.backbone.init(jax.random.key(0), labels, z)
  spec = factory.database_spec(config)
  rng = np.random.default_rng(0)
  db = database.fit(spec, rng.normal(size=(128, spec.feature_width)).astype(np.float32),
                    rng.uniform(-1, 1, (128, spec.value_dim)).astype(np.float32),
                    jax.random.key(0), 2)
  ex = model.init_exits(jax.random.key(3), bb, db, labels, z)
  return config, model, {'backbone': bb, 'exits': ex, 'database': db}, labels, z


def test_each_exit_path_matches_the_shared_pass(setup):
  config, model, params, labels, z = setup
  images, teacher = model.all_exits(params, labels, z)
  assert len(images) == model.num_exits - 1
  for k in range(model.num_exits):
    out = jax.jit(model.exit_path(k))(params, labels, z)
    assert out.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(out, images[k] if k < len(images) else teacher, atol=1e-5)


def test_guidance_changes_the_exit_output(setup):
  config, model, params, labels, z = setup
  outs, cond, teacher, guide = model.backbone_pass(params, labels, z)
  a, _ = model.branch_outputs(params['exits'], outs, cond, guide)
  b, _ = model.branch_outputs(params['exits'], outs, cond, guide * 0 + 0.5)
  assert float(jnp.abs(a[0] - b[0]).mean()) > 1e-5
  with pytest.raises(ValueError, match='guided but got no guide'):
    model.branch_outputs(params['exits'], outs, cond, None)


def test_default_config_exits_span_the_compute_range():
  # Issue 3 target: earliest exit <= 35 % and latest <= 70 % of the backbone (lookup incl.).
  config = landscapes.get_config()
  s = costs.compute_stats(config)
  frac = [e['gflops'] / s['backbone']['gflops'] for e in s['exits'][:-1]]
  assert frac[0] <= 0.35 and frac[-1] <= 0.70, frac
  assert s['database']['lookup_gflops'] <= 0.03 * s['backbone']['gflops']
  assert s['predictor']['gflops'] <= 0.02 * s['backbone']['gflops']


def test_bad_attach_points_are_refused():
  config = landscapes.get_config('tiny')
  g = factory.make_generator(config)
  with pytest.raises(ValueError, match='attach_after'):
    exits.ExitModel(g, (2, 1), 0.25, False, 0)
  with pytest.raises(ValueError, match='attach_after'):
    exits.ExitModel(g, (1, 3), 0.25, False, 0)
  with pytest.raises(ValueError, match='key_block'):
    exits.ExitModel(g, (1, 2), 0.25, True, 2)


def _tiny(**exit_knobs):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.exits.update(exit_knobs)
  return config


def _init_unguided(config):
  model = factory.make_exit_model(config, guided=False)
  labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(2), (2, config.backbone.z_dim))
  bb = model.backbone.init(jax.random.key(0), labels, z)
  return model, {'backbone': bb, 'database': None,
                 'exits': model.init_exits(jax.random.key(3), bb, None, labels, z)}, labels, z


@pytest.mark.parametrize('z_aware', [True, False])
def test_only_z_aware_branches_see_z(z_aware):
  # The features a branch starts from stay fixed; only the z in the conditioning changes.
  model, params, labels, z = _init_unguided(_tiny(z_aware=z_aware))
  # z's weights start at zero (a z-aware branch starts as the z-blind one); give them values
  # as training would.
  params['exits'] = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(len(path)), x.shape)
                       if 'z_hidden' in jax.tree_util.keystr(path) else x), params['exits'])
  outs, cond, _, _ = model.backbone_pass(params, labels, z)
  cond_other_z = model.backbone.apply(params['backbone'], labels, -z, method='conditioning')
  a, _ = model.branch_outputs(params['exits'], outs, cond, None)
  b, _ = model.branch_outputs(params['exits'], outs, cond_other_z, None)
  for k, (x, y) in enumerate(zip(a, b)):
    change = float(jnp.abs(x - y).mean())
    assert (change > 1e-3) if z_aware else (change == 0.0), (k, change)


@pytest.mark.parametrize('knobs', [
    dict(z_aware=False),
    dict(width_mult=1.0, spade_hidden_mult=0.25),
    dict(width_mult=1.0, spade_hidden_mult=0.5, branch_width_mults=(0.5, 1.0),
         branch_hidden_mults=(0.25, 0.5)),
])
def test_light_block_shapes_and_costs_follow_the_knobs(knobs):
  config = _tiny(**knobs)
  e, b = config.exits, config.backbone
  model, params, labels, z = _init_unguided(config)
  widths = model.backbone.widths
  n = len(e.attach_after)
  width_mults = e.branch_width_mults or (e.width_mult,) * n
  hidden_mults = e.branch_hidden_mults or (e.spade_hidden_mult,) * n
  for k, attach in enumerate(e.attach_after):
    for j in range(attach + 1, model.backbone.num_blocks):
      res = params['exits'][k]['params'][f'block_{j}']['res']
      hidden = max(1, round(b.spade_hidden * hidden_mults[k]))
      assert res['conv_1']['kernel'].shape[-1] == max(1, round(widths[j + 1] * width_mults[k]))
      assert res['norm_0']['shared']['kernel'].shape == (3, 3, config.data.num_classes, hidden)
      assert res['norm_0']['gamma']['kernel'].shape[2] == hidden
      if e.z_aware:  # one Dense(z) for the block's three SPADEs (shortcut, 0, 1)
        assert res['z_hidden']['kernel'].shape == (b.z_dim, 3 * hidden)
      else:
        assert 'z_hidden' not in res
  images, teacher = model.all_exits(params, labels, z)
  assert all(img.shape == teacher.shape for img in images)
  g = [c['gflops'] for c in costs.exit_stats(config, guided=False)]
  assert all(x < y for x, y in zip(g, g[1:])), g


def test_z_costs_a_dense_not_a_conv():
  # z through Dense(z) adds a per-image matmul and a broadcast add, far less than the
  # conv over broadcast z channels the backbone's SPADEs pay.
  blind = costs.exit_stats(_tiny(z_aware=False), guided=False)
  aware = costs.exit_stats(_tiny(z_aware=True), guided=False)
  for x, y in zip(blind[:-1], aware[:-1]):
    assert x['gflops'] < y['gflops'] < 1.05 * x['gflops']


def test_branch_features_match_the_backbone_resolutions():
  model, params, labels, z = _init_unguided(_tiny())
  outs, cond, _, _ = model.backbone_pass(params, labels, z)
  images, new_stats, feats = model.branch_outputs(params['exits'], outs, cond, None,
                                                  train=True, features=True)
  assert len(feats) == len(images) == len(new_stats) == 2
  for k, attach in enumerate(model.attach_after):
    assert sorted(feats[k]) == list(range(attach + 1, model.backbone.num_blocks))
    for j, f in feats[k].items():
      assert f.shape[:3] == outs[j].shape[:3]
  # Without features the call keeps its two results and writes no intermediates.
  images2, st = model.branch_outputs(params['exits'], outs, cond, None)
  assert st is None
  np.testing.assert_allclose(images2[0], model.branch_outputs(
      params['exits'], outs, cond, None, features=True)[0][0])
  assert set(params['exits'][0]) == {'params', 'batch_stats'}


def test_bad_width_knobs_are_refused():
  with pytest.raises(ValueError, match='branch_width_mults'):
    factory.make_exit_model(_tiny(branch_width_mults=(1.0,)), guided=False)
  g = factory.make_generator(landscapes.get_config('tiny'))
  with pytest.raises(ValueError, match='width_mult'):
    exits.ExitModel(g, (1, 2), (0.5, 0.0), False, 0)
  with pytest.raises(ValueError, match='hidden_mult'):
    exits.ExitModel(g, (1, 2), 0.5, False, 0, hidden_mult=(0.5, 0.5, 0.5))


def test_a_z_aware_branch_starts_as_the_z_blind_one():
  # z's Dense starts at zero: before training, z-awareness changes no output.
  model, params, labels, z = _init_unguided(_tiny(z_aware=True))
  blind = factory.make_exit_model(_tiny(z_aware=False), guided=False)
  without_z = jax.tree_util.tree_map(lambda x: x, params['exits'])
  for ev in without_z:
    for block in ev['params'].values():
      block.get('res', {}).pop('z_hidden', None)
  a, _ = model.all_exits(params, labels, z)
  b, _ = blind.all_exits({**params, 'exits': without_z}, labels, z)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_residual_guidance_adds_each_exits_retrieved_residual_to_the_unguided_branch():
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.database.value_type = 'residual'
  guided = factory.make_exit_model(config, guided=True)
  plain = factory.make_exit_model(config, guided=False)
  assert guided.guidance == 'residual' and plain.guidance == 'residual'
  labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(2), (2, config.backbone.z_dim))
  bb = guided.backbone.init(jax.random.key(0), labels, z)
  spec = factory.database_spec(config)
  branches = len(config.exits.attach_after)
  assert spec.channels == 3 * branches and spec.value_agg == 'mean'
  rng = np.random.default_rng(0)
  db = database.fit(spec, rng.normal(size=(128, spec.feature_width)).astype(np.float32),
                    rng.uniform(-0.3, 0.3, (128, spec.value_dim)).astype(np.float32),
                    jax.random.key(0), 2)
  # The branches take no guide: the guided variant's variables are the unguided ones.
  ex = plain.init_exits(jax.random.key(3), bb, None, labels, z)
  same = jax.tree.map(lambda a, b: a.shape == b.shape,
                      guided.init_exits(jax.random.key(3), bb, db, labels, z), ex)
  assert all(jax.tree.leaves(same))
  params = {'backbone': bb, 'exits': ex, 'database': db}
  outs, cond, _, guide = guided.backbone_pass(params, labels, z)
  assert guide.shape == (2, 16, 16, 3 * branches)
  unguided = [jax.jit(plain.exit_path(k))({**params, 'database': None}, labels, z)
              for k in range(branches)]
  images, _ = guided.all_exits(params, labels, z)
  for k in range(branches):
    want = np.clip(np.asarray(unguided[k]) + np.asarray(guide[..., 3 * k:3 * k + 3]), -1, 1)
    np.testing.assert_allclose(jax.jit(guided.exit_path(k))(params, labels, z), want,
                               atol=1e-5)
    np.testing.assert_allclose(images[k], want, atol=1e-5)
  assert float(np.abs(np.asarray(images[0]) - np.asarray(unguided[0])).mean()) > 1e-3
  # The residual costs its lookup and an add on top of the branch.
  gflops = costs.exit_stats(config, guided=True)
  plain_gflops = costs.exit_stats(config, guided=False)
  assert all(g['gflops'] > p['gflops'] for g, p in zip(gflops[:-1], plain_gflops[:-1]))
