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


def _one_line(error: BaseException) -> str:
  """The most specific one-line description of `error` (root cause of a chain)."""
  while error.__cause__ is not None and not str(error).strip():
    error = error.__cause__
  text = ' '.join(str(error).split())
  return text or type(error).__name__


def _fail(message: str, status: int = 1) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with every flag or config-file problem reported in one line."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg[len('--config='):].split(':', 1)[0]
      if not os.path.isfile(path):
        _fail(f'--config: no such file {path}', 2)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_last_line(e) if 'Traceback' in str(e) else _one_line(e), 2)
  except (AttributeError, KeyError) as e:  # config_flags: an override names no field.
    _fail(_unknown_field_message(argv, e), 2)
  except Exception as e:  # noqa: BLE001 -- a config file that fails to load or to apply overrides.
    _fail(f'--config: {_last_line(e)}', 2)
  _load_config_now()
  return rest


def _unknown_field_message(argv: Sequence[str], error: BaseException) -> str:
  """Names the `--config.a.b=...` override whose field does not exist."""
  field = str(error).strip('"\' ')
  for arg in argv:
    path = arg.split('=', 1)[0]
    if path.startswith('--config.') and path.split('.')[-1] == field or f'.{field}.' in path:
      return f'{path}: no such config field ({field!r}; see uccl_jax/config.py for the schema)'
  return f'--config: no such config field {field!r} (see uccl_jax/config.py for the schema)'


def _last_line(error: BaseException) -> str:
  """The final line of a message that embeds a traceback (config_flags does), else the message."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    return lines[-1]
  return ' '.join(lines) or type(error).__name__


def _load_config_now() -> None:
  """Forces loading the config so that a missing/broken file fails during parsing."""
  try:
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # an unloadable file gives an object that raises on any access
  except Exception as e:  # noqa: BLE001 -- config_flags defers load errors to first access.
    _fail(f'--config: {_last_line(e)}', 2)


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
    _fail(_one_line(e))


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
