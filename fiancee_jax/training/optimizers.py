"""Optimizers of the trainers (optax)."""
import optax


def adam(lr: float | optax.Schedule, b1: float, b2: float) -> optax.GradientTransformation:
  """Adam as in OASIS (betas (0, 0.999) by default in the configs)."""
  return optax.adam(lr, b1=b1, b2=b2)


def gan_optimizers(train) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, discriminator) optimizers from a `config.train`-like mapping."""
  return (adam(train['lr_g'], train['b1'], train['b2']),
          adam(train['lr_d'], train['b1'], train['b2']))
