"""Two processes through launch/local.sh train exactly like one process with the same devices,
and one process resumes what two processes saved.

2 processes x 2 fake CPU devices (jax.distributed over loopback, gloo
collectives, each process reading its own half of every batch) against
1 process x 4 devices, on the tiny synthetic setup of test_main.py: same
parameters, BN statistics, optimizer state, losses and val mIoU after 2 steps,
up to float summation order across processes. Then one process x 4 devices
resumes the two processes' checkpoint and trains 2 more steps: the same state,
losses and mIoU as the single process that never stopped (a data-iterator state
saved by 2 processes restores in 1). The method is 'unimatch': its
step compiles in half the time of UCCL's, and what this test is about (the
processes' shards of all three data streams, global arrays, BN over the global
batch, checkpoints and eval counts across processes) is the same; that the UCCL
step does not depend on the device count is tests/test_parallel.py's check.
"""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest

from uccl_jax import checkpoint
from uccl_jax import reporting

from test_main import REPO, check_ok, cli_env, run_main, tiny_dataset, tiny_run_flags  # noqa: F401  (fixture)

STEPS = 2
METHOD = '--config.method=unimatch'
KEYS = ('loss', 'loss_x', 'loss_s', 'loss_fp', 'loss_sbu', 'loss_ckr', 'mask_ratio', 'lr')


def _assert_same_arrays(got_dir, expected_dir, step, rtol=1e-5, atol=1e-6):
  expected = checkpoint.read_arrays(expected_dir / 'checkpoints', step)
  got = dict(jax.tree_util.tree_leaves_with_path(checkpoint.read_arrays(got_dir / 'checkpoints', step)))
  leaves = jax.tree_util.tree_leaves_with_path(expected)
  assert len(leaves) == len(got)
  for path, value in leaves:
    np.testing.assert_allclose(got[path], value, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_two_processes_equal_one_process_and_one_process_resumes_them(tiny_dataset, tmp_path):
  """2 processes train STEPS steps and stop (train.max_steps); 1 process resumes their checkpoint
  and continues to 2 * STEPS: all of it equal to one process that never stopped."""
  single = tmp_path / 'single'
  check_ok(run_main(*tiny_run_flags(tiny_dataset, single, f'--config.train.max_steps={2 * STEPS}',
                                    '--config.eval.every_epochs=1', METHOD), devices=4))

  multi = tmp_path / 'multi'
  env = cli_env(2)
  env['DEVICES_PER_PROCESS'] = '2'
  proc = subprocess.run(
      ['bash', 'launch/local.sh', '2', '--',
       *tiny_run_flags(tiny_dataset, multi, f'--config.train.max_steps={STEPS}', METHOD,
                       # A timed save at every logging step: process 0's clock decides for both.
                       '--config.checkpoint.every_minutes=0.00001')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  check_ok(proc)
  assert '4 devices (2 processes)' in proc.stdout, proc.stdout
  assert checkpoint.RunCheckpoints(multi / 'checkpoints', read_only=True).all_steps() == [1, 2]
  _assert_same_arrays(multi, single, STEPS)

  single_train = reporting.read_metrics(single / 'metrics.jsonl', kind='train')
  multi_train = reporting.read_metrics(multi / 'metrics.jsonl', kind='train')
  assert [r['step'] for r in multi_train] == list(range(1, STEPS + 1))
  for a, b in zip(single_train, multi_train):
    for key in KEYS:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a['step'], key)
  single_evals = {r['step']: r for r in reporting.read_metrics(single / 'metrics.jsonl', kind='eval')}
  multi_eval = reporting.read_metrics(multi / 'metrics.jsonl', kind='eval')[-1]
  assert multi_eval['step'] == STEPS
  assert multi_eval['miou'] == pytest.approx(single_evals[STEPS]['miou'], abs=1e-6)
  assert multi_eval['num_images'] == single_evals[STEPS]['num_images'] == 2

  # One process (4 devices) resumes the two processes' checkpoint.
  proc = run_main(*tiny_run_flags(tiny_dataset, multi, f'--config.train.max_steps={2 * STEPS}',
                                  METHOD), devices=4)
  check_ok(proc)
  assert proc.stdout.splitlines()[0] == f'resuming from step {STEPS} (checkpoints in {multi}/checkpoints)'
  assert '4 devices (1 processes)' in proc.stdout, proc.stdout
  # Two more steps carry the processes' summation-order differences forward: 10x the tolerance.
  _assert_same_arrays(multi, single, 2 * STEPS, rtol=1e-4, atol=1e-5)
  raw = [json.loads(line) for line in (multi / 'metrics.jsonl').read_text().splitlines()]
  resumed_train = [r for r in raw if r['kind'] == 'train']
  assert [r['step'] for r in resumed_train] == list(range(1, 2 * STEPS + 1))
  for a, b in zip(single_train, resumed_train):
    for key in KEYS:
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a['step'], key)
  resumed_eval = [r for r in raw if r['kind'] == 'eval'][-1]
  assert resumed_eval['step'] == 2 * STEPS
  assert resumed_eval['miou'] == pytest.approx(single_evals[2 * STEPS]['miou'], abs=1e-4)
