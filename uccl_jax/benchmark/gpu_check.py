"""`python -m uccl_jax.benchmark gpu_check`: every GPU figure the project lacks, in one run of < 8 min.

Why: a GPU is lent to few sessions and briefly (one H200, minutes of device
time in all), so the figures docs/RESULTS.md is missing on GPU are measured
by one command whose parts run in order of importance, each saving its
figures as they come: a run cut short still leaves every figure it reached,
and a second run reuses the compiled programs (JAX's persistent compilation
cache, --cache_dir) and finishes the rest with `--parts=<the missing ones>`.

Parts, in the order they run; each is its own process, so that a crash or an
out-of-memory error loses one part only and each process's device memory
high-water mark (peak_bytes_in_use) belongs to that part alone:

1. float32: the step benchmark (uccl_jax/benchmark/step.py, `benchmark_methods`)
   at the Pascal setting (configs/pascal.py: DeepLabv3+ ResNet-50, crop 321,
   batch 8 labeled + 8 unlabeled, random inputs) for supervised, unimatch,
   uccl: compile time, median step time, images/s, FLOPs, MFU against a
   matmul timed in the same dtype, peak device memory (methods smallest
   first, so each row shows its own peak), XLA's memory estimate. Then the
   SBU+CKR overhead of uccl over unimatch timed interleaved
   (`interleaved_overhead`, unsup.anchors=passes), from the programs just
   compiled (cache hits). float32 because the paper's +29% (Table III) is a
   float32 figure.
2. bfloat16: the same three methods with model.dtype=bfloat16.
3. bf16_training: configs/synthetic.py (the demo: generated data, ResNet-18
   width 16, crop 97) trained 100 steps by `train.train_and_evaluate` in
   float32 and again in bfloat16, losses logged every step; passes when the
   mean loss over the last 20 steps of the bfloat16 run lies within
   LOSS_TOLERANCE (10%, relative; its comment says why) of the float32
   run's (see `compare_losses`).
4. input: does the input pipeline keep the device busy? The real training
   loop (`train.train_and_evaluate`, grain workers per data.workers=-1) runs
   the bfloat16 uccl step at the Pascal setting on generated Pascal-size
   JPEGs (375x500 -> crop 321) for 50 steps; its logged step_time (wall
   time per step of each 10-step logging window, the first window dropped)
   is compared with the pure step time of the same compiled program on a
   batch already on the device (`time_step`, measured just before):
   idle fraction = 1 - pure / loop (`idle_fraction`).
5. pasted: the interleaved overhead with unsup.anchors=pasted (one more uccl
   program to compile).
The order is the order of importance: the paper's comparison first, then the
dtype GPU users will pick, then whether that dtype trains, then the pipeline
(which the CPU figures already suggest keeps up), then a confirmation of a
CPU figure (docs/RESULTS.md, section 3) that costs a compilation of its own.

Time budget (--budget_s, default 465 s: the whole command stays under 8
minutes; on an H200, compiling one ResNet-50 step at crop 321 takes about
30-90 s, most of each part):
  float32        ~120-280 s  3 compilations, 30 timed steps each, 30 interleaved rounds (cached)
  bfloat16       ~100-250 s  3 compilations, 30 timed steps each
  bf16_training   ~60-120 s  demo data generated once (~15 s), 2 x (init + step + eval compile, 100 steps)
  input            ~40-120 s  uccl bf16 from the cache, init + eval compile, 30 + 50 steps
  pasted           ~50-110 s  1 compilation, 30 interleaved rounds
A part starts only while at least MIN_START_S of the budget is left; at the
deadline the running part is stopped (what it saved stays) and the rest is
marked not run. On a first run the later parts may well be cut; the summary
then prints the command that finishes them (the cache makes it quick).

--smoke: the same parts on a tiny network (ResNet-18 width 4, head 8, crop
33, batch 2), tiny generated data and a few steps: a check that the command
works; its figures mean nothing. On a CPU its time goes nearly all into XLA
compilation of the UniMatch and UCCL steps (its time on this project's 2-core
CPU: docs/RESULTS.md, "GPU check"), so the tests run one cheap part of it and
test the rest piece by piece.

Output, in --out (default runs/gpu_check; launch/gpu_check.sh uses $OUT when
set), three files and nothing else: gpu_check.json (every figure, rewritten
as figures come), summary.txt (the same for people, with the method behind
each figure), log.txt (each part's output). The parts' own records and run
folders live in a temporary folder, removed at the end.

usage:
  python -m uccl_jax.benchmark gpu_check [--parts=float32,bfloat16,bf16_training,input,pasted]
      [--methods=supervised,unimatch,uccl] [--smoke] [--budget_s=465] [--cache_dir=DIR]
      [--out=DIR]

examples:
  launch/gpu_check.sh
  python -m uccl_jax.benchmark gpu_check --out=runs/gpu_check
  python -m uccl_jax.benchmark gpu_check --parts=input,pasted
  python -m uccl_jax.benchmark gpu_check --smoke --parts=float32 --methods=supervised

Exit status: 0 when every requested part finished (and the bf16 check
passed), 1 otherwise, 2 with one line on stderr for a bad flag.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from uccl_jax import cli
from uccl_jax.benchmark import subcommand

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / 'configs'
DEFAULT_OUT = 'runs/gpu_check'
DEFAULT_CACHE_DIR = REPO / '.cache' / 'jax_gpu_check'
DEFAULT_BUDGET_S = 465.0
REPORT_FILE = 'gpu_check.json'
SUMMARY_FILE = 'summary.txt'
LOG_FILE = 'log.txt'
METHODS = ('supervised', 'unimatch', 'uccl')  # smallest program first: each row its own peak

# The bf16 training check. The two runs start from the same initial weights and see the same
# batches; only rounding differs (bfloat16 keeps 8 significant bits; parameters, BN statistics and
# losses stay float32), but the trajectories drift apart step by step. In the one such run on this
# project's 2-core CPU (100 demo steps; its figures: docs/RESULTS.md, "GPU check") single steps
# drifted further apart than the window's means, which stayed a few percent apart while the float32
# loss itself fell by about a third. 10% leaves the drift of a working bf16 path 2-3x headroom and
# still fails a run that stops learning, diverges or produces NaN; it cannot see a bias of a few
# percent (one 100-step run cannot tell that from drift).
LOSS_TOLERANCE = 0.10
LOSS_WINDOW = 20
# The training loop's idle fraction up to which the input pipeline is said to keep up.
IDLE_KEEPS_UP = 0.05
# The dtype of the input part (the faster step asks the most of the pipeline) and the poly
# schedule length shared by its benchmark state and its training run, so both run one program.
INPUT_DTYPE = 'bfloat16'
SCHEDULE_STEPS = 1000
PASCAL_SOURCE_SIZE = (375, 500)  # VOC images are about 500x375
POLL_S = 5.0  # how often the parent rewrites the report while a part runs
KILL_GRACE_S = 3.0  # SIGTERM -> SIGKILL; the figures are on disk already


class GpuCheckError(ValueError):
  """A bad flag or an input the check cannot work with: one line, naming it."""


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Step counts and sizes of one mode (full or --smoke)."""
  timed_steps: int = 30  # per method, after the warm-up
  warmup: int = 3
  overhead_rounds: int = 30
  matmul_size: int = 0  # 0: the step benchmark's default (8192 on a GPU)
  input_steps: int = 50  # training-loop steps of the input part
  input_log_every: int = 10
  input_steps_per_epoch: int = 50  # >= input_steps: no epoch-end checkpoint inside the timing
  input_source_size: tuple[int, int] = PASCAL_SOURCE_SIZE
  input_images: int = 24  # distinct generated images (the lists repeat them)
  train_steps: int = 100  # bf16_training
  loss_window: int = LOSS_WINDOW


FULL = Sizes()
SMOKE = Sizes(timed_steps=2, warmup=1, overhead_rounds=2, matmul_size=256, input_steps=4,
              input_log_every=2, input_steps_per_epoch=10, input_source_size=(40, 56),
              input_images=6, train_steps=6, loss_window=3)


# ----------------------------------------------------------------------------
# The arithmetic of the figures (pure functions; tested without a device).


def compare_losses(reference: Sequence[float], candidate: Sequence[float], *, window: int,
                   tolerance: float) -> dict[str, Any]:
  """Whether `candidate`'s mean loss over the last `window` steps is within `tolerance` of `reference`'s.

  Both are per-step losses of the same steps (same data, same start).
  relative_difference = |mean_c - mean_r| / |mean_r| over the last `window`
  steps; the check fails on any non-finite loss. Also returned, to judge the
  margin: the first step's relative difference (rounding alone, before the
  trajectories drift), the largest per-step relative difference in the
  window, and the reference's own standard deviation there (how much the
  loss moves from batch to batch).
  """
  if len(reference) != len(candidate):
    raise GpuCheckError(f'loss lists differ in length ({len(reference)} and {len(candidate)} steps)')
  if window < 1 or len(reference) < window:
    raise GpuCheckError(f'a window of {window} steps needs at least that many losses '
                        f'(got {len(reference)})')
  ref = [float(x) for x in reference]
  cand = [float(x) for x in candidate]
  finite = all(math.isfinite(x) for x in ref + cand)
  ref_mean = statistics.fmean(ref[-window:])
  cand_mean = statistics.fmean(cand[-window:])
  relative = abs(cand_mean - ref_mean) / abs(ref_mean) if ref_mean else math.inf

  def rel(a: float, b: float) -> float:
    return abs(b - a) / abs(a) if a else math.inf

  return {
      'steps': len(ref), 'window': window, 'tolerance': tolerance,
      'reference_mean': ref_mean, 'candidate_mean': cand_mean,
      'relative_difference': relative if finite else math.nan,
      'first_step_relative_difference': rel(ref[0], cand[0]),
      'max_step_relative_difference': max(rel(a, b) for a, b in zip(ref[-window:], cand[-window:])),
      'reference_std': statistics.pstdev(ref[-window:]),
      'all_finite': finite,
      'passed': bool(finite and relative <= tolerance),
  }


def loop_step_time(records: Sequence[Mapping[str, Any]], *, skip_windows: int = 1,
                   first_step: int = 1) -> dict[str, Any]:
  """Seconds per step of a training run, from its logged 'train' records.

  Each record's step_time is the mean over its logging window: the steps
  after the previous logged step (the first window starts after `first_step`,
  the step that compiled, which the loop keeps out). The first
  `skip_windows` windows are dropped (the pipeline's buffers filled while the
  step compiled, so they flatter it); the rest are averaged weighted by their
  length, i.e. total time / total steps.
  """
  windows, previous = [], first_step
  for record in records:
    step, value = int(record['step']), float(record['step_time'])
    windows.append({'first': previous + 1, 'last': step, 'steps': step - previous,
                    'step_time_s': value})
    previous = step
  used = windows[skip_windows:]
  if not used:
    raise GpuCheckError(f'{len(windows)} logged windows: none left after dropping the first '
                        f'{skip_windows}')
  if any(w['steps'] < 1 or not math.isfinite(w['step_time_s']) for w in used):
    raise GpuCheckError(f'logged step times are not usable: {used}')
  steps = sum(w['steps'] for w in used)
  return {'step_time_s': sum(w['step_time_s'] * w['steps'] for w in used) / steps,
          'steps': steps, 'first': used[0]['first'], 'last': used[-1]['last'],
          'windows': windows, 'skipped_windows': skip_windows}


def idle_fraction(pure_step_s: float, loop_step_s: float) -> float:
  """1 - pure / loop: the share of the loop's time per step in which the device had no step to run.

  `pure_step_s` is the compiled step alone on a batch already on the device;
  `loop_step_s` the same program inside the training loop (input pipeline,
  transfers, logging). Negative values mean the loop ran as fast as the
  step alone, within timing noise.
  """
  if not (pure_step_s > 0 and loop_step_s > 0):
    raise GpuCheckError(f'step times must be positive (pure {pure_step_s}, loop {loop_step_s})')
  return 1.0 - pure_step_s / loop_step_s


# ----------------------------------------------------------------------------
# Configs.


def load_config_file(path: pathlib.Path, arg: str | None = None) -> Any:
  """`get_config()` of a configs/*.py file (they are files, not a package)."""
  spec = importlib.util.spec_from_file_location(f'_gpu_check_config_{path.stem}', path)
  if spec is None or spec.loader is None:
    raise GpuCheckError(f'{path}: cannot load this config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _shrink_model(config: Any) -> None:
  config.model.backbone = 'resnet18'
  config.model.width = 4
  config.model.head_channels = 8
  config.data.crop_size = 33


def pascal_config(dtype: str, *, smoke: bool) -> Any:
  """configs/pascal.py in `dtype` from random weights; with `smoke`, a tiny network and batch.

  Random weights ('' = no model.pretrained file): speed, memory and the input
  pipeline do not depend on the values, and the check needs no download.
  """
  config = load_config_file(CONFIG_DIR / 'pascal.py')
  config.model.dtype = dtype
  config.model.pretrained = ''
  if smoke:
    _shrink_model(config)
    config.train.batch_size = 2
  return config


def demo_config(dtype: str, *, smoke: bool, steps: int, root: str = '') -> Any:
  """configs/synthetic.py for `steps` steps in `dtype`, logging every step, one final evaluation."""
  config = load_config_file(CONFIG_DIR / 'synthetic.py')
  config.model.dtype = dtype
  config.data.root = root
  config.train.max_steps = steps
  config.train.log_every_steps = 1
  config.eval.every_epochs = 0  # evaluate at the end only
  config.checkpoint.keep = 1
  if smoke:
    _shrink_model(config)
    config.train.epochs = steps  # the tiny dataset has few steps per epoch
  return config


# ----------------------------------------------------------------------------
# The parts (each runs in its own process; `record` saves after every figure).


class PartRecord:
  """One part's figures, rewritten to its JSON file (atomically) whenever they change."""

  def __init__(self, path: pathlib.Path, name: str):
    self.path = path
    self.data: dict[str, Any] = {'name': name, 'status': 'running',
                                 'started': datetime.datetime.now().isoformat(timespec='seconds')}
    self._start = time.perf_counter()
    self.save()

  def update(self, **figures: Any) -> None:
    self.data.update(figures)
    self.save()

  def save(self) -> None:
    self.data['elapsed_s'] = round(time.perf_counter() - self._start, 1)
    write_json(self.path, self.data)


def _device_fields() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.device_figures import describe_devices  # pylint: disable=g-import-not-at-top
  return {'device': describe_devices(jax.devices()), 'jax_version': jax.__version__,
          'host_cpus': os.cpu_count()}


def _setting(config: Any, devices: int) -> str:
  return (f'{config.model.backbone} width {config.model.width}, head {config.model.head_channels}, '
          f'crop {config.data.crop_size}, batch {config.train.batch_size} labeled + '
          f'{config.train.batch_size} unlabeled, {config.data.num_classes} classes, '
          f'{config.model.dtype}, {devices} device(s)')


def _overhead(config: Any, anchors: str, sizes: Sizes) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.overhead import interleaved_overhead  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.unsup.anchors = anchors
  return interleaved_overhead(config, jax.devices(), rounds=sizes.overhead_rounds,
                              warmup=sizes.warmup)


def run_step_part(record: PartRecord, sizes: Sizes, *, dtype: str, smoke: bool,
                  methods: Sequence[str]) -> None:
  """Step figures per method at the Pascal setting in `dtype`; in float32 also the passes overhead."""
  import jax  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.device_figures import measure_matmul_rate  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.overhead import overhead_percent  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.step import benchmark_methods  # pylint: disable=g-import-not-at-top
  from uccl_jax.models import deeplab  # pylint: disable=g-import-not-at-top
  config = pascal_config(dtype, smoke=smoke)
  devices = jax.devices()
  record.update(**_device_fields(), dtype=dtype, setting=_setting(config, len(devices)),
                timed_steps=sizes.timed_steps, warmup=sizes.warmup)
  matmul = measure_matmul_rate(deeplab.DTYPES[dtype], devices[0], sizes.matmul_size)
  record.update(matmul=matmul, methods=[])
  for method in methods:
    rows = benchmark_methods(config, [method], devices, steps=sizes.timed_steps,
                             warmup=sizes.warmup, matmul=matmul)
    record.update(methods=record.data['methods'] + rows)
  record.update(uccl_overhead_percent=overhead_percent(record.data['methods']))
  if dtype == 'float32':
    if {'unimatch', 'uccl'} <= set(methods):
      record.update(overhead_passes=_overhead(config, 'passes', sizes))
    else:
      record.update(overhead_passes={'not_measured': 'needs unimatch and uccl in --methods'})


def run_pasted_part(record: PartRecord, sizes: Sizes, *, smoke: bool) -> None:
  """The interleaved uccl-over-unimatch overhead with unsup.anchors=pasted, float32."""
  import jax  # pylint: disable=g-import-not-at-top
  config = pascal_config('float32', smoke=smoke)
  record.update(**_device_fields(), dtype='float32', setting=_setting(config, jax.device_count()))
  record.update(overhead_pasted=_overhead(config, 'pasted', sizes))


def _train_records(workdir: pathlib.Path, kind: str) -> list[dict[str, Any]]:
  from uccl_jax import reporting  # pylint: disable=g-import-not-at-top
  return reporting.read_metrics(workdir / reporting.METRICS_FILE, kind)


def run_bf16_training_part(record: PartRecord, sizes: Sizes, *, smoke: bool,
                           work: pathlib.Path) -> None:
  """The demo trained `sizes.train_steps` steps in float32, then in bfloat16; losses compared."""
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  record.update(**_device_fields(), steps=sizes.train_steps, runs={})
  root = ''
  if smoke:
    from uccl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    root = str(synthetic.ensure_dataset(work / 'synthetic', seed=0, num_train=10, num_labeled=2,
                                        num_val=2, size=(32, 64)))
  runs: dict[str, Any] = {}
  for dtype in ('float32', 'bfloat16'):
    config = demo_config(dtype, smoke=smoke, steps=sizes.train_steps, root=root)
    workdir = work / f'demo_{dtype}'
    start = time.perf_counter()
    train.train_and_evaluate(config, str(workdir))
    wall = time.perf_counter() - start
    rows = _train_records(workdir, 'train')
    evals = _train_records(workdir, 'eval')
    runs[dtype] = {'wall_s': wall, 'steps': [int(r['step']) for r in rows],
                   'loss': [float(r['loss']) for r in rows],
                   'final_miou': float(evals[-1]['miou']) if evals else None,
                   'setting': _setting(config, 1).rsplit(', ', 2)[0]}
    record.update(runs=runs)
  if runs['float32']['steps'] != runs['bfloat16']['steps']:
    raise GpuCheckError(f'the two runs logged different steps ({runs["float32"]["steps"]} and '
                        f'{runs["bfloat16"]["steps"]})')
  record.update(comparison=compare_losses(runs['float32']['loss'], runs['bfloat16']['loss'],
                                          window=sizes.loss_window, tolerance=LOSS_TOLERANCE))


def _write_input_dataset(root: pathlib.Path, sizes: Sizes, batch: int) -> tuple[str, str, str]:
  """Generated JPEGs (pipeline benchmark's scenes) and lists long enough for one epoch of timing.

  The unlabeled list repeats the distinct images to batch * steps-per-epoch
  lines (decoding costs the same either way), so no epoch ends, and no
  checkpoint is written, inside the timed steps.
  """
  from uccl_jax.benchmark import pipeline as pipeline_benchmark  # pylint: disable=g-import-not-at-top
  labeled, unlabeled, val = pipeline_benchmark.write_dataset(
      root, sizes.input_source_size, sizes.input_images, num_labeled=batch, image_format='jpg')
  lines = pathlib.Path(unlabeled).read_text().splitlines(keepends=True)
  needed = batch * sizes.input_steps_per_epoch
  long_list = root / 'unlabeled_repeated.txt'
  long_list.write_text(''.join(lines[i % len(lines)] for i in range(needed)))
  return labeled, str(long_list), val


def run_input_part(record: PartRecord, sizes: Sizes, *, smoke: bool, work: pathlib.Path) -> None:
  """Idle fraction of the training loop: the loop's step time against the step alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.random_inputs import random_train_state  # pylint: disable=g-import-not-at-top
  from uccl_jax.benchmark.timing import time_step  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from uccl_jax.models import deeplab  # pylint: disable=g-import-not-at-top
  if (SCHEDULE_STEPS % sizes.input_steps_per_epoch or sizes.input_steps > sizes.input_steps_per_epoch
      or sizes.input_steps % sizes.input_log_every or sizes.input_steps < 2 * sizes.input_log_every):
    raise GpuCheckError('input part: steps must be whole logging windows (at least two) within one '
                        'epoch, and the epoch must divide the schedule')
  config = pascal_config(INPUT_DTYPE, smoke=smoke)
  config.method = 'uccl'
  batch = int(config.train.batch_size)
  labeled, unlabeled, val = _write_input_dataset(work / 'input_data', sizes, batch)
  config.data.root = str(work / 'input_data')
  config.data.labeled_split, config.data.unlabeled_split, config.data.val_split = labeled, unlabeled, val
  config.train.epochs = SCHEDULE_STEPS // sizes.input_steps_per_epoch
  config.train.max_steps = sizes.input_steps
  config.train.log_every_steps = sizes.input_log_every
  config.eval.every_epochs = 0  # one evaluation (one image), after the timed steps
  config.checkpoint.every_steps = SCHEDULE_STEPS
  config.checkpoint.keep = 1
  devices = jax.devices()
  record.update(**_device_fields(), setting=_setting(config, len(devices)),
                source_size=list(sizes.input_source_size),
                workers=pipeline.resolve_workers(int(config.data.workers)),
                available_cpus=pipeline.available_cpus())
  model = deeplab.from_config(config.model, int(config.data.num_classes))
  host_state = random_train_state(config, model, seed=int(config.train.seed),
                                  total_steps=SCHEDULE_STEPS)
  pure = time_step(config, devices, steps=sizes.timed_steps, warmup=sizes.warmup,
                   host_state=host_state)
  del host_state
  record.update(pure={'step_time_s': pure['step_time_s'], 'compile_s': pure['compile_s'],
                      'steps': sizes.timed_steps})
  workdir = work / 'input_run'
  start = time.perf_counter()
  train.train_and_evaluate(config, str(workdir))
  records = _train_records(workdir, 'train')
  loop = loop_step_time(records, skip_windows=1)
  record.update(loop={**loop, 'wall_s': time.perf_counter() - start},
                idle_fraction=idle_fraction(pure['step_time_s'], loop['step_time_s']))


PART_NAMES = ('float32', 'bfloat16', 'bf16_training', 'input', 'pasted')
# Least budget left at which a part still starts: enough for its first figure on an H200.
MIN_START_S = {'float32': 0.0, 'bfloat16': 60.0, 'bf16_training': 60.0, 'input': 45.0,
               'pasted': 75.0}


def run_part(name: str, record_path: pathlib.Path, *, smoke: bool, methods: Sequence[str],
             work: pathlib.Path) -> int:
  """Runs one part in this process (the parent's child); 0 when it finished."""
  sizes = SMOKE if smoke else FULL
  record = PartRecord(record_path, name)
  try:
    if name in ('float32', 'bfloat16'):
      run_step_part(record, sizes, dtype=name, smoke=smoke, methods=methods)
    elif name == 'pasted':
      run_pasted_part(record, sizes, smoke=smoke)
    elif name == 'bf16_training':
      run_bf16_training_part(record, sizes, smoke=smoke, work=work)
    elif name == 'input':
      run_input_part(record, sizes, smoke=smoke, work=work)
    else:
      raise GpuCheckError(f'unknown part {name!r}')
  except Exception as error:  # noqa: BLE001 -- reported in the record; the traceback goes to the log
    traceback.print_exc()
    record.update(status='failed', error=cli.error_line(error))
    return 1
  record.update(status='done')
  return 0


# ----------------------------------------------------------------------------
# The parent: runs the parts in order under the time budget, merges, writes the report.


def _plain(value: Any) -> Any:
  """Strict-JSON value: non-finite floats as the strings 'nan', 'inf', '-inf' (as metrics.jsonl)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  return value


def write_json(path: pathlib.Path, data: Any) -> None:
  """Writes to a sibling and renames, so a reader (or a kill) never sees half a file."""
  partial = path.with_name(path.name + '.partial')
  partial.write_text(json.dumps(_plain(data), indent=1, allow_nan=False) + '\n')
  os.replace(partial, path)


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def child_env(cache_dir: str, *, smoke: bool) -> dict[str, str]:
  """The parts' environment: the compilation cache, the repository importable, fake devices off.

  Fake CPU devices (--xla_force_host_platform_device_count, as the tests set)
  are dropped: the check measures what one process's real devices do, and
  several fake devices on one CPU only multiply compile time. --smoke adds
  XLA's lowest backend optimisation level (about half the CPU compile time;
  smoke figures mean nothing anyway).
  """
  env = dict(os.environ)
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
  if smoke and '--xla_backend_optimization_level' not in xla_flags:
    xla_flags += ' --xla_backend_optimization_level=0'
  env['XLA_FLAGS'] = ' '.join(xla_flags.split())
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  env['PYTHONPATH'] = str(REPO) + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  env['PYTHONUNBUFFERED'] = '1'
  return env


def _stop(proc: subprocess.Popen) -> None:
  """Ends a part's process group (the part and its grain workers): SIGTERM, then SIGKILL."""
  for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait_s)
      return
    except subprocess.TimeoutExpired:
      continue


def _git_revision() -> str | None:
  try:
    proc = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=REPO, capture_output=True,
                          text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() or None


def orchestrate(*, out: pathlib.Path, parts: Sequence[str], smoke: bool, budget_s: float,
                cache_dir: str, methods: Sequence[str], argv: Sequence[str]) -> dict[str, Any]:
  """Runs `parts` in order, each in a child process, within `budget_s`; returns the report."""
  out.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  deadline = start + budget_s
  report: dict[str, Any] = {
      'meta': {'command': ' '.join(['python -m uccl_jax.benchmark gpu_check', *argv]),
               'started': datetime.datetime.now().isoformat(timespec='seconds'),
               'budget_s': budget_s, 'smoke': smoke, 'parts_requested': list(parts),
               'methods': list(methods), 'cache_dir': cache_dir, 'python': platform.python_version(),
               'host': platform.node(), 'revision': _git_revision()},
      'parts': {name: {'name': name, 'status': 'not run'} for name in parts}}

  def publish() -> None:
    report['meta']['elapsed_s'] = round(time.monotonic() - start, 1)
    write_json(out / REPORT_FILE, report)
    (out / SUMMARY_FILE).write_text(format_summary(report))

  work = pathlib.Path(tempfile.mkdtemp(prefix='uccl_gpu_check_'))
  env = child_env(cache_dir, smoke=smoke)
  try:
    with open(out / LOG_FILE, 'w', encoding='utf-8') as log:
      publish()
      for name in parts:
        left = deadline - time.monotonic()
        floor = 0.0 if smoke else MIN_START_S[name]
        if left <= 0 or left < floor:
          report['parts'][name].update(
              status='not run', reason=f'{max(left, 0):.0f} s of the {budget_s:.0f} s budget left '
              f'(the part needs at least {floor:.0f} s to reach a figure)')
          publish()
          continue
        record_path = work / f'{name}.json'
        command = [sys.executable, '-m', 'uccl_jax.benchmark', 'gpu_check', f'--part={name}',
                   f'--record={record_path}', f'--work={work}', f'--methods={",".join(methods)}',
                   *(['--smoke'] if smoke else [])]
        log.write(f'\n===== part {name} ({datetime.datetime.now():%H:%M:%S}, {left:.0f} s of the '
                  f'budget left) =====\n')
        log.flush()
        _progress(f'gpu_check: part {name} ...')
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        cut = False
        while True:
          try:
            proc.wait(timeout=max(0.05, min(POLL_S, deadline - time.monotonic())))
            break
          except subprocess.TimeoutExpired:
            report['parts'][name] = _read_json(record_path) or report['parts'][name]
            publish()
            if time.monotonic() >= deadline:
              _stop(proc)
              cut = True
              break
        part = _read_json(record_path) or {'name': name}
        if cut and part.get('status') != 'done':
          part.update(status='cut off', reason=f'stopped at the end of the {budget_s:.0f} s budget; '
                      'the figures it saved are kept')
        elif part.get('status') not in ('done', 'failed'):
          part.update(status='failed', error=f'the part\'s process ended with exit status '
                      f'{proc.returncode} before finishing (see {LOG_FILE})')
        report['parts'][name] = part
        publish()
        _progress(f'gpu_check: part {name}: {part["status"]}')
  finally:
    shutil.rmtree(work, ignore_errors=True)
  publish()
  return report


def _progress(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def succeeded(report: Mapping[str, Any]) -> bool:
  """Every requested part done, and the bf16 check (when run) passed."""
  parts = report['parts']
  if any(part.get('status') != 'done' for part in parts.values()):
    return False
  comparison = parts.get('bf16_training', {}).get('comparison')
  return comparison is None or bool(comparison.get('passed'))


# ----------------------------------------------------------------------------
# The human-readable summary.


def _num(value: Any, spec: str, scale: float = 1.0) -> str:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    return '-'
  return format(value * scale, spec)


def _status_line(part: Mapping[str, Any]) -> str:
  text = f'{part["name"]}: {part.get("status", "?")}'
  if part.get('elapsed_s') is not None:
    text += f' ({part["elapsed_s"]:.0f} s)'
  for key in ('reason', 'error'):
    if part.get(key):
      text += f'; {part[key]}'
  return text


def _step_section(parts: Mapping[str, Any]) -> list[str]:
  rows = [(name, r) for name in ('float32', 'bfloat16') for r in parts.get(name, {}).get('methods', [])]
  first = next((parts[name] for name in ('float32', 'bfloat16') if parts.get(name, {}).get('setting')),
               None)
  lines = ['1. Step time at the Pascal setting (random inputs, batch already on the device)']
  if first is None:
    return lines + ['   not measured (the float32 and bfloat16 parts did not run)']
  lines.append(f'   {first["setting"].rsplit(", ", 2)[0]}; {first.get("device", "?")}, '
               f'jax {first.get("jax_version", "?")}')
  header = (f'   {"dtype":<9}{"method":<11}{"step s":>8}{"min s":>8}{"img/s":>8}{"compile s":>10}'
            f'{"GFLOP":>9}{"MFU":>7}{"peak GiB":>9}{"XLA GiB":>8}')
  lines += [header, '   ' + '-' * (len(header) - 3)]
  for dtype, r in rows:
    lines.append(f'   {dtype:<9}{r["method"]:<11}{_num(r.get("step_time_s"), "8.4f")}'
                 f'{_num(r.get("step_time_min_s"), "8.4f")}{_num(r.get("images_per_s"), "8.1f")}'
                 f'{_num(r.get("compile_s"), "10.1f")}{_num(r.get("flops_per_step"), "9.1f", 1e-9)}'
                 f'{_num(r.get("mfu"), "7.1%")}{_num(r.get("peak_memory_bytes"), "9.2f", 2**-30)}'
                 f'{_num(r.get("step_memory_bytes"), "8.2f", 2**-30)}')
  for name in ('float32', 'bfloat16'):
    part = parts.get(name, {})
    if part.get('matmul'):
      m = part['matmul']
      lines.append(f'   MFU denominator, {name}: a {m["matmul_size"]}^2 matmul measured at '
                   f'{m["matmul_flops_per_s"] / 1e12:.3g} TFLOP/s on the spot')
    if part.get('status') not in (None, 'done'):
      lines.append(f'   ({_status_line(part)})')
  lines.append('   step s: median of the timed steps (each ended by block_until_ready); GFLOP: XLA\'s '
               'cost analysis; MFU = FLOPs / step time / matmul rate; peak: the process\'s device '
               'peak_bytes_in_use (one process per dtype, methods smallest first, so each row is its '
               'own peak; on CPU the process RSS); XLA GiB: XLA\'s static estimate of the step.')
  return lines


def _overhead_line(label: str, o: Mapping[str, Any] | None) -> str:
  if not o:
    return f'   {label}: not measured'
  if 'not_measured' in o:
    return f'   {label}: not measured ({o["not_measured"]})'
  low, high = o['overhead_percent_quartiles']
  return (f'   {label}: {o["overhead_percent"]:+.1f}% (quartiles {low:+.1f}% to {high:+.1f}%, '
          f'{o["rounds"]} rounds); unimatch {o["unimatch_step_time_s"]:.4f} s, uccl '
          f'{o["uccl_step_time_s"]:.4f} s')


def _overhead_section(parts: Mapping[str, Any]) -> list[str]:
  lines = ['2. SBU+CKR overhead, uccl over unimatch (paper, Table III: +29%)',
           '   interleaved (one step of each per round, AB/BA; median of per-round ratios), float32:']
  lines.append(_overhead_line('unsup.anchors=passes', parts.get('float32', {}).get('overhead_passes')))
  lines.append(_overhead_line('unsup.anchors=pasted', parts.get('pasted', {}).get('overhead_pasted')))
  for name in ('float32', 'bfloat16'):
    value = parts.get(name, {}).get('uccl_overhead_percent')
    if value is not None:
      lines.append(f'   from the {name} table\'s medians (anchors=passes): {value:+.1f}%')
  return lines


def _input_section(part: Mapping[str, Any] | None) -> list[str]:
  lines = [f'3. Does the input pipeline keep up? (training loop, {INPUT_DTYPE} uccl step)']
  if not part or 'pure' not in part:
    return lines + [f'   not measured ({_status_line(part) if part else "part not requested"})']
  size = part.get('source_size', ['?', '?'])
  lines.append(f'   {part["setting"]}; {part["workers"]} grain workers ({part["available_cpus"]} CPUs); '
               f'generated {size[0]}x{size[1]} JPEGs')
  lines.append(f'   pure step (benchmark, batch on the device): {part["pure"]["step_time_s"]:.4f} s '
               f'(median of {part["pure"]["steps"]})')
  if 'loop' not in part:
    return lines + [f'   training loop: not measured ({_status_line(part)})']
  loop, idle = part['loop'], part['idle_fraction']
  verdict = ('the pipeline keeps up' if idle <= IDLE_KEEPS_UP else
             f'the device waits for input {idle:.0%} of the time')
  lines += [f'   training loop (logged step_time, steps {loop["first"]}-{loop["last"]}): '
            f'{loop["step_time_s"]:.4f} s',
            f'   idle fraction = 1 - pure / loop = {idle:+.1%}: {verdict} (threshold {IDLE_KEEPS_UP:.0%})',
            '   Method: the loop (train.train_and_evaluate: grain workers, prefetch to the device, '
            'metrics read every log_every_steps) runs the same compiled program as the pure timing '
            '(same config, same schedule length); its logged step_time is wall time per step over each '
            'logging window, the compile step and the first window (buffers filled during compilation) '
            'left out. Whatever the loop adds to the pure step is time the device had no step to run. '
            'The pure timing ends every step with block_until_ready, so it carries one dispatch '
            'latency per step that the loop overlaps: a few percent either side of 0 is noise.']
  return lines


def _bf16_section(part: Mapping[str, Any] | None) -> list[str]:
  lines = ['4. bfloat16 training against float32 (demo, configs/synthetic.py)']
  if not part or 'comparison' not in part:
    return lines + [f'   not measured ({_status_line(part) if part else "part not requested"})']
  c, runs = part['comparison'], part['runs']
  lines.append(f'   {runs["float32"]["setting"]}; {c["steps"]} steps from the same initial weights '
               'and batches')
  lines.append(f'   mean loss over the last {c["window"]} steps: float32 {_num(c["reference_mean"], ".4f")}, '
               f'bfloat16 {_num(c["candidate_mean"], ".4f")}; relative difference '
               f'{_num(c["relative_difference"], ".2%")} (tolerance {c["tolerance"]:.0%}): '
               f'{"PASS" if c["passed"] else "FAIL"}')
  lines.append(f'   first step: {_num(c["first_step_relative_difference"], ".2%")} apart; largest '
               f'single-step difference in the window {_num(c["max_step_relative_difference"], ".1%")}; '
               f'the float32 loss moves by {_num(c["reference_std"], ".4f")} (std) over the window')
  lines.append(f'   final mIoU: float32 {_num(runs["float32"]["final_miou"], ".2f")}, bfloat16 '
               f'{_num(runs["bfloat16"]["final_miou"], ".2f")} (one evaluation each; not part of the check)')
  return lines


def format_summary(report: Mapping[str, Any]) -> str:
  """The report as text: part statuses, then one section per figure, each with its method."""
  meta, parts = report['meta'], report['parts']
  lines = [f'uccl_jax GPU check{" (SMOKE: tiny network, figures meaningless)" if meta["smoke"] else ""}',
           f'started {meta["started"]} on {meta.get("host", "?")}, revision {meta.get("revision")}; '
           f'{meta.get("elapsed_s", 0):.0f} s of a {meta["budget_s"]:.0f} s budget',
           f'command: {meta["command"]}', '', 'parts:']
  lines += [f'  {_status_line(part)}' for part in parts.values()]
  missing = [name for name, part in parts.items() if part.get('status') != 'done']
  if missing:
    lines.append(f'  to finish (compiled programs are cached in {meta["cache_dir"]}): '
                 f'launch/gpu_check.sh --parts={",".join(missing)}' + (' --smoke' if meta['smoke'] else ''))
  lines.append('')
  lines += _step_section(parts) + [''] + _overhead_section(parts) + ['']
  lines += _input_section(parts.get('input')) + [''] + _bf16_section(parts.get('bf16_training'))
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------
# Command line.


@dataclasses.dataclass(frozen=True)
class _Args:
  """The parsed command line, checked."""
  out: str
  parts: list[str]
  methods: list[str]
  smoke: bool
  budget_s: float
  cache_dir: str
  part: str  # the next three: set by the parent command to run one part in a child process
  record: str
  work: str


def _define_flags() -> flags.FlagValues:
  """The flags on a private FlagValues, so that importing or running this defines nothing global."""
  values = flags.FlagValues()
  flags.DEFINE_string('out', DEFAULT_OUT, 'Output folder (three files).', flag_values=values)
  flags.DEFINE_list('parts', list(PART_NAMES), 'Parts to run, in this order; from '
                    f'{",".join(PART_NAMES)}.', flag_values=values)
  flags.DEFINE_list('methods', list(METHODS), 'Methods of the float32 and bfloat16 step parts.',
                    flag_values=values)
  flags.DEFINE_bool('smoke', False, 'Tiny network and data, few steps.', flag_values=values)
  flags.DEFINE_float('budget_s', DEFAULT_BUDGET_S, 'Wall-clock budget of all parts together, '
                     'seconds.', flag_values=values)
  flags.DEFINE_string('cache_dir', '', 'JAX compilation cache (default: $JAX_COMPILATION_CACHE_DIR, '
                      f'else {DEFAULT_CACHE_DIR.relative_to(REPO)}).', flag_values=values)
  for name in ('part', 'record', 'work'):
    flags.DEFINE_string(name, '', 'Internal: set by the parent command to run one part in a child '
                        'process.', flag_values=values)
  return values


def _parse(argv: Sequence[str]) -> _Args | None:
  """The checked flags of `argv` (argv[0] is 'gpu_check'); None after printing --help.

  Raises:
    cli.CommandLineError: a bad flag or value (one line naming it).
  """
  values = _define_flags()
  if not subcommand.parse(argv, values, __doc__):
    return None
  parts = [p.strip() for p in values.parts if p.strip()]
  unknown = [p for p in parts if p not in PART_NAMES]
  if unknown or not parts or len(set(parts)) != len(parts):
    raise cli.CommandLineError(f'--parts={",".join(parts)}: expected distinct names from '
                               f'{",".join(PART_NAMES)}')
  methods = [m.strip() for m in values.methods if m.strip()]
  if not methods or any(m not in METHODS for m in methods):
    raise cli.CommandLineError(f'--methods={",".join(methods)}: expected names from '
                               f'{",".join(METHODS)}')
  if not values.budget_s > 0:
    raise cli.CommandLineError(f'--budget_s={values.budget_s}: must be positive')
  if values.part and values.part not in PART_NAMES:
    raise cli.CommandLineError(f'--part={values.part}: expected one of {",".join(PART_NAMES)}')
  if values.part and not (values.record and values.work):
    raise cli.CommandLineError('--part needs --record and --work (it is started by the parent '
                               'command)')
  return _Args(out=values.out, parts=parts, methods=methods, smoke=values.smoke,
               budget_s=values.budget_s, cache_dir=values.cache_dir, part=values.part,
               record=values.record, work=values.work)


def main(argv: Sequence[str]) -> int:
  """`argv[0]` is 'gpu_check'; returns the exit status (see the module docstring)."""
  try:
    args = _parse(argv)
  except cli.CommandLineError as error:
    return subcommand.fail(error)
  if args is None:  # --help
    return 0
  if args.part:
    return run_part(args.part, pathlib.Path(args.record), smoke=args.smoke, methods=args.methods,
                    work=pathlib.Path(args.work))
  cache_dir = args.cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(DEFAULT_CACHE_DIR)
  out = pathlib.Path(args.out).resolve()
  report = orchestrate(out=out, parts=args.parts, smoke=args.smoke, budget_s=args.budget_s,
                       cache_dir=str(pathlib.Path(cache_dir).resolve()), methods=args.methods,
                       argv=argv[1:])
  print((out / SUMMARY_FILE).read_text(), end='', flush=True)
  print(f'wrote {out / REPORT_FILE}, {out / SUMMARY_FILE}, {out / LOG_FILE}')
  return 0 if succeeded(report) else 1


if __name__ == '__main__':
  sys.exit(main(['gpu_check', *sys.argv[1:]]))
