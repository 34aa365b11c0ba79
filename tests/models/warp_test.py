"""Tests of the volume warps: sampler, coordinates, rotations, warp generator, 3-D conv."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fiancee_jax.models import warp


@pytest.mark.parametrize('padding', warp.PADDINGS)
def test_trilinear_sample_matches_a_numpy_reference(padding):
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(2, 3, 4, 5, 2)).astype(np.float32)
  sample = jax.jit(functools.partial(warp.trilinear_sample, padding=padding))
  # On the voxel grid it is the identity (align_corners=True).
  grid = jnp.broadcast_to(warp.volume_grid(3, 4, 5), (2, 3, 4, 5, 3))
  np.testing.assert_allclose(sample(jnp.asarray(vol), grid), vol, atol=1e-5)
  pts = rng.uniform(-1.3, 1.3, size=(2, 7, 3)).astype(np.float32)
  got = np.asarray(sample(jnp.asarray(vol), jnp.asarray(pts)))
  for b in range(2):
    for n in range(7):
      pos = [(pts[b, n, k] + 1) / 2 * (s - 1) for k, s in enumerate((5, 4, 3))]
      if padding == 'border':
        pos = [min(max(p, 0), s - 1) for p, s in zip(pos, (5, 4, 3))]
      want = np.zeros(2)
      for corner in np.ndindex(2, 2, 2):
        idx = [int(np.floor(p)) + c for p, c in zip(pos, corner)]
        w = np.prod([1 - abs(p - i) for p, i in zip(pos, idx)])
        if 0 <= idx[0] < 5 and 0 <= idx[1] < 4 and 0 <= idx[2] < 3:  # zeros outside
          want += w * vol[b, idx[2], idx[1], idx[0]]
      np.testing.assert_allclose(got[b, n], want, atol=1e-5)
  grad = jax.jit(jax.grad(lambda c: sample(jnp.asarray(vol), c).sum()))(jnp.asarray(pts))
  assert np.isfinite(np.asarray(grad)).all() and np.abs(grad).sum() > 0


def test_border_padding_continues_the_edges():
  # A volume whose bottom row (y = +1) is 1 and everything else 0: a warp that moves the
  # content up reads below the volume. Border padding reads the edge (1, no dark stripe);
  # zeros fade to 0 one voxel past the edge centre.
  vol = jnp.zeros((1, 2, 4, 4, 1)).at[:, :, -1].set(1.0)
  below = jnp.array([[[0.0, 1.0 + 2 / 3 * t, 0.0] for t in (0.0, 0.5, 1.0, 3.0)]])
  border = warp.trilinear_sample(vol, below, 'border')[0, :, 0]
  zeros = warp.trilinear_sample(vol, below, 'zeros')[0, :, 0]
  np.testing.assert_allclose(border, [1, 1, 1, 1], atol=1e-6)
  np.testing.assert_allclose(zeros, [1, 0.5, 0, 0], atol=1e-6)
  # Corners and every side: outside points read the nearest voxel.
  rng = np.random.default_rng(1)
  vol = jnp.asarray(rng.normal(size=(1, 3, 4, 5, 2)).astype(np.float32))
  far = jnp.array([[[-3.0, -2.0, -5.0], [4.0, 1.5, 2.0], [0.0, -1.0, 9.0]]])
  got = warp.trilinear_sample(vol, far, 'border')[0]
  np.testing.assert_allclose(got, vol[0, [0, 2, 2], [0, 3, 0], [0, 4, 2]], atol=1e-6)
  # The coordinate gradient of a clamped axis is 0, of the others finite.
  grad = jax.grad(lambda c: warp.trilinear_sample(vol, c, 'border').sum())(
      jnp.array([[[0.1, 1.5, 0.2]]]))
  assert grad[0, 0, 1] == 0 and np.abs(grad[0, 0, [0, 2]]).sum() > 0
  with pytest.raises(ValueError, match='warp_padding'):
    warp.trilinear_sample(vol, far, 'reflect')


def test_conv3x3x3_is_nn_conv_3d():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4, 3))
  ref = nn.Conv(6, (3, 3, 3))
  variables = ref.init(jax.random.key(1), x)
  ours = warp.Conv3x3x3(6)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=1e-5)


def test_rotation_matrices_are_rotations():
  r = warp.rotation_matrix(jnp.array([[0.3, -0.2, 0.5], [0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(r @ jnp.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), (2, 3, 3)),
                             atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.det(r), 1.0, atol=1e-6)
  np.testing.assert_allclose(r[1], np.eye(3), atol=1e-7)


def test_warp_coordinates_compose_rotation_translation_and_flow():
  grid = warp.volume_grid(2, 3, 4)[None]
  r = warp.rotation_matrix(jnp.array([[0.4, -0.3, 0.2]]))
  t = jnp.array([[0.1, -0.2, 0.05]])
  flow = 0.01 * jax.random.normal(jax.random.key(0), (1, 2, 3, 4, 3))
  x = np.asarray(grid[0, 1, 2, 3])
  want = np.asarray(r[0]) @ (x + np.asarray(flow[0, 1, 2, 3])) + np.asarray(t[0])
  np.testing.assert_allclose(warp.canonical_coords(grid, r, t, flow)[0, 1, 2, 3], want,
                             atol=1e-6)
  want = np.asarray(r[0]).T @ (x - np.asarray(t[0])) + np.asarray(flow[0, 1, 2, 3])
  np.testing.assert_allclose(warp.driver_coords(grid, r, t, flow)[0, 1, 2, 3], want, atol=1e-6)
  # Without flow, the driver warp undoes the canonical one.
  zero = jnp.zeros_like(flow)
  there = warp.canonical_coords(grid, r, t, zero)
  np.testing.assert_allclose(warp.driver_coords(there, r, t, zero), jnp.broadcast_to(
      grid, there.shape), atol=1e-6)


def test_warp_generator_starts_at_zero_flow():
  g = warp.WarpGenerator(width=4, scale=0.25)
  ident, expr = jnp.ones((2, 5)), jnp.ones((2, 3))
  variables = g.init(jax.random.key(0), ident, expr, (4, 8, 8))
  flow = g.apply(variables, ident, expr, (4, 8, 8))
  assert flow.shape == (2, 4, 8, 8, 3)
  np.testing.assert_array_equal(flow, 0.0)
