"""The evaluation benchmark command: end to end on a tiny setting (no timing assertions), its flags."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from uccl_jax.benchmark import __main__ as benchmark_main
from uccl_jax.benchmark import evaluation

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_eval_benchmark_prints_throughput_and_the_miou(capsys):
  """The dashed spelling of the argparse release still works, with one warning line."""
  assert benchmark_main.main([
      'uccl_jax.benchmark', 'eval', '--size', '20x36', '--images=2', '--repeats=1',
      '--mode=original', '--width=4', '--head-channels', '8']) == 0
  captured = capsys.readouterr()
  out = captured.out
  assert re.search(r'original \(crop 801\), 2 images of 20x36, .* head 8, .* [0-9.]+ images/s', out)
  assert re.search(r'main thread [0-9]+ ms CPU per image', out)
  assert re.search(r'mIoU [0-9.]+, pixel accuracy [0-9.]+, intersection sum [0-9]+', out)
  assert ('warning: --head-channels is deprecated; use --head_channels'
          in captured.err.splitlines()), captured.err


@pytest.mark.parametrize('flag', ['--help', '-h', '--helpfull'])
def test_help_exits_0_with_the_examples_and_the_flags(flag):
  result = subprocess.run([sys.executable, '-m', 'uccl_jax.benchmark', 'eval', flag],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO)))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  examples = lines[lines.index('examples:') + 1:lines.index('examples:') + 4]
  assert examples[1] == ('  python -m uccl_jax.benchmark eval --backbone=resnet50 --width=64 '
                         '--head_channels=256')
  for name in ('--size', '--head_channels', '--read_threads', '--log_level'):
    assert any(line.startswith(f'  {name}:') for line in lines), name


@pytest.mark.parametrize('args,fragment', [
    (['--size=12'], '--size=12: expected an image size HxW'),
    (['--images=0'], '--images=0: must be >= 1'),
    (['--repeats=two'], 'flag --repeats=two'),
    (['--mode=fast'], 'flag --mode=fast'),
    (['--backbone=vgg'], 'flag --backbone=vgg'),
    (['--read_threads=-1'], '--read_threads=-1: must be >= 0'),
    (['--no_such=1'], "Unknown command line flag 'no_such'"),
    (['extra'], 'unexpected arguments: extra'),
])
def test_bad_values_are_one_line(args, fragment, capsys, monkeypatch):
  monkeypatch.setattr(evaluation, 'measure', lambda *a, **k: pytest.fail('ran despite a bad flag'))
  assert benchmark_main.main(['uccl_jax.benchmark', 'eval', *args]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and fragment in err[0], err
