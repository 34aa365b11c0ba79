"""Cost accounting: exit GFLOPs, counting on the plain XLA kernels, lookup chunks, the
broadcast-z share of the backbone's MACs, the reenactment backbone's G2D share."""
import jax
import jax.numpy as jnp
import pytest

from configs import avatars
from configs import landscapes
from fiancee_jax.guidance import database
from fiancee_jax.metrics import costs
from fiancee_jax.metrics import flops
from fiancee_jax.models import factory
from fiancee_jax.ops import kernels


@pytest.fixture(scope='module')
def tiny_stats():
  return costs.compute_stats(landscapes.get_config('tiny'))


def test_compute_stats_of_the_tiny_config(tiny_stats):
  s = tiny_stats
  assert set(s) == {'backbone', 'exits', 'predictor', 'database'}
  assert set(s['backbone']) == {'params', 'gflops', 'broadcast_z_share'}
  assert s['backbone']['broadcast_z_share'] == costs.broadcast_z_share(
      landscapes.get_config('tiny'))
  assert s['predictor']['gflops'] > 0 and s['database']['lookup_gflops'] > 0
  assert s['database']['entries'] == 64


def test_exit_gflops_strictly_increase_to_the_backbone(tiny_stats):
  config = landscapes.get_config('tiny')
  guided = [c['gflops'] for c in tiny_stats['exits']]
  unguided_stats = costs.exit_stats(config, guided=False)
  unguided = [c['gflops'] for c in unguided_stats]
  for g in (guided, unguided):
    assert all(a < b for a, b in zip(g, g[1:])), g
    assert g[-1] == pytest.approx(tiny_stats['backbone']['gflops'])
  assert [c['attach_after'] for c in unguided_stats] == [1, 2, 3]
  # The guided branches pay for the lookup and their guide channels; the backbone is one path.
  assert all(a > b for a, b in zip(guided[:-1], unguided[:-1]))


def _exit0_gflops(config, kernel_names):
  """GFLOPs of exit 0 counted on the model as built on `kernel_names` (not what costs does)."""
  model = factory.make_exit_model(config, guided=True, kernels=kernel_names)
  inputs = costs.abstract_inputs(config)
  bb = jax.eval_shape(model.backbone.init, jax.random.key(0), *inputs)
  db = costs.abstract_database(config)
  ex = jax.eval_shape(lambda b, d, *x: model.init_exits(jax.random.key(0), b, d, *x), bb, db,
                      *inputs)
  return flops.gflops(model.exit_path(0), {'backbone': bb, 'exits': ex, 'database': db},
                      *inputs)


def test_gflops_are_counted_on_plain_xla_whatever_the_kernels(tiny_stats):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.kernels.update(conv='even', top_k='two_stage')
  assert [c['gflops'] for c in costs.exit_stats(config)] == [
      c['gflops'] for c in tiny_stats['exits']]
  # Counted on the model as built, the kernels would move the figure: the guided exits read
  # 12 label + 3 guide channels, and 'even' convolves a zero channel too.
  assert _exit0_gflops(config, {'conv': 'even', 'top_k': 'xla'}) > _exit0_gflops(
      config, kernels.XLA)


def test_reported_costs_count_every_chunk_of_the_lookup(tiny_stats):
  # The tiny database (64 entries, chunks of 32) is scanned in two chunks; XLA counts a loop
  # body once, so the costs are counted on the unchunked lookup (the same arithmetic).
  config = landscapes.get_config('tiny')
  assert config.database.chunk < config.database.num_entries
  one = config.copy_and_resolve_references()
  with one.unlocked():
    one.database.chunk = config.database.num_entries
  assert tiny_stats['database']['lookup_gflops'] == pytest.approx(costs.lookup_gflops(one))
  assert [c['gflops'] for c in tiny_stats['exits']] == pytest.approx(
      [c['gflops'] for c in costs.exit_stats(one)])
  # The loop really is undercounted: one chunk's worth of key scores, not two.
  spec = factory.database_spec(config)
  q = jnp.zeros((256, spec.key_dim))
  db = {'keys': jnp.zeros((spec.num_entries, spec.key_dim))}
  chunked = flops.gflops(lambda d, q: database._top_k(spec, d, q), db, q)  # pylint: disable=protected-access
  whole = flops.gflops(lambda d, q: database._top_k(factory.database_spec(one), d, q), db, q)  # pylint: disable=protected-access
  assert chunked < 0.75 * whole


def test_broadcast_z_share_of_the_tiny_config_by_hand():
  config = landscapes.get_config('tiny')
  b = config.backbone
  assert (b.ch, tuple(b.width_ratios), b.spade_hidden, b.z_dim) == (2, (8, 8, 4, 2, 1), 4, 8)
  assert tuple(config.data.resolution) == (16, 16)
  c, z, hid = config.data.num_classes, 8, 4
  # Widths 16, 16, 8, 4, 2; the stem at 2x2, block i at 2 * 2**i pixels a side.
  blocks = [(4, 16, 16), (16, 16, 8), (64, 8, 4), (256, 4, 2)]  # (pixels, in, out)

  def block_macs(pixels, fin, fout, seg):
    fmid, n = min(fin, fout), (2 if fin == fout else 3)  # SPADEs: norm_0, norm_1 (+ norm_s)
    shared = pixels * 9 * seg * hid * n  # the first 3x3 conv of every SPADE reads seg
    gamma_beta = pixels * 9 * hid * 2 * (fin * (n - 1) + fmid)
    convs = pixels * 9 * (fin * fmid + fmid * fout) + (pixels * fin * fout if n == 3 else 0)
    return shared + gamma_beta + convs

  def total(seg):  # stem (3x3, seg -> 16 at 2x2) + blocks + head (3x3, 2 -> 3 at 16x16)
    return 4 * 9 * seg * 16 + sum(block_macs(*blk, seg) for blk in blocks) + 256 * 9 * 2 * 3

  g = factory.make_generator(config, kernels=kernels.XLA)
  inputs = costs.abstract_inputs(config)
  v = jax.eval_shape(g.init, jax.random.key(0), *inputs)
  assert costs.macs(lambda v, *x: g.apply(v, *x), v, *inputs) == total(c + z)
  assert costs.broadcast_z_share(config) == pytest.approx(1 - total(c) / total(c + z),
                                                          rel=1e-12)


def test_broadcast_z_share_is_zero_without_z():
  assert costs.broadcast_z_share(avatars.get_config('tiny')) == 0.0


def test_macs_count_matmuls_scan_iterations_and_the_largest_branch():
  x = jax.ShapeDtypeStruct((3, 5), jnp.float32)
  w = jax.ShapeDtypeStruct((5, 7), jnp.float32)
  assert costs.macs(lambda x, w: x @ w, x, w) == 3 * 5 * 7
  loop = lambda x, w: jax.lax.scan(lambda c, _: (c, c @ w), x, None, length=4)[1]
  assert costs.macs(loop, x, w) == 4 * 3 * 5 * 7
  branch = lambda x, w: jax.lax.cond(True, lambda: (x @ w).sum(), lambda: x.sum())
  assert costs.macs(branch, x, w) == 3 * 5 * 7


def test_reenact_stats_of_the_tiny_config():
  s = costs.reenact_stats(avatars.get_config('tiny'))
  assert set(s) == {'params', 'gflops', 'g2d_params', 'g2d_gflops'}
  assert 0 < s['g2d_params'] < s['params'] and 0 < s['g2d_gflops'] < s['gflops']
  with pytest.raises(ValueError, match='backbone_stats'):
    costs.reenact_stats(landscapes.get_config('tiny'))


def test_default_avatars_config_keeps_g2d_the_bulk_of_the_flops():
  # Exits only save G2D compute: G2D must stay the dominant share of the generator.
  s = costs.reenact_stats(avatars.get_config())
  assert s['g2d_gflops'] / s['gflops'] >= 0.7, s
