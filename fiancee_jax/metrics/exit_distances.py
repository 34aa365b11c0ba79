"""Every exit's distance to the backbone on a split, measured once and cached per artifact.

Inputs are a split's first n examples with a fixed z per dataset index (so the numbers are
reproducible); the distances of all exits are measured in one jitted batched pass. The cache,
WORKDIR/cache/distances_{split}_{variant}.npz, is keyed by what the distances were measured
with: the fingerprint of the exits artifact (which names its backbone and database), the
variant, the distance and the inputs' bytes. A stale key or a damaged file is rebuilt (a
damaged one with a warning naming it).
"""
import hashlib
import os
import warnings
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax import parallel
from fiancee_jax import tasks
from fiancee_jax.data import sources
from fiancee_jax.metrics import distances
from fiancee_jax.models import exits as exits_lib
from fiancee_jax.models import factory

_SPLIT_STREAM = {'train': 10, 'validation': 11, 'test': 12}


def fixed_z(config: ml_collections.ConfigDict, split: str,
            indices: np.ndarray) -> np.ndarray | None:
  """One z per dataset index of `split`: float32 [len(indices), z_dim], reproducible; None
  for a noise-free backbone.

  The validation and test z come from config.data.seed, so every seed of a job
  (replicates.py) calibrates and is evaluated on the same inputs; the training z (predictor
  targets) from config.seed.
  """
  z_dim = factory.get_task(config).noise_dim
  if not z_dim:
    return None
  seed = config.seed if split == 'train' else config.data.seed
  key = jax.random.fold_in(jax.random.key(seed), _SPLIT_STREAM[split])
  return np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(
      jnp.asarray(indices)))


def load_inputs(config: ml_collections.ConfigDict, split: str, n: int,
                draws: int = 1) -> tuple[np.ndarray, ...]:
  """Exit-path inputs of the first n examples of `split`: the data plus a fixed z per index.

  With `draws` > 1 (and a generator with noise) the n examples are repeated `draws` times,
  each repetition with its own z: [draws * n, ...], example i of draw d at d * n + i.
  """
  data = sources.load_data(config, split, n)
  task = factory.get_task(config)
  if draws > 1 and task.noise_dim:
    data = tuple(np.concatenate([x] * draws) for x in data)
  z = fixed_z(config, split, np.arange(len(data[0])))
  return tasks.with_noise(task, data, z)


def measure_distances(config: ml_collections.ConfigDict, model: exits_lib.ExitModel,
                      params: dict, inputs: tuple[np.ndarray, ...], batch: int,
                      reference: np.ndarray | None = None) -> np.ndarray:
  """Distance of every exit's output to the backbone's: float32 [N, E - 1].

  With `reference` (float32 [N, H, W, 3], e.g. the ground truth), the distance of every exit
  and of the backbone to it instead: float32 [N, E]. The rows are split over every device of
  every process (parallel.map_rows): call on every process.
  """
  dist = distances.from_config(config)
  num = len(inputs)

  def f(params, *rows):  # the exit paths' inputs, then the reference if any
    images, teacher = model.all_exits(params, *rows[:num])
    if reference is None:
      return jnp.stack([dist.fn(img, teacher) for img in images], axis=-1)
    return jnp.stack([dist.fn(img, rows[num]) for img in images + [teacher]], axis=-1)

  rows = tuple(inputs) + (() if reference is None else (reference,))
  return parallel.map_rows(f, rows, batch, consts=params).astype(np.float32)


def cache_path(workdir: str, split: str, variant: str) -> str:
  """WORKDIR/cache/distances_{split}_{variant}.npz."""
  return os.path.join(workdir, 'cache', f'distances_{split}_{variant}.npz')


def with_database(exits_fingerprint: str, database_fingerprint: str) -> str:
  """The source fingerprint of exits whose images also depend on a database (residual
  guidance): distances cached under the exits alone are not reused for them."""
  return f'{exits_fingerprint}+{database_fingerprint}'


def cache_key(exits_fingerprint: str, variant: str, distance: str,
              inputs: tuple[np.ndarray, ...]) -> str:
  """sha256 hex of what distances are measured with: the exits artifact, the variant, the
  distance and the inputs (dtype, shape and bytes of each array)."""
  h = hashlib.sha256(f'{exits_fingerprint}/{variant}/{distance}'.encode())
  for x in inputs:
    x = np.ascontiguousarray(x)
    h.update(f'{x.dtype}{x.shape}'.encode())
    h.update(memoryview(x).cast('B'))
  return h.hexdigest()


def _read_cache(path: str, key: str) -> np.ndarray | None:
  """The cached distances if `path` holds them for `key`; None if absent, stale or damaged
  (damage is reported with a warning naming the file)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      if str(f['key']) != key:
        return None
      return np.asarray(f['distances'], np.float32)
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    warnings.warn(f'distance cache {path} is damaged ({type(e).__name__}: {e}); measuring '
                  'the distances again and rewriting it', RuntimeWarning, stacklevel=3)
    return None


def split_distances(config: ml_collections.ConfigDict, workdir: str, split: str, n: int, *,
                    exit_model: exits_lib.ExitModel, params: dict, exits_fingerprint: str,
                    draws: int = 1) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
  """(inputs, distances float32 [N, E - 1]) of a split's first n examples, cached on disk.

  Args:
    config: the run's config (data, seed, distance, predictor.measure_batch).
    workdir: the run directory; the cache lives under WORKDIR/cache.
    split: 'train', 'validation' or 'test'.
    n: number of examples.
    exit_model: the exits measured; its `guided` flag names the variant.
    params: {'backbone', 'exits', 'database'} of that variant.
    exits_fingerprint: fingerprint of the exits artifact `params` come from (artifacts.py).
    draws: z draws per example (generators with noise).

  Returns:
    inputs: the exit paths' inputs (load_inputs), e.g. (labels [N, H, W], z [N, z_dim]);
      N = draws * n with a z per draw for generators with noise, else n.
    distances: float32 [N, E - 1], exit k's distance to the backbone in column k.
  """
  variant = 'guided' if exit_model.guided else 'unguided'
  inputs = load_inputs(config, split, n, draws)
  key = cache_key(exits_fingerprint, variant, distances.from_config(config).name, inputs)
  path = cache_path(workdir, split, variant)
  cached = _read_cache(path, key)
  want = (len(inputs[0]), exit_model.num_exits - 1)
  if cached is not None and cached.shape == want:
    return inputs, cached
  if cached is not None:
    warnings.warn(f'distance cache {path} holds distances of shape {cached.shape}, expected '
                  f'{want}; measuring them again and rewriting it', RuntimeWarning,
                  stacklevel=2)
  d = measure_distances(config, exit_model, params, inputs, config.predictor.measure_batch)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, distances=d, key=np.array(key))
    os.replace(tmp, path)
  # Every process decides from this file next time whether to measure (a collective step).
  parallel.barrier('fiancee_distance_cache')
  return inputs, d


def of_model(config: ml_collections.ConfigDict, workdir: str, model: Any, split: str, n: int,
             draws: int = 1) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
  """split_distances of a loaded FianceeModel's exits (its exit_model, params and the
  fingerprint of the exits artifact it was loaded from)."""
  if 'exits' not in model.fingerprints:
    raise ValueError('the model was not loaded from a workdir (no exits fingerprint); use '
                     'inference.loading.load_model, or call split_distances with the '
                     'fingerprint of the exits artifact')
  fp = model.fingerprints['exits']
  em = model.exit_model
  if em.guided and em.guidance == 'residual':
    fp = with_database(fp, model.fingerprints['database'])
  return split_distances(config, workdir, split, n, exit_model=em, params=model.params,
                         exits_fingerprint=fp, draws=draws)
