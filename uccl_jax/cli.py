"""Command-line plumbing shared by the entry points: the config flag and one-line errors.

Why: training, prediction and the benchmarks all take `--config=FILE[:arg]`
with `--config.a.b=value` overrides through ml_collections, whose errors come
as several lines with an embedded traceback, or only on first access to the
config. The project's rule is one clear line naming the file or field, so the
parsing and the error translation live here once.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence

from absl import flags
from ml_collections import config_flags


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


class CommandLineError(ValueError):
  """A flag or config problem, as one line that names the flag, file or field."""


def error_line(error: BaseException) -> str:
  """The most specific one-line description of `error`.

  An empty message defers to its cause. A message that embeds a traceback
  (config_flags does that when a config file raises) keeps the text before the
  traceback, the exception line at its end and the innermost 'File, line' it
  names, e.g. "flag --config=c.py: Error whilst parsing config file:
  ValueError: no root (c.py, line 2)". Any other message is joined into one line.
  """
  while error.__cause__ is not None and not str(error).strip():
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  starts = [i for i, line in enumerate(lines) if line.startswith('Traceback')]
  if starts:
    head = ' '.join(lines[:starts[0]])
    where = [match.groups() for match in map(_FRAME.match, lines[starts[-1]:]) if match]
    text = f'{head} {lines[-1]}'.strip()
    return f'{text} ({where[-1][0]}, line {where[-1][1]})' if where else text
  return ' '.join(lines) or type(error).__name__


def unknown_field_message(argv: Sequence[str], error: BaseException) -> str:
  """Names the `--config.a.b=...` override whose field does not exist (config_flags' KeyError)."""
  field = str(error).strip('"\' ')
  for arg in argv:
    path = arg.split('=', 1)[0]
    if path.startswith('--config.') and (path.split('.')[-1] == field or f'.{field}.' in path):
      return f'{path}: no such config field ({field!r}; see uccl_jax/config.py for the schema)'
  return f'--config: no such config field {field!r} (see uccl_jax/config.py for the schema)'


@contextlib.contextmanager
def _one_line_errors(argv: Sequence[str]) -> Iterator[None]:
  """Turns what absl and config_flags raise while parsing into CommandLineError."""
  try:
    yield
  except flags.Error as error:
    raise CommandLineError(error_line(error)) from None
  except (AttributeError, KeyError) as error:  # config_flags: an override names no field
    raise CommandLineError(unknown_field_message(argv, error)) from None
  except Exception as error:  # noqa: BLE001 -- a config file that fails to load or to apply overrides
    raise CommandLineError(f'--config: {error_line(error)}') from None


def define_config_flag(values: flags.FlagValues, argv: Sequence[str], default: str | None,
                       help_text: str) -> flags.FlagHolder:
  """`--config` on a private FlagValues, its overrides read from `argv` (not sys.argv).

  With a default file, config_flags loads it and applies the overrides while
  defining the flag, so problems can surface here already.

  Raises:
    CommandLineError: the default file fails to load or an override is wrong.
  """
  with _one_line_errors(argv):
    return config_flags.DEFINE_config_file('config', default, help_text, flag_values=values,
                                           lock_config=True, sys_argv=list(argv))


def parse_flags(values: flags.FlagValues, argv: Sequence[str],
                config: flags.FlagHolder) -> list[str]:
  """Parses `argv` (argv[0] is the program) into `values` and loads the config file now.

  `config` is the `--config` holder on `values` (from `define_config_flag`,
  or `config_flags.DEFINE_config_file` on absl's global FLAGS). Returns the
  arguments left over.

  Raises:
    CommandLineError: a missing config file, a file that fails to load, an
      override naming no field or of the wrong type, or a bad flag.
  """
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg[len('--config='):].split(':', 1)[0]
      if not os.path.isfile(path):
        raise CommandLineError(f'--config: no such file {path}')
  with _one_line_errors(argv):
    rest = values(list(argv))
    if config.value is not None:
      config.value.keys()  # config_flags defers load errors to the first access
  return rest
