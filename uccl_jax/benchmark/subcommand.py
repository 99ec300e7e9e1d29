"""The command line of a named benchmark (`python -m uccl_jax.benchmark eval|pipeline|losses|gpu_check`).

Why: every command of the project follows one style (issue 13): absl flags
with underscores on a private FlagValues, the dashed spellings of the argparse
releases accepted for one release with a one-line warning, `--help` / `-h` /
`--helpfull` printing the module docstring as written (its examples keep their
line breaks) and exiting 0, and every bad flag one `error: ...` line on stderr
with status 2. The named benchmarks share this parsing here; the flags and
their checks stay in each benchmark's module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from uccl_jax import cli

USAGE_STATUS = 2  # a bad command line


def parse(argv: Sequence[str], values: flags.FlagValues, doc: str | None) -> bool:
  """Parses `argv` (argv[0] is the benchmark's name) into `values`; False after printing the help.

  Raises:
    cli.CommandLineError: an unknown flag, a value of the wrong type or an
      argument that is not a flag (one line naming it).
  """
  help_flag = cli.wants_help(argv)
  if help_flag:
    sys.stdout.write(cli.help_text(doc, values, full=help_flag == '--helpfull'))
    sys.stdout.flush()
    return False
  try:
    rest = values(cli.rewrite_dashed_flags(list(argv), values))
  except flags.Error as error:
    raise cli.CommandLineError(cli.error_line(error)) from None
  if len(rest) > 1:
    raise cli.CommandLineError(f'unexpected arguments: {" ".join(rest[1:])} (flags are '
                               '--name=value)')
  return True


def fail(error: BaseException) -> int:
  """Prints `error` as one `error: ...` line on stderr; returns the status of a bad command line."""
  print(f'error: {" ".join(str(error).split())}', file=sys.stderr, flush=True)
  return USAGE_STATUS


def parse_size(text: str, flag: str) -> tuple[int, int]:
  """'HxW' -> (H, W); CommandLineError (one line naming `flag`) for anything else."""
  try:
    height, width = (int(part) for part in text.lower().split('x'))
  except ValueError:
    raise cli.CommandLineError(f'{flag}={text}: expected an image size HxW like 1024x2048') from None
  if height <= 0 or width <= 0:
    raise cli.CommandLineError(f'{flag}={text}: the image size must be positive')
  return height, width


def require_positive(values: flags.FlagValues, *names: str) -> None:
  """CommandLineError naming the first of the integer flags `names` below 1."""
  for name in names:
    if values[name].value < 1:
      raise cli.CommandLineError(f'--{name}={values[name].value}: must be >= 1')
