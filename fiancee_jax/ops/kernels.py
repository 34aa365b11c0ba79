"""Which implementation of each backend kernel a model runs: `config.kernels`.

`config.kernels` names one implementation per op ('conv': ops/conv.py, 'top_k':
ops/top_k.py), or 'auto'. 'auto' means the fastest measured for the backend: on the CPU the
block-Toeplitz / even-width convs ('toeplitz_even') and the two-stage top-k ('two_stage'),
elsewhere plain XLA ('xla'). `resolve` is the only place that turns 'auto' into a name;
models/factory.py calls it when it builds models, and the models receive concrete names as
module fields. The benchmark records the resolved names and times them against 'xla'.
"""
import types
from collections.abc import Mapping

from fiancee_jax.ops import top_k

# What a config may name per op ('auto' aside). 'toeplitz' alone is a per-call form that only
# fits small maps, so a whole model cannot run on it.
CHOICES = types.MappingProxyType({
    'conv': ('xla', 'even', 'toeplitz_even'),
    'top_k': top_k.TOP_K_IMPLS,
})
# The plain XLA form of every op: what FLOPs are counted on, and the benchmark's reference.
XLA = types.MappingProxyType({'conv': 'xla', 'top_k': 'xla'})
# 'auto' per platform (jax.default_backend() names); platforms not listed get XLA.
_FASTEST = types.MappingProxyType({
    'cpu': types.MappingProxyType({'conv': 'toeplitz_even', 'top_k': 'two_stage'}),
})


def fastest(op: str, platform: str) -> str:
  """The implementation of `op` that 'auto' stands for on `platform` ('cpu', 'gpu', 'tpu')."""
  if op not in CHOICES:
    raise ValueError(f'unknown kernel {op!r}; known: {tuple(CHOICES)}')
  return _FASTEST.get(platform, XLA).get(op, XLA[op])


def check_concrete(kernels: Mapping[str, str]) -> dict[str, str]:
  """`kernels` as a dict if it names a known implementation (not 'auto') for every op.

  Raises:
    ValueError: a missing or unknown op, 'auto', or an unknown implementation.
  """
  kernels = dict(kernels)
  if set(kernels) != set(CHOICES):
    raise ValueError(f'kernels={kernels} must name an implementation for exactly the ops '
                     f'{tuple(CHOICES)}')
  for op, impl in kernels.items():
    if impl not in CHOICES[op]:
      raise ValueError(f'kernels[{op!r}]={impl!r} is not one of {CHOICES[op]} (resolve '
                       "'auto' with ops.kernels.resolve)")
  return kernels


def resolve(kernels: Mapping[str, str] | None, platform: str) -> dict[str, str]:
  """Concrete implementations {'conv': ..., 'top_k': ...} of a `config.kernels` section.

  Args:
    kernels: op -> implementation or 'auto'; ops left out (or None: a config written before
      the section existed) are 'auto'.
    platform: the backend the models will run on (e.g. jax.default_backend()).

  Raises:
    ValueError: an unknown op or implementation, naming the known ones.
  """
  kernels = dict(kernels or {})
  unknown = sorted(set(kernels) - set(CHOICES))
  if unknown:
    raise ValueError(f'config.kernels has unknown ops {unknown}; known: {tuple(CHOICES)}')
  out = {}
  for op, choices in CHOICES.items():
    impl = kernels.get(op, 'auto')
    if impl == 'auto':
      impl = fastest(op, platform)
    elif impl not in choices:
      raise ValueError(f"config.kernels.{op}={impl!r} is not one of {('auto', *choices)}")
    out[op] = impl
  return out
