"""Two processes through launch/local.sh train exactly like one process with the same devices.

2 processes x 2 fake CPU devices (jax.distributed over loopback, gloo
collectives, each process reading its own half of every batch) against
1 process x 4 devices, on the tiny synthetic setup of test_main.py: same
parameters, BN statistics, optimizer state, losses and val mIoU after 2 steps,
up to float summation order across processes. The method is 'unimatch': its
step compiles in half the time of UCCL's, and what this test is about (the
processes' shards of all three data streams, global arrays, BN over the global
batch, checkpoints and eval counts across processes) is the same; that the UCCL
step does not depend on the device count is tests/test_parallel.py's check.
"""

from __future__ import annotations

import subprocess

import jax
import numpy as np
import pytest

from uccl_jax import checkpoint
from uccl_jax import reporting

from test_main import REPO, check_ok, cli_env, run_main, tiny_dataset, tiny_run_flags  # noqa: F401  (fixture)

STEPS = 2
METHOD = '--config.method=unimatch'


def test_two_processes_equal_one_process(tiny_dataset, tmp_path):
  single = tmp_path / 'single'
  check_ok(run_main(*tiny_run_flags(tiny_dataset, single, f'--config.train.max_steps={STEPS}', METHOD),
                    devices=4))

  multi = tmp_path / 'multi'
  env = cli_env(2)
  env['DEVICES_PER_PROCESS'] = '2'
  proc = subprocess.run(
      ['bash', 'launch/local.sh', '2', '--',
       *tiny_run_flags(tiny_dataset, multi, f'--config.train.max_steps={STEPS}', METHOD)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  check_ok(proc)
  assert '4 devices (2 processes)' in proc.stdout, proc.stdout

  expected = checkpoint.read_arrays(single / 'checkpoints', STEPS)
  got = dict(jax.tree_util.tree_leaves_with_path(checkpoint.read_arrays(multi / 'checkpoints', STEPS)))
  leaves = jax.tree_util.tree_leaves_with_path(expected)
  assert len(leaves) == len(got)
  for path, value in leaves:
    np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))

  keys = ('loss', 'loss_x', 'loss_s', 'loss_fp', 'loss_sbu', 'loss_ckr', 'mask_ratio', 'lr')
  single_train = reporting.read_metrics(single / 'metrics.jsonl', kind='train')
  multi_train = reporting.read_metrics(multi / 'metrics.jsonl', kind='train')
  assert [r['step'] for r in multi_train] == list(range(1, STEPS + 1))
  for a, b in zip(single_train, multi_train):
    for key in keys:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a['step'], key)
  single_eval = reporting.read_metrics(single / 'metrics.jsonl', kind='eval')[-1]
  multi_eval = reporting.read_metrics(multi / 'metrics.jsonl', kind='eval')[-1]
  assert multi_eval['miou'] == pytest.approx(single_eval['miou'], abs=1e-6)
  assert multi_eval['num_images'] == single_eval['num_images'] == 2
