"""The training loop: save/eval schedule, NaN stop, SIGTERM, and exact resume of a real run.

The schedule tests drive `train.run_loop` with a counting fake step (no model,
milliseconds). The resume test runs the real command line on the tiny
synthetic setup of test_main.py: 4 steps straight against 1 step stopped by
SIGTERM, resumed to step 2 (`train.max_steps`), resumed again to 4.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uccl_jax import checkpoint
from uccl_jax import config as config_lib
from uccl_jax import parallel
from uccl_jax import reporting
from uccl_jax import train
from uccl_jax.data import sources

from test_main import REPO, TINY_FLAGS, check_ok, cli_env, error_line, four_step_run, run_main, tiny_dataset, tiny_run_flags  # noqa: F401  (fixtures)


class _FakeIterator:
  """Batches numbered by position; the state is the position (as grain's iterator state is)."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    batch = {'x': np.full((4, 1), self.position, np.float32)}
    self.position += 1
    return batch

  def get_state(self):
    return {'position': self.position}


def _fake_step(nan_at: int | None = None, sigterm_at: int | None = None,
               signal_to_send: int = signal.SIGTERM):
  """state {'w'} += batch mean; metrics as the real step names them; optional NaN or SIGTERM."""
  @jax.jit
  def step_fn(state, batch):
    new = {'w': state['w'] + jnp.mean(batch['x']) + 1.0}
    return new, new['w']

  def train_step(state, batch):
    new_state, _ = step_fn(state, batch)
    count = train_step.calls = getattr(train_step, 'calls', 0) + 1
    loss = float('nan') if count == nan_at else 1.0 / count
    if count == sigterm_at:
      os.kill(os.getpid(), signal_to_send)
    metrics = {name: jnp.float32(loss) for name in train.step_lib.LOSS_NAMES}
    metrics.update(lr=jnp.float32(0.01), mask_ratio=jnp.float32(0.5), grad_norm=jnp.float32(1.0))
    return new_state, metrics
  return train_step


class _FakeResult:
  def __init__(self, step):
    self.miou = 10.0 + step
    self.iou_per_class = np.full((7,), 10.0 + step)
    self.present = np.ones((7,), bool)
    self.num_images = 2
    self.intersection = self.union = self.target = np.ones((7,), np.int64)
    self.pixel_accuracy = 50.0


def _run(tmp_path, monkeypatch, *, last_step, every_steps, eval_every, steps_per_epoch=3,
         nan_at=None, sigterm_at=None, log_every=2, train_step=None, signal_to_send=signal.SIGTERM,
         every_minutes=0.0, start=None):
  """run_loop with fakes; `start`: (step, state) to resume from (the checkpoints stay)."""
  config = config_lib.base_config()
  config.data.name = 'synthetic'
  config.data.num_classes = 7
  config.train.log_every_steps = log_every
  config.checkpoint.every_steps = every_steps
  config.checkpoint.every_minutes = every_minutes
  config.eval.every_epochs = eval_every
  evaluated = []

  def fake_evaluation(config, model, state):
    evaluated.append(int(round(float(jax.device_get(state['w'])))))
    return _FakeResult(len(evaluated))
  monkeypatch.setattr(train, 'run_evaluation', fake_evaluation)
  monkeypatch.setattr(train.evaluate_lib, 'format_iou_table', lambda result, names: 'table')

  mesh = parallel.make_mesh()
  start_step, state = start or (0, {'w': jnp.zeros(())})
  state = jax.device_put(state, parallel.replicated_sharding(mesh))
  iterator = _FakeIterator()
  iterator.position = start_step
  plan = train.RunPlan(steps_per_epoch=steps_per_epoch, schedule_steps=100, last_step=last_step,
                       with_unlabeled=True)
  manager = checkpoint.RunCheckpoints(tmp_path / 'checkpoints', keep=100)
  reporter = reporting.RunReporter(tmp_path, total_steps=last_step, start_step=start_step,
                                   is_main=True, tensorboard=False, console='off')
  try:
    with train._Preemption() as preemption:  # pylint: disable=protected-access
      result = train.run_loop(config, plan, None, mesh, train_step or _fake_step(nan_at, sigterm_at, signal_to_send), state,
                              iterator, manager, reporter, start_step, preemption)
  finally:
    reporter.close()
    manager.close()
  return result, evaluated


def test_saves_and_evaluates_on_schedule(tmp_path, monkeypatch):
  result, evaluated = _run(tmp_path, monkeypatch, last_step=8, every_steps=4, eval_every=2)
  assert result.step == 8 and not result.preempted
  manager = checkpoint.RunCheckpoints(tmp_path / 'checkpoints', read_only=True)
  # every 4 steps (4, 8), each epoch end (3, 6), the end (8).
  assert manager.all_steps() == [3, 4, 6, 8]
  # Every second epoch (step 6) and the end (8); the mIoU goes with that checkpoint.
  assert len(evaluated) == 2
  assert [manager.miou(s) for s in (3, 4, 6, 8)] == [None, None, 11.0, 12.0]
  assert manager.best_step() == 8
  # The iterator state saved with step s says s batches were consumed.
  for step in manager.all_steps():
    _, data_state = manager.restore(step, {'w': jnp.zeros(())})
    assert data_state == {'step': step}
  records = reporting.read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if r['kind'] == 'train'] == [2, 4, 6, 8]
  assert [r['step'] for r in records if r['kind'] == 'eval'] == [6, 8]
  assert all(math.isfinite(r['step_time']) for r in records if r['kind'] == 'train')


def test_epochs_shorter_than_a_logging_interval_do_not_save_each_epoch(tmp_path, monkeypatch):
  """4 labeled images, batch 4, no unlabeled list: every step ends an epoch. Saves then follow
  checkpoint.every_steps, the evaluations and the end only, not every step."""
  result, evaluated = _run(tmp_path, monkeypatch, last_step=9, every_steps=4, eval_every=3,
                           steps_per_epoch=1, log_every=2)
  assert result.step == 9 and len(evaluated) == 3
  manager = checkpoint.RunCheckpoints(tmp_path / 'checkpoints', read_only=True)
  # every 4 steps (4, 8), the evaluations every 3 one-step epochs (3, 6, 9), the end (9).
  assert manager.all_steps() == [3, 4, 6, 8, 9]


def test_steps_between_logging_steps_copy_nothing_to_the_host(tmp_path, monkeypatch,
                                                               cpu_transfer_guard):
  """The per-step path (prefetch, step, finite watch, progress) under a guard that forbids every
  device-to-host copy, explicit ones too: 9 non-logging steps, then the final (logging) step."""
  del cpu_transfer_guard
  monkeypatch.setattr(train, 'STEP_TRANSFER_GUARD', 'disallow_explicit')
  result, _ = _run(tmp_path, monkeypatch, last_step=10, every_steps=100, eval_every=0,
                   steps_per_epoch=100, log_every=100)
  assert result.step == 10
  records = reporting.read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if r['kind'] == 'train'] == [10]


def test_a_per_step_host_read_trips_the_guard(tmp_path, monkeypatch, cpu_transfer_guard):
  """The guard is real: a step that reads a device value on the host every step fails at once."""
  del cpu_transfer_guard
  fake = _fake_step()

  def reading_step(state, batch):
    state, metrics = fake(state, batch)
    float(metrics['loss'])  # the kind of per-step sync the loop must not make
    return state, metrics
  with pytest.raises(Exception, match='(?i)disallowed device-to-host'):
    _run(tmp_path / 'run', monkeypatch, last_step=10, every_steps=100, eval_every=0,
         steps_per_epoch=100, log_every=100, train_step=reading_step)


def test_nan_loss_stops_naming_step_and_terms_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  with pytest.raises(train.RunError, match=r'non-finite loss at step 5: loss=nan, loss_x=nan.*'
                                           r'last good checkpoint is kept'):
    _run(tmp_path, monkeypatch, last_step=8, every_steps=2, eval_every=0, steps_per_epoch=100,
         nan_at=5)
  manager = checkpoint.RunCheckpoints(tmp_path / 'checkpoints', read_only=True)
  assert manager.all_steps() == [2, 4]
  restored, _ = manager.restore(4, {'w': jnp.zeros(())})
  assert float(restored['w']) == pytest.approx(4 + sum(range(4)))


def test_sigterm_saves_then_stops(tmp_path, monkeypatch):
  result, evaluated = _run(tmp_path, monkeypatch, last_step=8, every_steps=100, eval_every=1,
                           steps_per_epoch=3, sigterm_at=3)
  assert result.preempted and result.step == 3
  assert evaluated == []  # the epoch-end evaluation is skipped: the job has seconds left
  manager = checkpoint.RunCheckpoints(tmp_path / 'checkpoints', read_only=True)
  assert manager.all_steps() == [3]


def test_ctrl_c_saves_then_stops_like_sigterm(tmp_path, monkeypatch, capsys):
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job
  result, _ = _run(tmp_path, monkeypatch, last_step=8, every_steps=100, eval_every=0,
                   steps_per_epoch=100, sigterm_at=5, signal_to_send=signal.SIGINT)
  assert result.preempted and result.step == 5
  assert checkpoint.RunCheckpoints(tmp_path / 'checkpoints', read_only=True).all_steps() == [5]
  assert signal.getsignal(signal.SIGINT) is before  # restored afterwards


def test_a_save_every_n_minutes_at_the_first_logging_step_after_them(tmp_path, monkeypatch):
  now = [0.0]
  monkeypatch.setattr(train, '_clock', lambda: now[0])
  fake = _fake_step()

  def one_minute_per_step(state, batch):
    now[0] += 60.0
    return fake(state, batch)
  result, _ = _run(tmp_path / 'timed', monkeypatch, last_step=9, every_steps=100, eval_every=0,
                   steps_per_epoch=100, log_every=2, every_minutes=2.5, train_step=one_minute_per_step)
  assert result.step == 9
  # Logging steps 2, 4, 6, 8: 4 min after the start > 2.5 -> save; at 8, 4 min after it; the end.
  assert checkpoint.RunCheckpoints(tmp_path / 'timed' / 'checkpoints',
                                   read_only=True).all_steps() == [4, 8, 9]
  now[0] = 0.0
  _run(tmp_path / 'untimed', monkeypatch, last_step=9, every_steps=100, eval_every=0,
       steps_per_epoch=100, log_every=2, every_minutes=0.0, train_step=one_minute_per_step)
  assert checkpoint.RunCheckpoints(tmp_path / 'untimed' / 'checkpoints',
                                   read_only=True).all_steps() == [9]


def test_a_rerun_after_a_crash_writes_each_step_once_as_an_uninterrupted_run(tmp_path, monkeypatch):
  straight, _ = _run(tmp_path / 'straight', monkeypatch, last_step=8, every_steps=4, eval_every=1,
                     steps_per_epoch=4, log_every=1)
  crashing = _fake_step()

  def crash_after_step_6(state, batch):
    if getattr(crash_after_step_6, 'calls', 0) == 6:
      raise RuntimeError('killed')
    crash_after_step_6.calls = getattr(crash_after_step_6, 'calls', 0) + 1
    return crashing(state, batch)
  with pytest.raises(RuntimeError, match='killed'):
    _run(tmp_path / 'crashed', monkeypatch, last_step=8, every_steps=4, eval_every=1,
         steps_per_epoch=4, log_every=1, train_step=crash_after_step_6)
  manager = checkpoint.RunCheckpoints(tmp_path / 'crashed' / 'checkpoints', read_only=True)
  assert manager.latest_step() == 4
  assert [r['step'] for r in reporting.read_metrics(tmp_path / 'crashed' / 'metrics.jsonl',
                                                    kind='train')][-1] == 6
  restored, data_state = manager.restore(4, {'w': jnp.zeros(())})
  assert data_state == {'step': 4}
  resumed = _fake_step()
  resumed.calls = 4
  _run(tmp_path / 'crashed', monkeypatch, last_step=8, every_steps=4, eval_every=1,
       steps_per_epoch=4, log_every=1, train_step=resumed, start=(4, restored))

  def rows(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  got, expected = rows(tmp_path / 'crashed'), rows(tmp_path / 'straight')
  steps = [(r['kind'], r['step']) for r in got if r['kind'] != 'resume']
  assert steps == [(r['kind'], r['step']) for r in expected]  # each once, in order
  assert [r['step'] for r in got if r['kind'] == 'train'] == list(range(1, 9))
  keys = train.step_lib.METRIC_NAMES
  assert ([{k: r[k] for k in keys} for r in got if r['kind'] == 'train']
          == [{k: r[k] for k in keys} for r in expected if r['kind'] == 'train'])


def test_check_config_names_the_field():
  config = config_lib.base_config()
  config.train.log_every_steps = 0
  with pytest.raises(train.RunError, match='train.log_every_steps=0 must be a positive integer'):
    train.check_config(config)
  config = config_lib.base_config()
  config.method = 'fixmatch'
  with pytest.raises(train.RunError, match="method='fixmatch'"):
    train.check_config(config)


# ----------------------------------------------------------------------------
# Exact resume of the real run.


def _final_arrays(workdir, step):
  return checkpoint.read_arrays(workdir / 'checkpoints', step)


def _train_records(workdir):
  keys = ('loss', 'loss_x', 'loss_s', 'loss_fp', 'loss_sbu', 'loss_ckr', 'lr', 'mask_ratio')
  return {r['step']: {k: r[k] for k in keys}
          for r in reporting.read_metrics(workdir / 'metrics.jsonl', kind='train')}


def test_resume_is_exact(tiny_dataset, four_step_run, tmp_path):
  straight, straight_proc = four_step_run  # 4 steps straight (shared with test_main's end-to-end test)
  check_ok(straight_proc)

  # SIGTERM while the program is still being set up: the run stops after step 1 with a checkpoint.
  stopped = tmp_path / 'stopped'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'uccl_jax.main',
       *tiny_run_flags(tiny_dataset, stopped, '--config.train.max_steps=4')],
      cwd=REPO, env=cli_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (stopped / 'checkpoints').is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-4000:]
  assert 'SIGTERM: saved the checkpoint at step 1' in out, out + err[-3000:]
  assert checkpoint.RunCheckpoints(stopped / 'checkpoints', read_only=True).all_steps() == [1]

  # Resume to step 2 (a stop at N/2 by train.max_steps), then to step 4.
  proc = run_main(*tiny_run_flags(tiny_dataset, stopped, '--config.train.max_steps=2'))
  check_ok(proc)
  assert proc.stdout.splitlines()[0] == f'resuming from step 1 (checkpoints in {stopped}/checkpoints)'
  # What a run killed after logging step 3, before saving it, leaves behind.
  with open(stopped / 'metrics.jsonl', 'a') as file:
    file.write(json.dumps({'kind': 'train', 'step': 3, 'loss': 99.0}) + '\n')
  proc = run_main(*tiny_run_flags(tiny_dataset, stopped, '--config.train.max_steps=4'))
  check_ok(proc)
  assert proc.stdout.splitlines()[0] == (
      f'resuming from step 2 (checkpoints in {stopped}/checkpoints); dropped 1 records of later '
      f'steps from {stopped}/metrics.jsonl: they are recomputed')
  assert 'resumed at step 2' in proc.stdout
  # Each step once, in order, in the file itself (not only as read_metrics replays it).
  raw = [json.loads(line) for line in (stopped / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in raw if r['kind'] == 'train'] == [1, 2, 3, 4]

  expected, got = _final_arrays(straight, 4), _final_arrays(stopped, 4)
  assert int(got['step']) == 4
  flat_expected = jax.tree_util.tree_leaves_with_path(expected)
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  assert len(flat_expected) == len(flat_got)
  for path, value in flat_expected:
    np.testing.assert_allclose(flat_got[path], value, rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  records_expected, records_got = _train_records(straight), _train_records(stopped)
  assert sorted(records_got) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):
    for key, value in records_expected[step].items():
      assert records_got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
  eval_expected = reporting.read_metrics(straight / 'metrics.jsonl', kind='eval')[-1]
  eval_got = reporting.read_metrics(stopped / 'metrics.jsonl', kind='eval')[-1]
  assert eval_got['step'] == eval_expected['step'] == 4
  assert eval_got['miou'] == pytest.approx(eval_expected['miou'], abs=1e-6)


def test_pretrained_backbone_is_loaded_strictly(tmp_path):
  torch = pytest.importorskip('torch')
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top
  from uccl_jax.config import base_config  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.model.backbone, config.model.width, config.model.head_channels = 'resnet18', 4, 8
  config.data.crop_size, config.data.num_classes = 33, 7
  model = train.build_model(config)
  mesh = parallel.make_mesh()
  state = train._state_factory(config, model, mesh, 10)(jax.random.PRNGKey(0))  # pylint: disable=protected-access

  # A UniMatch-format backbone file (torch names, OIHW kernels) with random values.
  rng = np.random.default_rng(0)
  state_dict, expected = {}, {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(getattr(state, collection)['backbone']).items():
      value = np.abs(rng.normal(size=leaf.shape)).astype(np.float32)
      expected[(collection,) + path] = value
      torch_value = value.transpose(3, 2, 0, 1) if path[-1] == 'kernel' and value.ndim == 4 else value
      state_dict[convert.torch_key(path, collection)] = torch.from_numpy(np.ascontiguousarray(torch_value))
  torch.save(state_dict, tmp_path / 'resnet.pth')
  config.model.pretrained = str(tmp_path / 'resnet.pth')

  loaded = train.load_pretrained(config, model, state, mesh)
  for (collection, *path), value in expected.items():
    got = traverse_util.flatten_dict(getattr(loaded, collection)['backbone'])[tuple(path)]
    np.testing.assert_array_equal(np.asarray(got), value)
  for name in state.params:  # the head keeps its fresh initialisation
    if name != 'backbone':
      for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(loaded.params[name])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Strict: one missing tensor is an error naming it, not a silent random init.
  dropped = sorted(state_dict)[0]
  del state_dict[dropped]
  torch.save(state_dict, tmp_path / 'resnet.pth')
  with pytest.raises(train.RunError, match=rf'model\.pretrained: .*missing.*{dropped}'):
    train.load_pretrained(config, model, state, mesh)


# ----------------------------------------------------------------------------
# What a real run says and checks before it writes anything.


def _tiny_config(dataset, *overrides: str):
  """configs/synthetic.py with TINY_FLAGS and `overrides` ('section.field=int'), in-process."""
  spec = importlib.util.spec_from_file_location('_synthetic_config', REPO / 'configs' / 'synthetic.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.root = str(dataset)
  for flag in (*TINY_FLAGS, *overrides):
    name, value = flag.removeprefix('--config.').split('=')
    section, field = name.split('.')
    config[section][field] = int(value) if value.lstrip('-').isdigit() else value
  return config


def _files(folder):
  return {p: p.stat().st_mtime_ns for p in pathlib.Path(folder).rglob('*') if p.is_file()}


def test_first_lines_say_what_was_found_and_the_legend_and_log_plainly(four_step_run):
  workdir, proc = four_step_run
  check_ok(proc)
  lines = proc.stdout.splitlines()
  assert lines[0] == f'no checkpoint in {workdir}/checkpoints: starting at step 0'
  assert lines[1] == reporting.legend().splitlines()[0]
  legend = '\n'.join(lines[1:1 + len(train.step_lib.METRICS) + 1])
  assert legend == reporting.legend()
  # Not a terminal: one plain line per logging step (log_every_steps=1), no bar.
  assert '\r' not in proc.stdout + proc.stderr
  progress = [line for line in lines if line.startswith('step ') and ' | ' in line]
  assert [line.split(' | ')[0] for line in progress] == [f'step {s}/4' for s in (1, 2, 3, 4)]
  assert all(' x ' in line and ' mask ' in line and 'ETA ' in line for line in progress)


def test_a_missing_listed_image_stops_the_run_before_anything_is_written(tiny_dataset, tmp_path):
  dataset = tmp_path / 'data'
  shutil.copytree(tiny_dataset, dataset)
  unlabeled = (dataset / 'splits' / 'unlabeled.txt').read_text().splitlines()
  last_image = unlabeled[-1].split()[0]
  (dataset / last_image).unlink()
  workdir = tmp_path / 'run'
  with pytest.raises(sources.DataError) as raised:
    train.train_and_evaluate(_tiny_config(dataset), str(workdir))
  assert str(raised.value) == (
      f'1 files named in the data lists are missing: {dataset / last_image}: image file not '
      f'found (named in {dataset / "splits" / "unlabeled.txt"}:{len(unlabeled)})')
  assert not workdir.exists()


def test_a_config_that_does_not_fit_the_checkpoint_names_the_fields(tiny_dataset, four_step_run,
                                                                   tmp_path):
  straight, proc = four_step_run
  check_ok(proc)
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  before = _files(workdir)
  config = _tiny_config(tiny_dataset, '--config.model.width=32', '--config.data.num_classes=19')
  with pytest.raises(checkpoint.CheckpointError) as raised:
    train.train_and_evaluate(config, str(workdir))
  assert str(raised.value) == (
      f'{workdir}/checkpoints/4: saved with model.width=4, data.num_classes=7; the config says '
      "model.width=32, data.num_classes=19 (use the run's config, or another --workdir)")
  # --mode=eval makes the same check against the run's config.json.
  with pytest.raises(checkpoint.CheckpointError) as raised:
    train.evaluate_checkpoint(config, str(workdir), 'latest')
  assert str(raised.value).startswith(f'{workdir}/checkpoints/4: saved with model.width=4, ')
  # Without config.json the shapes still stop it, before any array is read.
  (workdir / 'config.json').unlink()
  del before[workdir / 'config.json']
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'^{workdir}/checkpoints/4: cannot restore into this model/optimizer: '):
    train.train_and_evaluate(config, str(workdir))
  assert _files(workdir) == before  # nothing written


def test_a_truncated_checkpoint_is_one_line_naming_its_folder(tiny_dataset, four_step_run, tmp_path):
  straight, proc = four_step_run
  check_ok(proc)
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  arrays = [p for p in (workdir / 'checkpoints' / '4' / 'state').rglob('*') if p.is_file()]
  largest = max(arrays, key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as file:
    file.truncate(largest.stat().st_size // 2)
  proc = run_main(*tiny_run_flags(tiny_dataset, workdir))
  line = error_line(proc)
  assert line.startswith(f'error: {workdir}/checkpoints/4: cannot read this checkpoint ('), line
  assert line.endswith('it is damaged or incomplete: move that folder away to resume from the '
                       'one before'), line
  assert 'Event loop is closed' not in proc.stderr and len(proc.stderr.splitlines()) < 5, proc.stderr
