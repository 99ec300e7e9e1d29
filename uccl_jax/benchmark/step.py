"""`python -m uccl_jax.benchmark [--config=...] [--config.x=...]`: how fast the train step runs.

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

Prints a table and, with --json=FILE, writes the figures as JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uccl_jax import cli
from uccl_jax import parallel
from uccl_jax import step as step_lib
from uccl_jax.data import pipeline as data_pipeline
from uccl_jax.data import transforms
from uccl_jax.models import deeplab

REPO_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / 'configs'
DEFAULT_CONFIG = REPO_CONFIG_DIR / 'pascal.py'
# Typical source image sizes per dataset, for the pipeline figure (Pascal VOC images are
# about 500x375; Cityscapes 2048x1024; the demo dataset 256x128).
SOURCE_SIZES = {'pascal': (375, 500), 'cityscapes': (1024, 2048), 'synthetic': (128, 256)}
RECORD_FIELDS = ('method', 'step_time_s', 'images_per_s', 'compile_s', 'flops_per_step', 'mfu',
                 'peak_memory_bytes', 'device')


class BenchmarkError(ValueError):
  """A flag or config value the benchmark cannot work with (one line, names it)."""


# ----------------------------------------------------------------------------
# Inputs: random batch and random state of the config's shapes.


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, Any]:
  """A host batch in the pipeline's layout (`uccl_jax.inputs`) filled with random values.

  Images are random bytes, masks random classes with a few ignored pixels,
  the valid region cut short at the bottom in half the images (padding),
  strong-view parameters and CutMix boxes drawn by the pipeline's own
  functions. The values only matter to the extent that every code path is
  exercised.
  """
  rng = np.random.default_rng(seed)
  batch_size, size = int(config.train.batch_size), int(config.data.crop_size)
  num_classes, ignore_index = int(config.data.num_classes), int(config.data.ignore_index)

  def images():
    return rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)

  def unlabeled_views(with_boxes: bool):
    valid = np.tile(np.array([0, 0, size, size], np.int32), (batch_size, 1))
    valid[::2, 2] = size - max(1, size // 8)
    views = {'weak': images(), 'valid': valid}
    for name in ('strong1', 'strong2'):
      views[name] = np.stack([transforms.draw_strong_params(rng) for _ in range(batch_size)])
    if with_boxes:
      for name in ('box1', 'box2'):
        views[name] = np.stack([transforms.draw_cutmix_box(size, rng, prob=1.0)
                                for _ in range(batch_size)])
    return views

  mask = rng.integers(0, num_classes, (batch_size, size, size)).astype(np.uint8)
  mask[rng.random(mask.shape) < 0.02] = ignore_index
  return {'labeled': {'image': images(), 'mask': mask},
          'unlabeled': unlabeled_views(True), 'mix': unlabeled_views(False)}


def random_train_state(config: ml_collections.ConfigDict, model: deeplab.DeepLabV3Plus,
                       seed: int = 0, total_steps: int = 1000) -> step_lib.TrainState:
  """A TrainState with host (NumPy) arrays of the model's shapes, randomly filled.

  Why not `create_train_state`: running the initializer compiles another large
  program (minutes for ResNet-50 on a CPU); tracing it under jax.eval_shape
  takes seconds. Kernels get He-normal values (std sqrt(2 / fan_in), so
  activations keep their scale and no denormals slow a CPU down), BN scales 1
  and biases 0, running means 0 and variances 1, optimizer buffers 0.
  """
  crop = int(config.data.crop_size)
  abstract = jax.eval_shape(
      lambda key: step_lib.create_train_state(config, model, key, (crop, crop, 3),
                                              total_steps=total_steps),
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill_param(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape, dtype=np.float32) *
              np.float32(math.sqrt(2.0 / max(fan_in, 1)))).astype(leaf.dtype)
    if name == 'scale':
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  def fill_stat(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    return np.ones(leaf.shape, leaf.dtype) if name == 'var' else np.zeros(leaf.shape, leaf.dtype)

  zeros = lambda leaf: np.zeros(leaf.shape, leaf.dtype)
  return abstract.replace(
      step=np.zeros((), np.int32),
      params=jax.tree_util.tree_map_with_path(fill_param, abstract.params),
      batch_stats=jax.tree_util.tree_map_with_path(fill_stat, abstract.batch_stats),
      opt_state=jax.tree.map(zeros, abstract.opt_state),
      rng=np.asarray(jax.random.PRNGKey(seed)))  # raw uint32[2], as create_train_state keeps it


# ----------------------------------------------------------------------------
# Measurements.


def _progress(text: str) -> None:
  """Progress on stderr, so that stdout holds only the table (compiles take minutes on CPU)."""
  print(text, file=sys.stderr, flush=True)


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


def _per_device_cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return cost


def _step_memory(compiled: Any) -> int | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend implements it
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  with config.unlocked():
    config.method = method
  return config


def _compiled_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                   host_state: step_lib.TrainState | None,
                   host_batch: dict[str, Any] | None) -> tuple[Any, Any, Any, float]:
  """(compiled step, state and batch on the mesh of `devices`, compile seconds)."""
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
  compiled, state, batch, compile_s = _compiled_step(config, devices, host_state, host_batch)
  cost = _per_device_cost(compiled)

  if steps == 0:  # compile only: FLOPs and the memory estimate, nothing executed
    return {'compile_s': compile_s, 'step_time_s': None, 'step_times_s': [],
            'flops_per_device': float(cost.get('flops', float('nan'))),
            'bytes_accessed_per_device': float(cost.get('bytes accessed', float('nan'))),
            'step_memory_bytes': _step_memory(compiled), 'first_step_metrics': None}
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
  return {'compile_s': compile_s, 'step_time_s': statistics.median(times),
          'step_times_s': times, 'flops_per_device': float(cost.get('flops', float('nan'))),
          'bytes_accessed_per_device': float(cost.get('bytes accessed', float('nan'))),
          'step_memory_bytes': _step_memory(compiled), 'first_step_metrics': first_metrics}


def benchmark_methods(config: ml_collections.ConfigDict, methods: Sequence[str],
                      devices: Sequence[jax.Device], *, steps: int, warmup: int = 1,
                      matmul: dict[str, float] | None = None) -> list[dict[str, Any]]:
  """One record per method (fields RECORD_FIELDS and more); see the module docstring."""
  unknown = [m for m in methods if m not in step_lib.METHODS]
  if unknown:
    raise BenchmarkError(f'--methods: unknown {", ".join(unknown)} (choose from '
                         f'{", ".join(step_lib.METHODS)})')
  device = describe_devices(devices)
  model = deeplab.from_config(config.model, int(config.data.num_classes))
  host_state = random_train_state(config, model, seed=int(config.train.seed))
  host_batch = random_batch(config, seed=int(config.train.seed))
  on_cpu = devices[0].platform == 'cpu'
  records = []
  for method in methods:
    _progress(f'{method}: compiling' + (f' and timing {steps} steps' if steps else ' only') +
              f' on {device} ...')
    timing = time_step(_method_config(config, method), devices, steps=steps, warmup=warmup,
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


def interleaved_overhead(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                         rounds: int, warmup: int = 1) -> dict[str, Any]:
  """The SBU+CKR overhead with unimatch and uccl steps timed in alternation.

  Why: timed one method after the other, the two medians see different
  minutes of a shared machine (on this project's 2-core CPU the same uccl
  step measured 0.33-0.44 s in three consecutive runs), which swamps an
  overhead of a few percent. Here both steps are compiled side by side and
  each round times one step of each, in the order AB then BA, so drift hits
  both alike. overhead_percent is the median over rounds of
  100 * (uccl / unimatch - 1); the per-method medians come along.
  """
  host_state = random_train_state(config, deeplab.from_config(
      config.model, int(config.data.num_classes)), seed=int(config.train.seed))
  host_batch = random_batch(config, seed=int(config.train.seed))
  programs = {}
  for method in ('unimatch', 'uccl'):
    _progress(f'overhead: compiling {method} for interleaved timing ...')
    compiled, state, batch, _ = _compiled_step(_method_config(config, method), devices,
                                               host_state, host_batch)
    programs[method] = [compiled, state, batch]

  def one_step(method: str) -> float:
    compiled, state, batch = programs[method]
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    programs[method][1] = state
    return time.perf_counter() - start

  for _ in range(max(warmup, 1)):
    for method in programs:
      one_step(method)
  times: dict[str, list[float]] = {'unimatch': [], 'uccl': []}
  for index in range(rounds):
    for method in (('unimatch', 'uccl') if index % 2 == 0 else ('uccl', 'unimatch')):
      times[method].append(one_step(method))
  ratios = [b / a for a, b in zip(times['unimatch'], times['uccl'])]
  return {'rounds': rounds, 'unimatch_step_time_s': statistics.median(times['unimatch']),
          'uccl_step_time_s': statistics.median(times['uccl']),
          'overhead_percent': 100.0 * (statistics.median(ratios) - 1.0),
          'overhead_percent_quartiles': [100.0 * (q - 1.0) for q in _quartiles(ratios)],
          'anchors': str(config.unsup.anchors)}


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
  if len(values) < 2:
    return values[0], values[0]
  quartiles = statistics.quantiles(values, n=4)
  return quartiles[0], quartiles[2]


def overhead_percent(records: Sequence[dict[str, Any]]) -> float | None:
  """(uccl - unimatch) / unimatch step time in percent, when both were timed."""
  times = {r['method']: r['step_time_s'] for r in records}
  if times.get('uccl') and times.get('unimatch'):
    return 100.0 * (times['uccl'] - times['unimatch']) / times['unimatch']
  return None


def measure_scaling(config: ml_collections.ConfigDict, device_counts: Sequence[int], *,
                    steps: int, warmup: int = 1) -> list[dict[str, Any]]:
  """Step time of config.method on the first n devices for each n that divides the batch.

  All counts start from the same host state and batch, so their first-step
  losses must agree up to float summation order (loss_difference is relative
  to the first count's).
  """
  devices = jax.devices()
  batch_size = int(config.train.batch_size)
  model = deeplab.from_config(config.model, int(config.data.num_classes))
  host_state = random_train_state(config, model, seed=int(config.train.seed))
  host_batch = random_batch(config, seed=int(config.train.seed))
  rows = []
  for count in device_counts:
    if count > len(devices):
      rows.append({'num_devices': count, 'skipped': f'only {len(devices)} devices'})
      continue
    if batch_size % count:
      rows.append({'num_devices': count,
                   'skipped': f'train.batch_size={batch_size} does not divide over {count}'})
      continue
    _progress(f'scaling: {config.method} on {count} device(s) ...')
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


def measure_pipeline_throughput(config: ml_collections.ConfigDict,
                                source_size: tuple[int, int] | None = None, *,
                                batches: int = 3, samples: int = 4) -> dict[str, Any]:
  """The input pipeline at the config's crop, batch and workers, on generated PNGs.

  Reuses uccl_jax.benchmark.pipeline (same images, same timing); source images
  default to the dataset's typical size (SOURCE_SIZES).
  """
  from uccl_jax.benchmark import pipeline as pipeline_benchmark  # pylint: disable=g-import-not-at-top
  if source_size is None:
    crop = int(config.data.crop_size)
    source_size = SOURCE_SIZES.get(config.data.name, (crop, crop))
  batch_size = int(config.train.batch_size)
  with tempfile.TemporaryDirectory(prefix='uccl_step_bench_pipeline_') as folder:
    root = pathlib.Path(folder)
    splits = pipeline_benchmark.write_dataset(root, source_size, 2 + 2 * batch_size, num_labeled=2)
    data_config = copy.deepcopy(config)
    with data_config.unlocked():
      # write_dataset writes the Cityscapes layout with train ids 0..18.
      data_config.data.name = 'cityscapes'
      data_config.data.source = 'folder'
      data_config.data.root = str(root)
      data_config.data.labeled_split, data_config.data.unlabeled_split, data_config.data.val_split = splits
      data_config.data.num_classes = 19
    one = pipeline_benchmark.measure_one_worker(data_config, samples)
    full = pipeline_benchmark.measure_pipeline(data_config, batches)
  return {'source_size': list(source_size),
          'workers': data_pipeline.resolve_workers(int(config.data.workers)),
          'batch_size': batch_size, 'crop_size': int(config.data.crop_size),
          'batches_per_s': full['batches_per_s'], 'unlabeled_per_s': full['unlabeled_per_s'],
          'one_worker_sample_s': one['sample_s'], 'one_worker_cpu_s': one['cpu_s']}


def measure_losses(config: ml_collections.ConfigDict, repeats: int = 10) -> dict[str, Any]:
  """SBU + CKR forward+backward (jitted) at the step's feature size, via benchmark.losses."""
  from uccl_jax.benchmark import losses as losses_benchmark  # pylint: disable=g-import-not-at-top
  feature_size = -(-int(config.data.crop_size) // 4)  # deep stem + max pool: ceil(crop / 4)
  times = losses_benchmark.time_jax_losses(
      batch=int(config.train.batch_size), size=feature_size,
      classes=int(config.data.num_classes), channels=int(config.model.head_channels),
      threshold=float(config.sbu.threshold), variant=str(config.sbu.variant), repeats=repeats)
  return {'batch': int(config.train.batch_size), 'feature_size': feature_size,
          'classes': int(config.data.num_classes), 'channels': int(config.model.head_channels),
          'sbu_ckr_fwd_bwd_s': statistics.median(times), 'sbu_ckr_fwd_bwd_min_s': min(times)}


# ----------------------------------------------------------------------------
# Report.


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
  """`value * scale` formatted with `spec` ('9.3f'); '-' right-aligned to the width when absent."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    width = spec.split('.')[0]
    return '-'.rjust(int(width) if width.isdigit() else 1)
  return format(value * scale, spec)


def format_report(report: dict[str, Any]) -> str:
  """The printed table (one row per method) and the extra figures, as text."""
  lines = [f'device: {report["device"]}; jax {report["jax_version"]}; {report["setting"]}']
  if report.get('matmul'):
    m = report['matmul']
    lines.append(f'matmul rate ({report["compute_dtype"]}, {m["matmul_size"]}^2): '
                 f'{m["matmul_flops_per_s"] / 1e12:.3f} TFLOP/s per device')
  header = (f'{"method":<11}{"step s":>9}{"min s":>9}{"img/s":>9}{"compile s":>11}'
            f'{"GFLOP/step":>12}{"MFU":>8}{"peak MiB":>10}{"step MiB":>10}')
  lines += [header, '-' * len(header)]
  for r in report['methods']:
    lines.append(f'{r["method"]:<11}{_fmt(r["step_time_s"], "9.3f")}'
                 f'{_fmt(r["step_time_min_s"], "9.3f")}{_fmt(r["images_per_s"], "9.2f")}'
                 f'{_fmt(r["compile_s"], "11.1f")}{_fmt(r["flops_per_step"], "12.1f", 1e-9)}'
                 f'{_fmt(r["mfu"], "8.1%")}{_fmt(r["peak_memory_bytes"], "10.0f", 2**-20)}'
                 f'{_fmt(r["step_memory_bytes"], "10.0f", 2**-20)}')
  if report.get('methods'):
    lines.append(f'peak memory: {report["methods"][0]["peak_memory_kind"]}; step MiB: XLA\'s '
                 'estimate for the compiled step (arguments + outputs + temporaries)')
  if report.get('uccl_overhead_percent') is not None:
    lines.append(f'SBU+CKR overhead, uccl over unimatch, from the table\'s medians: '
                 f'{report["uccl_overhead_percent"]:+.1f}% (paper, Table III: +29%)')
  if report.get('overhead'):
    o = report['overhead']
    low, high = o['overhead_percent_quartiles']
    lines.append(f'SBU+CKR overhead, interleaved ({o["rounds"]} rounds, unsup.anchors={o["anchors"]}): '
                 f'{o["overhead_percent"]:+.1f}% median of per-round ratios (quartiles {low:+.1f}% '
                 f'to {high:+.1f}%); unimatch {o["unimatch_step_time_s"]:.3f} s, uccl '
                 f'{o["uccl_step_time_s"]:.3f} s')
  if report.get('losses'):
    l = report['losses']
    lines.append(f'loss benchmark: SBU+CKR forward+backward at B={l["batch"]}, '
                 f'{l["feature_size"]}x{l["feature_size"]}, C={l["classes"]}, D={l["channels"]}: '
                 f'{l["sbu_ckr_fwd_bwd_s"] * 1e3:.1f} ms median ({l["sbu_ckr_fwd_bwd_min_s"] * 1e3:.1f} min)')
  if report.get('pipeline'):
    p = report['pipeline']
    step_rate = None
    times = [r['step_time_s'] for r in report['methods'] if r['step_time_s']]
    slowest = max(times) if times else None
    if slowest:
      step_rate = 1.0 / slowest
    verdict = ''
    if step_rate is not None:
      bound = 'the pipeline' if p['batches_per_s'] < step_rate else 'the step'
      verdict = f'; the slowest step runs {step_rate:.2f} steps/s, so {bound} bounds training'
    lines.append(f'input pipeline ({p["workers"]} workers, {p["source_size"][0]}x{p["source_size"][1]} '
                 f'PNGs -> crop {p["crop_size"]}, batch {p["batch_size"]}): '
                 f'{p["batches_per_s"]:.2f} batches/s ({p["unlabeled_per_s"]:.1f} unlabeled samples/s)'
                 f'{verdict}')
  if report.get('scaling'):
    lines.append(f'scaling ({report["scaling_method"]}):')
    for row in report['scaling']:
      if 'skipped' in row:
        lines.append(f'  {row["num_devices"]} devices: skipped ({row["skipped"]})')
      else:
        lines.append(f'  {row["num_devices"]} devices: {row["step_time_s"]:.3f} s/step '
                     f'(x{row["speedup"]:.2f}), compile {row["compile_s"]:.1f} s, first-step loss '
                     f'{row["loss_first_step"]:.6f} (differs by {row["loss_difference"]:.1e})')
  return '\n'.join(lines)


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
    _progress('loss benchmark ...')
    report['losses'] = measure_losses(config)
  if pipeline:
    _progress('input pipeline ...')
    report['pipeline'] = measure_pipeline_throughput(config, pipeline_source_size)
  if scaling:
    report['scaling_method'] = scaling_method
    report['scaling'] = measure_scaling(_method_config(config, scaling_method), scaling_devices,
                                        steps=steps, warmup=warmup)
  return report


# ----------------------------------------------------------------------------
# Command line.


@dataclasses.dataclass
class _Flags:
  config: ml_collections.ConfigDict
  methods: list[str]
  steps: int
  warmup: int
  json: str
  devices: int
  matmul_size: int
  pipeline: bool
  losses: bool
  scaling: bool
  scaling_method: str
  scaling_devices: list[int]
  pipeline_source_size: tuple[int, int] | None
  overhead_rounds: int


def _parse_flags(argv: Sequence[str], *, fake_devices_added: bool) -> _Flags:
  """absl flags on a private FlagValues (so the module can be run twice in one process)."""
  values = flags.FlagValues()
  flags.DEFINE_list('methods', list(step_lib.METHODS), 'Methods to time.', flag_values=values)
  flags.DEFINE_integer('steps', 10, 'Timed steps per method (median reported); 0: compile only '
                       '(FLOPs and XLA\'s memory estimate of a setting too large to run here).',
                       flag_values=values)
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.', flag_values=values)
  flags.DEFINE_string('json', '', 'Write the report as JSON here.', flag_values=values)
  flags.DEFINE_integer('devices', 0, 'Devices of the per-method timing (0: all; 1 when --scaling '
                       'added fake CPU devices).', flag_values=values)
  flags.DEFINE_integer('matmul_size', 0, 'Side of the timed matmul (0: 2048 on CPU, 8192 else).',
                       flag_values=values)
  flags.DEFINE_bool('pipeline', True, 'Also time the input pipeline.', flag_values=values)
  flags.DEFINE_bool('losses', True, 'Also run the SBU+CKR loss benchmark.', flag_values=values)
  flags.DEFINE_integer('overhead_rounds', -1, 'Rounds of the interleaved unimatch/uccl timing of '
                       'the SBU+CKR overhead (-1: as many as --steps; 0: off).', flag_values=values)
  flags.DEFINE_bool('scaling', False, 'Also time the step on 1, 2, 4 devices.', flag_values=values)
  flags.DEFINE_string('scaling_method', 'uccl', 'Method of the scaling runs.', flag_values=values)
  flags.DEFINE_list('scaling_devices', ['1', '2', '4'], 'Device counts of the scaling runs.',
                    flag_values=values)
  flags.DEFINE_string('pipeline_source_size', '', 'HxW of the generated source images (default: '
                      'typical for data.name).', flag_values=values)
  if not any(arg.startswith('--config=') for arg in argv) and not DEFAULT_CONFIG.is_file():
    raise BenchmarkError(f'--config is required ({DEFAULT_CONFIG} does not exist here)')
  command_line = ['benchmark', *argv]
  try:
    config_flag = cli.define_config_flag(
        values, command_line, str(DEFAULT_CONFIG),
        'Config file (configs/*.py[:arg]); default: the Pascal recipe.')
    cli.parse_flags(values, command_line, config_flag)
  except cli.CommandLineError as error:
    raise BenchmarkError(str(error)) from None
  config = config_flag.value
  try:
    scaling_devices = [int(n) for n in values.scaling_devices]
  except ValueError:
    raise BenchmarkError(f'--scaling_devices={",".join(values.scaling_devices)}: expected '
                         'integers like 1,2,4') from None
  source_size = None
  if values.pipeline_source_size:
    try:
      height, width = (int(p) for p in values.pipeline_source_size.lower().split('x'))
      source_size = (height, width)
    except ValueError:
      raise BenchmarkError(f'--pipeline_source_size={values.pipeline_source_size}: expected HxW '
                           'like 375x500') from None
  if values.scaling_method not in step_lib.METHODS:
    raise BenchmarkError(f'--scaling_method={values.scaling_method}: expected one of '
                         f'{", ".join(step_lib.METHODS)}')
  devices = values.devices
  if devices == 0 and fake_devices_added and jax.devices()[0].platform == 'cpu':
    devices = 1  # the fake devices share the host's cores: time the methods on one
  return _Flags(config=config, methods=list(values.methods), steps=values.steps,
                warmup=values.warmup, json=values.json, devices=devices,
                matmul_size=values.matmul_size, pipeline=values.pipeline, losses=values.losses,
                scaling=values.scaling, scaling_method=values.scaling_method,
                scaling_devices=scaling_devices, pipeline_source_size=source_size,
                overhead_rounds=values.steps if values.overhead_rounds < 0 else values.overhead_rounds)


def main(argv: Sequence[str], *, fake_devices_added: bool = False) -> int:
  """`argv` without the program name; prints the table; returns the exit status."""
  try:
    parsed = _parse_flags(argv, fake_devices_added=fake_devices_added)
    report = run(parsed.config, methods=parsed.methods, steps=parsed.steps, warmup=parsed.warmup,
                 num_devices=parsed.devices, matmul_size=parsed.matmul_size,
                 pipeline=parsed.pipeline, losses=parsed.losses, scaling=parsed.scaling,
                 scaling_method=parsed.scaling_method, scaling_devices=parsed.scaling_devices,
                 pipeline_source_size=parsed.pipeline_source_size,
                 overhead_rounds=parsed.overhead_rounds)
  except (BenchmarkError, parallel.BatchSizeError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(format_report(report), flush=True)
  if parsed.json:
    path = pathlib.Path(parsed.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary sibling and renamed, so a failure never leaves half a file.
    partial = path.with_name(path.name + '.partial')
    partial.write_text(json.dumps(report, indent=1) + '\n')
    os.replace(partial, path)
    print(f'wrote {path}')
  return 0
