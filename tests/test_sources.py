"""Tests of uccl_jax/data/sources.py and classes.py against files written by the tests themselves."""

from __future__ import annotations

import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data_fixtures
from uccl_jax.data import classes
from uccl_jax.data import sources

# The shared folder beside the checkout (../shared), where this project's machines keep UniMatch's lists.
REAL_SPLITS = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'unimatch_splits'
REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- split files

def test_read_split_file_accepts_blank_lines_trailing_spaces_crlf_and_comments(tmp_path):
  path = tmp_path / 'list.txt'
  path.write_bytes(b'# header\r\n\r\na/1.png b/1.png  \r\n   \r\n  a/2.png\tb/2.png\r\na/3.png # no mask\r\n\r\n')
  entries = sources.read_split_file(path)
  assert entries == [sources.SplitLine('a/1.png', 'b/1.png', 3), sources.SplitLine('a/2.png', 'b/2.png', 5),
                     sources.SplitLine('a/3.png', None, 6)]


def test_read_split_file_names_file_and_line_of_a_bad_line(tmp_path):
  path = tmp_path / 'list.txt'
  path.write_text('a.png b.png\n\na.png b.png c.png\n')
  with pytest.raises(sources.DataError, match=rf'^{path}:3: expected "image_path \[mask_path\]", found 3 fields$'):
    sources.read_split_file(path)


def test_read_split_file_rejects_an_empty_list_and_a_missing_file(tmp_path):
  path = tmp_path / 'empty.txt'
  path.write_text('\n  \r\n# only a comment\n')
  with pytest.raises(sources.DataError, match='lists no images'):
    sources.read_split_file(path)
  with pytest.raises(sources.DataError, match='split file not found'):
    sources.read_split_file(tmp_path / 'absent.txt')


@pytest.mark.skipif(not REAL_SPLITS.is_dir(), reason='UniMatch split lists not on this machine')
def test_real_unimatch_split_files_parse():
  # Cityscapes has 2975 train images, VOC+SBD 10582: every labeled/unlabeled pair covers the train set.
  for dataset, total, splits in (('cityscapes', 2975, ('1_16', '1_8', '1_4', '1_2')),
                                 ('pascal', 10582, ('92', '183', '366', '732', '1464'))):
    for split in splits:
      labeled = sources.read_split_file(REAL_SPLITS / dataset / split / 'labeled.txt')
      unlabeled = sources.read_split_file(REAL_SPLITS / dataset / split / 'unlabeled.txt')
      assert len(labeled) + len(unlabeled) == total, (dataset, split)
      assert not {e.image for e in labeled} & {e.image for e in unlabeled}
      assert all(entry.mask for entry in labeled)
    if dataset == 'pascal':
      assert len(sources.read_split_file(REAL_SPLITS / 'pascal' / '92' / 'labeled.txt')) == 92
  assert len(sources.read_split_file(REAL_SPLITS / 'cityscapes' / 'val.txt')) == 500
  assert len(sources.read_split_file(REAL_SPLITS / 'pascal' / 'val.txt')) == 1449


# ---------------------------------------------------------------------------------------------- folder sources

def test_cityscapes_source_reads_records_as_written(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, messy=True)
  config = data_fixtures.data_config(tree, 'cityscapes')
  labeled = sources.make_source(config, 'labeled')
  unlabeled = sources.make_source(config, 'unlabeled')
  val = sources.make_source(config, 'val')
  assert (len(labeled), len(unlabeled), len(val)) == (2, 4, 2)
  for source, lines in ((labeled, tree['train_lines'][:2]), (val, tree['val_lines'])):
    for index, (image_rel, mask_rel) in enumerate(lines):
      record = source[index]
      assert record['image'].dtype == np.uint8 and record['image'].shape == (32, 64, 3)
      np.testing.assert_array_equal(record['image'], np.asarray(Image.open(tree['root'] / image_rel)))
      np.testing.assert_array_equal(record['mask'], np.asarray(Image.open(tree['root'] / mask_rel)))
      assert record['name'] == pathlib.Path(image_rel).name[:-len('_leftImg8bit.png')]
  record = unlabeled[0]
  assert set(record) == {'image', 'name'}
  assert record['name'] == pathlib.Path(tree['train_lines'][2][0]).name.replace('_leftImg8bit.png', '')


def test_label_ids_are_mapped_to_train_ids_with_hand_checked_values(tmp_path):
  root = tmp_path / 'cs'
  (root / 'leftImg8bit/train/x').mkdir(parents=True)
  (root / 'gtFine/train/x').mkdir(parents=True)
  Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / 'leftImg8bit/train/x/x_1_leftImg8bit.png')
  # road 7 -> 0, car 26 -> 13, unlabeled 0 -> 255, person 24 -> 11, sky 23 -> 10, parking 9 -> 255.
  Image.fromarray(np.array([[7, 26, 0], [24, 23, 9]], np.uint8)).save(root / 'gtFine/train/x/x_1_gtFine_labelIds.png')
  split = tmp_path / 'split.txt'
  split.write_text('leftImg8bit/train/x/x_1_leftImg8bit.png gtFine/train/x/x_1_gtFine_labelTrainIds.png\n')
  config = data_fixtures.data_config({'root': root, 'labeled': split, 'unlabeled': split, 'val': split,
                                      'num_classes': 19}, 'cityscapes')
  record = sources.make_source(config, 'labeled')[0]
  np.testing.assert_array_equal(record['mask'], [[0, 13, 255], [11, 10, 255]])


def test_label_ids_fallback_agrees_with_train_id_files(tmp_path):
  both = data_fixtures.make_cityscapes_tree(tmp_path / 'both', label_files='both', seed=3)
  only_ids = data_fixtures.make_cityscapes_tree(tmp_path / 'ids', label_files='label_ids', seed=3)
  for split in ('labeled', 'val'):
    reference = sources.make_source(data_fixtures.data_config(both, 'cityscapes'), split)
    mapped = sources.make_source(data_fixtures.data_config(only_ids, 'cityscapes'), split)
    for index in range(len(reference)):
      np.testing.assert_array_equal(mapped[index]['mask'], reference[index]['mask'])


def test_pascal_palette_masks_are_read_as_indices(tmp_path):
  tree = data_fixtures.make_pascal_tree(tmp_path)
  val = sources.make_source(data_fixtures.data_config(tree, 'pascal'), 'val')
  palette = np.array(data_fixtures.voc_palette(), np.uint8).reshape(256, 3)
  for index, (image_rel, mask_rel) in enumerate(tree['val_lines']):
    record = val[index]
    assert record['image'].shape == (48, 40, 3) and record['mask'].shape == (48, 40)
    # The palette colours of the indices are the PNG's RGB rendering: indices, not colours, were read.
    rgb = np.asarray(Image.open(tree['root'] / mask_rel).convert('RGB'))
    np.testing.assert_array_equal(palette[record['mask']], rgb)
    assert set(np.unique(record['mask'])) <= set(range(21)) | {255}
    assert record['name'] == pathlib.Path(image_rel).stem


def test_class_tables():
  cityscapes = classes.cityscapes()
  assert cityscapes.num_classes == 19
  assert (cityscapes.names[0], cityscapes.colors[0]) == ('road', (128, 64, 128))
  assert (cityscapes.names[13], cityscapes.colors[13]) == ('car', (0, 0, 142))
  assert cityscapes.names[18] == 'bicycle'
  pascal = classes.pascal()
  assert pascal.num_classes == 21 and pascal.names[15] == 'person'
  assert pascal.colors[1] == (128, 0, 0) and pascal.colors[15] == (192, 128, 128)
  np.testing.assert_array_equal(classes.voc_colormap(), np.array(data_fixtures.voc_palette()).reshape(256, 3))
  assert classes.synthetic().num_classes == 7
  np.testing.assert_array_equal(pascal.colorize(np.array([[0, 15, 255]])),
                                [[(0, 0, 0), (192, 128, 128), classes.IGNORE_COLOR]])
  with pytest.raises(ValueError, match='data.name'):
    classes.for_dataset('kitti')


def test_sources_pickle_for_grain_workers(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, label_files='label_ids')
  source = sources.make_source(data_fixtures.data_config(tree, 'cityscapes'), 'labeled')
  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[1]['mask'], source[1]['mask'])


def test_split_paths_resolve_against_cwd_then_root(tmp_path, monkeypatch):
  tree = data_fixtures.make_cityscapes_tree(tmp_path)
  (tree['root'] / 'splits').mkdir()
  (tree['root'] / 'splits' / 'mine.txt').write_text(tree['labeled'].read_text())
  config = data_fixtures.data_config(tree, 'cityscapes', labeled_split='splits/mine.txt')
  monkeypatch.chdir(tmp_path / 'splits')  # no splits/mine.txt here: falls back to data.root
  assert sources.make_source(config, 'labeled').split_file == str(tree['root'] / 'splits' / 'mine.txt')
  monkeypatch.chdir(tmp_path)
  config.data.labeled_split = 'splits/cityscapes/labeled.txt'  # exists relative to the cwd
  assert len(sources.make_source(config, 'labeled')) == 2
  config.data.labeled_split = 'splits/nowhere.txt'
  with pytest.raises(sources.DataError, match='data.labeled_split: split file splits/nowhere.txt not found'):
    sources.make_source(config, 'labeled')


# ---------------------------------------------------------------------------------------------- drawn splits

def test_no_split_files_draws_with_the_seed_and_writes_the_lists(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=8)
  config = data_fixtures.data_config(tree, 'cityscapes', labeled_split='', unlabeled_split='', num_labeled=3,
                                     split_seed=5)
  workdir = tmp_path / 'run'
  labeled = sources.make_source(config, 'labeled', workdir=workdir)
  unlabeled = sources.make_source(config, 'unlabeled', workdir=workdir)
  assert (len(labeled), len(unlabeled)) == (3, 5)
  written_labeled = sources.read_split_file(workdir / 'splits' / 'labeled.txt')
  written_unlabeled = sources.read_split_file(workdir / 'splits' / 'unlabeled.txt')
  assert [e.image for e in written_labeled] == [e.image for e in labeled.entries]
  all_images = {image for image, _ in tree['train_lines']}
  assert {e.image for e in written_labeled} | {e.image for e in written_unlabeled} == all_images
  assert not {e.image for e in written_labeled} & {e.image for e in written_unlabeled}
  assert labeled[0]['mask'].shape == (32, 64)  # the written mask paths resolve
  # The written lists repeat the run; another seed draws another subset but keeps what was written.
  config.data.labeled_split = str(workdir / 'splits' / 'labeled.txt')
  assert [e.image for e in sources.make_source(config, 'labeled').entries] == [e.image for e in labeled.entries]
  config.data.labeled_split = ''
  config.data.split_seed = 6
  before = (workdir / 'splits' / 'labeled.txt').read_text()
  with pytest.raises(sources.DataError, match='exists with a different list'):
    sources.make_source(config, 'labeled', workdir=workdir)
  assert (workdir / 'splits' / 'labeled.txt').read_text() == before
  config.data.num_labeled = 0
  config.data.labeled_fraction = 0.5
  assert len(sources.make_source(config, 'labeled')) == 4
  config.data.labeled_fraction = 0.0
  with pytest.raises(sources.DataError, match='data.num_labeled > 0'):
    sources.make_source(config, 'labeled')


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_input_config(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=5, num_labeled=5, messy=True)
  return tree, data_fixtures.data_config(tree, 'cityscapes')


def _split_line_of(tree, image_rel):
  for entry in sources.read_split_file(tree['labeled']):
    if entry.image == image_rel:
      return f"{tree['labeled']}:{entry.line}"
  raise AssertionError(image_rel)


def test_missing_root(tmp_path):
  tree, config = _bad_input_config(tmp_path)
  config.data.root = str(tmp_path / 'nowhere')
  with pytest.raises(sources.DataError, match=f'data.root: dataset folder {tmp_path}/nowhere does not exist'):
    sources.make_source(config, 'labeled')


@pytest.mark.parametrize('problem', ['missing_image', 'missing_mask', 'truncated_png', 'other_size',
                                     'value_out_of_range', 'rgb_mask'])
def test_bad_record_errors_name_the_file_and_the_split_line(tmp_path, problem):
  tree, config = _bad_input_config(tmp_path)
  image_rel, mask_rel = tree['train_lines'][3]
  image_path, mask_path = tree['root'] / image_rel, tree['root'] / mask_rel
  if problem == 'missing_image':
    image_path.unlink()
    bad_file, message = image_path, 'image file not found'
  elif problem == 'missing_mask':
    mask_path.unlink()
    bad_file, message = mask_path, 'mask file not found'
  elif problem == 'truncated_png':
    image_path.write_bytes(image_path.read_bytes()[:200])
    bad_file, message = image_path, 'cannot decode image'
  elif problem == 'other_size':
    Image.fromarray(np.zeros((16, 64), np.uint8)).save(mask_path)
    bad_file, message = mask_path, 'mask size 64x16 differs from image size 64x32'
  elif problem == 'value_out_of_range':
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, :3] = (19, 19, 200)
    Image.fromarray(mask).save(mask_path)
    bad_file, message = mask_path, 'mask values 19, 200 outside 0..18 and 255'
  else:
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(mask_path)
    bad_file, message = mask_path, 'mask has image mode RGB'
  source = sources.make_source(config, 'labeled')
  for index in (0, 1, 2, 4):
    source[index]  # the other records are unaffected  # pylint: disable=pointless-statement
  with pytest.raises(sources.DataError) as raised:
    source[3]
  text = str(raised.value)
  assert '\n' not in text
  assert text.startswith(f'{bad_file}: {message}')
  assert text.endswith(f'(named in {_split_line_of(tree, image_rel)})')


def _three_sources(config):
  return [sources.make_source(config, split) for split in sources.SPLITS]


def test_check_files_exist_names_the_first_missing_files_with_split_file_and_line(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=6, num_labeled=2, n_val=2,
                                            size=(8, 16), messy=True)
  config = data_fixtures.data_config(tree, 'cityscapes')
  sources.check_files_exist(_three_sources(config))  # all there: nothing raised
  last_unlabeled, last_unlabeled_mask = tree['train_lines'][-1]
  (tree['root'] / last_unlabeled).unlink()
  (tree['root'] / last_unlabeled_mask).unlink()  # unlabeled masks are never read: not reported
  val_image, val_mask = tree['val_lines'][0]
  (tree['root'] / val_mask).unlink()
  with pytest.raises(sources.DataError) as raised:
    sources.check_files_exist(_three_sources(config))
  text = str(raised.value)
  line = {e.image: e.line for e in sources.read_split_file(tree['unlabeled'])}[last_unlabeled]
  val_line = {e.image: e.line for e in sources.read_split_file(tree['val'])}[val_image]
  assert text == (f'2 files named in the data lists are missing: '
                  f'{tree["root"] / last_unlabeled}: image file not found (named in '
                  f'{tree["unlabeled"]}:{line}); {tree["root"] / val_mask}: mask file not found '
                  f'(named in {tree["val"]}:{val_line})')


def test_check_files_exist_accepts_label_ids_and_caps_the_list(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=8, num_labeled=6, n_val=1,
                                            size=(8, 16), label_files='label_ids')
  config = data_fixtures.data_config(tree, 'cityscapes')
  sources.check_files_exist(_three_sources(config))  # labelIds stand in for labelTrainIds
  for image, _ in tree['train_lines']:
    (tree['root'] / image).unlink()
  with pytest.raises(sources.DataError, match=r'^8 files named .*; .*; .* \(and 5 more\)$'):
    sources.check_files_exist(_three_sources(config))


def test_check_files_exist_lists_each_folder_once(tmp_path, monkeypatch):
  """Cityscapes-sized lists (3,475 lines over 21 city folders) cost one listing per folder."""
  root = tmp_path / 'cityscapes'
  lines = {'labeled': [], 'unlabeled': [], 'val': []}
  for index in range(3475):
    split = 'val' if index >= 2975 else ('labeled' if index < 186 else 'unlabeled')
    folder = 'val' if split == 'val' else 'train'
    city = f'city{index % 18 if folder == "train" else index % 3}'
    image = f'leftImg8bit/{folder}/{city}/{city}_{index:06d}_leftImg8bit.png'
    mask = f'gtFine/{folder}/{city}/{city}_{index:06d}_gtFine_labelTrainIds.png'
    for name in (image, mask):
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).touch()
    lines[split].append((image, mask))
  tree = {'root': root, 'num_classes': 19}
  for split, split_lines in lines.items():
    tree[split] = data_fixtures.write_split_file(tmp_path / f'{split}.txt', split_lines)
  config = data_fixtures.data_config(tree, 'cityscapes')
  listed = _three_sources(config)
  scans = []
  real_scandir = sources.os.scandir
  monkeypatch.setattr(sources.os, 'scandir', lambda path: scans.append(path) or real_scandir(path))
  import time  # pylint: disable=g-import-not-at-top
  began = time.perf_counter()
  sources.check_files_exist(listed)
  seconds = time.perf_counter() - began
  # 18 + 3 image folders, the same for masks; labeled and unlabeled share theirs.
  assert len(scans) == len(set(scans)) == 42, scans
  print(f'checked {sum(len(s) for s in listed)} lines in {seconds * 1000:.0f} ms')


def test_labeled_list_without_masks_is_an_error(tmp_path):
  tree, config = _bad_input_config(tmp_path)
  only_images = tmp_path / 'images.txt'
  only_images.write_text(''.join(f'{image}\n' for image, _ in tree['train_lines']))
  config.data.labeled_split = str(only_images)
  with pytest.raises(sources.DataError, match=f'{only_images}:1: a labeled list needs'):
    sources.make_source(config, 'labeled')
  config.data.unlabeled_split = str(only_images)
  assert len(sources.make_source(config, 'unlabeled')) == 5  # unlabeled lists may omit masks


# ---------------------------------------------------------------------------------------------- TFDS

def _tfds_records(split):
  rng = np.random.default_rng(0 if split == 'train' else 1)
  ids = ['jena_000078_000019', 'aachen_000001_000019', 'jena_000005_000019', 'ulm_000002_000019']
  if split != 'train':
    ids = ['frankfurt_000000_000294']
  records = []
  for image_id in ids:
    label_ids = rng.choice(np.array([7, 26, 0, 24, 33], np.uint8), size=(6, 8, 1))
    records.append({'image_id': image_id, 'image_left': rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
                    'segmentation_label': label_ids})
  return records


def test_tfds_source_selects_labeled_ids_and_maps_labels(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  split_file = tmp_path / 'labeled.txt'
  split_file.write_text('leftImg8bit/train/jena/jena_000005_000019_leftImg8bit.png '
                        'gtFine/train/jena/jena_000005_000019_gtFine_labelTrainIds.png\r\n\r\n'
                        'leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png x.png\r\n')
  config = data_fixtures.data_config({'root': tmp_path, 'labeled': split_file, 'unlabeled': '', 'val': '',
                                      'num_classes': 19}, 'cityscapes', source='tfds', tfds_data_dir=str(tmp_path))
  train, val = _tfds_records('train'), _tfds_records('validation')
  lookup = {7: 0, 26: 13, 0: 255, 24: 11, 33: 18}
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **_: _tfds_records(split)):
    labeled = sources.make_source(config, 'labeled')
    unlabeled = sources.make_source(config, 'unlabeled')
    validation = sources.make_source(config, 'val')
    assert [labeled[i]['name'] for i in range(len(labeled))] == ['jena_000005_000019', 'jena_000078_000019']
    assert [unlabeled[i]['name'] for i in range(len(unlabeled))] == ['aachen_000001_000019', 'ulm_000002_000019']
    assert 'mask' not in unlabeled[0]
    np.testing.assert_array_equal(labeled[0]['image'], train[2]['image_left'])
    expected = np.vectorize(lookup.get)(train[2]['segmentation_label'][..., 0])
    np.testing.assert_array_equal(labeled[0]['mask'], expected)
    assert validation[0]['name'] == 'frankfurt_000000_000294' and validation[0]['mask'].shape == (6, 8)
    assert np.isin(validation[0]['mask'], list(lookup.values())).all()
    np.testing.assert_array_equal(validation[0]['mask'], np.vectorize(lookup.get)(val[0]['segmentation_label'][..., 0]))
    split_file.write_text('leftImg8bit/train/x/bonn_000001_000019_leftImg8bit.png y.png\n')
    with pytest.raises(sources.DataError, match=f'{split_file}:1: image id bonn_000001_000019 is not in'):
      sources.make_source(config, 'labeled')


def test_tfds_mock_data_reads_without_tensorflow(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = data_fixtures.data_config({'root': tmp_path, 'labeled': '', 'unlabeled': '', 'val': '', 'num_classes': 19},
                                     'cityscapes', source='tfds', num_labeled=1, split_seed=0)
  with tfds.testing.mock_data(num_examples=2):  # TFDS's own random Cityscapes records, decoded by NumPy
    val = sources.make_source(config, 'val')
    record = val[0]
    raw = tfds.data_source('cityscapes/semantic_segmentation', split='validation')[0]
  assert len(val) == 2
  assert record['image'].shape == (1024, 2048, 3) and record['mask'].shape == (1024, 2048)
  assert set(np.unique(record['mask'])) <= set(range(19)) | {255}
  np.testing.assert_array_equal(record['mask'], classes.cityscapes_id_to_train_id()[raw['segmentation_label'][..., 0]])
  assert 'tensorflow' not in sys.modules


def test_tfds_without_split_file_draws_ids_and_writes_unimatch_lists(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = data_fixtures.data_config({'root': tmp_path, 'labeled': '', 'unlabeled': '', 'val': '', 'num_classes': 19},
                                     'cityscapes', source='tfds', num_labeled=1, split_seed=0)
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **_: _tfds_records(split)):
    labeled = sources.make_source(config, 'labeled', workdir=tmp_path / 'run')
    unlabeled = sources.make_source(config, 'unlabeled', workdir=tmp_path / 'run')
    names = [labeled[0]['name']] + [unlabeled[i]['name'] for i in range(len(unlabeled))]
  assert len(labeled) == 1 and sorted(names) == sorted(r['image_id'] for r in _tfds_records('train'))
  written = sources.read_split_file(tmp_path / 'run' / 'splits' / 'labeled.txt')
  assert sources.record_name(written[0].image) == labeled[0]['name']
  city = labeled[0]['name'].split('_')[0]
  assert written[0].image == f"leftImg8bit/train/{city}/{labeled[0]['name']}_leftImg8bit.png"


def test_importing_the_data_modules_imports_neither_tensorflow_nor_torch():
  code = ('import sys; import uccl_jax.data, uccl_jax.data.sources, uccl_jax.data.classes, uccl_jax.data.synthetic, '
          'uccl_jax.data.check; bad = [m for m in ("tensorflow", "torch", "tensorflow_datasets") if m in sys.modules]; '
          'print(bad); sys.exit(1 if bad else 0)')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
