"""`python -m uccl_jax.benchmark teacher`: pseudo-label figures against an independent count, bad inputs.

The run is made here, not trained: a tiny network's initial state, its
classifier replaced by large random weights (so the argmax covers several
classes and the confidences spread from 1/7 to near 1), saved as a checkpoint
of a run folder. The figures the command writes are checked against
probabilities computed in this file with `model.apply` on images read with PIL
and normalised in NumPy, and counts taken from the definitions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from uccl_jax import checkpoint
from uccl_jax import train
from uccl_jax.benchmark import teacher

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ('--config.model.pretrained=none', '--config.data.crop_size=33', '--config.model.width=4',
        '--config.model.head_channels=8')
STEP = 3
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _demo_config(root: pathlib.Path):
  spec = importlib.util.spec_from_file_location('_teacher_synthetic_config', REPO / 'configs' / 'synthetic.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('uccl')
  config.data.root = str(root)
  config.model.pretrained = 'none'
  config.data.crop_size = 33
  config.model.width = 4
  config.model.head_channels = 8
  return config


def _save_run(config, workdir: pathlib.Path) -> tuple:
  """A run folder with one checkpoint (step STEP); returns (model, its variables)."""
  model = train.build_model(config)
  mesh = train.make_mesh(config)
  state = train._state_factory(config, model, mesh, 1)(jax.random.PRNGKey(0))  # pylint: disable=protected-access
  old = state.params['classifier']
  rng = np.random.default_rng(0)
  classifier = {'kernel': rng.normal(0.0, 100.0, old['kernel'].shape).astype(np.float32),
                'bias': np.zeros(old['bias'].shape, np.float32)}
  classifier = {name: jax.device_put(value, old[name].sharding) for name, value in classifier.items()}
  state = state.replace(params={**state.params, 'classifier': classifier})
  checkpoints = checkpoint.RunCheckpoints(workdir / train.CHECKPOINT_DIR)
  checkpoints.save(STEP, state, {'step': STEP})
  checkpoints.wait()
  return model, {'params': state.params, 'batch_stats': state.batch_stats}


def _reference_maps(model, variables, root: pathlib.Path, lines: list[tuple[str, str]]):
  """[(mask, argmax, max probability)] per image, computed here from the definitions."""
  logits_fn = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
  maps = []
  for image_path, mask_path in lines:
    pixels = np.asarray(Image.open(root / image_path).convert('RGB'))
    normalised = ((pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)[None]
    logits = np.asarray(logits_fn(variables, normalised))[0].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    maps.append((np.asarray(Image.open(root / mask_path)), logits.argmax(-1), probs.max(-1)))
  return maps


def _threshold_between(confidences: np.ndarray, quantile: float) -> float:
  """A threshold near `quantile` of the confidences, midway in the widest gap around it, so
  last-bit differences between two computations of a probability cannot move a pixel across."""
  values = np.unique(confidences)
  middle = int(quantile * (len(values) - 1))
  window = np.arange(max(middle - 20, 0), min(middle + 20, len(values) - 1))
  widest = window[np.argmax(values[window + 1] - values[window])]
  return float((values[widest] + values[widest + 1]) / 2)


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> dict:
  from uccl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('teacher')
  root = synthetic.ensure_dataset(base / 'synthetic', seed=0, num_train=10, num_labeled=2,
                                  num_val=2, size=(32, 64))
  workdir = base / 'run'
  model, variables = _save_run(_demo_config(root), workdir)
  lines = [tuple(line.split()) for line in (root / 'splits' / 'unlabeled.txt').read_text().splitlines()
           if line.strip()]
  maps = _reference_maps(model, variables, root, lines)
  flags = ['teacher', '--config=configs/synthetic.py', f'--workdir={workdir}',
           f'--config.data.root={root}', *TINY]
  return {'root': root, 'workdir': workdir, 'maps': maps, 'flags': flags, 'base': base}


def _run(argv, capsys) -> tuple[int, str, str]:
  status = teacher.main(argv)
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _expected(maps, threshold: float, num_classes: int = 7) -> dict:
  """The figures from their definitions, pixel by pixel over all images."""
  mask = np.concatenate([m.ravel() for m, _, _ in maps]).astype(np.int64)
  pred = np.concatenate([p.ravel() for _, p, _ in maps])
  conf = np.concatenate([c.ravel() for _, _, c in maps])
  valid = mask != 255
  sure = valid & (conf >= threshold)
  ratio = lambda a, b: None if b == 0 else a / b
  per_class = []
  for c in range(num_classes):
    truly, said = valid & (mask == c), sure & (pred == c)
    per_class.append({'gt_share': ratio(truly.sum(), valid.sum()),
                      'confident_recall': ratio((said & truly).sum(), truly.sum()),
                      'confident_precision': ratio((said & truly).sum(), said.sum()),
                      'confident_share': ratio(said.sum(), sure.sum())})
  return {'valid_pixels': int(valid.sum()), 'confident_pixels': int(sure.sum()),
          'confident_share': ratio(sure.sum(), valid.sum()),
          'confident_accuracy': ratio((sure & (pred == mask)).sum(), sure.sum()),
          'pixel_accuracy': ratio((valid & (pred == mask)).sum(), valid.sum()),
          'per_class': per_class}


def _assert_close(got, want, where: str) -> None:
  if want is None:
    assert got is None, where
  else:
    assert got == pytest.approx(want, abs=1e-12), where


def test_figures_equal_an_independent_count_of_the_definitions(run, capsys):
  confidences = np.concatenate([c.ravel() for _, _, c in run['maps']])
  threshold = _threshold_between(confidences, 0.6)
  out = run['base'] / 'figures' / 'teacher.json'
  status, stdout, stderr = _run([*run['flags'], f'--threshold={threshold!r}', f'--out={out}'], capsys)
  assert status == 0, stderr
  got = json.loads(out.read_text())
  want = _expected(run['maps'], threshold)
  assert got['images'] == len(run['maps']) and got['threshold'] == threshold
  assert got['checkpoint'].endswith(os.path.join(train.CHECKPOINT_DIR, str(STEP)))
  for key in ('valid_pixels', 'confident_pixels'):
    assert got[key] == want[key], key
  for key in ('confident_share', 'confident_accuracy', 'pixel_accuracy'):
    _assert_close(got[key], want[key], key)
  assert 0.2 < got['confident_share'] < 0.6  # a threshold that splits the pixels
  names = [row['class'] for row in got['per_class']]
  assert names == ['sky', 'ground', 'building', 'tree', 'car', 'person', 'pole']
  for k, (row, expected) in enumerate(zip(got['per_class'], want['per_class'])):
    for key, value in expected.items():
      _assert_close(row[key], value, f'{names[k]} {key}')
  assert any(row['confident_precision'] is None for row in got['per_class'])  # a class never predicted
  assert sum(row['confident_share'] for row in got['per_class']) == pytest.approx(1.0)
  # The table shows the same figures, in percent.
  assert f'confident {100 * want["confident_share"]:.2f}%' in stdout
  sky = next(line for line in stdout.splitlines() if line.split()[:2] == ['0', 'sky'])
  assert f'{100 * want["per_class"][0]["gt_share"]:.2f}%' in sky
  assert f'wrote {out}' in stdout and not stderr


def test_threshold_one_trusts_almost_nothing_and_a_tiny_one_everything(run, capsys):
  figures = {}
  for threshold in ('1.0', '1e-6'):
    out = run['base'] / f'threshold_{threshold}.json'
    status, _, stderr = _run([*run['flags'], f'--threshold={threshold}', f'--out={out}',
                              '--checkpoint=latest'], capsys)
    assert status == 0, stderr
    figures[threshold] = json.loads(out.read_text())
  assert figures['1.0']['confident_share'] <= 1e-3
  assert figures['1e-6']['confident_share'] == 1.0
  assert figures['1e-6']['confident_accuracy'] == figures['1e-6']['pixel_accuracy']


def _split_file(run, name: str, text: str) -> pathlib.Path:
  path = run['base'] / name
  path.write_text(text)
  return path


def test_bad_inputs_are_one_line_naming_the_cause(run, capsys):
  base = run['base']
  image, mask = (run['root'] / 'splits' / 'unlabeled.txt').read_text().split('\n')[0].split()
  no_mask = _split_file(run, 'no_mask.txt', f'{image} {mask}\n{image}\n')
  (base / 'not_an_image.png').write_text('text, not a PNG')
  broken = _split_file(run, 'broken.txt', f'{base / "not_an_image.png"} {mask}\n')
  existing = base / 'existing.json'
  existing.write_text('{"keep": true}\n')
  (base / 'empty_run').mkdir()
  flags = [flag for flag in run['flags'] if not flag.startswith('--workdir=')]
  cases = [
      ([f'--workdir={base / "nowhere"}'], f'--workdir={base / "nowhere"}: no such folder'),
      ([f'--workdir={base / "empty_run"}'], 'no checkpoints folder'),
      ([f'--workdir={run["workdir"]}', '--checkpoint=7'], 'no checkpoint at step 7'),
      ([f'--workdir={run["workdir"]}', '--checkpoint=first'], '--checkpoint=first'),
      ([f'--workdir={run["workdir"]}', f'--split={no_mask}'], f'{no_mask}:2: no mask path'),
      ([f'--workdir={run["workdir"]}', f'--split={broken}'],
       f'{base / "not_an_image.png"}: cannot decode image'),
      ([f'--workdir={run["workdir"]}', f'--split={base / "none.txt"}'], 'none.txt: split file not found'),
      ([f'--workdir={run["workdir"]}', '--threshold=0'], '--threshold=0.0: must lie in (0, 1]'),
      ([f'--workdir={run["workdir"]}', '--threshold=1.5'], '--threshold=1.5: must lie in (0, 1]'),
      ([f'--workdir={run["workdir"]}', f'--out={existing}'], f'--out={existing}: exists already'),
      ([f'--workdir={run["workdir"]}', '--no_such_flag=1'], 'no_such_flag'),
  ]
  for extra, fragment in cases:
    status, _, stderr = _run([*flags, *extra], capsys)
    lines = stderr.splitlines()
    assert status == 1, (extra, stderr)
    assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], (extra, stderr)
  assert existing.read_text() == '{"keep": true}\n'  # not overwritten


def test_the_command_line_dispatches_and_helps(run):
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  command = [sys.executable, '-m', 'uccl_jax.benchmark', 'teacher']
  helped = subprocess.run([*command, '--help'], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120, check=False)
  assert helped.returncode == 0, helped.stderr
  assert '  python -m uccl_jax.benchmark teacher --config=configs/synthetic.py --workdir=runs/demo' in (
      helped.stdout.splitlines())
  assert '--threshold' in helped.stdout
  failed = subprocess.run([*command, '--config=configs/synthetic.py', f'--workdir={run["base"] / "gone"}'],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
  assert failed.returncode == 1
  assert failed.stderr.splitlines() == [f'error: --workdir={run["base"] / "gone"}: no such folder']
