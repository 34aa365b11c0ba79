"""Device mesh, shardings and multi-process start-up: data parallel over a `data` axis.

Trainers are written as global-batch programs and run with `jax.jit` over a `Mesh`:
the batch is sharded on `data`, parameters and optimizer state are replicated, and XLA
inserts the gradient all-reduce (and the global batch-norm reductions) itself. This is
the pmap-style data parallelism of the OASIS code without `jax.pmap`, which is in
maintenance mode since JAX 0.8. The stages that only apply models (database, predictor
targets, evaluate) run the same way through `map_rows`: each call's rows are split over
every device of every process and the results come back to every process.

Multi-process (multi-host) runs. Every process runs the same command; the mesh spans the
devices of all of them, each process loads its own rows of every training batch, every
process takes part in each checkpoint and artifact save, and process 0 alone writes logs,
samples and reports. `initialize` starts JAX's distributed runtime and must run before
anything touches a backend (`jax.devices()`, `jax.process_count()`, any computation):

  python -m fiancee_jax.main ... --coordinator_address=HOST:PORT --num_processes=N \
      --process_id=I              # I = 0 .. N-1; process 0 serves the coordinator at HOST:PORT

or, where JAX detects the cluster itself (Cloud TPU, SLURM, Open MPI, Kubernetes),
`--config.distributed=True` and no flags. A process that cannot join within
`--initialization_timeout` seconds (default 300) prints why, naming the flag to fix (no
coordinator at the address; not all `--num_processes` processes joined, e.g. a process id
given twice), and exits with status 1, instead of hanging or being aborted by the runtime
with a bare DEADLINE_EXCEEDED. Processes that join with different `--num_processes` are
refused at once. On CPU, cross-process collectives use gloo (JAX's default
`jax_cpu_collectives_implementation`).
"""
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed  # the runtime's client (see _client)
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
DEFAULT_INITIALIZATION_TIMEOUT = 300  # seconds, as jax.distributed.initialize
_FLAGS = '--coordinator_address, --num_processes and --process_id'


class LaunchError(ValueError):
  """Launch flags that cannot start a multi-process run (raised before anything starts)."""


class Launch(NamedTuple):
  """How this process joins a run (`launch` builds and checks it)."""
  coordinator_address: str | None  # HOST:PORT of process 0; None: auto-detected or 1 process
  num_processes: int | None
  process_id: int | None
  auto: bool  # jax.distributed.initialize() detects the cluster (config.distributed)
  timeout: int  # seconds to join before failing with the reason

  @property
  def explicit(self) -> bool:
    return self.num_processes is not None


def launch(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, *, auto: bool = False,
           timeout: int = DEFAULT_INITIALIZATION_TIMEOUT) -> Launch:
  """Checks the launch flags (touches no device); `initialize(launch(...))` starts the run.

  Args:
    coordinator_address: HOST:PORT where process 0 serves the coordinator (--coordinator_address).
    num_processes: processes in the run (--num_processes).
    process_id: this process, in [0, num_processes) (--process_id).
    auto: no flags: let JAX detect the cluster (config.distributed).
    timeout: seconds a process waits for the others to join (--initialization_timeout).

  Raises:
    LaunchError: flags given in part, a process id out of range, a malformed address, a
      non-positive count or timeout.
  """
  given = {'--coordinator_address': coordinator_address or None,
           '--num_processes': num_processes, '--process_id': process_id}
  missing = [k for k, v in given.items() if v is None]
  if len(missing) not in (0, 3):
    raise LaunchError(f'{", ".join(missing)} missing: give {_FLAGS} together (every process '
                      'the same address and count, each its own id), or none of them')
  if not isinstance(timeout, int) or timeout < 1:
    raise LaunchError(f'--initialization_timeout={timeout!r} must be a positive number of '
                      'seconds')
  if missing:
    return Launch(None, None, None, bool(auto), timeout)
  if num_processes < 1:
    raise LaunchError(f'--num_processes={num_processes} must be >= 1')
  if not 0 <= process_id < num_processes:
    raise LaunchError(f'--process_id={process_id} must be in [0, {num_processes}) '
                      f'(--num_processes={num_processes}): processes are numbered 0 .. '
                      f'{num_processes - 1}, process 0 serving the coordinator')
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise LaunchError(f'--coordinator_address={coordinator_address!r} must be HOST:PORT '
                      '(e.g. 10.0.0.1:1234), the address of process 0 and a free port there')
  return Launch(coordinator_address, num_processes, process_id, bool(auto), timeout)


def initialize(spec: Launch) -> None:
  """Joins the multi-process run `spec` describes; nothing for a single process.

  Call before anything touches a backend. A second call (e.g. `pipeline.run` after the
  command line started the run) does nothing. A process that has not joined after
  `spec.timeout` seconds prints the reason and exits with status 1 (module docstring).

  Raises:
    LaunchError: the backend is already running; config.distributed without a cluster JAX
      detects; processes that disagree on --num_processes.
  """
  if jax.distributed.is_initialized() or (not spec.explicit and not spec.auto):
    return
  if spec.explicit and spec.num_processes == 1:
    return  # nothing to coordinate
  where = (f'process {spec.process_id} of {spec.num_processes}, coordinator '
           f'{spec.coordinator_address}' if spec.explicit else 'cluster auto-detection')
  watchdog = threading.Timer(spec.timeout, _give_up, (spec,))
  watchdog.daemon = True
  watchdog.start()
  try:
    # The runtime's own deadline comes after ours, so that the reason above is what the
    # user reads, not the runtime's abort.
    kwargs = dict(initialization_timeout=2 * spec.timeout + 30)
    if spec.explicit:
      kwargs.update(coordinator_address=spec.coordinator_address,
                    num_processes=spec.num_processes, process_id=spec.process_id)
    try:
      jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
      if 'before any JAX calls' in str(e):
        raise LaunchError('the JAX backend started before the multi-process run was joined: '
                          'call parallel.initialize (or pipeline.run) before any JAX '
                          'computation or jax.devices()') from None
      raise
    except ValueError as e:
      if spec.explicit:
        raise
      raise LaunchError(f'config.distributed=True but JAX detected no cluster ({e}): launch '
                        f'every process with {_FLAGS}') from None
    if spec.explicit:
      _check_same_count(spec)
  finally:
    watchdog.cancel()
  logging.info('jax.distributed: joined as %s', where)


def _client():
  """The distributed runtime's client: JAX has no public key-value store or timed barrier."""
  return jax_distributed.global_state.client


def _check_same_count(spec: Launch) -> None:
  """Raises LaunchError unless every process was given process 0's --num_processes."""
  client = _client()
  client.key_value_set(f'fiancee_jax/num_processes/{spec.process_id}',
                       str(spec.num_processes))
  others = range(1, spec.num_processes) if spec.process_id == 0 else [0]
  for other in others:
    got = int(client.blocking_key_value_get(f'fiancee_jax/num_processes/{other}',
                                            spec.timeout * 1000))
    if got != spec.num_processes:
      raise LaunchError(f'process {other} was started with --num_processes={got}, this '
                        f'process ({spec.process_id}) with --num_processes={spec.num_processes}:'
                        ' give every process the same --num_processes')


def join_failure(spec: Launch, coordinator_reachable: bool) -> str:
  """Why a process of `spec` has not joined after spec.timeout seconds, naming the flags."""
  if not spec.explicit:
    return (f'jax.distributed.initialize() with cluster auto-detection did not finish within '
            f'{spec.timeout} s (--initialization_timeout): check the cluster environment, or '
            f'launch every process with {_FLAGS}')
  if spec.process_id != 0 and not coordinator_reachable:
    return (f'process {spec.process_id}: no coordinator answers at {spec.coordinator_address} '
            f'(--coordinator_address) after {spec.timeout} s (--initialization_timeout): start '
            'process 0 (--process_id=0) with this address, or correct the address')
  return (f'process {spec.process_id}: not all {spec.num_processes} processes '
          f'(--num_processes) joined the coordinator at {spec.coordinator_address} within '
          f'{spec.timeout} s (--initialization_timeout): start {spec.num_processes} processes '
          'with the same --coordinator_address and --num_processes, each with its own '
          f'--process_id in [0, {spec.num_processes})')


def _give_up(spec: Launch) -> None:
  """The watchdog: says why this process could not join, and ends it (status 1)."""
  reachable = spec.explicit and _reachable(spec.coordinator_address)
  sys.stderr.write(f'FATAL: {join_failure(spec, reachable)}\n')
  sys.stderr.flush()
  # The main thread is blocked inside the runtime's connect call: no exception reaches it.
  os._exit(1)  # pylint: disable=protected-access


def _reachable(address: str) -> bool:
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
      return True
  except OSError:
    return False


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


def barrier(name: str, timeout: int | None = None) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process).

  After process 0 writes a file that every process reads next (t*, a cache), so that all of
  them decide alike whether it exists: a process that decided otherwise would skip or add a
  collective step (a save, a sharded computation) and the run would stop on it.

  Args:
    name: the same on every process.
    timeout: None: a collective over every device, for processes that arrive together (a
      process that reached a barrier of another name raises there); else seconds to wait
      in the coordinator, for processes waiting while one works alone (process 0's
      benchmark). Either fails rather than hangs if a process died.
  """
  if jax.process_count() == 1:
    return
  if timeout is None:
    multihost_utils.sync_global_devices(name)
  else:
    _client().wait_at_barrier(name, int(timeout) * 1000)


def map_rows(fn: Callable[..., Any], rows: tuple[np.ndarray, ...], batch: int, *,
             consts: Any = None, mesh: Mesh | None = None) -> Any:
  """`fn` over the rows of `rows`, chunk by chunk, each chunk split over every device.

  The multi-process form of a jitted loop over batches: every process calls it with the same
  arguments, computes the rows of its own devices, and gets every row back. Call on every
  process (the computation is collective).

  Args:
    fn: fn(*chunk), or fn(consts, *chunk) when `consts` is given -> pytree of arrays
      [B, ...] whose row i depends on row i of the chunk only (arrays [B, ...]). Compiled
      once per function, for B = `batch` rounded up to a multiple of the device count (the
      last chunk is padded with copies of its last row).
    rows: NumPy arrays [N, ...] with the same N, the same on every process.
    batch: rows per call (rounded up to a multiple of the device count).
    consts: pytree of arrays every row uses (e.g. parameters), copied to every device once;
      an argument rather than a closure, so that XLA does not fold them into the program.
    mesh: the devices; default `make_mesh()`, all devices of all processes.

  Returns:
    fn's pytree with NumPy leaves [N, ...] (every row), on every process.
  """
  mesh = make_mesh() if mesh is None else mesh
  n = len(rows[0])
  if any(len(x) != n for x in rows):
    raise ValueError(f'map_rows needs arrays with the same number of rows, got '
                     f'{[len(x) for x in rows]}')
  size = -(-max(batch, 1) // mesh.devices.size) * mesh.devices.size
  repl, split = replicated(mesh), batch_sharding(mesh)
  head = () if consts is None else (jax.device_put(jax.device_get(consts), repl),)
  f = jax.jit(fn, in_shardings=(repl,) * len(head) + (split,) * len(rows), out_shardings=repl)
  outs = []
  for start in range(0, n, size):
    chunk = [np.asarray(x[start:start + size]) for x in rows]
    pad = size - len(chunk[0])
    if pad:  # one compiled shape
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
    # Every process holds the whole chunk; each device takes its rows from it.
    args = [jax.make_array_from_callback(c.shape, split, lambda i, c=c: c[i]) for c in chunk]
    outs.append(jax.tree.map(lambda o: np.asarray(o)[:size - pad], f(*head, *args)))
  if not outs:
    shapes = jax.eval_shape(fn, *head, *(jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
                                         for x in rows))
    return jax.tree.map(lambda s: np.zeros((0,) + s.shape[1:], s.dtype), shapes)
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
