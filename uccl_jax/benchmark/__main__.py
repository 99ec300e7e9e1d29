"""`python -m uccl_jax.benchmark [<name>] [flags]`: the step benchmark, or one named benchmark.

With no name (the first argument is a flag or absent) the step benchmark runs
(uccl_jax/benchmark/step_cli.py: step time, FLOPs, MFU, memory, pipeline, scaling;
`--help` shows its usage and examples); `losses`, `pipeline` (host cost per step),
`eval`, `gpu_check`, `ablation` and `teacher` (pseudo-label quality of a run's
checkpoint) run their modules' `main(argv)`.

`--scaling` on a CPU needs several devices, which JAX fixes when it starts: if
XLA_FLAGS does not already ask for host devices, 4 fake ones are requested here,
before anything imports JAX, and the per-method timing then uses one of them.
"""

from __future__ import annotations

import importlib
import os
import sys

BENCHMARKS = {
    'losses': 'uccl_jax.benchmark.losses',  # SBU + CKR forward+backward vs NumPy loops
    'pipeline': 'uccl_jax.benchmark.pipeline',  # host bytes and core-seconds per training step
    'ablation': 'uccl_jax.benchmark.ablation',  # Table III rows trained on the demo dataset
    'eval': 'uccl_jax.benchmark.evaluation',  # evaluation images/s at the Cityscapes setting
    'gpu_check': 'uccl_jax.benchmark.gpu_check',  # every GPU figure of docs/RESULTS.md, < 8 min
    'teacher': 'uccl_jax.benchmark.teacher',  # confident share, accuracy and class mix of pseudo-labels
}
FAKE_DEVICE_FLAG = '--xla_force_host_platform_device_count'
SCALING_FAKE_DEVICES = 4


def _wants_scaling(argv: list[str]) -> bool:
  return any(arg in ('--scaling', '--scaling=true', '--scaling=True', '--scaling=1')
             for arg in argv)


def main(argv: list[str]) -> int:
  if len(argv) >= 2 and not argv[1].startswith('-'):
    if argv[1] not in BENCHMARKS:
      print(f'usage: python -m uccl_jax.benchmark [{"|".join(BENCHMARKS)}] [flags] '
            f'(unknown benchmark {argv[1]!r}; no name runs the step benchmark)', file=sys.stderr)
      return 2
    module = importlib.import_module(BENCHMARKS[argv[1]])
    return module.main(argv[1:]) or 0

  fake_devices_added = False
  if (_wants_scaling(argv[1:]) and FAKE_DEVICE_FLAG not in os.environ.get('XLA_FLAGS', '')
      and 'jax' not in sys.modules):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' {FAKE_DEVICE_FLAG}={SCALING_FAKE_DEVICES}').strip()
    fake_devices_added = True
  step_cli = importlib.import_module('uccl_jax.benchmark.step_cli')
  return step_cli.main(argv[1:], fake_devices_added=fake_devices_added)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
