"""Command line: `python -m uccl_jax.main --config=PATH.py[:arg] --workdir=DIR [--mode=train|eval]`.

Kept tiny on purpose: parse flags, set up logging, join the other processes
(`jax.distributed`), then hand over to `uccl_jax.train`. Every expected failure
(bad config value, missing data, missing checkpoint, impossible batch size)
ends as one line on stderr and a non-zero exit status, never a traceback.

Examples:
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m uccl_jax.main --config=configs/cityscapes.py:1_8 --workdir=runs/cs_1_8 \
      --config.data.root=/data/cityscapes
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo --mode=eval \
      --checkpoint=best
Multi-process: launch/local.sh (one machine) or launch/slurm.sh (a cluster).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Sequence

from absl import app
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


def _fail(message: str, status: int = 1) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with every flag or config-file problem reported in one line."""
  try:
    return cli.parse_flags(flags.FLAGS, argv, _CONFIG)
  except cli.CommandLineError as e:
    _fail(str(e), 2)


class _OwnInfoOnly(std_logging.Filter):
  """Passes INFO records of uccl_jax and WARNING+ of everyone: orbax logs every save at INFO."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f'{os.sep}uccl_jax{os.sep}' in record.pathname


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
  if _CONFIG.value is None:
    _fail('--config is required (e.g. --config=configs/synthetic.py)', 2)
  if not _WORKDIR.value:
    _fail('--workdir is required', 2)
  # absl logs to stderr; keep INFO for process 0 only, warnings from the others.
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())

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
    _fail(cli.error_line(e))


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
