"""Tests of the dataset checker (uccl_jax/data/check.py and `python -m uccl_jax.data`)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

import data_fixtures
from uccl_jax.data import check
from uccl_jax.data import classes
from uccl_jax.data import sources
from uccl_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_checker(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'uccl_jax.data', *flags], cwd=REPO, capture_output=True, text=True,
                        check=False, timeout=120)


def test_checker_counts_pixels_per_class_like_numpy(tmp_path):
  tree = data_fixtures.make_pascal_tree(tmp_path, messy=True)
  reports = check.check_dataset(data_fixtures.data_config(tree, 'pascal'), threads=2)
  assert [r.split for r in reports] == ['labeled', 'unlabeled', 'val'] and not check.problems(reports)
  assert [(r.records, r.readable) for r in reports] == [(2, 2), (4, 4), (2, 2)]
  assert reports[1].pixel_counts is None  # unlabeled masks are never read
  expected = np.zeros(256, np.int64)
  for _, mask_rel in tree['val_lines']:
    values, counts = np.unique(np.asarray(Image.open(tree['root'] / mask_rel)), return_counts=True)
    expected[values] += counts
  np.testing.assert_array_equal(reports[2].pixel_counts, expected)
  text = check.format_report(reports, classes.pascal())
  share = 100 * expected[15] / expected.sum()
  assert f' 15 person           {share:6.2f}%' in text
  assert '  val: 2/2 records read' in text


def test_checker_reports_every_planted_problem_with_file_and_split_line(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=8, num_labeled=4, messy=True)
  root, lines = tree['root'], tree['train_lines']
  (root / lines[0][0]).unlink()  # missing image (labeled)
  (root / lines[1][0]).write_bytes((root / lines[1][0]).read_bytes()[:150])  # truncated PNG (labeled)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / lines[2][1])  # mask of another size (labeled)
  Image.fromarray(np.full((32, 64), 42, np.uint8)).save(root / tree['val_lines'][1][1])  # out of range (val)
  (root / lines[6][0]).write_bytes(b'not a png')  # undecodable unlabeled image
  reports = check.check_dataset(data_fixtures.data_config(tree, 'cityscapes'), threads=2)
  found = check.problems(reports)
  assert len(found) == 5
  line_of = {entry.image: f'{path}:{entry.line}' for path in (tree['labeled'], tree['unlabeled'], tree['val'])
             for entry in sources.read_split_file(path)}
  planted = [(lines[0][0], lines[0][0], 'image file not found'), (lines[1][0], lines[1][0], 'cannot decode image'),
             (lines[2][0], lines[2][1], 'mask size 8x8 differs'), (lines[6][0], lines[6][0], 'cannot decode image'),
             (tree['val_lines'][1][0], tree['val_lines'][1][1], 'mask values 42 outside 0..18 and 255')]
  for image_rel, bad_rel, message in planted:
    assert any(p.startswith(f'{root / bad_rel}: {message}') and p.endswith(f'(named in {line_of[image_rel]})')
               for p in found), (bad_rel, found)
  assert [(r.records, r.readable) for r in reports] == [(4, 1), (4, 3), (2, 1)]


def test_cli_exits_nonzero_with_one_line_per_problem(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=4)
  (tree['root'] / tree['train_lines'][3][0]).unlink()
  config_flags = [f'--config={REPO}/configs/cityscapes.py', f'--config.data.root={tree["root"]}',
                  f'--config.data.labeled_split={tree["labeled"]}', f'--config.data.unlabeled_split={tree["unlabeled"]}',
                  f'--config.data.val_split={tree["val"]}']
  result = _run_checker(*config_flags)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [f'error: {tree["root"] / tree["train_lines"][3][0]}: image file not found '
                    f'(named in {tree["unlabeled"]}:2)']
  assert 'Traceback' not in result.stderr + result.stdout
  result = _run_checker(*config_flags[:1], f'--config.data.root={tmp_path}/absent')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert f'error: data.root: dataset folder {tmp_path}/absent does not exist' in result.stderr.splitlines()


def test_cli_passes_on_the_synthetic_dataset_and_writes_a_preview(tmp_path):
  root = synthetic.generate(tmp_path / 'synthetic', seed=0, num_train=6, num_labeled=2, num_val=2, size=(48, 96))
  preview = tmp_path / 'preview.png'
  result = _run_checker(f'--config={REPO}/configs/cityscapes.py', '--config.data.name=synthetic',
                        f'--config.data.root={root}', '--config.data.num_classes=7',
                        '--config.data.labeled_split=splits/labeled.txt',
                        '--config.data.unlabeled_split=splits/unlabeled.txt', '--config.data.val_split=splits/val.txt',
                        '--config.data.crop_size=40', f'--preview={preview}', '--samples=2')
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'dataset OK' in result.stdout and '  labeled: 2/2 records read' in result.stdout
  for name in classes.SYNTHETIC_NAMES:
    assert f' {name} ' in result.stdout
  grid = np.asarray(Image.open(preview))
  assert grid.shape == (check.CAPTION_HEIGHT + 2 * 40 + 4, 5 * 40 + 4 * 4, 3)
  header = grid[:check.CAPTION_HEIGHT]
  for column in range(5):  # every column has its caption (dark text on white)
    assert (header[:, column * 44:column * 44 + 40] < 100).any(), column
  for gap in range(4):  # and the captions stay inside their columns
    assert (header[:, gap * 44 + 40:gap * 44 + 44] == 255).all(), gap


def test_caption_strip_draws_each_caption_in_its_column():
  strip = check.caption_strip(check.PREVIEW_CAPTIONS, 60)
  assert check.PREVIEW_CAPTIONS == ('crop', 'mask', 'weak', 'strong 1', 'strong 2')
  assert strip.shape == (check.CAPTION_HEIGHT, 5 * 60 + 4 * 4, 3) and strip.dtype == np.uint8
  columns = [strip[:, i * 64:i * 64 + 60] for i in range(5)]
  assert all((c < 100).any() for c in columns)
  assert not np.array_equal(columns[3], columns[4])  # 'strong 1' and 'strong 2' differ
  assert not np.array_equal(columns[0], columns[1])


def test_cli_help_exits_zero_with_the_examples_as_written():
  for flag in ('--help', '-h', '--helpfull'):
    result = _run_checker(flag)
    assert result.returncode == 0, result.stderr
    assert ('--config.data.root=/data/cityscapes \\\n      --preview=preview.png\n'
            in result.stdout), result.stdout
    assert '--preview' in result.stdout and '--log_level' in result.stdout


def test_preview_outlines_cutmix_boxes(tmp_path):
  box = np.zeros((10, 12), np.int32)
  box[2:5, 3:9] = 1
  outlined = check._outline(np.zeros((10, 12, 3), np.uint8), box, (255, 0, 0))  # pylint: disable=protected-access
  red = outlined[..., 0] == 255
  assert red[2, 3:9].all() and red[4, 3:9].all() and red[2:5, 3].all() and red[2:5, 8].all()
  assert not red[0].any() and not red[:, 10:].any()
  np.testing.assert_array_equal(check._outline(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)), (1, 2, 3)), 0)  # pylint: disable=protected-access
