"""`python -m uccl_jax.main`: a short end-to-end run of configs/synthetic.py, eval reproducing it, bad inputs.

The runs are subprocesses (they test the command line) on a tiny generated
dataset and a tiny network. The step program of UCCL takes minutes to compile
on a 2-core CPU, so every run shares JAX's persistent compilation cache
($UCCL_JAX_TEST_COMPILE_CACHE, default <repo>/.cache/jax_test_compile_cache):
the first run on a machine compiles, later runs (and the resume and
multi-process tests, which use the same tiny settings) load the program.

The helpers here are shared with test_train_loop.py and test_multiprocess.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from uccl_jax import reporting

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tiny network and run shared by every end-to-end test (same program, one compilation).
TINY_FLAGS = (
    '--config.model.pretrained=none',  # the demo's source-domain backbone is pretrained elsewhere
    '--config.data.crop_size=33',
    '--config.model.width=4',
    '--config.model.head_channels=8',
    '--config.train.batch_size=4',
    '--config.train.epochs=4',
    '--config.train.log_every_steps=1',
    '--config.checkpoint.every_steps=2',
    '--config.eval.every_epochs=2',
    '--config.data.workers=0',
)
TRAIN_KEYS = ('step', 'loss', 'loss_x', 'loss_s', 'loss_fp', 'loss_sbu', 'loss_ckr', 'lr',
              'mask_ratio', 'step_time')


def compile_cache_dir() -> str:
  return os.environ.get('UCCL_JAX_TEST_COMPILE_CACHE',
                        str(REPO / '.cache' / 'jax_test_compile_cache'))


def cli_env(devices: int = 4) -> dict[str, str]:
  """Environment of a run with `devices` fake CPU devices and the shared compilation cache."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu',
             XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices} '
                        + os.environ.get('UCCL_JAX_TEST_XLA_EXTRA', '')),
             XLA_FLAGS_EXTRA=os.environ.get('UCCL_JAX_TEST_XLA_EXTRA', ''),
             JAX_COMPILATION_CACHE_DIR=compile_cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
             PYTHONPATH=str(REPO) + os.pathsep + env.get('PYTHONPATH', ''))
  return env


def run_main(*flags: str, devices: int = 4, timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'uccl_jax.main', *flags], cwd=REPO,
                        env=cli_env(devices), capture_output=True, text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
  assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The single 'error: ...' line of a failed run (and no traceback)."""
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def make_tiny_dataset(root: pathlib.Path) -> pathlib.Path:
  """The synthetic demo dataset, shrunk: 2 labeled + 8 unlabeled train images, 2 val, 32 x 64."""
  from uccl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.ensure_dataset(root, seed=0, num_train=10, num_labeled=2, num_val=2,
                                  size=(32, 64))


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> pathlib.Path:
  return make_tiny_dataset(tmp_path_factory.mktemp('data') / 'synthetic')


@pytest.fixture(scope='session')
def four_step_run(tiny_dataset, tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """One tiny UCCL run of 4 steps, shared: the end-to-end test checks it, the resume test compares."""
  workdir = tmp_path_factory.mktemp('four_steps') / 'run'
  return workdir, run_main(*tiny_run_flags(tiny_dataset, workdir, '--config.train.max_steps=4'))


def tiny_run_flags(dataset: pathlib.Path, workdir: pathlib.Path, *extra: str,
                   config: str = 'configs/synthetic.py') -> list[str]:
  return [f'--config={config}', f'--workdir={workdir}', f'--config.data.root={dataset}',
          *TINY_FLAGS, *extra]


_LOG_LINE = re.compile(r'^[DIWEF]\d{4} [\d:.]+\s+\d+ ([^:\]]+):\d+\] ')


def foreign_log_lines(stderr: str) -> list[str]:
  """absl-format log lines on stderr whose source file is not one of uccl_jax's."""
  own = {path.name for path in (REPO / 'uccl_jax').rglob('*.py')}
  return [line for line in stderr.splitlines()
          if (match := _LOG_LINE.match(line)) and match.group(1) not in own]


def eval_miou_line(stdout: str) -> str:
  lines = [line for line in stdout.splitlines() if line.strip()]
  assert lines and re.fullmatch(r'mIoU: \d+\.\d\d', lines[-1]), stdout
  return lines[-1]


# ----------------------------------------------------------------------------


def test_end_to_end_train_then_eval_reproduces_the_logged_miou(tiny_dataset, four_step_run, tmp_path):
  workdir, proc = four_step_run
  check_ok(proc)
  assert not foreign_log_lines(proc.stderr), proc.stderr  # orbax logs every save at INFO

  # Checkpoints every 2 steps and at each epoch end (2 steps per epoch); newest 2 kept.
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  config = json.loads((workdir / 'config.json').read_text())
  assert config['method'] == 'uccl' and config['model']['width'] == 4
  assert list((workdir / 'tensorboard').rglob('events.out.tfevents.*'))

  train = reporting.read_metrics(workdir / 'metrics.jsonl', kind='train')
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  for record in train:
    assert all(key in record for key in TRAIN_KEYS), record
  assert all(r['loss'] == pytest.approx(
      (r['loss_x'] + 0.5 * r['loss_s'] + 0.5 * r['loss_fp']) / 2 + 0.015 * r['loss_sbu']
      + 0.02 * r['loss_ckr'], rel=1e-5) for r in train)
  evals = reporting.read_metrics(workdir / 'metrics.jsonl', kind='eval')
  # eval.every_epochs=2: the end of epoch 2 is step 4, also the last step.
  assert [r['step'] for r in evals] == [4]
  assert set(evals[0]['iou_per_class']) == {'sky', 'ground', 'building', 'tree', 'car', 'person',
                                            'pole'}
  logged = f'mIoU: {evals[0]["miou"]:.2f}'

  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  proc = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                  f'--config.data.root={tiny_dataset}', *TINY_FLAGS, '--mode=eval')
  check_ok(proc)
  assert eval_miou_line(proc.stdout) == logged
  assert 'pole' in proc.stdout and 'checkpoint' in proc.stdout
  after = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  assert before == after  # evaluation writes nothing into the run folder
  assert not foreign_log_lines(proc.stderr), proc.stderr
  # --log_level brings the libraries' lines back (the default above hid them).
  proc = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                  f'--config.data.root={tiny_dataset}', *TINY_FLAGS, '--mode=eval',
                  '--log_level=warning')
  check_ok(proc)
  assert 'Given directory is read only' in proc.stderr and foreign_log_lines(proc.stderr)

  # A step folder given directly, and a step that does not exist.
  proc = run_main('--config=configs/synthetic.py', f'--workdir={tmp_path / "elsewhere"}',
                  f'--config.data.root={tiny_dataset}', *TINY_FLAGS, '--mode=eval',
                  f'--checkpoint={workdir / "checkpoints" / "4"}')
  check_ok(proc)
  assert eval_miou_line(proc.stdout) == logged
  proc = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                  f'--config.data.root={tiny_dataset}', *TINY_FLAGS, '--mode=eval',
                  '--checkpoint=3')
  assert 'no checkpoint at step 3 (saved steps: [2, 4])' in error_line(proc)


def _prior_run_folder(path: pathlib.Path) -> dict[pathlib.Path, bytes]:
  """A run folder with earlier output, to check that a failing start leaves it as it was."""
  path.mkdir(parents=True)
  (path / 'metrics.jsonl').write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
  (path / 'config.json').write_text('{"method": "uccl"}\n')
  return {p: p.read_bytes() for p in path.rglob('*') if p.is_file()}


@pytest.mark.parametrize('flags, message', [
    (('--config.data.root=/nonexistent/dataset',), r'data\.root: dataset folder /nonexistent/dataset does not exist'),
    (('--config.train.bogus=1',), r'bogus'),
    (('--config.train.batch_sise=4',),
     r'^error: --config\.train\.batch_sise: no such config field \(did you mean batch_size\?\)$'),
    (('--config.train.batch_size=four',),
     r'^error: --config\.train\.batch_size=four: wrong type for this config field'),
    (('--config=cityscapes.yaml',), r'^error: --config=cityscapes\.yaml: configs here are Python '
                                    r'files \(configs/\*\.py\).*docs/UNIMATCH_CONFIG\.md'),
    (('--config.train.batch_size=6',), r'train\.batch_size=6 must be divisible by the number of devices \(4\)'),
    (('--config.eval.mode=whole',), r"eval\.mode='whole'"),
    (('--config=configs/nothere.py',), r'configs/nothere\.py'),
    (('--config=configs/cityscapes.py:1_3',), r'unknown split'),
    (('--mode=eval',), r'no checkpoint folder'),
])
def test_bad_inputs_give_one_line_and_keep_the_run_folder(tiny_dataset, tmp_path, flags, message):
  workdir = tmp_path / 'run'
  before = _prior_run_folder(workdir)
  base = ['--config=configs/synthetic.py', f'--workdir={workdir}', f'--config.data.root={tiny_dataset}',
          '--config.model.pretrained=none']
  if any(flag.startswith('--config=') for flag in flags):
    base = [flag for flag in base if not flag.startswith('--config')]
  proc = run_main(*base, *flags, timeout=300)
  assert re.search(message, error_line(proc)), proc.stderr
  after = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  assert after == before


def _unwritable_folder(tmp_path: pathlib.Path) -> pathlib.Path:
  """A folder this process cannot write in: chmod 555, or (root ignores modes) sysfs."""
  if os.geteuid() == 0:
    return pathlib.Path('/sys')
  folder = tmp_path / 'read_only'
  folder.mkdir()
  folder.chmod(0o555)
  return folder


def test_a_workdir_that_cannot_be_a_run_folder_is_one_line(tiny_dataset, tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('not a run folder')
  locked = _unwritable_folder(tmp_path)
  cases = [(afile, rf'^error: --workdir={afile}: is a file, not a folder; choose another --workdir$'),
           (afile / 'run', rf'^error: --workdir={afile}/run: cannot be created, {afile} is a file'),
           (locked / 'run', rf'^error: --workdir={locked}/run: cannot write in {locked} \(.+\); '
                            r'choose a writable --workdir$')]
  for workdir, message in cases:
    proc = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                    f'--config.data.root={tiny_dataset}', *TINY_FLAGS, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
    assert re.search(message, error_line(proc)), proc.stderr
  assert afile.read_text() == 'not a run folder' and list(tmp_path.iterdir()) == [afile] + (
      [] if locked == pathlib.Path('/sys') else [locked])
  proc = run_main('--config=configs/synthetic.py', f'--workdir={afile}', '--mode=eval', timeout=120)
  assert re.search(rf'^error: --workdir={afile}: is a file, not a run folder$', error_line(proc))


def test_an_unwritable_path_in_the_run_folder_is_one_line(tiny_dataset, tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'metrics.jsonl').mkdir(parents=True)  # the run cannot append its metrics
  proc = run_main(*tiny_run_flags(tiny_dataset, workdir, '--config.train.max_steps=2'), timeout=300)
  assert error_line(proc) == (f'error: {workdir}/metrics.jsonl: Is a directory (in --workdir={workdir}: '
                              'make it writable or choose another --workdir)')
  assert proc.stderr.count('\n') == 1, proc.stderr
  assert not [p for p in workdir.rglob('*') if p.is_file()]  # nothing written


def test_help_exits_zero_with_the_examples_as_written():
  for flag in ('--help', '-h', '--helpfull'):
    proc = subprocess.run([sys.executable, '-m', 'uccl_jax.main', flag], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ('--workdir=runs/cs_1_8 \\\n      --config.data.root=/data/cityscapes\n'
            in proc.stdout), proc.stdout
    assert '--log_level' in proc.stdout and '--mode' in proc.stdout


def test_a_second_ctrl_c_ends_in_one_line_interrupted(tiny_dataset, tmp_path):
  """The first SIGINT asks the loop to save and stop; the next ones must end it as `interrupted`."""
  workdir = tmp_path / 'run'
  with subprocess.Popen([sys.executable, '-m', 'uccl_jax.main',
                         *tiny_run_flags(tiny_dataset, workdir)], cwd=REPO, env=cli_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
    try:
      for line in proc.stdout:
        if line.startswith('step 1'):  # compiled and stepping: the loop's handler is installed
          break
      sent = 0
      while proc.poll() is None and sent < 100:
        proc.send_signal(signal.SIGINT)
        sent += 1
        time.sleep(0.2)
      _, stderr = proc.communicate(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert sent >= 2
  assert proc.returncode == 130, stderr
  assert stderr.splitlines() == ['interrupted'], stderr
