"""metrics.jsonl, TensorBoard event files, console output and the config file of a run."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from uccl_jax import reporting
from uccl_jax.reporting import ReportingError, RunReporter, read_metrics


def train_metrics(step, **overrides):
  metrics = {'loss': jnp.float32(1.0 / step), 'loss_x': np.float32(0.5), 'loss_s': 0.25,
             'loss_fp': 0.125, 'loss_sbu': jnp.asarray(0.01), 'loss_ckr': 0.02, 'lr': 1e-3,
             'mask_ratio': 0.75, 'grad_norm': 2.0, 'step_time': 0.5}
  metrics.update(overrides)
  return metrics


def strict_json_lines(path):
  """Every line parsed by a strict JSON parser (no NaN/Infinity tokens)."""
  def reject(token):
    raise ValueError(f'non-standard JSON token {token}')
  return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_train_and_eval_records_are_json_lines(tmp_path):
  with RunReporter(tmp_path, total_steps=10, console='off', tensorboard=False) as reporter:
    reporter.log_train(1, train_metrics(1))
    reporter.log_train(2, train_metrics(2, loss=float('nan'), loss_ckr=jnp.inf))
    reporter.log_eval(2, np.float64(41.5), {'road': 90.0, 'sky': np.float32(-0.0)}, epoch=1)
    # Flushed per record: readable before close.
    records = strict_json_lines(tmp_path / 'metrics.jsonl')
  assert [r['kind'] for r in records] == ['train', 'train', 'eval']
  first = records[0]
  for key in reporting.TRAIN_KEYS + ('step', 'time'):
    assert key in first
  assert first['step'] == 1 and first['loss'] == 1.0 and first['loss_sbu'] == pytest.approx(0.01)
  assert math.isnan(float(records[1]['loss'])) and float(records[1]['loss_ckr']) == math.inf
  assert records[2] == {'kind': 'eval', 'step': 2, 'time': records[2]['time'], 'miou': 41.5,
                        'iou_per_class': {'road': 90.0, 'sky': 0.0}, 'epoch': 1}


def test_missing_training_field_is_one_clear_error(tmp_path):
  metrics = train_metrics(1)
  del metrics['mask_ratio'], metrics['loss_ckr']
  with RunReporter(tmp_path, total_steps=10, console='off', tensorboard=False) as reporter:
    with pytest.raises(ReportingError, match='step 3 lack loss_ckr, mask_ratio'):
      reporter.log_train(3, metrics)


def test_resume_drops_the_steps_it_recomputes_so_each_step_is_written_once(tmp_path):
  with RunReporter(tmp_path, total_steps=6, console='off', tensorboard=False) as reporter:
    for step in range(1, 6):
      reporter.log_train(step, train_metrics(step))
    reporter.log_eval(3, 9.0, {'road': 9.0})
    reporter.log_eval(4, 10.0, {'road': 10.0})
  lines = (tmp_path / 'metrics.jsonl').read_bytes().splitlines(keepends=True)
  kept = b''.join(lines[:3] + lines[5:6])  # steps 1-3 and the eval at 3
  # Checkpoint at step 3; steps 4-5 and the eval at 4 are recomputed by the resumed run.
  with RunReporter(tmp_path, total_steps=6, start_step=3, console='off',
                   tensorboard=False) as reporter:
    assert reporter.dropped_records == 3
    assert (tmp_path / 'metrics.jsonl').read_bytes().startswith(kept)  # the rest, byte for byte
    for step in range(4, 7):
      reporter.log_train(step, train_metrics(step, loss=100.0 + step))
  assert not list(tmp_path.glob('*.tmp'))
  raw = strict_json_lines(tmp_path / 'metrics.jsonl')
  assert [(r['kind'], r['step']) for r in raw] == (
      [('train', s) for s in (1, 2, 3)] + [('eval', 3), ('resume', 3)]
      + [('train', s) for s in (4, 5, 6)])
  assert read_metrics(tmp_path / 'metrics.jsonl') == raw
  assert [r['loss'] for r in raw if r['kind'] == 'train'][3:] == [104.0, 105.0, 106.0]


def test_a_start_over_without_checkpoint_drops_the_earlier_attempt(tmp_path):
  with RunReporter(tmp_path, total_steps=6, console='off', tensorboard=False) as reporter:
    reporter.write_config(ml_collections.ConfigDict({'lr': 1.0}))
    reporter.log_train(1, train_metrics(1))
    reporter.log_train(2, train_metrics(2))
  with RunReporter(tmp_path, total_steps=6, console='off', tensorboard=False) as reporter:
    assert reporter.dropped_records == 2
    assert (tmp_path / 'metrics.jsonl').read_bytes() == b''
    # The earlier attempt's config is replaced: its steps are redone with this one.
    assert reporter.write_config(ml_collections.ConfigDict({'lr': 2.0})) == tmp_path / 'config.json'
    reporter.log_train(1, train_metrics(1, loss=7.0))
  assert [(r['step'], r['loss']) for r in strict_json_lines(tmp_path / 'metrics.jsonl')] == [(1, 7.0)]
  assert json.loads((tmp_path / 'config.json').read_text()) == {'lr': 2.0}
  assert not list(tmp_path.glob('config.step_*'))


def test_truncate_metrics_keeps_the_file_when_nothing_goes(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  assert reporting.truncate_metrics(path, 3) == 0 and not path.exists()
  path.write_bytes(b'{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
  before = path.stat().st_mtime_ns, path.stat().st_ino
  assert reporting.truncate_metrics(path, 2) == 0
  assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
  assert reporting.truncate_metrics(path, 1) == 1
  assert path.read_bytes() == b'{"kind": "train", "step": 1}\n'


def test_line_cut_off_by_a_crash_is_skipped_and_corruption_is_named(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  with RunReporter(tmp_path, total_steps=6, console='off', tensorboard=False) as reporter:
    reporter.log_train(1, train_metrics(1))
  with open(path, 'ab') as file:
    file.write(b'{"kind": "train", "step": 2, "lo')  # killed mid-write
  assert [r['step'] for r in read_metrics(path)] == [1]
  with RunReporter(tmp_path, total_steps=6, start_step=1, console='off',
                   tensorboard=False) as reporter:
    reporter.log_train(2, train_metrics(2))
  assert [(r['kind'], r['step']) for r in strict_json_lines(path)] == [  # the cut line is gone
      ('train', 1), ('resume', 1), ('train', 2)]
  lines = path.read_text().splitlines()
  assert json.loads(lines[-1])['step'] == 2
  path.write_text('\n'.join(lines[:1] + ['garbage'] + lines[-1:]) + '\n')
  with pytest.raises(ReportingError, match=r'metrics\.jsonl:2: not a JSON object'):
    read_metrics(path)


def read_event_records(path):
  """TFRecord framing checked independently: lengths and masked CRC32C of every record."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
  data = path.read_bytes()
  offset, payloads = 0, []
  while offset < len(data):
    header = data[offset:offset + 8]
    length = int.from_bytes(header, 'little')
    assert int.from_bytes(data[offset + 8:offset + 12], 'little') == masked_crc32c(header)
    payload = data[offset + 12:offset + 12 + length]
    assert int.from_bytes(data[offset + 12 + length:offset + 16 + length], 'little') == (
        masked_crc32c(payload))
    payloads.append(payload)
    offset += 16 + length
  return payloads


def test_tensorboard_scalars_read_back(tmp_path):
  with RunReporter(tmp_path, total_steps=10, console='off') as reporter:
    reporter.log_train(1, train_metrics(1))
    reporter.log_train(2, train_metrics(2))
    reporter.log_eval(2, 41.5, {'road': 90.0, 'traffic light': 3.0})
  event_files = list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(event_files) == 1
  assert len(read_event_records(event_files[0])) > 5
  scalars = {(tag, step): value
             for tag, step, value in reporting.iter_tensorboard_scalars(tmp_path / 'tensorboard')}
  assert scalars[('train/loss', 1)] == 1.0 and scalars[('train/loss', 2)] == 0.5
  assert scalars[('train/mask_ratio', 2)] == 0.75
  assert scalars[('eval/mIoU', 2)] == 41.5
  assert scalars[('eval/IoU/traffic_light', 2)] == 3.0


def test_a_resumed_run_is_one_tensorboard_run_without_the_recomputed_points(tmp_path):
  with RunReporter(tmp_path, total_steps=6, console='off') as reporter:
    for step in range(1, 6):
      reporter.log_train(step, train_metrics(step))
  with RunReporter(tmp_path, total_steps=6, start_step=3, console='off') as reporter:
    for step in range(4, 7):
      reporter.log_train(step, train_metrics(step, loss=100.0 + step))
  # One folder (one run in TensorBoard); the second writer's purge_step=4 drops steps 4-5 of the
  # first, as TensorBoard does when it reads the folder.
  assert [p.parent for p in (tmp_path / 'tensorboard').rglob('events.out.tfevents.*')] == [
      tmp_path / 'tensorboard'] * 2
  curves = reporting.read_tensorboard_scalars(tmp_path / 'tensorboard')
  assert curves['train/loss'] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 104.0),
                                  (5, 105.0), (6, 106.0)]


def test_only_the_main_process_writes(tmp_path, capsys):
  workdir = tmp_path / 'run'
  with RunReporter(workdir, total_steps=10, is_main=False, console='lines') as reporter:
    reporter.write_config(ml_collections.ConfigDict({'a': 1}))
    reporter.log_train(1, {})  # not even validated: nothing happens off the main process
    reporter.log_eval(1, 1.0, {'a': 1.0})
    reporter.message('hello')
  assert not workdir.exists()
  assert capsys.readouterr() == ('', '')


def test_config_written_once_and_never_overwritten_on_resume(tmp_path):
  config = ml_collections.ConfigDict({'train': {'lr': 0.001, 'epochs': 80}, 'crop': (321, 321)})
  with RunReporter(tmp_path, total_steps=10, console='off', tensorboard=False) as reporter:
    assert reporter.write_config(config) == tmp_path / 'config.json'
  original = (tmp_path / 'config.json').read_text()
  assert json.loads(original) == {'crop': [321, 321], 'train': {'epochs': 80, 'lr': 0.001}}
  with RunReporter(tmp_path, total_steps=10, start_step=50, console='off',
                   tensorboard=False) as reporter:
    assert reporter.write_config(config) is None
    config.train.epochs = 120
    assert reporter.write_config(config) == tmp_path / 'config.step_50.json'
  assert (tmp_path / 'config.json').read_text() == original
  assert json.loads((tmp_path / 'config.step_50.json').read_text())['train']['epochs'] == 120


def test_console_lines_show_losses_and_eta(tmp_path, capsys):
  with RunReporter(tmp_path, total_steps=100, console='lines', tensorboard=False) as reporter:
    reporter.log_train(10, train_metrics(10))
    reporter.log_train(20, train_metrics(20))
    reporter.log_eval(20, 12.345, {'road': 1.0}, table='mIoU: 12.35')
  out = capsys.readouterr().out.splitlines()
  assert out[0] == ('step 10/100 | loss 0.1 x 0.5 s 0.25 fp 0.125 sbu 0.01 ckr 0.02 mask 0.75 '
                    'lr 0.001 grad 2 | 0.5 s/step | ETA ?')
  assert out[1].startswith('step 20/100') and 'ETA 0:00:0' in out[1]
  assert out[-1] == 'mIoU: 12.35'


def test_without_a_terminal_auto_prints_plain_lines_not_a_bar(tmp_path, capsys):
  # Under pytest's capture neither stream is a terminal, as in CI or a SLURM log file.
  with RunReporter(tmp_path, total_steps=20, tensorboard=False) as reporter:
    reporter.advance(5)
    reporter.log_train(10, train_metrics(10))
    reporter.log_train(20, train_metrics(20))
  out, err = capsys.readouterr()
  assert '\r' not in out + err and err == ''
  assert [line.split(' | ')[0] for line in out.splitlines()] == ['step 10/20', 'step 20/20']


def test_eta_counts_the_evaluations_still_to_come_at_their_measured_time(tmp_path, monkeypatch):
  clock = [1000.0]
  monkeypatch.setattr(reporting.time, 'time', lambda: clock[0])
  with RunReporter(tmp_path, total_steps=100, console='off', tensorboard=False) as reporter:
    reporter.schedule_evaluations([50, 100])
    reporter.log_train(10, train_metrics(10))
    clock[0] += 40.0  # steps 11-50: 1 s each
    reporter.log_train(50, train_metrics(50))
    # 50 steps and 2 evaluations to go, none timed yet.
    assert reporter.eta(50) == '0:00:50 +2 eval'
    clock[0] += 30.0
    reporter.log_eval(50, 1.0, {'road': 1.0}, seconds=30.0)
    clock[0] += 10.0  # steps 51-60
    reporter.log_train(60, train_metrics(60))
    # 40 steps at 1 s (the evaluation's 30 s are not steps) + 1 evaluation of 30 s.
    assert reporter.eta(60) == '0:01:10'
  evals = read_metrics(tmp_path / 'metrics.jsonl', kind='eval')
  assert evals[0]['eval_seconds'] == 30.0


def test_the_legend_names_every_metric_of_the_one_list():
  from uccl_jax import step  # pylint: disable=g-import-not-at-top
  text = reporting.legend()
  for name, short, meaning in step.METRICS:
    assert f' {short} ' in text and meaning in text and f'[{name}]' in text
  assert 'x    = labeled loss: cross-entropy (or OHEM' in text
  assert reporting.TRAIN_KEYS == step.METRIC_NAMES + ('step_time',)
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  width = max(len(short) for _, short, _ in step.METRICS)
  for _, short, meaning in step.METRICS:  # the README's legend is this one
    assert f'  {short:<{width}} = {meaning}\n' in readme, short


def test_console_bar_shows_progress_and_summary(tmp_path, capsys):
  with RunReporter(tmp_path, total_steps=100, start_step=40, console='bar',
                   tensorboard=False) as reporter:
    reporter.advance(45)
    reporter.log_train(50, train_metrics(50))
  err = capsys.readouterr().err
  assert '50/100' in err and 'loss 0.02 ' in err and 'mask 0.75 ' in err and 'ETA ' in err


def test_no_torch_or_tensorflow_at_run_time(tmp_path):
  code = (
      'import sys\n'
      'from uccl_jax import evaluate, reporting\n'
      f'r = reporting.RunReporter({str(tmp_path)!r}, total_steps=2, is_main=True, console="off")\n'
      'r.close()\n'
      'list(reporting.iter_tensorboard_scalars(r.workdir))\n'
      'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow")))\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], check=True)
  assert result.stdout.strip() == '[]'


def test_eval_progress_bar_counts_images(tmp_path, capsys):
  with RunReporter(tmp_path, total_steps=10, console='bar', tensorboard=False) as reporter:
    with reporter.eval_progress(total=7) as progress:
      progress(4)
      progress(7)
  err = capsys.readouterr().err
  assert 'eval:' in err and '/7 [' in err  # tqdm redraws at most every 0.1 s
  with RunReporter(tmp_path, total_steps=10, console='lines', tensorboard=False) as reporter:
    with reporter.eval_progress(total=7) as progress:
      progress(7)
  assert capsys.readouterr() == ('', '')
