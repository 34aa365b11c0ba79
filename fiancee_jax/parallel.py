"""Device mesh and shardings: data parallel over a `data` axis, state replicated.

Trainers are written as global-batch programs and run with `jax.jit` over a `Mesh`:
the batch is sharded on `data`, parameters and optimizer state are replicated, and XLA
inserts the gradient all-reduce (and the global batch-norm reductions) itself. This is
the pmap-style data parallelism of the OASIS code without `jax.pmap`, which is in
maintenance mode since JAX 0.8.
"""
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls `jax.distributed.initialize()` (coordinator etc. from the environment) once."""
  if enabled and jax.process_count() == 1:
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d', jax.process_index(),
                 jax.process_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
  """1-D mesh over all (or the first `num_devices`) devices, axis `data`, Auto sharding."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices but only {len(devices)} exist')
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f'{key}={batch_size} is not divisible by the {n} devices of the '
                     'mesh; choose a multiple')


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch (this process's rows) -> global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf on all devices of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def data_mesh(batch_size: int, key: str) -> Mesh:
  """The device mesh, after checking that the global batch `key` = batch_size divides over it."""
  mesh = make_mesh()
  check_batch_divisible(batch_size, mesh, key)
  return mesh
