import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import checkpoint
from fiancee_jax.guidance import database


def _spec(**kw):
  base = dict(resolution=(16, 16), grid=(4, 4), key_block=1, feature_width=8, key_dim=4,
              num_entries=32, num_classes=5, top_k=1, chunk=16)
  base.update(kw)
  return database.DatabaseSpec(**base)


def _fit(spec, m=128, seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(m, spec.feature_width)).astype(np.float32)
  values = rng.uniform(-1, 1, size=(m, spec.value_dim)).astype(np.float32)
  return database.fit(spec, feats, values, jax.random.key(seed), kmeans_iters=3), feats, values


def test_lookup_of_a_stored_key_returns_its_value():
  spec = _spec()
  db, _, _ = _fit(spec)
  lookup = jax.jit(database.make_lookup(spec), static_argnums=2)
  # Build features whose pooled, projected key equals stored entry 3 at every patch:
  # invert the projection through the pseudo-inverse (keys are unit vectors).
  proj, mean = np.asarray(db['proj']), np.asarray(db['mean'])
  key = np.asarray(db['keys'][3])
  feat = mean + np.linalg.pinv(proj).T @ key * 1.0
  feats = jnp.broadcast_to(jnp.asarray(feat, jnp.float32), (1, 8, 8, 8))
  guide = lookup(db, feats, (16, 16))
  expect = np.asarray(db['values'][3]).reshape(4, 4, 3)
  np.testing.assert_allclose(np.asarray(guide)[0, :4, :4], expect, atol=1e-5)
  np.testing.assert_allclose(np.asarray(guide)[0, 12:, 8:12], expect, atol=1e-5)


@pytest.mark.parametrize('metric', ['cosine', 'l2'])
@pytest.mark.parametrize('top_k', [1, 3])
def test_chunked_lookup_equals_unchunked(metric, top_k):
  small, big = _spec(metric=metric, top_k=top_k, chunk=8), _spec(metric=metric, top_k=top_k,
                                                                 chunk=4096)
  db, _, _ = _fit(small)
  feats = jax.random.normal(jax.random.key(3), (2, 8, 8, 8))
  a = database.make_lookup(small)(db, feats, (16, 16))
  b = database.make_lookup(big)(db, feats, (16, 16))
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert a.shape == (2, 16, 16, 3)


def test_entries_are_distinct_training_patches():
  spec = _spec()
  db, feats, values = _fit(spec)
  vals = np.asarray(db['values'])
  assert len({v.tobytes() for v in vals}) == spec.num_entries
  for v in vals[:5]:
    assert np.any(np.all(np.isclose(values, v), axis=1))


def test_save_load_roundtrip_and_mismatch_errors(tmp_path):
  spec = _spec()
  db, _, _ = _fit(spec)
  path = str(tmp_path / 'db')
  database.save(path, spec, db)
  back = database.load(path, spec)
  for k in db:
    np.testing.assert_array_equal(back[k], db[k])
  with pytest.raises(ValueError, match='feature_width is 8 in the database but 16'):
    database.load(path, _spec(feature_width=16))
  with pytest.raises(ValueError, match='num_classes'):
    database.load(path, _spec(num_classes=6))
  with pytest.raises(ValueError, match='grid'):
    database.load(path, _spec(grid=(2, 2)))
  with pytest.raises(checkpoint.CheckpointError, match='no guiding database'):
    database.load(str(tmp_path / 'missing'), spec)


def test_corrupt_database_file_is_refused(tmp_path):
  spec = _spec()
  db, _, _ = _fit(spec)
  path = tmp_path / 'db'
  database.save(str(path), spec, db)
  files = sorted(p for p in path.rglob('*') if p.is_file() and p.stat().st_size > 64)
  for f in files:
    f.write_bytes(b'garbage' * 10)
  with pytest.raises((checkpoint.CheckpointError, ValueError)):
    database.load(str(path), spec)


def test_bad_spec_is_refused():
  with pytest.raises(ValueError, match='grid'):
    _spec(grid=(3, 3))
  with pytest.raises(ValueError, match='key_dim'):
    _spec(key_dim=99)
  with pytest.raises(ValueError, match='num_entries'):
    database.fit(_spec(num_entries=64), np.zeros((10, 8), np.float32),
                 np.zeros((10, 48), np.float32), jax.random.key(0))


def test_lookup_returns_the_same_guide_on_every_top_k_implementation():
  # 256 entries in chunks of 128: the two-stage top-k groups them (128 >= 4 * 2 * 16).
  spec = _spec(num_entries=256, top_k=2, chunk=128)
  db, _, _ = _fit(spec, m=512)
  feats = jax.random.normal(jax.random.key(3), (2, 8, 8, 8))
  a = jax.jit(database.make_lookup(spec, 'xla'), static_argnums=2)(db, feats, (16, 16))
  b = jax.jit(database.make_lookup(spec, 'two_stage'), static_argnums=2)(db, feats, (16, 16))
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r'config\.kernels\.top_k'):
    database.make_lookup(spec, 'approx')


def test_residual_entries_are_centroids_holding_their_members_mean_value():
  spec = _spec(metric='l2', key_dim=8, channels=6, value_agg='mean', num_entries=8)
  rng = np.random.default_rng(0)
  # Four tight clusters in feature space, each member with its own value.
  centres = rng.normal(size=(4, 8)).astype(np.float32)
  member = np.repeat(np.arange(4), 32)
  feats = centres[member] + rng.normal(size=(128, 8)).astype(np.float32) * 0.05
  values = rng.normal(size=(128, spec.value_dim)).astype(np.float32)
  db = database.fit(spec, feats, values, jax.random.key(0), kmeans_iters=10)
  assert db['values'].shape == (8, spec.value_dim)
  # Every non-empty entry's value is the mean of the values of the training patches whose
  # key is nearest to it, and its key is their mean key.
  keys_all = (feats - np.asarray(db['mean'])) @ np.asarray(db['proj'])
  d = ((keys_all[:, None] - np.asarray(db['keys'])[None]) ** 2).sum(-1)
  owner = d.argmin(1)
  for e in np.unique(owner):
    np.testing.assert_allclose(np.asarray(db['values'])[e], values[owner == e].mean(0),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(db['keys'])[e], keys_all[owner == e].mean(0),
                               atol=1e-3)
  # A cluster's value is what a lookup of any of its members returns (top-1).
  lookup = database.make_lookup(spec)
  feat = jnp.broadcast_to(jnp.asarray(feats[0]), (1, 8, 8, 8))
  guide = np.asarray(lookup(db, feat, (16, 16)))
  assert guide.shape == (1, 16, 16, 6)
  np.testing.assert_allclose(guide[0, :4, :4], np.asarray(db['values'])[owner[0]].reshape(
      4, 4, 6), atol=1e-5)


def test_mean_blend_averages_the_top_k_values_and_softmax_weights_them():
  spec_mean = _spec(metric='l2', top_k=3, blend='mean')
  spec_soft = _spec(metric='l2', top_k=3, blend='softmax', temperature=1e6)
  spec_sharp = _spec(metric='l2', top_k=3, blend='softmax', temperature=1e-6)
  top1 = _spec(metric='l2', top_k=1)
  db, _, _ = _fit(spec_mean)
  feats = jax.random.normal(jax.random.key(5), (2, 8, 8, 8))
  mean = np.asarray(database.make_lookup(spec_mean)(db, feats, (16, 16)))
  # The three nearest values, by hand.
  q = np.asarray(database.pool(feats, (4, 4))).reshape(-1, 8)
  q = (q - np.asarray(db['mean'])) @ np.asarray(db['proj'])
  d = ((q[:, None] - np.asarray(db['keys'])[None]) ** 2).sum(-1)
  nearest = np.argsort(d, axis=1)[:, :3]
  want = np.asarray(db['values'])[nearest].mean(1).reshape(2, 4, 4, 4, 4, 3)
  want = want.transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 3)
  np.testing.assert_allclose(mean, want, atol=1e-5)
  # A flat softmax is the mean; a sharp one is the nearest entry alone.
  np.testing.assert_allclose(database.make_lookup(spec_soft)(db, feats, (16, 16)), mean,
                             atol=1e-4)
  np.testing.assert_allclose(database.make_lookup(spec_sharp)(db, feats, (16, 16)),
                             database.make_lookup(top1)(db, feats, (16, 16)), atol=1e-4)


def test_values_of_another_width_are_refused():
  spec = _spec(channels=6)
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(64, 8)).astype(np.float32)
  with pytest.raises(ValueError, match='values have shape'):
    database.fit(spec, feats, np.zeros((64, 4 * 4 * 3), np.float32), jax.random.key(0))
  with pytest.raises(ValueError, match='blend'):
    _spec(blend='max')
