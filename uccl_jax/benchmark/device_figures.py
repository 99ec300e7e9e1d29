"""What the devices are and can do: their description, a measured matmul rate, peak memory.

Why measured: MFU needs a ceiling, and a datasheet figure says nothing about
this machine, this XLA build or fake CPU devices; a large matrix product timed
on the spot is the rate the step could reach. Peak memory is read from the
device where it reports one, else from the process (CPU).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def describe_devices(devices: Sequence[jax.Device]) -> str:
  """'cpu: cpu x1 (2 CPU cores)' / 'gpu: NVIDIA H100 80GB HBM3 x1'."""
  first = devices[0]
  text = f'{first.platform}: {first.device_kind} x{len(devices)}'
  if first.platform == 'cpu':
    text += f' ({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()})'
  return text


def measure_matmul_rate(dtype: Any, device: jax.Device, size: int = 0,
                        repeats: int = 5) -> dict[str, float]:
  """FLOP/s of one size x size matrix product in `dtype` on `device` (best of `repeats`).

  The size defaults to 2048 on CPU (about 17 GFLOP, a fraction of a second on
  two cores) and 8192 elsewhere (1.1 TFLOP, milliseconds on a GPU; the product
  is chained 10 times per timed call so launch overhead does not count).
  """
  if size <= 0:
    size = 2048 if device.platform == 'cpu' else 8192
  chain = 1 if device.platform == 'cpu' else 10
  keys = jax.random.split(jax.random.PRNGKey(0))
  a = jax.device_put(jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype), device)
  b = jax.device_put(jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype), device)
  scale = jnp.asarray(1.0 / math.sqrt(size), dtype)

  @jax.jit
  def product(a, b):
    for _ in range(chain):
      a = (a @ b) * scale
    return a

  jax.block_until_ready(product(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, b))
    times.append(time.perf_counter() - start)
  best = min(times)
  return {'matmul_size': size, 'matmul_s': best / chain,
          'matmul_flops_per_s': 2.0 * size ** 3 * chain / best}


def peak_memory(devices: Sequence[jax.Device]) -> tuple[int | None, str]:
  """(bytes, what they are): the devices' peak in use, or on CPU the process's peak RSS."""
  if devices[0].platform != 'cpu':
    peaks = []
    for device in devices:
      stats = device.memory_stats() or {}
      if 'peak_bytes_in_use' in stats:
        peaks.append(int(stats['peak_bytes_in_use']))
    if peaks:
      return max(peaks), 'device peak_bytes_in_use (max over devices)'
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  scale = 1 if sys.platform == 'darwin' else 1024  # bytes on macOS
  return int(kib * scale), 'host peak RSS of the process (includes compilation)'

