"""Test set-up: four fake CPU devices (for the sharding tests) before JAX is imported."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
