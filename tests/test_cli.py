"""Tests of uccl_jax.cli: `--config` parsing, one-line errors, help, console filter, output folders."""

from __future__ import annotations

import logging
import os
import textwrap

from absl import flags
import pytest

from uccl_jax import cli

CONFIG_TEXT = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.train = ml_collections.ConfigDict()
      config.train.batch_size = 8
      config.train.lr = 0.01
      config.name = arg or 'default'
      return config
''')


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / 'demo_config.py'
  path.write_text(CONFIG_TEXT)
  return path


def parse(argv, default=None):
  values = flags.FlagValues()
  flags.DEFINE_integer('steps', 1, 'steps', flag_values=values)
  holder = cli.define_config_flag(values, argv, default, 'config file')
  rest = cli.parse_flags(values, argv, holder)
  return holder.value, values, rest


def test_overrides_and_config_argument_are_applied(config_file):
  config, values, rest = parse(['prog', f'--config={config_file}:fine', '--config.train.lr=0.5',
                                '--steps=3'])
  assert (config.train.lr, config.train.batch_size, config.name) == (0.5, 8, 'fine')
  assert values.steps == 3 and rest == ['prog']


@pytest.mark.parametrize('override,message', [
    ('--config.train.nope=1', '--config.train.nope: no such config field (see uccl_jax/config.py'),
    ('--config.nope.lr=1', '--config.nope.lr: no such config field'),
    ('--config.train.batch_sise=4',
     '--config.train.batch_sise: no such config field (did you mean batch_size?)'),
    ('--config.trian.lr=4', '--config.trian.lr: no such config field (did you mean train?)'),
    ('--config.train.batch_size=abc',
     '--config.train.batch_size=abc: wrong type for this config field (invalid literal'),
    ('--config.train.lr=fast', '--config.train.lr=fast: wrong type for this config field'),
])
def test_bad_override_is_one_line_naming_it(config_file, override, message):
  for default in (None, str(config_file)):  # a default file applies overrides at definition
    argv = ['prog', override] if default else ['prog', f'--config={config_file}', override]
    with pytest.raises(cli.CommandLineError) as caught:
      parse(argv, default)
    assert message in str(caught.value)
    assert '\n' not in str(caught.value) and 'Traceback' not in str(caught.value)
    assert '\\' not in str(caught.value)  # no escaped quotes or newlines


def test_missing_and_broken_config_files(tmp_path):
  with pytest.raises(cli.CommandLineError, match=r'^--config: no such file .*absent\.py$'):
    parse(['prog', f'--config={tmp_path / "absent.py"}'])
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  raise ValueError("data.root must be set")\n')
  with pytest.raises(cli.CommandLineError) as caught:
    parse(['prog', f'--config={broken}'])
  assert str(caught.value) == (f'flag --config={broken}: Error whilst parsing config file: '
                               f'ValueError: data.root must be set ({broken}, line 2)')


def test_unknown_flag_is_one_line(config_file):
  with pytest.raises(cli.CommandLineError, match="Unknown command line flag 'bogus'"):
    parse(['prog', f'--config={config_file}', '--bogus=1'])


def test_error_line():
  assert cli.error_line(ValueError('a\n  b\n')) == 'a b'
  assert cli.error_line(ValueError('Traceback (most recent call last):\n  File "a.py", line 3, in f'
                                   '\n    f()\nKeyError: 1')) == 'KeyError: 1 (a.py, line 3)'
  try:
    try:
      raise KeyError('inner cause')
    except KeyError as inner:
      raise RuntimeError('') from inner
  except RuntimeError as outer:
    assert cli.error_line(outer) == "'inner cause'"
  assert cli.error_line(ValueError()) == 'ValueError'


@pytest.mark.parametrize('name', ['cityscapes.yaml', 'configs/pascal.yml'])
def test_a_yaml_config_points_to_the_mapping_doc(tmp_path, name):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('dataset: cityscapes\nnclass: 19\n')
  with pytest.raises(cli.CommandLineError) as caught:
    parse(['prog', f'--config={path}'])
  message = str(caught.value)
  assert message.startswith(f'--config={path}: configs here are Python files (configs/*.py)')
  assert cli.YAML_DOC in message and '\n' not in message
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert os.path.isfile(os.path.join(repo, cli.YAML_DOC))


def test_dashed_flags_are_rewritten_with_a_warning(capsys):
  values = flags.FlagValues()
  flags.DEFINE_bool('save_probs', False, 'x', flag_values=values)
  argv = ['prog', '--save-probs', '--nosave-probs', '--save_probs=true', '--other-flag=1',
          '--config.data.some-thing=1', 'positional-arg']
  assert cli.rewrite_dashed_flags(argv, values) == [
      'prog', '--save_probs', '--nosave_probs', '--save_probs=true', '--other-flag=1',
      '--config.data.some-thing=1', 'positional-arg']
  assert capsys.readouterr().err.splitlines() == [
      'warning: --save-probs is deprecated; use --save_probs',
      'warning: --nosave-probs is deprecated; use --nosave_probs']


def test_help_text_keeps_the_docstring_lines():
  values = flags.FlagValues()
  flags.DEFINE_integer('steps', 1, 'Steps to run.', flag_values=values)
  doc = 'Title.\n\nExamples:\n  prog --a=1 \\\n      --b=2\n'
  text = cli.help_text(doc, values)
  assert 'Examples:\n  prog --a=1 \\\n      --b=2\n' in text and '--steps' in text
  assert cli.wants_help(['prog', '--x', '-h']) == '-h' and cli.wants_help(['prog', '--x']) is None


def _record(pathname: str, level: int = logging.INFO, name: str = 'absl') -> logging.LogRecord:
  return logging.LogRecord(name, level, pathname, 1, 'message', None, None)


def test_console_filter_decides_by_package_folder_not_by_substring():
  """The README's layout: a clone named uccl_jax with .venv inside holds orbax under /uccl_jax/."""
  package = '/x/uccl_jax/uccl_jax'
  orbax = '/x/uccl_jax/.venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'
  quiet = cli.ConsoleFilter('none', package_dir=package)
  for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
    assert not quiet.filter(_record(orbax, level))
  assert quiet.filter(_record(f'{package}/train.py'))
  assert quiet.filter(_record(f'{package}/data/pipeline.py'))
  assert quiet.filter(_record('/elsewhere/jax/_src/x.py', name='uccl_jax.train'))
  assert not quiet.filter(_record('/x/uccl_jax/uccl_jax_extra/a.py'))  # a sibling, not the package
  warnings_on = cli.ConsoleFilter('warning', package_dir=package)
  assert warnings_on.filter(_record(orbax, logging.WARNING))
  assert not warnings_on.filter(_record(orbax, logging.INFO))
  assert cli.ConsoleFilter('info', package_dir=package).filter(_record(orbax, logging.INFO))
  # The installed package itself, whatever the folder around it is called.
  assert cli.is_own_record(_record(os.path.join(cli.PACKAGE_DIR, 'checkpoint.py')))
  venv_orbax = os.path.join(os.path.dirname(cli.PACKAGE_DIR), '.venv', 'lib', 'python3.11',
                            'site-packages', 'orbax', 'checkpoint', 'checkpoint_manager.py')
  assert not cli.is_own_record(_record(venv_orbax))


def _unwritable_folder(tmp_path):
  """A folder this process cannot write in: chmod 555, or (root ignores modes) sysfs."""
  if os.geteuid() == 0:
    return '/sys'
  folder = tmp_path / 'read_only'
  folder.mkdir()
  folder.chmod(0o555)
  return str(folder)


def test_check_output_dir(tmp_path):
  cli.check_output_dir(str(tmp_path / 'new' / 'run'), '--workdir')
  assert not (tmp_path / 'new').exists()  # judged, not created
  cli.check_output_dir(str(tmp_path), '--workdir')
  assert list(tmp_path.iterdir()) == []  # the write probe is gone
  afile = tmp_path / 'afile'
  afile.write_text('keep')
  with pytest.raises(cli.CommandLineError,
                     match=rf'^--out={afile}: is a file, not a folder; choose another --out$'):
    cli.check_output_dir(str(afile), '--out')
  with pytest.raises(cli.CommandLineError,
                     match=rf'^--workdir={afile}/run: cannot be created, {afile} is a file'):
    cli.check_output_dir(str(afile / 'run'), '--workdir')
  locked = _unwritable_folder(tmp_path)
  with pytest.raises(cli.CommandLineError, match=rf'^--workdir={locked}/run: cannot write in {locked} '):
    cli.check_output_dir(f'{locked}/run', '--workdir')
  assert afile.read_text() == 'keep'


def test_os_error_line():
  assert cli.os_error_line(PermissionError(13, 'Permission denied', '/a/b')) == '/a/b: Permission denied'
  assert cli.os_error_line(OSError(28, 'No space left on device')) == 'No space left on device'
