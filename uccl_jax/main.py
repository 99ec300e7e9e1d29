r"""Command line: `python -m uccl_jax.main --config=PATH.py[:arg] --workdir=DIR [--mode=train|eval]`.

Kept tiny on purpose: parse flags, set up logging, join the other processes
(`jax.distributed`), then hand over to `uccl_jax.train`. Every expected failure
(bad flag or config value, missing data, missing checkpoint, impossible batch
size, a --workdir that is a file or cannot be written, an unwritable path)
ends as one line on stderr (`error: ...`, naming the flag, file or field) and a
non-zero exit status, never a traceback; a second Ctrl-C ends as `interrupted`
(status 130). Bugs keep their traceback. The console shows this project's
lines only; `--log_level=warning` (or info) brings the libraries' logs back.

Examples:
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m uccl_jax.main --config=configs/cityscapes.py:1_8 --workdir=runs/cs_1_8 \
      --config.data.root=/data/cityscapes
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo --mode=eval \
      --checkpoint=best
Multi-process: launch/local.sh (one machine) or launch/slurm.sh (a cluster).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from uccl_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py), optionally with an argument: configs/pascal.py:183.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics.jsonl, TensorBoard events.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train (resumes from the newest checkpoint in --workdir) or eval.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'best',
    "For --mode=eval: 'best' (highest val mIoU), 'latest', a step number, or a folder "
    '(run folder, checkpoints folder or one step folder).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for multi-process runs outside SLURM (with --num_processes, --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')
_LOG_LEVEL = cli.define_log_level_flag()
flags.declare_key_flag('log_level')  # listed by --help with this module's flags


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with every flag or config-file problem reported in one line; --help exits 0."""
  return cli.parse_command_line(argv, flags.FLAGS, _CONFIG, __doc__)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
  if _CONFIG.value is None:
    cli.fail('--config is required (e.g. --config=configs/synthetic.py)', 2)
  if not _WORKDIR.value:
    cli.fail('--workdir is required', 2)
  # absl logs to stderr: this package's INFO for process 0 only (warnings from the others),
  # the libraries' lines (orbax logs every save) only at --log_level.
  cli.setup_console(_LOG_LEVEL.value)
  try:  # before anything is read or written: a run folder that cannot be one is one line
    if _MODE.value == 'train':
      cli.check_output_dir(_WORKDIR.value, '--workdir')
    elif os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
      raise cli.CommandLineError(f'--workdir={_WORKDIR.value}: is a file, not a run folder')
  except cli.CommandLineError as e:
    cli.fail(str(e), 2)

  # Imported here so that `--help` and flag errors stay fast.
  from uccl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from uccl_jax import parallel  # pylint: disable=g-import-not-at-top
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top

  expected = (train.RunError, checkpoint.CheckpointError, sources.DataError, pipeline.PipelineError,
              parallel.BatchSizeError, parallel.DistributedSetupError)
  try:
    parallel.initialize_distributed(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value)
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
  except expected as e:
    cli.fail(cli.error_line(e))
  except OSError as e:  # an unwritable or vanished path somewhere in the run: name it
    cli.fail(_os_error_message(e, _WORKDIR.value))


def _os_error_message(error: OSError, workdir: str) -> str:
  """'PATH: reason', with the way out when PATH lies in the run folder."""
  line = cli.os_error_line(error)
  paths = [os.path.abspath(str(p)) for p in (error.filename, error.filename2) if p is not None]
  root = os.path.abspath(workdir)
  if any(p == root or p.startswith(root + os.sep) for p in paths):
    return f'{line} (in --workdir={workdir}: make it writable or choose another --workdir)'
  return line


def run() -> None:
  """absl's app.run, with a KeyboardInterrupt (a second Ctrl-C) as one line and status 130.

  The first Ctrl-C is the training loop's: it saves and stops at the next step.
  """
  cli.run_app(main, _parse_flags)


if __name__ == '__main__':
  run()
