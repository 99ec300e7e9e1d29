"""Step time on 1, 2, 4, ... devices: how the step scales over a mesh, and that it stays correct.

Every device count starts from the same host state and batch, so the
first-step losses must agree up to float summation order: a scaling run is
also a check that sharding does not change the computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from uccl_jax.benchmark.random_inputs import random_state_and_batch
from uccl_jax.benchmark.step_report import progress
from uccl_jax.benchmark.timing import time_step


def measure_scaling(config: ml_collections.ConfigDict, device_counts: Sequence[int], *,
                    steps: int, warmup: int = 1) -> list[dict[str, Any]]:
  """Step time of config.method on the first n devices for each n that divides the batch.

  All counts start from the same host state and batch, so their first-step
  losses must agree up to float summation order (loss_difference is relative
  to the first count's).
  """
  devices = jax.devices()
  batch_size = int(config.train.batch_size)
  host_state, host_batch = random_state_and_batch(config)
  rows = []
  for count in device_counts:
    if count > len(devices):
      rows.append({'num_devices': count, 'skipped': f'only {len(devices)} devices'})
      continue
    if batch_size % count:
      rows.append({'num_devices': count,
                   'skipped': f'train.batch_size={batch_size} does not divide over {count}'})
      continue
    progress(f'scaling: {config.method} on {count} device(s) ...')
    timing = time_step(config, devices[:count], steps=steps, warmup=warmup,
                       host_state=host_state, host_batch=host_batch)
    rows.append({'num_devices': count, 'step_time_s': timing['step_time_s'],
                 'compile_s': timing['compile_s'],
                 'flops_per_step': timing['flops_per_device'] * count,
                 'loss_first_step': timing['first_step_metrics']['loss']})
  timed = [r for r in rows if 'step_time_s' in r]
  for row in timed:
    row['loss_difference'] = abs(row['loss_first_step'] - timed[0]['loss_first_step'])
    row['speedup'] = timed[0]['step_time_s'] / row['step_time_s']
  return rows

