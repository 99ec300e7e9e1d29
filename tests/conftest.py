"""Test set-up, before JAX is imported: four fake CPU devices, and cheap compilation.

The tests run tiny models for a few steps, so XLA's compile time, not run time,
is what they wait for; `xla_backend_optimization_level=0` roughly halves the
compile time of the UCCL step on CPU (63 s -> 38 s for the tiny 4-device step on
a 2-core machine) at no cost that matters for a few steps of a tiny model.
Subprocess tests pass the same flags on through UCCL_JAX_TEST_XLA_EXTRA.
"""

import os

os.environ.setdefault('UCCL_JAX_TEST_XLA_EXTRA', '--xla_backend_optimization_level=0')
os.environ.setdefault(
    'XLA_FLAGS',
    '--xla_force_host_platform_device_count=4 ' + os.environ['UCCL_JAX_TEST_XLA_EXTRA'])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
