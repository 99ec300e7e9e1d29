"""The step benchmark: how fast the train step runs (`python -m uccl_jax.benchmark`).

Why a separate benchmark: a reimplementation is trusted when anyone can
regenerate its speed figures, and the paper's Table III claims SBU + CKR cost
+29% per step (0.199 s -> 0.257 s); this command measures that overhead here.

What it measures, for each method of --methods (supervised, unimatch, uccl) on
random inputs of the config's shapes (so no dataset is read: configs/pascal.py
works on a machine without Pascal VOC):
  * compile_s: lowering + XLA compilation of the jitted step (make_train_step:
    state replicated and donated, batch sharded on the mesh);
  * step_time_s: median wall time of --steps steps after --warmup steps, each
    ended by block_until_ready; images_per_s = labeled images per step / that
    (the global batch; every step also consumes as many unlabeled images);
  * flops_per_step: XLA's cost analysis of the compiled step (it reports one
    device's share; multiplied by the mesh size here, so work every device
    repeats, such as the replicated optimizer update, counts once per device:
    the FLOPs executed, which is what utilisation is about);
  * mfu: flops_per_step / step_time_s / the matmul rate of the devices used, where
    the rate is a large matrix product in the model's compute dtype timed on
    the spot (best of a few) - a measured ceiling, not a datasheet figure.
    Fake CPU devices share the host's cores, so on CPU the rate is not
    multiplied by the device count;
  * peak_memory_bytes: on GPU/TPU the device's peak_bytes_in_use (a process-wide
    high-water mark: methods run in the order given, so a later, larger step
    shows its own peak); on CPU the peak resident set of the process
    (getrusage, compilation included). step_memory_bytes is XLA's static
    estimate for the step (arguments + outputs + temporaries - aliased);
  * overhead of uccl over unimatch in percent (the paper's +29%): from the
    two medians above, and (when both methods run, --overhead_rounds) timed
    interleaved, one step of each per round, which is the figure to quote on
    a shared machine (`interleaved_overhead`).
Also, unless switched off: the input pipeline's throughput at the same crop,
batch and worker count (generated PNGs; uccl_jax.benchmark.pipeline), the loss
benchmark's SBU + CKR forward+backward at the matching feature size
(uccl_jax.benchmark.losses), and with --scaling the step time on 1, 2, 4
devices (sub-meshes of jax.devices(); the same state and batch on each, so the
first-step loss must agree across device counts).

Prints a table and, with --json=FILE, writes the figures as JSON. run()
returns the report (what --json writes); the command line is in step_cli.py,
the table in step_report.py, and each measurement in a module of its own:
random_inputs, timing, device_figures, overhead, scaling; the pipeline and loss
figures come from the pipeline and losses benchmarks
(`pipeline.measure_pipeline_throughput`, `losses.measure_losses`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from uccl_jax import parallel
from uccl_jax import step as step_lib
from uccl_jax.benchmark import losses as losses_benchmark
from uccl_jax.benchmark import pipeline as pipeline_benchmark
from uccl_jax.benchmark.device_figures import describe_devices
from uccl_jax.benchmark.device_figures import measure_matmul_rate
from uccl_jax.benchmark.device_figures import peak_memory
from uccl_jax.benchmark.overhead import interleaved_overhead
from uccl_jax.benchmark.overhead import overhead_percent
from uccl_jax.benchmark.random_inputs import random_state_and_batch
from uccl_jax.benchmark.scaling import measure_scaling
from uccl_jax.benchmark.step_report import progress
from uccl_jax.benchmark.timing import method_config
from uccl_jax.benchmark.timing import time_step
from uccl_jax.models import deeplab

RECORD_FIELDS = ('method', 'step_time_s', 'images_per_s', 'compile_s', 'flops_per_step', 'mfu',
                 'peak_memory_bytes', 'device')


class BenchmarkError(ValueError):
  """A flag or config value the benchmark cannot work with (one line, names it)."""


def benchmark_methods(config: ml_collections.ConfigDict, methods: Sequence[str],
                      devices: Sequence[jax.Device], *, steps: int, warmup: int = 1,
                      matmul: dict[str, float] | None = None) -> list[dict[str, Any]]:
  """One record per method (fields RECORD_FIELDS and more); see the module docstring."""
  unknown = [m for m in methods if m not in step_lib.METHODS]
  if unknown:
    raise BenchmarkError(f'--methods: unknown {", ".join(unknown)} (choose from '
                         f'{", ".join(step_lib.METHODS)})')
  device = describe_devices(devices)
  host_state, host_batch = random_state_and_batch(config)
  on_cpu = devices[0].platform == 'cpu'
  records = []
  for method in methods:
    progress(f'{method}: compiling' + (f' and timing {steps} steps' if steps else ' only') +
              f' on {device} ...')
    timing = time_step(method_config(config, method), devices, steps=steps, warmup=warmup,
                       host_state=host_state, host_batch=host_batch)
    flops = timing['flops_per_device'] * len(devices)
    rate = None
    if matmul is not None:
      rate = matmul['matmul_flops_per_s'] * (1 if on_cpu else len(devices))
    memory, memory_kind = peak_memory(devices)
    batch_size = int(config.train.batch_size)
    step_time = timing['step_time_s']
    records.append({
        'method': method,
        'step_time_s': step_time,
        'step_time_min_s': min(timing['step_times_s']) if timing['step_times_s'] else None,
        'images_per_s': batch_size / step_time if step_time else None,
        'compile_s': timing['compile_s'],
        'flops_per_step': flops,
        'mfu': flops / step_time / rate if rate and step_time else None,
        'peak_memory_bytes': memory,
        'peak_memory_kind': memory_kind,
        'step_memory_bytes': timing['step_memory_bytes'],
        'device': device,
        'num_devices': len(devices),
        'batch_size': batch_size,
        'crop_size': int(config.data.crop_size),
        'dtype': str(config.model.dtype),
        'steps_timed': steps,
        'loss_first_step': (timing['first_step_metrics'] or {}).get('loss'),
    })
  return records


def run(config: ml_collections.ConfigDict, *, methods: Sequence[str], steps: int,
        warmup: int = 1, num_devices: int = 0, matmul_size: int = 0,
        pipeline: bool = True, losses: bool = True, scaling: bool = False,
        scaling_method: str = 'uccl', scaling_devices: Sequence[int] = (1, 2, 4),
        pipeline_source_size: tuple[int, int] | None = None,
        overhead_rounds: int = 0) -> dict[str, Any]:
  """Runs every requested measurement and returns the report (what --json writes)."""
  all_devices = jax.devices()
  if num_devices < 0 or num_devices > len(all_devices):
    raise BenchmarkError(f'--devices={num_devices}: this machine has {len(all_devices)} devices')
  devices = all_devices[:num_devices] if num_devices else all_devices
  try:
    step_lib.check_config(config)
    parallel.check_batch_size(int(config.train.batch_size), parallel.make_mesh(devices),
                              grad_accum=int(config.train.grad_accum))
    deeplab.from_config(config.model, int(config.data.num_classes))
  except (ValueError, step_lib.StepConfigError) as error:
    raise BenchmarkError(str(error)) from None
  unknown = [m for m in (*methods, scaling_method) if m not in step_lib.METHODS]
  if unknown or not methods:
    raise BenchmarkError(f'--methods: unknown or none ({", ".join(unknown)}); choose from '
                         f'{", ".join(step_lib.METHODS)}')
  if steps < 0:
    raise BenchmarkError(f'--steps={steps} must be >= 0 (0: compile only)')
  if overhead_rounds < 0:
    raise BenchmarkError(f'--overhead_rounds={overhead_rounds} must be >= 0')
  if scaling and steps == 0:
    raise BenchmarkError('--scaling needs --steps >= 1 (it compares step times and losses)')
  compute_dtype = deeplab.DTYPES[config.model.dtype]
  report: dict[str, Any] = {
      'device': describe_devices(devices), 'jax_version': jax.__version__,
      'compute_dtype': str(config.model.dtype),
      'setting': (f'{config.model.backbone} width {config.model.width}, head '
                  f'{config.model.head_channels}, crop {config.data.crop_size}, batch '
                  f'{config.train.batch_size} labeled + {config.train.batch_size} unlabeled, '
                  f'{config.data.num_classes} classes, {config.model.dtype}, grad_accum '
                  f'{config.train.grad_accum}, {len(devices)} device(s)'),
  }
  report['matmul'] = measure_matmul_rate(compute_dtype, devices[0], matmul_size)
  report['methods'] = benchmark_methods(config, methods, devices, steps=steps, warmup=warmup,
                                        matmul=report['matmul'])
  report['uccl_overhead_percent'] = overhead_percent(report['methods'])
  if overhead_rounds and steps and {'unimatch', 'uccl'} <= set(methods):
    report['overhead'] = interleaved_overhead(config, devices, rounds=overhead_rounds,
                                              warmup=warmup)
  if losses:
    progress('loss benchmark ...')
    report['losses'] = losses_benchmark.measure_losses(config)
  if pipeline:
    progress('input pipeline ...')
    report['pipeline'] = pipeline_benchmark.measure_pipeline_throughput(config,
                                                                      pipeline_source_size)
  if scaling:
    report['scaling_method'] = scaling_method
    report['scaling'] = measure_scaling(method_config(config, scaling_method), scaling_devices,
                                        steps=steps, warmup=warmup)
  return report
