"""Command-line plumbing shared by the entry points: config flag, one-line errors, help, console.

Why: training (`uccl_jax.main`), prediction (`uccl_jax.predict`), the dataset
checker (`uccl_jax.data`) and the benchmarks all take `--config=FILE[:arg]`
with `--config.a.b=value` overrides through ml_collections, whose errors come
as several lines with an embedded traceback, or only on first access to the
config. The project's rule: every expected failure is one line on stderr
(`error: ...`) naming the flag, file or config field and the way out, and the
console shows this project's lines, not the libraries' (orbax alone logs
~170 INFO/WARNING lines in the demo). The parsing, the error translation, the
help text and the console policy live here once, so the commands agree.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import uccl_jax

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_SUGGESTION = re.compile(r'Did you mean "([^"]+)"')
HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull')
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT
YAML_DOC = 'docs/UNIMATCH_CONFIG.md'


class CommandLineError(ValueError):
  """A flag or config problem, as one line that names the flag, file or field."""


# ----------------------------------------------------------------------------
# One-line errors.


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


def os_error_line(error: OSError) -> str:
  """'PATH: reason' for an OSError (the path first: it is what the user has to change)."""
  reason = error.strerror or error_line(error)
  paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
  if not paths:
    return reason
  return f'{" -> ".join(paths)}: {reason}'


def _message_text(error: BaseException) -> str:
  """The innermost string argument (config_flags wraps a KeyError's text in an AttributeError)."""
  value: Any = error
  while isinstance(value, BaseException) and value.args:
    value = value.args[0]
  return value if isinstance(value, str) else str(value)


def unknown_field_message(argv: Sequence[str], error: BaseException) -> str:
  """Names the `--config.a.b=...` override whose field does not exist (config_flags' KeyError).

  E.g. '--config.train.batch_sise: no such config field (did you mean batch_size?)'.
  """
  text = _message_text(error)
  field = text.splitlines()[0].strip('"\' ') if text.strip() else ''
  suggestion = _SUGGESTION.search(text)
  hint = (f'did you mean {suggestion.group(1)}?' if suggestion
          else 'see uccl_jax/config.py for the schema')
  for arg in argv:
    path = arg.split('=', 1)[0]
    parts = path.split('.')
    if path.startswith('--config.') and field and field in parts[1:]:
      return f'{path}: no such config field ({hint})'
  where = f'--config.{field}' if field else '--config'
  return f'{where}: no such config field ({hint})'


def _flag_error_message(error: flags.Error) -> str:
  """absl's 'flag --config.a.b=v: parser message' as 'config field a.b=v: wrong type (...)'."""
  text = error_line(error)
  match = re.match(r'flag (--config\.[\w.]+)=(.*?): (.*)$', text)
  if not match:
    return text
  path, value, reason = match.groups()
  return f'{path}={value}: wrong type for this config field ({reason})'


@contextlib.contextmanager
def _one_line_errors(argv: Sequence[str]) -> Iterator[None]:
  """Turns what absl and config_flags raise while parsing into CommandLineError."""
  try:
    yield
  except flags.Error as error:
    raise CommandLineError(_flag_error_message(error)) from None
  except (AttributeError, KeyError) as error:  # config_flags: an override names no field
    raise CommandLineError(unknown_field_message(argv, error)) from None
  except TypeError as error:  # ml_collections: a locked field given a value of another type
    raise CommandLineError(f'--config: {error_line(error)} (see uccl_jax/config.py for the '
                           'field types)') from None
  except Exception as error:  # noqa: BLE001 -- a config file that fails to load or to apply overrides
    raise CommandLineError(f'--config: {error_line(error)}') from None


def _check_config_path(argv: Sequence[str]) -> None:
  """A `--config=` that names no file, or a UniMatch/UCCL YAML file, is one line before absl runs it."""
  for arg in argv[1:]:
    if not arg.startswith('--config='):
      continue
    path = arg[len('--config='):].split(':', 1)[0]
    if path.lower().endswith(('.yaml', '.yml')):
      raise CommandLineError(
          f'--config={path}: configs here are Python files (configs/*.py), not UniMatch/UCCL YAML; '
          f'{YAML_DOC} maps each YAML key to its config field (e.g. --config=configs/cityscapes.py)')
    if not os.path.isfile(path):
      raise CommandLineError(f'--config: no such file {path}')


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
    CommandLineError: a missing config file, a YAML config, a file that fails
      to load, an override naming no field or of the wrong type, or a bad flag.
  """
  _check_config_path(argv)
  with _one_line_errors(argv):
    rest = values(list(argv))
    if config.value is not None:
      config.value.keys()  # config_flags defers load errors to the first access
  return rest


def rewrite_dashed_flags(argv: Sequence[str], values: flags.FlagValues) -> list[str]:
  """`--save-probs` -> `--save_probs` (and `--nosave-probs`) for flags defined with underscores.

  The old dashed spellings keep working for one release; each one used prints
  one `warning: --a-b is deprecated; use --a_b` line on stderr.
  """
  rewritten = [argv[0]] if argv else []
  for arg in argv[1:]:
    name, sep, value = arg.partition('=')
    if arg.startswith('--') and '-' in name[2:] and not name.startswith('--config'):
      bare = name[2:]
      negated = bare.startswith('no') and bare[2:].replace('-', '_') in values
      new_name = '--' + ('no' + bare[2:].replace('-', '_') if negated else bare.replace('-', '_'))
      if new_name[2:] in values or negated:
        print(f'warning: {name} is deprecated; use {new_name}', file=sys.stderr, flush=True)
        arg = new_name + sep + value
    rewritten.append(arg)
  return rewritten


def fail(message: str, status: int = 1) -> NoReturn:
  """Ends the command: `error: message` as the one line on stderr, then exit `status`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_command_line(argv: Sequence[str], values: flags.FlagValues, config: flags.FlagHolder,
                       doc: str | None) -> list[str]:
  """absl's `flags_parser` for a command with `--config`: `--help` prints `doc` and exits 0,
  any flag or config problem is one line and exit status 2."""
  help_flag = wants_help(argv)
  if help_flag:
    exit_with_help(doc, values, help_flag, module=sys.argv[0])
  try:
    return parse_flags(values, argv, config)
  except CommandLineError as error:
    fail(str(error), 2)


# ----------------------------------------------------------------------------
# Help.


def wants_help(argv: Sequence[str]) -> str | None:
  """The help flag in `argv[1:]` ('--help', '-h', '--helpfull', ...), or None."""
  return next((arg for arg in argv[1:] if arg in HELP_FLAGS), None)


def help_text(doc: str | None, values: flags.FlagValues, *, full: bool = False,
              module: str | None = None) -> str:
  """The module docstring as written (examples keep their line breaks and `\\` continuations),
  then the command's flags (`full`: every flag, absl's own included).

  absl's own help folds the docstring's whitespace, which runs the examples together.
  """
  if full:
    listing = values.get_help()
  elif module is not None:
    listing = values.module_help(module)
  else:
    listing = values.get_help()
  return f'{(doc or "").strip()}\n\nFlags:\n{listing}\n'


def exit_with_help(doc: str | None, values: flags.FlagValues, flag: str,
                   module: str | None = None) -> None:
  """Prints `help_text` to stdout and exits 0 (absl's own --help exits 1)."""
  sys.stdout.write(help_text(doc, values, full=flag == '--helpfull', module=module))
  sys.stdout.flush()
  sys.exit(0)


# ----------------------------------------------------------------------------
# Console policy.

LOG_LEVELS = ('none', 'error', 'warning', 'info', 'debug')
_LEVEL_NUMBERS = {'none': std_logging.CRITICAL + 1, 'error': std_logging.ERROR,
                  'warning': std_logging.WARNING, 'info': std_logging.INFO,
                  'debug': std_logging.DEBUG}
PACKAGE_DIR = os.path.realpath(os.path.dirname(uccl_jax.__file__))


def define_log_level_flag(values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """`--log_level`: the lowest level of library log lines (orbax, jax, grain) shown on the console."""
  return flags.DEFINE_enum(
      'log_level', 'none', LOG_LEVELS,
      "Library log lines (orbax, jax, grain, ...) shown on stderr: 'none' (default) hides them all, "
      "warnings included; 'warning' or 'info' brings them back. This project's own lines are "
      'always shown.', flag_values=values)


def is_own_record(record: std_logging.LogRecord, package_dir: str = PACKAGE_DIR) -> bool:
  """True for a log record written by this package's code.

  By the logger name (`uccl_jax.*`) or by the file that wrote it: absl's
  records all come from the 'absl' logger, orbax's included, and carry the
  caller's path. The path must lie inside the installed package folder itself,
  not merely contain 'uccl_jax' (a clone named uccl_jax holds .venv/.../orbax).
  """
  if record.name == 'uccl_jax' or record.name.startswith('uccl_jax.'):
    return True
  path = os.path.realpath(record.pathname) if record.pathname else ''
  return path.startswith(package_dir + os.sep)


class ConsoleFilter(std_logging.Filter):
  """Keeps this package's records (INFO and up) and the libraries' at `library_level` and up."""

  def __init__(self, library_level: str = 'none', package_dir: str = PACKAGE_DIR):
    super().__init__()
    self.library_threshold = _LEVEL_NUMBERS[library_level]
    self.package_dir = package_dir

  def filter(self, record: std_logging.LogRecord) -> bool:
    if is_own_record(record, self.package_dir):
      return True
    return record.levelno >= self.library_threshold


def setup_console(library_level: str = 'none') -> None:
  """Routes logging (and Python warnings) through absl's stderr handler, with ConsoleFilter on it.

  Idempotent: a second call replaces the filter. Own INFO lines stay visible;
  the libraries' lines show only at `--log_level` and up.
  """
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
    handler.removeFilter(old)
  handler.addFilter(ConsoleFilter(library_level))
  std_logging.captureWarnings(True)  # library warnings.warn(...) obey the same filter
  if logging.get_verbosity() > logging.INFO:
    logging.set_verbosity(logging.INFO)


# ----------------------------------------------------------------------------
# Output folders.


def _first_existing(path: str) -> str:
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_output_dir(path: str, flag: str) -> None:
  """Raises CommandLineError (one line naming `flag`) unless `path` is, or can become, a writable folder.

  Creates nothing: a folder that does not exist yet is judged by its nearest
  existing parent. Writability is probed with a temporary file (removed at
  once), since permissions alone do not tell (root, read-only mounts, NFS).
  """
  absolute = os.path.abspath(path)
  if os.path.exists(absolute) and not os.path.isdir(absolute):
    raise CommandLineError(f'{flag}={path}: is a file, not a folder; choose another {flag}')
  existing = _first_existing(absolute)
  if not os.path.isdir(existing):
    raise CommandLineError(f'{flag}={path}: cannot be created, {existing} is a file; '
                           f'choose another {flag}')
  try:
    with tempfile.TemporaryFile(dir=existing, prefix='.uccl_jax_write_probe'):
      pass
  except OSError as error:
    reason = error.strerror or type(error).__name__
    raise CommandLineError(f'{flag}={path}: cannot write in {existing} ({reason}); '
                           f'choose a writable {flag}') from None


# ----------------------------------------------------------------------------
# Ctrl-C.


def interrupted() -> int:
  """Prints the one line of an interrupted command and returns its status (130).

  Further Ctrl-C presses are ignored from here on, so the exit itself is not
  interrupted into a traceback.
  """
  try:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  except ValueError:  # not the main thread
    pass
  print('interrupted', file=sys.stderr, flush=True)
  return INTERRUPTED_STATUS


def run_app(main: Callable[[list[str]], Any], flags_parser: Callable[[list[str]], Any]) -> None:
  """absl's app.run, with a KeyboardInterrupt (e.g. a second Ctrl-C) as the line `interrupted`.

  A training run handles the first Ctrl-C itself (it saves and stops at the next step).
  """
  try:
    app.run(main, flags_parser=flags_parser)
  except KeyboardInterrupt:
    sys.exit(interrupted())
