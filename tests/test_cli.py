"""Tests of uccl_jax.cli: the shared `--config` parsing and its one-line errors."""

from __future__ import annotations

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
    ('--config.train.nope=1', "--config.train.nope: no such config field ('nope'"),
    ('--config.nope.lr=1', '--config.nope.lr: no such config field'),
    ('--config.train.batch_size=abc', 'flag --config.train.batch_size=abc: invalid literal'),
])
def test_bad_override_is_one_line_naming_it(config_file, override, message):
  for default in (None, str(config_file)):  # a default file applies overrides at definition
    argv = ['prog', override] if default else ['prog', f'--config={config_file}', override]
    with pytest.raises(cli.CommandLineError) as caught:
      parse(argv, default)
    assert message in str(caught.value)
    assert '\n' not in str(caught.value) and 'Traceback' not in str(caught.value)


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
