"""The evaluation benchmark command runs end to end on a tiny setting (no timing assertions)."""

from __future__ import annotations

import re

from uccl_jax.benchmark import __main__ as benchmark_main


def test_eval_benchmark_prints_throughput_and_the_miou(capsys):
  assert benchmark_main.main([
      'uccl_jax.benchmark', 'eval', '--size', '20x36', '--images', '2', '--repeats', '1',
      '--mode', 'original', '--width', '4', '--head-channels', '8']) == 0
  out = capsys.readouterr().out
  assert re.search(r'original \(crop 801\), 2 images of 20x36, .* [0-9.]+ images/s', out)
  assert re.search(r'main thread [0-9]+ ms CPU per image', out)
  assert re.search(r'mIoU [0-9.]+, pixel accuracy [0-9.]+, intersection sum [0-9]+', out)
