"""The GPU check (uccl_jax/benchmark/gpu_check.py): its arithmetic, its report, its command line.

The whole --smoke run takes minutes on a 2-core CPU (the UniMatch/UCCL steps
compile for tens of seconds each), so the pieces are tested separately: the
loss comparison and the idle-fraction arithmetic on made-up numbers, the
summary on a made-up complete report, and the command end to end with one
cheap part (the supervised step of the tiny network) and with a budget that
cuts a part off. No figure is asserted, only behaviour.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from uccl_jax.benchmark import __main__ as benchmark_main
from uccl_jax.benchmark import gpu_check

from test_main import compile_cache_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTPUT_FILES = {gpu_check.REPORT_FILE, gpu_check.SUMMARY_FILE, gpu_check.LOG_FILE}


# ----------------------------------------------------------------------------
# The arithmetic.


def _losses(steps: int = 100) -> list[float]:
  """A decaying loss with batch-to-batch wiggle, like a training curve."""
  return [1.0 + 1.5 * math.exp(-k / 30) + 0.05 * math.sin(1.7 * k) for k in range(steps)]


def test_compare_losses_passes_within_tolerance_and_fails_beyond():
  reference = _losses()
  close = [x * 1.02 for x in reference]
  result = gpu_check.compare_losses(reference, close, window=20, tolerance=0.05)
  assert result['passed'] and result['all_finite']
  assert result['relative_difference'] == pytest.approx(0.02)
  assert result['first_step_relative_difference'] == pytest.approx(0.02)
  assert result['reference_mean'] == pytest.approx(sum(reference[-20:]) / 20)

  far = [x * 1.08 for x in reference]
  assert not gpu_check.compare_losses(reference, far, window=20, tolerance=0.05)['passed']
  # Only the window counts: an early excursion does not fail the check.
  early = [x * (3.0 if k < 50 else 1.0) for k, x in enumerate(reference)]
  assert gpu_check.compare_losses(reference, early, window=20, tolerance=0.05)['passed']


def test_compare_losses_fails_on_a_non_finite_loss_anywhere():
  reference = _losses()
  broken = list(reference)
  broken[3] = float('nan')
  result = gpu_check.compare_losses(reference, broken, window=20, tolerance=0.05)
  assert not result['passed'] and not result['all_finite']


@pytest.mark.parametrize('reference, candidate, window', [
    ([1.0, 2.0], [1.0], 1),  # different lengths
    ([1.0, 2.0], [1.0, 2.0], 3),  # window longer than the run
    ([1.0, 2.0], [1.0, 2.0], 0),
])
def test_compare_losses_rejects_unusable_inputs(reference, candidate, window):
  with pytest.raises(gpu_check.GpuCheckError):
    gpu_check.compare_losses(reference, candidate, window=window, tolerance=0.05)


def test_loop_step_time_drops_the_first_window_and_weights_by_length():
  # Logged at steps 10, 20, 25 (the last a short final window); step 1 compiled.
  records = [{'step': 10, 'step_time': 0.5}, {'step': 20, 'step_time': 0.2},
             {'step': 25, 'step_time': 0.4}]
  result = gpu_check.loop_step_time(records, skip_windows=1)
  assert [w['steps'] for w in result['windows']] == [9, 10, 5]
  assert result['step_time_s'] == pytest.approx((10 * 0.2 + 5 * 0.4) / 15)
  assert (result['first'], result['last'], result['steps']) == (11, 25, 15)
  with pytest.raises(gpu_check.GpuCheckError):
    gpu_check.loop_step_time(records[:1], skip_windows=1)
  with pytest.raises(gpu_check.GpuCheckError):
    gpu_check.loop_step_time(records[:1] + [{'step': 20, 'step_time': 'nan'}], skip_windows=1)


def test_idle_fraction():
  assert gpu_check.idle_fraction(0.1, 0.125) == pytest.approx(0.2)
  assert gpu_check.idle_fraction(0.1, 0.1) == pytest.approx(0.0)
  assert gpu_check.idle_fraction(0.1, 0.09) < 0  # the loop no slower than the step: noise
  for pure, loop in ((0.0, 0.1), (0.1, 0.0), (-1.0, 0.1)):
    with pytest.raises(gpu_check.GpuCheckError):
      gpu_check.idle_fraction(pure, loop)


# ----------------------------------------------------------------------------
# The report.


def _method_row(method: str, step: float) -> dict:
  return {'method': method, 'step_time_s': step, 'step_time_min_s': step * 0.95,
          'images_per_s': 8 / step, 'compile_s': 40.0, 'flops_per_step': 9.5e12, 'mfu': 0.3,
          'peak_memory_bytes': 20 * 2**30, 'step_memory_bytes': 22 * 2**30}


def _overhead(anchors: str) -> dict:
  return {'rounds': 30, 'unimatch_step_time_s': 0.2, 'uccl_step_time_s': 0.26,
          'overhead_percent': 30.0, 'overhead_percent_quartiles': [28.0, 32.0], 'anchors': anchors}


def _complete_report(passed: bool = True) -> dict:
  step_part = lambda dtype: {
      'name': dtype, 'status': 'done', 'elapsed_s': 100.0, 'device': 'gpu: NVIDIA H200 x1',
      'jax_version': '0.11.2', 'dtype': dtype,
      'setting': f'resnet50 width 64, head 256, crop 321, batch 8 labeled + 8 unlabeled, 21 classes, '
                 f'{dtype}, 1 device(s)',
      'matmul': {'matmul_size': 8192, 'matmul_flops_per_s': 4e14},
      'methods': [_method_row(m, t) for m, t in (('supervised', 0.05), ('unimatch', 0.2),
                                                 ('uccl', 0.26))],
      'uccl_overhead_percent': 30.0}
  float32 = step_part('float32')
  float32['overhead_passes'] = _overhead('passes')
  loss = _losses()
  comparison = gpu_check.compare_losses(loss, [x * (1.01 if passed else 1.2) for x in loss],
                                        window=20, tolerance=gpu_check.LOSS_TOLERANCE)
  return {
      'meta': {'command': 'python -m uccl_jax.benchmark gpu_check', 'started': '2026-01-01T00:00:00',
               'budget_s': 465.0, 'smoke': False, 'cache_dir': '.cache/jax_gpu_check',
               'elapsed_s': 400.0, 'host': 'h200', 'revision': 'abc123'},
      'parts': {
          'float32': float32, 'bfloat16': step_part('bfloat16'),
          'bf16_training': {'name': 'bf16_training', 'status': 'done', 'comparison': comparison,
                            'runs': {dtype: {'setting': 'resnet18 width 16', 'final_miou': 12.5,
                                             'loss': loss} for dtype in ('float32', 'bfloat16')}},
          'input': {'name': 'input', 'status': 'done', 'setting': 'resnet50 ...',
                    'workers': 15, 'available_cpus': 16, 'source_size': [375, 500],
                    'pure': {'step_time_s': 0.15, 'steps': 30, 'compile_s': 2.0},
                    'loop': {'step_time_s': 0.16, 'first': 11, 'last': 50, 'steps': 40},
                    'idle_fraction': gpu_check.idle_fraction(0.15, 0.16)},
          'pasted': {'name': 'pasted', 'status': 'done', 'overhead_pasted': _overhead('pasted')},
      }}


def test_summary_of_a_complete_report_names_every_figure():
  report = _complete_report()
  text = gpu_check.format_summary(report)
  for dtype in ('float32', 'bfloat16'):
    for method in gpu_check.METHODS:
      assert any(line.split()[:2] == [dtype, method] for line in text.splitlines()), (dtype, method)
  assert 'unsup.anchors=passes: +30.0%' in text and 'unsup.anchors=pasted: +30.0%' in text
  assert 'idle fraction = 1 - pure / loop = +6.2%' in text
  assert 'PASS' in text and 'to finish' not in text
  assert gpu_check.succeeded(report)
  json.dumps(gpu_check._plain(report), allow_nan=False)  # pylint: disable=protected-access

  failing = _complete_report(passed=False)
  assert 'FAIL' in gpu_check.format_summary(failing) and not gpu_check.succeeded(failing)


def test_summary_of_an_empty_report_says_what_is_missing():
  report = _complete_report()
  report['parts'] = {name: {'name': name, 'status': 'not run', 'reason': 'budget spent'}
                     for name in gpu_check.PART_NAMES}
  text = gpu_check.format_summary(report)
  assert text.count('not measured') >= 4
  assert f'launch/gpu_check.sh --parts={",".join(gpu_check.PART_NAMES)}' in text
  assert not gpu_check.succeeded(report)


# ----------------------------------------------------------------------------
# The command.


def _run(tmp_path: pathlib.Path, *flags: str) -> tuple[int, dict, str]:
  out = tmp_path / 'out'
  status = gpu_check.main(['gpu_check', f'--out={out}', f'--cache_dir={compile_cache_dir()}',
                           *flags])
  assert {p.name for p in out.iterdir()} == OUTPUT_FILES  # nothing else: a result folder may take 8
  return status, json.loads((out / gpu_check.REPORT_FILE).read_text()), (
      out / gpu_check.SUMMARY_FILE).read_text()


def test_smoke_run_of_one_part_writes_the_report(tmp_path):
  status, report, summary = _run(tmp_path, '--smoke', '--parts=float32', '--methods=supervised')
  part = report['parts']['float32']
  assert status == 0, (tmp_path / 'out' / gpu_check.LOG_FILE).read_text()[-3000:]
  assert part['status'] == 'done' and [r['method'] for r in part['methods']] == ['supervised']
  assert part['methods'][0]['step_time_s'] > 0 and part['matmul']['matmul_flops_per_s'] > 0
  assert part['overhead_passes'] == {'not_measured': 'needs unimatch and uccl in --methods'}
  assert report['meta']['smoke'] and 'SMOKE' in summary
  assert any(line.split()[:2] == ['float32', 'supervised'] for line in summary.splitlines())


def test_the_budget_stops_a_part_and_the_summary_says_how_to_finish(tmp_path):
  status, report, summary = _run(tmp_path, '--smoke', '--parts=float32,pasted', '--budget_s=0.5')
  assert status == 1
  assert report['parts']['float32']['status'] == 'cut off'
  assert report['parts']['pasted']['status'] == 'not run'
  assert 'launch/gpu_check.sh --parts=float32,pasted --smoke' in summary


@pytest.mark.parametrize('flag', ['--parts=float32,nope', '--parts=float32,float32', '--methods=x',
                                  '--budget_s=0', '--bogus', '--part=input'])
def test_bad_flags_are_one_line_errors(flag, capsys, tmp_path):
  assert benchmark_main.main(['benchmark', 'gpu_check', flag, f'--out={tmp_path}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert not any(tmp_path.iterdir())  # nothing written


def test_launch_script_passes_flags_through(tmp_path):
  proc = subprocess.run(['bash', str(REPO / 'launch' / 'gpu_check.sh'), '--parts=nope'],
                        env={'PATH': '/usr/bin:/bin', 'PYTHON': sys.executable,
                             'GPU_CHECK_OUT': str(tmp_path / 'out')},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --parts=nope')
