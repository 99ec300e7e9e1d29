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


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def cpu_transfer_guard(monkeypatch):
  """Makes JAX's device-to-host transfer guard bite on CPU, where arrays already live in host memory
  and the real guard never fires.

  Every Python-level read of a jax.Array (float(), int(), bool(), .item(), .tolist(), __array__,
  the cached host value) raises while the thread's guard level is 'disallow' (implicit reads) or
  'disallow_explicit' (also reads inside jax.device_get), as the guard does on a GPU. NumPy's
  buffer-protocol path for np.asarray of a CPU array is C code and escapes it; on a GPU the real
  guard catches that too.
  """
  import threading  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import array as array_lib  # pylint: disable=g-import-not-at-top
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  explicit = threading.local()

  def check(name):
    level = jax_config.transfer_guard_device_to_host.value
    in_device_get = getattr(explicit, 'depth', 0) > 0
    if level == 'disallow_explicit' or (level == 'disallow' and not in_device_get):
      raise RuntimeError(f'Disallowed device-to-host transfer ({name}, emulated guard on CPU)')

  for name in ('__array__', '__float__', '__int__', '__bool__', '__index__', '__complex__', 'item',
               'tolist', '_value'):
    original = array_lib.ArrayImpl.__dict__[name]
    if isinstance(original, property):
      wrapped = property(lambda self, o=original, n=name: (check(n), o.fget(self))[1])
    else:
      def wrapped(self, *args, o=original, n=name, **kwargs):
        check(n)
        return o(self, *args, **kwargs)
    monkeypatch.setattr(array_lib.ArrayImpl, name, wrapped)

  device_get = jax.device_get

  def explicit_device_get(tree):
    explicit.depth = getattr(explicit, 'depth', 0) + 1
    try:
      return device_get(tree)
    finally:
      explicit.depth -= 1
  monkeypatch.setattr(jax, 'device_get', explicit_device_get)
