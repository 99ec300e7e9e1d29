"""Compiling and timing one train-step program on a mesh of given devices.

Why compile explicitly (lower().compile()): compile time is a figure of its
own, and the compiled program also gives XLA's cost analysis (FLOPs) and its
static memory estimate, which are the only figures for settings too large to
run on the machine at hand (steps=0).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from uccl_jax import parallel
from uccl_jax import step as step_lib
from uccl_jax.benchmark.random_inputs import random_batch
from uccl_jax.benchmark.random_inputs import random_train_state
from uccl_jax.models import deeplab


def per_device_cost(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of a compiled program: one device's share ('flops', 'bytes accessed')."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return cost


def step_memory(compiled: Any) -> int | None:
  """XLA's static memory estimate of a compiled program (None where the backend has none)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend implements it
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """A copy of `config` that trains `method` (supervised | unimatch | uccl)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.method = method
  return config


def compiled_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                  host_state: step_lib.TrainState | None,
                  host_batch: dict[str, Any] | None) -> tuple[Any, Any, Any, float]:
  """(compiled step, state and batch on the mesh of `devices`, compile seconds).

  A state or batch not given is drawn at random (seed: train.seed).
  """
  model = deeplab.from_config(config.model, int(config.data.num_classes))
  mesh = parallel.make_mesh(devices)
  train_step = step_lib.make_train_step(model, config, mesh)
  if host_state is None:
    host_state = random_train_state(config, model, seed=int(config.train.seed))
  if host_batch is None:
    host_batch = random_batch(config, seed=int(config.train.seed))
  replicated = parallel.replicated_sharding(mesh)
  state = jax.tree.map(lambda x: jax.device_put(x, replicated), host_state)
  batch = parallel.global_batch(host_batch, mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  return compiled, state, batch, time.perf_counter() - start


def time_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *, steps: int,
              warmup: int = 1, host_state: step_lib.TrainState | None = None,
              host_batch: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles `config.method`'s step on a mesh of `devices` and times it.

  Returns compile_s, step_time_s (median), step_times_s, per-device cost
  analysis figures, XLA's memory estimate, and the first step's metrics (for
  the cross-device check). steps=0 compiles only (step time and metrics None):
  the FLOPs and memory of a setting too large to run on this machine.
  """
  compiled, state, batch, compile_s = compiled_step(config, devices, host_state, host_batch)
  cost = per_device_cost(compiled)
  figures = {'compile_s': compile_s, 'step_time_s': None, 'step_times_s': [],
             'flops_per_device': float(cost.get('flops', float('nan'))),
             'bytes_accessed_per_device': float(cost.get('bytes accessed', float('nan'))),
             'step_memory_bytes': step_memory(compiled), 'first_step_metrics': None}
  if steps == 0:  # compile only: FLOPs and the memory estimate, nothing executed
    return figures
  first_metrics = None
  for _ in range(max(warmup, 1)):
    state, metrics = compiled(state, batch)
    metrics = jax.device_get(jax.block_until_ready(metrics))
    if first_metrics is None:
      first_metrics = {name: float(value) for name, value in metrics.items()}
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  del state
  figures.update(step_time_s=statistics.median(times), step_times_s=times,
                 first_step_metrics=first_metrics)
  return figures
