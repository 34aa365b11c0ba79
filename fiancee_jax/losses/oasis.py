"""OASIS losses: class-balanced (C+1)-way cross-entropy and LabelMix (Schonfeld et al. 2021)."""
import jax
import jax.numpy as jnp


def class_balance_weights(labels: jax.Array, num_classes: int) -> jax.Array:
  """Per-pixel weights [B, H, W]: inverse class frequency in the batch, mean 1 over the
  classes present."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  counts = onehot.sum(axis=(0, 1, 2))
  present = (counts > 0).sum()
  coeff = jnp.where(counts > 0, labels.size / (jnp.maximum(counts, 1.0) * present), 0.0)
  return coeff[labels]


def n1_cross_entropy(logits: jax.Array, labels: jax.Array, *, for_real: bool,
                     num_classes: int) -> jax.Array:
  """(C+1)-way per-pixel CE: real pixels -> class 1 + label (class-balanced), fake -> 0.

  Args:
    logits: [B, H, W, C + 1] discriminator outputs.
    labels: int32 [B, H, W].
    for_real: whether the target is the label map (True) or 'fake' (False).
    num_classes: C.
  Returns:
    scalar mean loss.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  if for_real:
    nll = -jnp.take_along_axis(logp, (labels + 1)[..., None], axis=-1)[..., 0]
    return jnp.mean(nll * class_balance_weights(labels, num_classes))
  return -jnp.mean(logp[..., 0])


def labelmix(key: jax.Array, labels: jax.Array, fake: jax.Array, real: jax.Array,
             num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Mixes real and fake images by a random binary choice per (image, class).

  Returns:
    mixed [B, H, W, 3] and mask [B, H, W, 1] (1 where the real image is used).
  """
  bits = jax.random.bernoulli(key, 0.5, (labels.shape[0], num_classes))
  mask = jnp.take_along_axis(bits, labels.reshape(labels.shape[0], -1), axis=1)
  mask = mask.reshape(labels.shape)[..., None].astype(real.dtype)
  return mask * real + (1 - mask) * fake, mask


def labelmix_consistency(d_mixed: jax.Array, d_fake: jax.Array, d_real: jax.Array,
                         mask: jax.Array) -> jax.Array:
  """MSE between D(mix) and the same mix of D(fake), D(real) logits; scalar."""
  target = mask * d_real + (1 - mask) * d_fake
  return jnp.mean((d_mixed - target) ** 2)
