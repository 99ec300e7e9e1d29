r"""Dataset checker: `python -m uccl_jax.data --config=configs/<dataset>.py [--config.x=...] [--preview=FILE.png]`.

Reads every record of the labeled, unlabeled and val splits as training will,
prints the counts and the per-class pixel share, optionally writes a preview
grid (columns: crop, mask, weak, strong 1, strong 2; CutMix boxes outlined),
and exits non-zero with one line per problem (file and split-file line)
before hours of training are spent on a broken dataset. Library logs stay off
the console unless --log_level asks for them.

Examples:
  python -m uccl_jax.data --config=configs/cityscapes.py --config.data.root=/data/cityscapes \
      --preview=preview.png
  python -m uccl_jax.data --config=configs/pascal.py:183 --config.data.root=/data/VOC2012
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from uccl_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<dataset>.py[:split]).',
                                          lock_config=True)
_PREVIEW = flags.DEFINE_string('preview', None, 'Write a PNG grid of a few training samples to this file.')
_SAMPLES = flags.DEFINE_integer('samples', 3, 'Rows of the preview grid.')
_THREADS = flags.DEFINE_integer('threads', 0, 'Decoding threads (0 = twice the CPU count, at most 16).')
_LOG_LEVEL = cli.define_log_level_flag()
flags.declare_key_flag('log_level')  # listed by --help with this module's flags


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  cli.setup_console(_LOG_LEVEL.value)
  from uccl_jax.data import check  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import classes  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if config is None:
    print('error: --config is required, e.g. --config=configs/cityscapes.py', file=sys.stderr)
    return 2
  try:
    class_table = classes.for_dataset(config.data.name)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if class_table.num_classes != config.data.num_classes:
    print(f'warning: data.num_classes={config.data.num_classes} but {config.data.name} has '
          f'{class_table.num_classes} classes', file=sys.stderr)
  reports = check.check_dataset(config, threads=_THREADS.value or None)
  print(check.format_report(reports, class_table))
  found = check.problems(reports)
  if not found and _PREVIEW.value:
    try:
      grid = check.preview_grid(config, num_samples=_SAMPLES.value)
      from PIL import Image  # pylint: disable=g-import-not-at-top
      Image.fromarray(grid).save(_PREVIEW.value)
      print(f'preview written to {_PREVIEW.value}')
    except OSError as error:
      found.append(f'--preview={_PREVIEW.value}: {cli.os_error_line(error)}')
    except (sources.DataError, ValueError) as error:
      found.append(f'--preview: {error}')
  for problem in found:
    print(f'error: {problem}', file=sys.stderr)
  if found:
    print(f'{len(found)} problem(s) found', file=sys.stderr)
    return 1
  print('dataset OK')
  return 0


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a flag or config-file problem reported in one line (exit status 2).

  --help, -h and --helpfull print this module's docstring as written and exit 0.
  """
  help_flag = cli.wants_help(argv)
  if help_flag:
    cli.exit_with_help(__doc__, flags.FLAGS, help_flag, module=sys.argv[0])
  try:
    return cli.parse_flags(flags.FLAGS, argv, _CONFIG)
  except cli.CommandLineError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


def run() -> None:
  """app.run with the checker's status; Ctrl-C ends as one line `interrupted`, status 130."""
  cli.run_app(lambda argv: sys.exit(main(argv)), _parse_flags)


if __name__ == '__main__':
  run()
