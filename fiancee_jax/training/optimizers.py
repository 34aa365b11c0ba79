"""Optimizers and learning-rate schedules of the trainers (optax)."""
import optax

SCHEDULES = ('constant', 'cosine')


def adam(lr: float | optax.Schedule, b1: float, b2: float) -> optax.GradientTransformation:
  """Adam as in OASIS (betas (0, 0.999) by default in the configs)."""
  return optax.adam(lr, b1=b1, b2=b2)


def schedule(lr: float, num_steps: int, kind: str = 'constant',
             warmup_steps: int = 0) -> optax.Schedule:
  """Learning rate per step: linear from 0 to `lr` over `warmup_steps`, then `lr` ('constant')
  or a cosine decay to 0 at `num_steps` ('cosine').

  Raises:
    ValueError: unknown `kind`, or warmup_steps outside [0, num_steps).
  """
  if kind not in SCHEDULES:
    raise ValueError(f'unknown learning-rate schedule {kind!r}; known: {SCHEDULES}')
  if not 0 <= warmup_steps < max(num_steps, 1):
    raise ValueError(f'warmup_steps={warmup_steps} must be in [0, num_steps={num_steps})')
  if kind == 'cosine':
    if warmup_steps:
      return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, num_steps, 0.0)
    return optax.cosine_decay_schedule(lr, num_steps)
  if warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
        [warmup_steps])
  return optax.constant_schedule(lr)


def gan_optimizers(train) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, discriminator) optimizers from a `config.train`-like mapping."""
  return (adam(train['lr_g'], train['b1'], train['b2']),
          adam(train['lr_d'], train['b1'], train['b2']))
