"""Losses that distil exit branches from the frozen backbone (pure functions).

An exit is trained to reproduce the backbone's image for the same inputs (and z):

  loss = l1_weight * L1(image, teacher)
       + perceptual_weight * mean distance(image, teacher)       (config.distance, e.g. LPIPS)
       + feature_weight * feature distillation                   (optional)

Feature distillation follows GAN Compression (Li et al., CVPR 2020) for SPADE generators: the
output of every light block j of a branch goes through a learned 1x1 projection to the width
of the backbone's block j and is compared with that block's output, at the same resolution.
The projections exist only for training (`FeatureProjections`; exported exits never run them).
Each tap's error is divided by the teacher's mean square ('l2') or mean absolute value ('l1'),
so that `feature_weight` does not depend on the scale of the backbone's activations; the taps
are averaged.

Images are float32 [B, H, W, 3] in [-1, 1]; every loss returns float32 [].
"""
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

FEATURE_NORMS = ('l2', 'l1')
# Floor of the teacher's scale in the relative feature error (a tap whose features are all 0).
_EPS = 1e-6


def l1(image: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean |image - teacher| over batch, pixels and channels; image, teacher [B, H, W, C]."""
  _check_pair(image, teacher, 'l1')
  return jnp.mean(jnp.abs(image - teacher))


def perceptual(distance_fn: Callable[[jax.Array, jax.Array], jax.Array], image: jax.Array,
               teacher: jax.Array) -> jax.Array:
  """Batch mean of a differentiable image distance (`metrics.distances.Distance.fn`, which
  maps two [B, H, W, 3] batches to float32 [B])."""
  _check_pair(image, teacher, 'perceptual')
  return jnp.mean(distance_fn(image, teacher))


class FeatureProjections(nn.Module):
  """1x1 convs from a branch's light-block outputs to the backbone's widths (training only).

  Call with {j: student features [B, h_j, w_j, c_j]}; returns {j: [B, h_j, w_j, widths[j]]}.
  Parameters are named `proj_{j}`.
  """
  widths: Mapping[int, int]  # block j -> channels of the backbone's block-j output

  @nn.compact
  def __call__(self, student: Mapping[int, jax.Array]) -> dict[int, jax.Array]:
    missing = sorted(set(student) - set(self.widths))
    if missing:
      raise ValueError(f'FeatureProjections has no backbone width for blocks {missing}; '
                       f'widths are given for {sorted(self.widths)}')
    return {j: nn.Conv(self.widths[j], (1, 1), name=f'proj_{j}')(x)
            for j, x in sorted(student.items())}


def projection_widths(teacher: Mapping[int, jax.Array],
                      student: Mapping[int, jax.Array]) -> dict[int, int]:
  """{j: channels of teacher[j]} for every tapped block j of `student`."""
  return {j: int(teacher[j].shape[-1]) for j in sorted(student)}


def init_projections(key: jax.Array, teacher: Mapping[int, jax.Array],
                     student: Mapping[int, jax.Array]) -> dict:
  """Params of the `FeatureProjections` that map `student` ({j: [B, h, w, c_j]}) onto
  `teacher` ({j: backbone block-j output [B, h, w, C_j]}, a superset of the taps)."""
  return FeatureProjections(projection_widths(teacher, student)).init(key, student)['params']


def feature_distillation(projected: Mapping[int, jax.Array], teacher: Mapping[int, jax.Array],
                         norm: str = 'l2') -> jax.Array:
  """Mean over taps j of the relative error between projected student and teacher features.

  Args:
    projected: {j: [B, h_j, w_j, C_j]}, the student's features after `FeatureProjections`.
    teacher: {j: [B, h_j, w_j, C_j]} (more blocks allowed): the backbone's block outputs;
      no gradient flows into them.
    norm: 'l2': mean squared error / mean square of the teacher; 'l1': mean absolute error /
      mean absolute value of the teacher.

  Returns:
    float32 []; 0 when the projections reproduce the teacher.
  """
  if norm not in FEATURE_NORMS:
    raise ValueError(f'unknown feature distillation norm {norm!r}; known: {FEATURE_NORMS} '
                     '(config.exits.feature_loss)')
  if not projected:
    raise ValueError('feature_distillation needs at least one tapped block')
  terms = []
  for j, p in sorted(projected.items()):
    if j not in teacher:
      raise ValueError(f'no teacher features for block {j} (have {sorted(teacher)})')
    t = jax.lax.stop_gradient(teacher[j])
    if p.shape != t.shape:
      raise ValueError(f'block {j}: projected student features {tuple(p.shape)} and teacher '
                       f'features {tuple(t.shape)} differ; project to the teacher width at '
                       'the teacher resolution')
    if norm == 'l2':
      terms.append(jnp.mean(jnp.square(p - t)) / (jnp.mean(jnp.square(t)) + _EPS))
    else:
      terms.append(jnp.mean(jnp.abs(p - t)) / (jnp.mean(jnp.abs(t)) + _EPS))
  return sum(terms) / len(terms)


def exit_loss(image: jax.Array, teacher: jax.Array, *,
              distance_fn: Callable[[jax.Array, jax.Array], jax.Array] | None,
              l1_weight: float, perceptual_weight: float, feature_weight: float = 0.0,
              projected: Mapping[int, jax.Array] | None = None,
              teacher_features: Mapping[int, jax.Array] | None = None,
              feature_norm: str = 'l2') -> tuple[jax.Array, dict[str, jax.Array]]:
  """One branch's distillation loss and its terms.

  Args:
    image, teacher: [B, H, W, 3], the branch's and the backbone's images.
    distance_fn: the perceptual distance ((x, y) -> [B]); may be None if perceptual_weight
      is 0.
    l1_weight, perceptual_weight, feature_weight: weights of the terms (>= 0).
    projected, teacher_features: for feature_weight > 0, the projected student features
      and the backbone's block outputs (see `feature_distillation`).
    feature_norm: 'l2' | 'l1'.

  Returns:
    (loss float32 [], terms {'l1', 'perceptual'[, 'features']}: float32 [] each, unweighted).
  """
  terms = {'l1': l1(image, teacher)}
  loss = l1_weight * terms['l1']
  if perceptual_weight:
    if distance_fn is None:
      raise ValueError('perceptual_weight > 0 needs a distance_fn')
    terms['perceptual'] = perceptual(distance_fn, image, teacher)
    loss = loss + perceptual_weight * terms['perceptual']
  if feature_weight:
    if projected is None or teacher_features is None:
      raise ValueError('feature_weight > 0 needs the projected student features and the '
                       "backbone's block outputs")
    terms['features'] = feature_distillation(projected, teacher_features, feature_norm)
    loss = loss + feature_weight * terms['features']
  return loss, terms


def _check_pair(x: jax.Array, y: jax.Array, what: str) -> None:
  if x.shape != y.shape:
    raise ValueError(f'{what} loss needs image and teacher of one shape; got '
                     f'{tuple(x.shape)} and {tuple(y.shape)}')


def check_weights(l1_weight: float, perceptual_weight: float, feature_weight: float,
                  feature_norm: str) -> None:
  """ValueError naming the config field if a weight is negative or the norm unknown."""
  for name, w in (('l1_weight', l1_weight), ('perceptual_weight', perceptual_weight),
                  ('feature_weight', feature_weight)):
    if not w >= 0:
      raise ValueError(f'config.exits.{name}={w} must be >= 0')
  if feature_norm not in FEATURE_NORMS:
    raise ValueError(f'config.exits.feature_loss={feature_norm!r} is not one of '
                     f'{FEATURE_NORMS}')

