"""Devices, processes and shardings: how one train step spans every accelerator.

The training step is one `jax.jit` program over a 1-D mesh whose single axis,
'data', covers every device of every process. Batches are split over 'data';
parameters, BN statistics and optimizer state are replicated. BatchNorm then
reduces over the global batch, which is what the PyTorch reference gets from
SyncBatchNorm, with no extra code; gradients are exact global-batch gradients,
so results do not depend on how many devices share the work (up to float
summation order).

Multi-host: every process calls `initialize_distributed` before touching any
device, reads its own shard of the data (B = train.batch_size // process_count
per process) and turns its NumPy batch into slices of global arrays with
`global_batch`.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'

_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')


class BatchSizeError(ValueError):
  """A batch size that cannot be split evenly over the processes or devices."""


class MeshShapeError(ValueError):
  """parallel.mesh_shape / mesh_axes that do not describe the run's devices."""


class DistributedSetupError(ValueError):
  """Incomplete or contradictory multi-process settings."""


def _under_multi_task_slurm() -> bool:
  """True inside `srun` with more than one task (JAX's own SLURM detection applies)."""
  if not all(name in os.environ for name in _SLURM_VARS):
    return False
  try:
    return int(os.environ['SLURM_NTASKS']) > 1
  except ValueError:
    return False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           *,
                           local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str = 'gloo') -> bool:
  """Starts `jax.distributed` when the run spans several processes.

  Must be called before anything touches a device (jax.devices(), an array
  computation), because JAX fixes its device list on first use.

  Which set-up is used:
  - `coordinator_address` given: explicit, `num_processes` and `process_id`
    must be given too (e.g. launch/local.sh, or a cluster without SLURM).
  - otherwise inside a SLURM step with more than one task: JAX reads the
    coordinator, process count and rank from SLURM's variables.
  - otherwise the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    environment variables when all three are set.
  - otherwise: a single process; nothing is started.

  Cross-process collectives on CPU (the tests, the local launcher) go through
  gloo; the setting has no effect on GPU runs.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's rank in [0, num_processes).
    local_device_ids: restricts this process to these local devices.
    cpu_collectives: 'gloo' or 'mpi' (JAX's jax_cpu_collectives_implementation).

  Returns:
    True if jax.distributed was initialized, False for a single process.

  Raises:
    DistributedSetupError: explicit settings that are incomplete or invalid.
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    env = os.environ
    if _under_multi_task_slurm():
      kwargs: dict[str, Any] = {}
    elif all(k in env for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                                'JAX_PROCESS_ID')):
      coordinator_address = env['JAX_COORDINATOR_ADDRESS']
      try:
        num_processes = int(env['JAX_NUM_PROCESSES'])
        process_id = int(env['JAX_PROCESS_ID'])
      except ValueError as e:
        raise DistributedSetupError(
            f'JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {e}') from None
      kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
    else:
      return False
  else:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise DistributedSetupError(
          'multi-process start needs all of coordinator_address, num_processes and '
          f'process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})')
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if 'num_processes' in kwargs:
    n, r = kwargs['num_processes'], kwargs['process_id']
    if n < 1 or not 0 <= r < n:
      raise DistributedSetupError(
          f'process_id must lie in [0, num_processes): got process_id={r}, num_processes={n}')
  if local_device_ids is not None:
    kwargs['local_device_ids'] = list(local_device_ids)
  jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed started: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def agree_with_process_zero(value: bool) -> bool:
  """Process 0's `value`, in every process (a collective: every process must call it).

  Why: a decision made from what a process sees on disk can differ between
  processes when one of them writes there a moment later (process 0 creating
  the checkpoints folder while a slower process is still looking for it), and
  orbax synchronises the processes in what such decisions lead to; taking
  process 0's view makes the decision one. For start-up decisions only: it
  waits for every process.
  """
  if jax.process_count() == 1:
    return bool(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with jax.transfer_guard_device_to_host('allow'):
    return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(bool(value)))))


def make_mesh(devices: Sequence[jax.Device] | None = None, *, shape: Sequence[int] = (-1,),
              axes: Sequence[str] = (DATA_AXIS,)) -> Mesh:
  """A mesh over `devices` (default: all devices of all processes) with `shape` and `axes`.

  One -1 in `shape` takes the remaining devices. The batch is split over the
  'data' axis, which must be present; other axes hold replicas (the step
  shards nothing else today). The default is a 1-D 'data' mesh.
  """
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device')
  shape, axes = tuple(int(n) for n in shape), tuple(str(a) for a in axes)
  if len(shape) != len(axes) or DATA_AXIS not in axes or len(set(axes)) != len(axes):
    raise MeshShapeError(f'parallel.mesh_shape={shape} and parallel.mesh_axes={axes} must have one '
                         f"entry each, distinct names, one of them '{DATA_AXIS}'")
  if shape.count(-1) > 1 or any(n == 0 or n < -1 for n in shape):
    raise MeshShapeError(f'parallel.mesh_shape={shape}: positive sizes and at most one -1')
  known = math.prod(n for n in shape if n != -1)
  if len(devices) % known:
    raise MeshShapeError(f'parallel.mesh_shape={shape} does not divide the {len(devices)} devices')
  shape = tuple(len(devices) // known if n == -1 else n for n in shape)
  if math.prod(shape) != len(devices):
    raise MeshShapeError(f'parallel.mesh_shape={shape} holds {math.prod(shape)} devices, the run '
                         f'has {len(devices)}')
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), axes)


def mesh_from_config(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.parallel` (mesh_shape, mesh_axes) over all devices."""
  return make_mesh(devices, shape=tuple(config.parallel.mesh_shape),
                   axes=tuple(config.parallel.mesh_axes))


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split: the size of the mesh's 'data' axis."""
  return int(mesh.shape[DATA_AXIS])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh | None, *, grad_accum: int = 1,
                     process_count: int | None = None) -> None:
  """Raises BatchSizeError (naming train.batch_size) if the batch cannot be split evenly.

  The global batch must divide over the processes (each reads its own share),
  into `grad_accum` micro-batches, and each micro-batch over the mesh's devices
  (not checked when `mesh` is None: the input pipeline, which has no mesh). The
  one place these are checked: the step (`step.make_train_step`), the loop and
  the pipeline all call it.
  """
  if process_count is None:
    process_count = jax.process_count()
  num_devices = 1 if mesh is None else data_parallel_size(mesh)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
    raise BatchSizeError(f'train.batch_size={batch_size!r} must be a positive integer')
  if batch_size < 1:
    raise BatchSizeError(f'train.batch_size={batch_size} must be positive')
  if grad_accum < 1:
    raise BatchSizeError(f'train.grad_accum={grad_accum} must be positive')
  if batch_size % process_count:
    raise BatchSizeError(
        f'train.batch_size={batch_size} must be divisible by the number of processes '
        f'({process_count})')
  if batch_size % grad_accum:
    raise BatchSizeError(
        f'train.batch_size={batch_size} must be divisible by train.grad_accum={grad_accum}')
  micro = batch_size // grad_accum
  if micro % num_devices:
    if grad_accum == 1:
      raise BatchSizeError(
          f'train.batch_size={batch_size} must be divisible by the number of devices '
          f'({num_devices}); use a multiple of {num_devices}')
    raise BatchSizeError(
        f'train.batch_size={batch_size} / train.grad_accum={grad_accum} = {micro} images per '
        f'micro-batch must be divisible by the number of devices ({num_devices})')


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Turns this process's NumPy batch (a pytree) into global arrays sharded on 'data'.

  Each process passes its own rows (leading axis B_local); the global array has
  B_local * process_count rows, process p's rows at [p*B_local, (p+1)*B_local).

  Raises:
    BatchSizeError: the global batch does not divide over the mesh's devices.
  """
  sharding = batch_sharding(mesh)
  leaves = jax.tree.leaves(local_batch)
  if not leaves:
    return local_batch
  local_rows = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in local_rows:
    raise BatchSizeError('every batch entry needs a leading batch axis')
  if len(local_rows) != 1:
    raise BatchSizeError(f'batch entries disagree on the batch size: {sorted(local_rows)}')
  global_rows = local_rows.pop() * jax.process_count()
  ways = data_parallel_size(mesh)
  if global_rows % ways:
    raise BatchSizeError(
        f'train.batch_size={global_rows} (global) must be divisible by the number of devices '
        f'({ways}); use a multiple of {ways}')

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x,
                                                  (global_rows,) + x.shape[1:])

  return jax.tree.map(to_global, local_batch)


def prefetch_to_device(host_batches: Iterator[Any], mesh: Mesh, *,
                       depth: int = 2) -> Iterator[Any]:
  """Global device batches from this process's host batches, `depth` of them in flight.

  Each `next` hands out the oldest batch already on its way to the devices and
  starts the transfer of a new one (`global_batch`), so while the device runs
  step n the host builds and ships step n + 1 (flax's `prefetch_to_device`,
  for global arrays over a mesh). It ends when `host_batches` does.
  """
  if depth < 1:
    raise ValueError(f'prefetch depth must be >= 1, got {depth}')
  queue: collections.deque[Any] = collections.deque()

  def fill() -> None:
    while len(queue) < depth:
      try:
        queue.append(global_batch(next(host_batches), mesh))
      except StopIteration:
        return

  fill()
  while queue:
    batch = queue.popleft()
    fill()
    yield batch
