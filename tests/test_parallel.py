"""Tests of uccl_jax.parallel: mesh, global batches, batch-size errors, processes.

Also the central sharding property of the train step: on 4 devices it gives
the same metrics and parameters as on one.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from uccl_jax import parallel
from uccl_jax import step

from test_step import init_state, make_batch, make_config, rel_close, run_steps  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_make_mesh_spans_all_devices():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.size == jax.device_count() == 4
  assert parallel.make_mesh(jax.devices()[:1]).size == 1


def test_mesh_shape_from_the_config():
  from uccl_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  mesh = parallel.mesh_from_config(config)
  assert mesh.axis_names == ('data',) and mesh.devices.shape == (4,)
  config.parallel.mesh_shape, config.parallel.mesh_axes = (-1, 2), ('data', 'model')
  mesh = parallel.mesh_from_config(config)
  assert dict(mesh.shape) == {'data': 2, 'model': 2}
  assert parallel.data_parallel_size(mesh) == 2
  # The batch splits over 'data' only: 2 rows need 2 devices' worth, not 4.
  parallel.check_batch_size(2, mesh, process_count=1)
  batch = parallel.global_batch({'x': np.arange(2, dtype=np.float32)}, mesh)
  np.testing.assert_array_equal(np.asarray(batch['x']), [0, 1])
  for shape, axes in (((3,), ('data',)), ((2, 2), ('model', 'pipe')), ((-1, -1), ('data', 'm')),
                      ((2,), ('data', 'model'))):
    config.parallel.mesh_shape, config.parallel.mesh_axes = shape, axes
    with pytest.raises(parallel.MeshShapeError, match='parallel.mesh_shape'):
      parallel.mesh_from_config(config)


def test_prefetch_to_device_keeps_order_and_stays_two_ahead():
  mesh = parallel.make_mesh()
  pulled = []

  def host_batches():
    for index in range(5):
      pulled.append(index)
      yield {'x': np.full((4, 2), index, np.float32)}

  device_batches = parallel.prefetch_to_device(host_batches(), mesh, depth=2)
  first = next(device_batches)
  assert pulled == [0, 1, 2]  # batch 0 handed out, 1 and 2 already on their way
  assert first['x'].sharding == parallel.batch_sharding(mesh)
  rest = list(device_batches)
  assert [int(np.asarray(b['x'])[0, 0]) for b in [first] + rest] == [0, 1, 2, 3, 4]


def test_global_batch_splits_rows_over_devices():
  mesh = parallel.make_mesh()
  local = {'a': np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
           'b': {'c': np.arange(8, dtype=np.int32)}}
  batch = parallel.global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch['a']), local['a'])
  np.testing.assert_array_equal(np.asarray(batch['b']['c']), local['b']['c'])
  assert batch['a'].sharding == parallel.batch_sharding(mesh)
  # Device i holds rows [2i, 2i + 2).
  for shard in batch['b']['c'].addressable_shards:
    rows = np.asarray(shard.data)
    assert rows.shape == (2,) and rows[0] % 2 == 0
    assert shard.index[0] == slice(int(rows[0]), int(rows[0]) + 2)


def test_global_batch_rejects_batch_not_divisible_by_devices():
  with pytest.raises(parallel.BatchSizeError, match=r'train\.batch_size=6 .*4') as info:
    parallel.global_batch({'x': np.zeros((6, 2), np.float32)}, parallel.make_mesh())
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('batch_size,grad_accum,processes,field', [
    (6, 1, 1, r'train\.batch_size=6 must be divisible by the number of devices \(4\)'),
    (9, 1, 2, r'train\.batch_size=9 must be divisible by the number of processes \(2\)'),
    (8, 3, 1, r'train\.batch_size=8 must be divisible by train\.grad_accum=3'),
    (8, 4, 1, r'train\.batch_size=8 / train\.grad_accum=4 = 2 images per micro-batch'),
    (0, 1, 1, r'train\.batch_size=0 must be positive'),
])
def test_check_batch_size_names_the_field(batch_size, grad_accum, processes, field):
  with pytest.raises(parallel.BatchSizeError, match=field) as info:
    parallel.check_batch_size(batch_size, parallel.make_mesh(), grad_accum=grad_accum,
                              process_count=processes)
  assert '\n' not in str(info.value)


def test_check_batch_size_accepts_even_splits():
  parallel.check_batch_size(8, parallel.make_mesh(), grad_accum=2, process_count=2)
  parallel.check_batch_size(3, parallel.make_mesh(jax.devices()[:1]))


def test_initialize_distributed_single_process_is_a_no_op(monkeypatch):
  for name in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
               'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  # One-task SLURM allocations (e.g. an interactive job) are single-process too.
  for name, value in [('SLURM_JOB_ID', '7'), ('SLURM_STEP_NODELIST', 'n1'), ('SLURM_NTASKS', '1'),
                      ('SLURM_PROCID', '0'), ('SLURM_LOCALID', '0')]:
    monkeypatch.setenv(name, value)
  assert parallel.initialize_distributed() is False


@pytest.mark.parametrize('kwargs,message', [
    (dict(coordinator_address='localhost:1234'), 'needs all of'),
    (dict(num_processes=2, process_id=0), 'needs all of'),
    (dict(coordinator_address='localhost:1234', num_processes=2, process_id=2),
     r'process_id must lie in \[0, num_processes\)'),
])
def test_initialize_distributed_rejects_incomplete_settings(kwargs, message):
  with pytest.raises(parallel.DistributedSetupError, match=message):
    parallel.initialize_distributed(**kwargs)


_TWO_PROCESS_SCRIPT = r'''
import json, sys
import numpy as np
from uccl_jax import parallel
process_id, port = int(sys.argv[1]), sys.argv[2]
assert parallel.initialize_distributed(f'localhost:{port}', 2, process_id)
import jax, jax.numpy as jnp
mesh = parallel.make_mesh()
# 3 rows per process = a global batch of 6, which 4 devices cannot split.
try:
  parallel.global_batch({'x': np.zeros((3, 2), np.float32)}, mesh)
  bad = 'no error'
except parallel.BatchSizeError as e:
  bad = str(e)
local = {'x': (np.arange(4, dtype=np.float32) + 4 * process_id)[:, None] * np.ones((1, 2), np.float32)}
batch = parallel.global_batch(local, mesh)
weighted = jax.jit(lambda b: jnp.sum(b['x'][:, 0] * jnp.arange(8.0)),
                   out_shardings=parallel.replicated_sharding(mesh))(batch)
# Each process sees something else; both must take process 0's view.
agreed = [parallel.agree_with_process_zero(process_id == 1),
          parallel.agree_with_process_zero(process_id == 0)]
print(json.dumps({'devices': mesh.size, 'shape': list(batch['x'].shape),
                  'weighted': float(weighted), 'bad': bad, 'agreed': agreed}))
'''


def test_two_processes_build_one_global_batch(tmp_path):
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_SCRIPT, str(i), str(port)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  for result in outputs:
    assert result['devices'] == 4
    assert result['shape'] == [8, 2]
    # Rows 0..7 hold the values 0..7 in order: process 0's rows first.
    assert result['weighted'] == sum(i * i for i in range(8))
    assert 'train.batch_size=6' in result['bad']
    assert result['agreed'] == [False, True]  # process 0's answers, in both processes


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 4
  config = make_config('uccl', lr=0.01)
  batches = [make_batch(seed=s) for s in (10, 11)]
  state4, history4 = run_steps(config, batches, jax.devices())
  state1, history1 = run_steps(config, batches, jax.devices()[:1])
  for h4, h1 in zip(history4, history1):
    for name in step.METRIC_NAMES:
      assert h4[name] == pytest.approx(h1[name], rel=1e-5, abs=1e-7), name
  assert history4[0]['loss_sbu'] > 0 and history4[0]['loss_ckr'] > 0
  init = init_state(config)[1]
  for tree in ('params', 'batch_stats'):
    for a, b, a0 in zip(jax.tree.leaves(getattr(state4, tree)),
                        jax.tree.leaves(getattr(state1, tree)),
                        jax.tree.leaves(getattr(init, tree))):
      assert rel_close(a, b, 1e-5)
      # The values moved, and by the same amount on both meshes.
      delta4, delta1 = np.asarray(a, np.float64) - a0, np.asarray(b, np.float64) - a0
      assert np.max(np.abs(delta1)) > 0
      assert rel_close(delta4, delta1, 1e-4)
  assert int(state4.step) == int(state1.step) == 2
