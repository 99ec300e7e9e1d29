"""Tests of the step benchmark and the ablation command (no timing assertions).

The step benchmark runs for real on a tiny DeepLab (ResNet-18 width 4, crop
33) and only the supervised step (the UniMatch/UCCL programs take minutes to
compile on a 2-core CPU; their step logic is tested in test_step.py). The
ablation's planning, resuming, aggregation, tables and plot run on fake
metrics files; its training runs are replaced by a writer of such files.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from uccl_jax import config as config_lib
from uccl_jax import inputs
from uccl_jax import reporting
from uccl_jax import step as step_lib
from uccl_jax.benchmark import __main__ as benchmark_main
from uccl_jax.benchmark import ablation
from uccl_jax.benchmark import losses as losses_benchmark
from uccl_jax.benchmark import pipeline as pipeline_benchmark
from uccl_jax.benchmark import overhead
from uccl_jax.benchmark import random_inputs
from uccl_jax.benchmark import scaling
from uccl_jax.benchmark import step as step_benchmark
from uccl_jax.benchmark import step_cli
from uccl_jax.benchmark import timing
from uccl_jax.models import deeplab

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ('--config.data.crop_size=33', '--config.model.width=4', '--config.model.head_channels=8',
        '--config.train.batch_size=4')


def tiny_config(method: str = 'supervised'):
  config = config_lib.base_config()
  config.method = method
  config.data.crop_size = 33
  config.data.num_classes = 5
  config.model.backbone = 'resnet18'
  config.model.width = 4
  config.model.head_channels = 8
  config.train.batch_size = 4
  return config


# ----------------------------------------------------------------------------
# Step benchmark.


def test_random_batch_has_the_pipeline_layout():
  """Same structure, shapes and dtypes as the contract in uccl_jax.inputs, and every path exercised."""
  config = tiny_config()
  batch = random_inputs.random_batch(config, seed=1)
  spec = inputs.host_batch_spec(33, 4)
  assert jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), batch) == jax.tree.map(
      lambda x: (x.shape, x.dtype), spec)
  labels = set(np.unique(batch['labeled']['mask']).tolist())
  assert labels <= set(range(5)) | {255} and 255 in labels
  for stream in ('unlabeled', 'mix'):
    heights = batch[stream]['valid'][:, 2]
    assert (heights < 33).any() and (heights == 33).any()  # padding in some images only
  for key in ('box1', 'box2'):  # one box per image, inside the crop
    top, left, height, width = batch['unlabeled'][key].T
    assert np.all((height > 0) & (width > 0) & (top + height <= 33) & (left + width <= 33))


def test_random_state_matches_create_train_state_structure():
  config = tiny_config()
  model = deeplab.from_config(config.model, 5)
  state = random_inputs.random_train_state(config, model, seed=0)
  expected = jax.eval_shape(
      lambda k: step_lib.create_train_state(config, model, k, (33, 33, 3), total_steps=1000),
      jax.random.PRNGKey(0))
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), tree)
  for field in ('params', 'batch_stats', 'opt_state', 'step', 'rng'):
    assert shapes(getattr(state, field)) == shapes(getattr(expected, field)), field
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  kernels = [(p, x) for p, x in flat if p[-1].key == 'kernel' and x.size > 2000]
  assert kernels
  for _, kernel in kernels:  # He-normal: std sqrt(2 / fan_in)
    fan_in = math.prod(kernel.shape[:-1])
    assert abs(kernel.std() / math.sqrt(2.0 / fan_in) - 1.0) < 0.1
  for path, x in flat:
    if path[-1].key == 'scale':
      np.testing.assert_array_equal(x, 1.0)
  for path, x in jax.tree_util.tree_flatten_with_path(state.batch_stats)[0]:
    np.testing.assert_array_equal(x, 1.0 if path[-1].key == 'var' else 0.0)


def test_interleaved_overhead_alternates_the_steps_and_takes_per_round_ratios(monkeypatch):
  """A fake clock and fake compiled steps: uccl 'takes' 1.25x unimatch, plus a drifting machine."""
  clock = [0.0]
  order = []
  drift = iter([1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0])

  def fake_compiled_step(config, devices, host_state, host_batch):
    def run(state, batch):
      order.append(config.method)
      clock[0] += (1.25 if config.method == 'uccl' else 1.0) * next(drift)
      return state, {'loss': 0.0}
    return run, host_state, host_batch, 0.0

  monkeypatch.setattr(timing, 'compiled_step', fake_compiled_step)
  monkeypatch.setattr(overhead.time, 'perf_counter', lambda: clock[0])
  result = overhead.interleaved_overhead(tiny_config('uccl'), jax.devices()[:1], rounds=5)
  # One warm-up step each, then rounds in the order AB, BA, AB, ...
  assert order == ['unimatch', 'uccl'] + ['unimatch', 'uccl', 'uccl', 'unimatch'] * 2 + [
      'unimatch', 'uccl']
  # Drift moves both steps of a round together, so every ratio is exactly 1.25.
  assert result['overhead_percent'] == pytest.approx(25.0)
  assert result['overhead_percent_quartiles'] == pytest.approx([25.0, 25.0])
  assert result['rounds'] == 5 and result['anchors'] == 'passes'
  assert result['unimatch_step_time_s'] == pytest.approx(1.0)


def test_loss_figures_are_taken_at_the_step_feature_size():
  config = tiny_config('uccl')  # crop 33 -> features 9x9 (deep stem, max pool: ceil(33 / 4))
  record = losses_benchmark.measure_losses(config, repeats=2)
  assert {k: record[k] for k in ('batch', 'feature_size', 'classes', 'channels')} == {
      'batch': 4, 'feature_size': 9, 'classes': 5, 'channels': 8}
  assert 0 < record['sbu_ckr_fwd_bwd_min_s'] <= record['sbu_ckr_fwd_bwd_s']


def test_step_benchmark_writes_the_json_fields(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  status = step_cli.main([f'--config={REPO / "configs" / "synthetic.py"}', *TINY,
                          '--methods=supervised', '--steps=2', f'--json={out}',
                          '--nopipeline', '--nolosses', '--matmul_size=256'])
  assert status == 0
  report = json.loads(out.read_text())
  (record,) = report['methods']
  for field in step_benchmark.RECORD_FIELDS:
    assert field in record, field
  assert record['method'] == 'supervised'
  assert record['device'].startswith('cpu: ') and record['num_devices'] == len(jax.devices())
  assert record['step_time_s'] > 0 and record['compile_s'] > 0
  assert record['images_per_s'] == pytest.approx(4 / record['step_time_s'])
  assert record['flops_per_step'] > 0
  rate = report['matmul']['matmul_flops_per_s']
  assert rate > 0 and report['matmul']['matmul_size'] == 256
  assert record['mfu'] == pytest.approx(record['flops_per_step'] / record['step_time_s'] / rate)
  assert record['peak_memory_bytes'] > 0
  assert math.isfinite(record['loss_first_step'])
  printed = capsys.readouterr().out
  assert 'supervised' in printed and 'wrote' in printed


def test_scaling_same_loss_and_global_flops_on_one_and_four_devices():
  config = tiny_config('supervised')
  rows = scaling.measure_scaling(config, (1, 4, 8, 3), steps=1)
  by_count = {row['num_devices']: row for row in rows}
  assert 'skipped' in by_count[8] and 'skipped' in by_count[3]  # 8 > devices; 3 does not divide 4
  # Same state and batch: the step computes the same loss whatever the sharding.
  assert by_count[4]['loss_difference'] < 1e-4 * abs(by_count[1]['loss_first_step'])
  assert by_count[1]['speedup'] == 1.0
  # XLA's cost analysis reports one device's share: times the device count it is the whole step,
  # plus the work every device repeats (the replicated optimizer update), a few percent here.
  ratio = by_count[4]['flops_per_step'] / by_count[1]['flops_per_step']
  assert 1.0 <= ratio < 1.25, ratio


def test_overhead_percent_from_step_times():
  records = [{'method': 'unimatch', 'step_time_s': 0.2}, {'method': 'uccl', 'step_time_s': 0.25}]
  assert overhead.overhead_percent(records) == pytest.approx(25.0)
  assert overhead.overhead_percent(records[:1]) is None


def test_step_benchmark_bad_flags_give_one_line(capsys):
  assert step_cli.main(['--methods=fastest', '--nopipeline', '--nolosses']) == 2
  assert step_cli.main(['--config=configs/synthetic.py', '--config.no_such=1']) == 2
  assert step_cli.main(['--config=configs/synthetic.py', '--config.train.batch_size=3',
                        '--nopipeline', '--nolosses']) == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(lines) == 3 and all(l.startswith('error: ') for l in lines), lines
  assert 'fastest' in lines[0] and 'no_such' in lines[1] and 'batch_size' in lines[2]


def _run_benchmark(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', 'uccl_jax.benchmark', *args], capture_output=True,
                        text=True, env=env, timeout=300, check=False, cwd=REPO)


@pytest.mark.parametrize('flag', ['--help', '-h', '--helpfull'])
def test_help_exits_0_and_prints_the_examples_and_flags_with_their_line_breaks(flag):
  result = _run_benchmark(flag)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  examples = lines[lines.index('examples:') + 1:lines.index('examples:') + 5]
  assert examples[0] == ('  python -m uccl_jax.benchmark --config=configs/pascal.py '
                         '--methods=unimatch,uccl --json=step.json')
  assert all(line.startswith('  python -m uccl_jax.benchmark ') for line in examples), examples
  usage = '\n'.join(lines[:lines.index('examples:')])
  assert all(name in usage for name in benchmark_main.BENCHMARKS)  # every subcommand is named
  for name in ('--methods', '--steps', '--json', '--[no]pipeline', '--scaling_devices', '--config'):
    assert any(line.startswith(f'  {name}:') for line in lines), name


def test_bad_flags_from_the_command_line_are_one_line_without_traceback(tmp_path):
  for args, fragment in ((['--no_such_flag=1'], "Unknown command line flag 'no_such_flag'"),
                         (['--config=configs/synthetic.py', '--steps=many'], '--steps=many'),
                         (['--config=nowhere.py'], 'no such file nowhere.py')):
    result = _run_benchmark(*args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], result.stderr


def test_an_unwritable_json_path_fails_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
  ran = []
  monkeypatch.setattr(step_cli, 'run', lambda *args, **kwargs: ran.append(1))
  (tmp_path / 'a_file').write_text('not a folder')
  out = tmp_path / 'a_file' / 'bench.json'  # its parent is a file: no one can write there
  assert step_cli.main(['--config=configs/synthetic.py', f'--json={out}']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --json={out}: cannot write') and err.count('\n') == 1, err
  assert not ran and (tmp_path / 'a_file').read_text() == 'not a folder'


def test_dispatch_unknown_benchmark_name(capsys):
  assert benchmark_main.main(['benchmark', 'nonsense']) == 2
  assert 'ablation' in capsys.readouterr().err
  assert set(benchmark_main.BENCHMARKS) >= {'losses', 'pipeline', 'ablation'}


# ----------------------------------------------------------------------------
# Ablation: aggregation, tables, plot, resume, on fake metrics files.


def write_metrics(path: pathlib.Path, evals: dict[int, float], step_times=(0.5, 0.7, 0.6)):
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [{'kind': 'message', 'text': 'hello'}]
  for index, t in enumerate(step_times):
    lines.append({'kind': 'train', 'step': index + 1, 'step_time': t, 'loss': 1.0,
                  'mask_ratio': 0.1 * (index + 1), 'loss_x': 1.0, 'loss_s': 0.5, 'loss_fp': 0.25,
                  'loss_sbu': 2.0, 'loss_ckr': 4.0})
  for step, miou in evals.items():
    lines.append({'kind': 'eval', 'step': step, 'miou': miou, 'iou_per_class': {'a': miou}})
  path.write_text(''.join(json.dumps(l) + '\n' for l in lines))


FAKE_FINAL = {  # row -> per-seed final mIoU
    'supervised': [40.0, 42.0, 41.0],
    'unimatch': [50.0, 51.0, 52.5],
    'sbu': [50.5, 51.0, 52.0],
    'ckr': [51.0, 52.0, 53.5],
    'uccl': [51.0, 51.5, 53.0],
    'uccl_pasted': [50.0, 51.0, 52.0],
}


def fake_runs(workdir: pathlib.Path, steps: int = 4):
  for name, finals in FAKE_FINAL.items():
    for seed, final in enumerate(finals):
      write_metrics(ablation.run_dir(workdir, ablation.ROWS_BY_NAME[name], seed) / 'metrics.jsonl',
                    {2: final - 10.0 - seed, steps: final})


def test_collect_means_stds_curves_and_step_times(tmp_path):
  fake_runs(tmp_path)
  # A fourth seed that stopped before the end counts as missing.
  write_metrics(ablation.run_dir(tmp_path, ablation.ROWS[0], 3) / 'metrics.jsonl', {2: 1.0})
  summary = ablation.collect(tmp_path, ablation.ROWS, [0, 1, 2, 3], steps=4)
  for name, finals in FAKE_FINAL.items():
    entry = summary[name]
    assert entry['final'] == dict(enumerate(finals))
    assert entry['mean'] == pytest.approx(np.mean(finals))
    assert entry['std'] == pytest.approx(np.std(finals, ddof=1))
    assert entry['curve'] == {2: [f - 10.0 - s for s, f in enumerate(finals)], 4: finals}
    assert entry['step_time_s'] == pytest.approx(0.6)  # median of each run, mean over seeds
    assert entry['missing'] == [3]


def test_paired_differences_and_verdicts(tmp_path):
  fake_runs(tmp_path)
  summary = ablation.collect(tmp_path, ablation.ROWS, [0, 1, 2], steps=4)
  by_pair = {(c['row'], c['reference']): c for c in ablation.paired_differences(summary)}
  semi = by_pair[('unimatch', 'supervised')]
  assert semi['differences'] == pytest.approx([10.0, 9.0, 11.5])
  assert semi['verdict'] == 'ahead'
  sbu = by_pair[('sbu', 'unimatch')]  # +0.5, 0, -0.5: no decision
  assert sbu['mean'] == pytest.approx(0.0) and sbu['verdict'] == 'within the spread'
  ckr = by_pair[('ckr', 'unimatch')]  # +1, +1, +1: std 0 -> ahead
  assert ckr['verdict'] == 'ahead' and ckr['std'] == pytest.approx(0.0)
  pasted = by_pair[('uccl_pasted', 'uccl')]  # -1, -0.5, -1
  assert pasted['mean'] == pytest.approx(-2.5 / 3) and pasted['verdict'] == 'behind'
  one_seed = ablation.paired_differences(ablation.collect(tmp_path, ablation.ROWS, [0], steps=4))
  assert all(c['verdict'] == 'one seed: undecided' for c in one_seed)


def test_tables_plot_and_marked_block(tmp_path):
  fake_runs(tmp_path)
  summary = ablation.collect(tmp_path, ablation.ROWS, [0, 1, 2], steps=4)
  tables = ablation.format_tables(summary, steps=4)
  assert '| UniMatch baseline |  |  | 51.17 ± 1.26 (n=3) | 50.00 | 51.00 | 52.50 | 0.600 |' in tables
  assert '| + CKR − UniMatch baseline | +1.00 ± 0.00 | +1.00, +1.00, +1.00 | ahead |' in tables

  png = ablation.plot_curves(summary, tmp_path / 'out' / 'plot.png')
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  results = tmp_path / 'RESULTS.md'
  results.write_text('# Results\n\nbefore\n\n' + ablation.BEGIN_MARKER + '\nold\n' +
                     ablation.END_MARKER + '\n\nafter\n')
  ablation.replace_marked_block(results, 'new block')
  text = results.read_text()
  assert 'old' not in text and 'new block' in text
  assert text.startswith('# Results\n\nbefore\n') and text.endswith('\n\nafter\n')
  ablation.replace_marked_block(results, 'newer')
  assert text.replace('new block', 'newer') == results.read_text()
  fresh = ablation.replace_marked_block(tmp_path / 'sub' / 'NEW.md', 'first')
  assert ablation.BEGIN_MARKER in fresh.read_text() and 'first' in fresh.read_text()
  results.write_text('only ' + ablation.BEGIN_MARKER)
  with pytest.raises(ablation.AblationError, match='one of the ablation markers'):
    ablation.replace_marked_block(results, 'x')
  assert results.read_text() == 'only ' + ablation.BEGIN_MARKER  # left as it was


def test_schedule_must_be_whole_epochs():
  row = ablation.ROWS_BY_NAME['unimatch']
  assert ablation.schedule_overrides(96, 48, 48, row=row) == [
      '--config.train.epochs=2', '--config.train.max_steps=96', '--config.eval.every_epochs=1',
      '--config.checkpoint.every_steps=48']
  with pytest.raises(ablation.AblationError, match='--steps=100'):
    ablation.schedule_overrides(100, 50, 48, row=row)


def test_ablation_defaults_are_the_demos_dataset_and_budget():
  """The plain command ablates the demo itself: its dataset, its steps, its evaluations."""
  from uccl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  parsed = ablation._parse_flags([])  # pylint: disable=protected-access
  assert (parsed.num_train, parsed.num_labeled) == (synthetic.DEMO_NUM_TRAIN,
                                                    synthetic.DEMO_NUM_LABELED)
  config = parsed.config  # configs/synthetic.py, the uccl variant
  steps_per_epoch = (parsed.num_train - parsed.num_labeled) // config.train.batch_size
  assert parsed.steps == config.train.epochs * steps_per_epoch
  assert parsed.eval_every == config.eval.every_epochs * steps_per_epoch


def test_ablation_command_trains_missing_runs_only_and_writes_results(tmp_path, monkeypatch,
                                                                       capsys):
  """End to end with the training subprocess replaced by a fake: plan, skip, resume, report."""
  monkeypatch.setenv('UCCL_JAX_CACHE', str(tmp_path / 'cache'))
  trained = []

  def fake_train_run(spec, workdir, steps):
    trained.append((spec.row.name, spec.seed))
    flags = dict(o.split('=', 1) for o in spec.overrides)
    assert flags['--config.train.seed'] == str(spec.seed)
    assert flags['--config.method'] == spec.row.method
    assert flags['--config.sbu.enabled'] == str(spec.row.sbu)
    assert flags['--config.ckr.enabled'] == str(spec.row.ckr)
    assert flags['--config.unsup.anchors'] == ('pasted' if spec.row.name == 'uccl_pasted'
                                               else 'passes')
    assert flags['--config.sbu.variant'] == ('paper' if spec.row.name == 'uccl_paper'
                                             else 'reference')
    assert flags['--config.train.max_steps'] == str(steps)
    # 12 train images, 4 labeled, batch 4: semi epoch 2 steps, supervised epoch 1 step.
    per_epoch = 1 if spec.row.method == 'supervised' else 2
    assert flags['--config.train.epochs'] == str(steps // per_epoch)
    assert flags['--config.eval.every_epochs'] == str(2 // per_epoch)
    miou = 30.0 + 5 * ablation.ROWS.index(spec.row) + spec.seed
    write_metrics(spec.workdir / reporting.METRICS_FILE, {2: miou - 5, steps: miou})
    return 1.0

  monkeypatch.setattr(ablation, 'train_run', fake_train_run)
  out = tmp_path / 'docs'
  argv = ['ablation', '--seeds=2', '--steps=4', '--eval_every=2', f'--out={out}',
          f'--workdir={tmp_path / "runs"}', '--num_train=12', '--num_labeled=4', '--num_val=2',
          '--config.train.batch_size=4']
  # One run finished before: it is skipped.
  done = ablation.run_dir(tmp_path / 'runs', ablation.ROWS_BY_NAME['uccl'], 1)
  write_metrics(done / reporting.METRICS_FILE, {2: 1.0, 4: 99.0})
  assert ablation.main(argv) == 0
  assert len(trained) == 2 * len(ablation.ROWS) - 1 and ('uccl', 1) not in trained
  text = (out / ablation.RESULTS_FILE).read_text()
  assert '| UCCL (SBU + CKR) | ✓ | ✓ | 74.50 ± 34.65 (n=2) | 50.00 | 99.00 |' in text
  # The demo config starts from the source-domain backbone: its own block and plot.
  assert (out / ablation.PRETRAINED_PLOT_FILE).read_bytes()[:4] == b'\x89PNG'
  assert text.count(ablation.PRETRAINED_BEGIN_MARKER) == 1 and ablation.BEGIN_MARKER not in text
  assert 'backbone pretrained (synthetic:source)' in text
  # Mask ratio and loss terms over the second half (steps 3 and 4 of 4: only step 3 is logged).
  assert '| UCCL (SBU + CKR) | 0.300 | 1.000 | 0.500 | 0.250 | 0.0300 | 0.0800 |' in text
  assert 'python -m uccl_jax.benchmark ablation --seeds=2' in text
  total = 2 * len(ablation.ROWS)
  assert f'in which {total - 1} of the {total} runs trained' in text
  # A rerun trains nothing and replaces the block rather than adding one.
  trained.clear()
  assert ablation.main(argv) == 0
  assert trained == []
  assert (out / ablation.RESULTS_FILE).read_text().count(ablation.PRETRAINED_BEGIN_MARKER) == 1
  # From scratch: a second block beside the first, which is kept.
  assert ablation.main([*argv, f'--workdir={tmp_path / "scratch"}', '--config.model.pretrained=none']) == 0
  text = (out / ablation.RESULTS_FILE).read_text()
  assert text.count(ablation.BEGIN_MARKER) == 1 and text.count(ablation.PRETRAINED_BEGIN_MARKER) == 1
  assert 'from scratch (random initialisation)' in text and (out / ablation.PLOT_FILE).is_file()
  assert ablation.main([*argv[:2], '--steps=5']) == 2  # not a multiple of --eval_every
  assert '--steps=5' in capsys.readouterr().err
  assert ablation.main(['ablation', '--eval-every=2', '--steps=5']) == 2  # dashed: warned, then read
  err = capsys.readouterr().err
  assert 'warning: --eval-every is deprecated; use --eval_every' in err and '--eval_every=2' in err


def test_ablation_help_exits_0_with_the_examples(capsys):
  assert ablation.main(['ablation', '--help']) == 0
  out = capsys.readouterr().out
  assert '  python -m uccl_jax.benchmark ablation [--seeds=3]' in out and '--rows' in out


def test_ablation_refuses_a_run_folder_trained_with_other_settings(tmp_path):
  row = ablation.ROWS_BY_NAME['sbu']
  spec = ablation.RunSpec(row, 0, tmp_path / 'run', ('--config.train.max_steps=8',
                                                     '--config.sbu.enabled=True'))
  spec.workdir.mkdir()
  (spec.workdir / reporting.CONFIG_FILE).write_text(json.dumps(
      {'train': {'max_steps': 4}, 'sbu': {'enabled': True}}))
  with pytest.raises(ablation.AblationError, match='max_steps=4'):
    ablation._check_run_settings(spec)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Pipeline benchmark.


def test_pipeline_benchmark_counts_the_bytes_of_the_batch_contract():
  setting = pipeline_benchmark.Setting('tiny', (40, 60), 'png', 33, batch_size=2)
  row = pipeline_benchmark.run_setting(setting, steps=1, workers=None, step_times=[0.5])
  spec = inputs.host_batch_spec(33, 2)
  assert row['bytes_per_step'] == sum(math.prod(x.shape) * x.dtype.itemsize
                                      for x in jax.tree.leaves(spec))
  assert row['core_s_per_step'] > 0
  assert row['cores_needed']['0.5'] == pytest.approx(row['core_s_per_step'] / 0.5)
  assert 'tiny' in pipeline_benchmark.format_report([row])


def test_pipeline_figure_of_the_step_benchmark_defaults_to_the_dataset_source_size():
  assert pipeline_benchmark.SOURCE_SIZES['pascal'] == pipeline_benchmark.SETTINGS['pascal'].source_size
  assert pipeline_benchmark.SOURCE_SIZES['synthetic'] == (128, 256)


# ----------------------------------------------------------------------------
# The named benchmarks' command lines (eval: test_benchmark_evaluation.py).


@pytest.mark.parametrize('name,example', [
    ('pipeline', '  python -m uccl_jax.benchmark pipeline --settings=cityscapes --workers=4 '
                 '--json=pipeline.json'),
    ('losses', '  python -m uccl_jax.benchmark losses --size=201 --classes=19 --notorch_loops'),
    ('gpu_check', '  python -m uccl_jax.benchmark gpu_check --parts=input,pasted'),
])
def test_named_benchmark_help_exits_0_with_the_examples(name, example):
  result = _run_benchmark(name, '--help')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert example in lines[lines.index('examples:'):]
  assert 'Flags:' in lines and any(line.startswith('  --') for line in lines)


@pytest.mark.parametrize('argv,fragment', [
    (['pipeline', '--settings=pascal,mars'], '--settings: unknown mars'),
    (['pipeline', '--step_times=fast'], '--step_times=fast: expected comma-separated seconds'),
    (['pipeline', '--source_size=375'], '--source_size=375: expected an image size HxW'),
    (['pipeline', '--steps=0'], '--steps=0: must be >= 1'),
    (['pipeline', '--workers=many'], 'flag --workers=many'),
    (['losses', '--batch=0'], '--batch=0: must be >= 1'),
    (['losses', '--variant=best'], 'flag --variant=best'),
    (['losses', '--ignored_fraction=1.5'], '--ignored_fraction=1.5: must be in [0, 1)'),
    (['losses', '--no_such=1'], "Unknown command line flag 'no_such'"),
])
def test_named_benchmark_bad_values_are_one_line(argv, fragment, capsys, monkeypatch):
  monkeypatch.setattr(pipeline_benchmark, 'run_setting', lambda *a, **k: pytest.fail('ran'))
  monkeypatch.setattr(losses_benchmark, '_numpy_loops', lambda *a, **k: pytest.fail('ran'))
  assert benchmark_main.main(['uccl_jax.benchmark', *argv]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and fragment in err[0], err


def test_named_benchmark_accepts_a_dashed_flag_with_a_warning(capsys, monkeypatch):
  runs = []
  monkeypatch.setattr(pipeline_benchmark, 'run_setting',
                      lambda setting, **kwargs: runs.append(setting) or {})
  monkeypatch.setattr(pipeline_benchmark, 'format_report', lambda rows: 'report')
  assert benchmark_main.main(['uccl_jax.benchmark', 'pipeline', '--settings=pascal',
                              '--batch-size=2', '--source-size=40x60']) == 0
  assert runs[0].batch_size == 2 and runs[0].source_size == (40, 60)
  assert capsys.readouterr().err.splitlines() == [
      'warning: --batch-size is deprecated; use --batch_size',
      'warning: --source-size is deprecated; use --source_size']


def test_losses_time_jax_losses_needs_no_command_line():
  times = losses_benchmark.time_jax_losses(batch=1, size=5, classes=3, channels=4, repeats=2)
  assert len(times) == 2 and all(t > 0 for t in times)
