"""`python -m uccl_jax.benchmark <name> [flags]`: runs one benchmark module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    'losses': 'uccl_jax.benchmark.losses',  # SBU + CKR forward+backward vs NumPy loops
    'pipeline': 'uccl_jax.benchmark.pipeline',  # input pipeline throughput
}


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in BENCHMARKS:
    print(f'usage: python -m uccl_jax.benchmark {{{"|".join(BENCHMARKS)}}} [flags]', file=sys.stderr)
    return 2
  module = importlib.import_module(BENCHMARKS[argv[1]])
  return module.main(argv[1:]) or 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
