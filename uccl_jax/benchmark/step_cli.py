"""Measures the train step: time, compile time, FLOPs, MFU, memory, and what bounds training.

usage:
  python -m uccl_jax.benchmark [--config=FILE[:ARG]] [--config.a.b=VALUE ...] [flags]
      The step benchmark (uccl_jax/benchmark/step.py) on random inputs of the
      config's shapes: no dataset is read. Default config: configs/pascal.py.
  python -m uccl_jax.benchmark losses|pipeline|eval|gpu_check|ablation|teacher [flags]
      One named benchmark: SBU + CKR against per-image loops | the host's cost
      per training step | evaluation images/s | every GPU figure of
      docs/RESULTS.md | the paper's Table III rows on the demo dataset | the
      pseudo-label quality of a run's checkpoint.

examples:
  python -m uccl_jax.benchmark --config=configs/pascal.py --methods=unimatch,uccl --json=step.json
  python -m uccl_jax.benchmark --config=configs/cityscapes.py --steps=0 --nopipeline
  python -m uccl_jax.benchmark --config=configs/synthetic.py --scaling --scaling_devices=1,2,4
  python -m uccl_jax.benchmark pipeline --workers=4

Exit status 0 on success, 2 with one line on stderr for a bad flag or config
value. --steps=0 compiles only: the FLOPs and XLA's memory estimate of a
setting too large to run on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
import jax
import ml_collections

from uccl_jax import cli
from uccl_jax import parallel
from uccl_jax import step as step_lib
from uccl_jax.benchmark.step import BenchmarkError
from uccl_jax.benchmark.step import run
from uccl_jax.benchmark.step_report import format_report

REPO_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / 'configs'
DEFAULT_CONFIG = REPO_CONFIG_DIR / 'pascal.py'


@dataclasses.dataclass
class _Flags:
  """The parsed command line, checked."""
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


def _define_flags(values: flags.FlagValues, command_line: Sequence[str]) -> flags.FlagHolder:
  """The flags on a private FlagValues (so the module can run twice in one process); returns --config.

  The config's `--config.a.b=...` overrides are read from `command_line`.
  """
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
  default = str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None
  return cli.define_config_flag(values, command_line, default,
                                'Config file (configs/*.py[:arg]); default: the Pascal recipe.')


def _help_text(full: bool) -> str:
  """The docstring as written (absl's own help would run the examples together), then the flags."""
  values = flags.FlagValues()
  try:
    _define_flags(values, ['benchmark'])
  except cli.CommandLineError:  # the default config fails to load: show the flags without it
    pass
  return cli.help_text(__doc__, values, full=full)


def _parse_flags(argv: Sequence[str], *, fake_devices_added: bool) -> _Flags:
  """The parsed flags and config; BenchmarkError (one line) for any problem."""
  if not any(arg.startswith('--config=') for arg in argv) and not DEFAULT_CONFIG.is_file():
    raise BenchmarkError(f'--config is required ({DEFAULT_CONFIG} does not exist here)')
  command_line = ['benchmark', *argv]
  values = flags.FlagValues()
  try:
    config_flag = _define_flags(values, command_line)
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
  """`argv` without the program name; prints the table; returns the exit status.

  `fake_devices_added`: __main__ asked XLA for fake CPU devices for --scaling,
  so the per-method timing runs on one of them.
  """
  help_flag = cli.wants_help(['benchmark', *argv])
  if help_flag:
    print(_help_text(full=help_flag == '--helpfull'), end='')
    return 0
  try:
    parsed = _parse_flags(argv, fake_devices_added=fake_devices_added)
    if parsed.json:
      _write_json(parsed.json, None)  # a path that cannot be written fails now, not after the run
    report = run(parsed.config, methods=parsed.methods, steps=parsed.steps, warmup=parsed.warmup,
                 num_devices=parsed.devices, matmul_size=parsed.matmul_size,
                 pipeline=parsed.pipeline, losses=parsed.losses, scaling=parsed.scaling,
                 scaling_method=parsed.scaling_method, scaling_devices=parsed.scaling_devices,
                 pipeline_source_size=parsed.pipeline_source_size,
                 overhead_rounds=parsed.overhead_rounds)
    print(format_report(report), flush=True)
    if parsed.json:
      _write_json(parsed.json, report)
      print(f'wrote {parsed.json}')
  except (BenchmarkError, parallel.BatchSizeError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


def _write_json(path: str, report: dict[str, Any] | None) -> None:
  """Writes `report` to `path` through a temporary sibling, so a failure never leaves half a file.

  With `report` None only checks that `path` can be written (and leaves nothing).
  """
  target = pathlib.Path(path)
  partial = target.with_name(target.name + '.partial')
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text('' if report is None else json.dumps(report, indent=1) + '\n')
    if report is None:
      partial.unlink()
    else:
      os.replace(partial, target)
  except OSError as error:
    raise BenchmarkError(f'--json={path}: cannot write {error.filename or path} '
                         f'({error.strerror or error}); choose a path you can write to') from None
