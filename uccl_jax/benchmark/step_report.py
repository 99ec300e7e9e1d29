"""What the step benchmark prints: progress on stderr, the table and its notes on stdout.

Progress goes to stderr so that stdout holds only the report (compiles take
minutes on a CPU, and a silent terminal looks hung).
"""

from __future__ import annotations

import math
import sys
from typing import Any


def progress(text: str) -> None:
  """One progress line on stderr, flushed at once."""
  print(text, file=sys.stderr, flush=True)


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
  """`value * scale` formatted with `spec` ('9.3f'); '-' right-aligned to the width when absent."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    width = spec.split('.')[0]
    return '-'.rjust(int(width) if width.isdigit() else 1)
  return format(value * scale, spec)


def format_report(report: dict[str, Any]) -> str:
  """The printed table (one row per method) and the extra figures, as text."""
  lines = [f'device: {report["device"]}; jax {report["jax_version"]}; {report["setting"]}']
  if report.get('matmul'):
    m = report['matmul']
    lines.append(f'matmul rate ({report["compute_dtype"]}, {m["matmul_size"]}^2): '
                 f'{m["matmul_flops_per_s"] / 1e12:.3f} TFLOP/s per device')
  header = (f'{"method":<11}{"step s":>9}{"min s":>9}{"img/s":>9}{"compile s":>11}'
            f'{"GFLOP/step":>12}{"MFU":>8}{"peak MiB":>10}{"step MiB":>10}')
  lines += [header, '-' * len(header)]
  for r in report['methods']:
    lines.append(f'{r["method"]:<11}{_fmt(r["step_time_s"], "9.3f")}'
                 f'{_fmt(r["step_time_min_s"], "9.3f")}{_fmt(r["images_per_s"], "9.2f")}'
                 f'{_fmt(r["compile_s"], "11.1f")}{_fmt(r["flops_per_step"], "12.1f", 1e-9)}'
                 f'{_fmt(r["mfu"], "8.1%")}{_fmt(r["peak_memory_bytes"], "10.0f", 2**-20)}'
                 f'{_fmt(r["step_memory_bytes"], "10.0f", 2**-20)}')
  if report.get('methods'):
    lines.append(f'peak memory: {report["methods"][0]["peak_memory_kind"]}; step MiB: XLA\'s '
                 'estimate for the compiled step (arguments + outputs + temporaries)')
  if report.get('uccl_overhead_percent') is not None:
    lines.append(f'SBU+CKR overhead, uccl over unimatch, from the table\'s medians: '
                 f'{report["uccl_overhead_percent"]:+.1f}% (paper, Table III: +29%)')
  if report.get('overhead'):
    o = report['overhead']
    low, high = o['overhead_percent_quartiles']
    lines.append(f'SBU+CKR overhead, interleaved ({o["rounds"]} rounds, unsup.anchors={o["anchors"]}): '
                 f'{o["overhead_percent"]:+.1f}% median of per-round ratios (quartiles {low:+.1f}% '
                 f'to {high:+.1f}%); unimatch {o["unimatch_step_time_s"]:.3f} s, uccl '
                 f'{o["uccl_step_time_s"]:.3f} s')
  if report.get('losses'):
    l = report['losses']
    lines.append(f'loss benchmark: SBU+CKR forward+backward at B={l["batch"]}, '
                 f'{l["feature_size"]}x{l["feature_size"]}, C={l["classes"]}, D={l["channels"]}: '
                 f'{l["sbu_ckr_fwd_bwd_s"] * 1e3:.1f} ms median ({l["sbu_ckr_fwd_bwd_min_s"] * 1e3:.1f} min)')
  if report.get('pipeline'):
    p = report['pipeline']
    step_rate = None
    times = [r['step_time_s'] for r in report['methods'] if r['step_time_s']]
    slowest = max(times) if times else None
    if slowest:
      step_rate = 1.0 / slowest
    verdict = ''
    if step_rate is not None:
      bound = 'the pipeline' if p['batches_per_s'] < step_rate else 'the step'
      verdict = f'; the slowest step runs {step_rate:.2f} steps/s, so {bound} bounds training'
    lines.append(f'input pipeline ({p["workers"]} workers, {p["source_size"][0]}x{p["source_size"][1]} '
                 f'PNGs -> crop {p["crop_size"]}, batch {p["batch_size"]}): '
                 f'{p["batches_per_s"]:.2f} batches/s ({p["unlabeled_per_s"]:.1f} unlabeled samples/s)'
                 f'{verdict}')
  if report.get('scaling'):
    lines.append(f'scaling ({report["scaling_method"]}):')
    for row in report['scaling']:
      if 'skipped' in row:
        lines.append(f'  {row["num_devices"]} devices: skipped ({row["skipped"]})')
      else:
        lines.append(f'  {row["num_devices"]} devices: {row["step_time_s"]:.3f} s/step '
                     f'(x{row["speedup"]:.2f}), compile {row["compile_s"]:.1f} s, first-step loss '
                     f'{row["loss_first_step"]:.6f} (differs by {row["loss_difference"]:.1e})')
  return '\n'.join(lines)

