"""Tests of the generated demo dataset (uccl_jax/data/synthetic.py)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

import data_fixtures
from uccl_jax.data import sources
from uccl_jax.data import synthetic

SMALL = {'num_train': 6, 'num_labeled': 2, 'num_val': 2, 'size': (32, 64)}


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob('*')) if path.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
  first = _files(synthetic.generate(tmp_path / 'a', seed=3, **SMALL))
  second = _files(synthetic.generate(tmp_path / 'b', seed=3, **SMALL))
  other = _files(synthetic.generate(tmp_path / 'c', seed=4, **SMALL))
  assert first == second
  assert len(first) == 2 * (6 + 2) + 5  # images + masks, 4 split files, synthetic.json
  image = 'leftImg8bit/train/synthville/synthville_000000_000019_leftImg8bit.png'
  assert first[image] != other[image]


def test_layout_splits_and_labels(tmp_path):
  root = synthetic.generate(tmp_path / 'd', seed=0, **SMALL)
  labeled = sources.read_split_file(root / 'splits' / 'labeled.txt')
  unlabeled = sources.read_split_file(root / 'splits' / 'unlabeled.txt')
  every = sources.read_split_file(root / 'splits' / 'train_all.txt')
  assert (len(labeled), len(unlabeled), len(every)) == (2, 4, 6)
  assert sorted(e.image for e in labeled + unlabeled) == sorted(e.image for e in every)
  config = data_fixtures.data_config({'root': root, 'labeled': root / 'splits/labeled.txt',
                                      'unlabeled': root / 'splits/unlabeled.txt', 'val': root / 'splits/val.txt',
                                      'num_classes': synthetic.NUM_CLASSES}, 'synthetic')
  record = sources.make_source(config, 'val')[1]
  assert record['image'].shape == (32, 64, 3) and record['mask'].shape == (32, 64)
  assert record['mask'].max() < synthetic.NUM_CLASSES


def test_choose_labeled_covers_every_class_then_follows_the_permutation():
  """Hand-checked: pole (6) is only in images 3 and 5; seed 1's permutation is [4 0 2 1 5 3].

  First every class once: take 4 (classes 0-5), skip 0, 2, 1 (nothing new), take 5 (pole);
  a plain draw of 2 (images 4 and 0) has no pole. Then classes shown once: 0 (classes 1-2),
  2 (4), 1 (3), 3 (5 and 6).
  """
  images = [{0, 1, 2}, {0, 1, 3}, {0, 1, 4}, {0, 5, 6}, {0, 1, 2, 3, 4, 5}, {0, 6}]
  assert np.random.default_rng(1).permutation(6).tolist() == [4, 0, 2, 1, 5, 3]
  assert synthetic.choose_labeled(images, 2, np.random.default_rng(1), images_per_class=1) == {4, 5}
  # Three slots, one image per class: the third follows the permutation after the cover (0).
  assert synthetic.choose_labeled(images, 3, np.random.default_rng(1), images_per_class=1) == {4, 5, 0}
  # Two images per class (the default): every class once first, then the second walk.
  assert synthetic.choose_labeled(images, 3, np.random.default_rng(1)) == {4, 5, 0}
  assert synthetic.choose_labeled(images, 5, np.random.default_rng(1)) == {4, 5, 0, 2, 1}
  assert synthetic.choose_labeled(images, 6, np.random.default_rng(1)) == set(range(6))
  # One slot cannot cover: the first image that adds anything.
  assert synthetic.choose_labeled(images, 1, np.random.default_rng(1)) == {4}
  # Every class in every image: the plain draw.
  assert synthetic.choose_labeled([{0}] * 6, 2, np.random.default_rng(1)) == {4, 0}
  assert synthetic.choose_labeled([{0}] * 6, 3, np.random.default_rng(1)) == {4, 0, 2}


def test_the_labeled_images_show_every_class_the_train_images_show(tmp_path):
  """Each class the train images show is in at least one of the 4 labeled ones (two where the
  slots allow: sky and ground are in every image)."""
  root = synthetic.generate(tmp_path / 'd', seed=0, num_train=24, num_labeled=4, num_val=1, size=(64, 128))

  def shown(split):
    return [set(np.unique(np.asarray(Image.open(root / e.mask))).tolist()) - {255}
            for e in sources.read_split_file(root / 'splits' / split)]
  labeled, every = shown('labeled.txt'), shown('train_all.txt')
  for label in set().union(*every):
    assert sum(label in image for image in labeled) >= 1, label


def test_scenes_hold_several_classes_and_colour_alone_does_not_name_them():
  # Pixel colour -> majority class, learned on 40 scenes and scored on 40 others: if colour gave the
  # class away this would be near 100%; shape, texture and context must carry the rest.
  def scenes(offset):
    pairs = [synthetic.render_scene(np.random.default_rng([9, offset + i]), (64, 128)) for i in range(40)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  train_images, train_masks = scenes(0)
  test_images, test_masks = scenes(1000)
  assert len(np.unique(train_masks)) == synthetic.NUM_CLASSES
  def bins(images):
    quantized = images.astype(np.int64) // 32
    return (quantized[..., 0] * 64 + quantized[..., 1] * 8 + quantized[..., 2]).ravel()
  votes = np.zeros((512, synthetic.NUM_CLASSES), np.int64)
  np.add.at(votes, (bins(train_images), train_masks.ravel()), 1)
  predicted = votes.argmax(1)[bins(test_images)]
  objects = np.isin(test_masks.ravel(), [synthetic.BUILDING, synthetic.CAR, synthetic.PERSON, synthetic.POLE])
  assert (predicted[objects] == test_masks.ravel()[objects]).mean() < 0.6


def test_ensure_dataset_is_atomic_and_reuses_a_complete_copy(tmp_path, monkeypatch):
  root = tmp_path / 'cache' / 'synthetic'
  real_generate = synthetic.generate

  def cut_off(staging, **settings):
    real_generate(staging, **{**settings, 'num_val': 1})
    raise KeyboardInterrupt  # cut off before the rename
  monkeypatch.setattr(synthetic, 'generate', cut_off)
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure_dataset(root, seed=1, **SMALL)
  assert not root.exists() and list((tmp_path / 'cache').iterdir()) == []
  monkeypatch.setattr(synthetic, 'generate', real_generate)
  assert synthetic.ensure_dataset(root, seed=1, **SMALL) == root
  stamp = (root / 'synthetic.json').stat().st_mtime_ns
  assert synthetic.ensure_dataset(root, seed=1, **SMALL) == root
  assert (root / 'synthetic.json').stat().st_mtime_ns == stamp
  with pytest.raises(sources.DataError, match='made with other settings'):
    synthetic.ensure_dataset(root, seed=2, **SMALL)
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'keep.txt').write_text('mine')
  with pytest.raises(sources.DataError, match='not a generated synthetic dataset'):
    synthetic.ensure_dataset(tmp_path / 'other', seed=1, **SMALL)
  assert (tmp_path / 'other' / 'keep.txt').read_text() == 'mine'


def test_default_cache_and_empty_root_config(tmp_path, monkeypatch):
  monkeypatch.setenv('UCCL_JAX_CACHE', str(tmp_path / 'cache'))
  root = synthetic.ensure_dataset(seed=0, **SMALL)
  assert root.parent == tmp_path / 'cache' and root.name.startswith(f'synthetic-v{synthetic.VERSION}-seed0')
  assert Image.open(next(root.glob('leftImg8bit/val/*/*.png'))).size == (64, 32)


def test_cli_writes_the_dataset(tmp_path, capsys):
  assert synthetic.main(['--out', str(tmp_path / 'demo'), '--num_train', '3', '--num_labeled', '1', '--num_val', '1',
                         '--height', '16', '--width', '32']) == 0
  assert (tmp_path / 'demo' / 'splits' / 'val.txt').exists()
  assert synthetic.main(['--out', str(tmp_path / 'demo'), '--seed', '7']) == 1
  assert 'error:' in capsys.readouterr().out


def test_empty_root_with_name_synthetic_uses_the_cached_dataset(tmp_path, monkeypatch):
  small = synthetic.generate(tmp_path / 'small', seed=5, **SMALL)
  asked = []
  monkeypatch.setattr(synthetic, 'ensure_dataset', lambda **kwargs: asked.append(kwargs) or small)
  config = data_fixtures.data_config({'root': '', 'labeled': 'splits/labeled.txt', 'unlabeled': 'splits/unlabeled.txt',
                                      'val': 'splits/val.txt', 'num_classes': 7}, 'synthetic', synthetic_seed=5)
  monkeypatch.chdir(tmp_path)  # no splits/ here: the split paths resolve against the generated root
  assert len(sources.make_source(config, 'labeled')) == 2 and asked == [{'seed': 5}]


def test_varied_lighting_changes_the_pixels_not_the_scenes(tmp_path):
  """lighting='varied' draws each image's conditions after its scene: same masks, other pixels."""
  mild = synthetic.render_scene(np.random.default_rng([0, 0, 3]), (64, 128), 0.5, 'mild')
  varied = synthetic.render_scene(np.random.default_rng([0, 0, 3]), (64, 128), 0.5, 'varied')
  np.testing.assert_array_equal(mild[1], varied[1])
  assert np.abs(mild[0].astype(int) - varied[0].astype(int)).mean() > 5
  # Per-image conditions: image statistics spread far wider than with the mild lighting.
  def spread(lighting):
    means = [synthetic.render_scene(np.random.default_rng([0, 0, i]), (32, 64), 0.5, lighting)[0].mean()
             for i in range(24)]
    return np.std(means)
  assert spread('varied') > 1.5 * spread('mild')
  with pytest.raises(ValueError, match='lighting'):
    synthetic.generate(tmp_path / 'bad', num_train=2, num_labeled=1, num_val=1, size=(16, 32),
                       lighting='night')
  assert not (tmp_path / 'bad').exists()


def test_the_demo_methods_train_equally_long_and_evaluate_at_the_same_steps(tmp_path):
  """configs/synthetic.py:<method>: same optimizer steps and evaluation steps for all three.

  An epoch is a pass over the unlabeled list, or over the labeled list when there is none, so
  the supervised variant needs more epochs; the split files here have the demo's sizes.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('demo_config', pathlib.Path(__file__).parents[1] / 'configs/synthetic.py')
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  (tmp_path / 'splits').mkdir()
  line = 'leftImg8bit/train/c/x_{0}_leftImg8bit.png gtFine/train/c/x_{0}_gtFine_labelTrainIds.png\n'
  num_labeled = synthetic.DEMO_NUM_LABELED
  (tmp_path / 'splits/labeled.txt').write_text(''.join(line.format(i) for i in range(num_labeled)))
  (tmp_path / 'splits/unlabeled.txt').write_text(
      ''.join(line.format(i) for i in range(num_labeled, synthetic.DEMO_NUM_TRAIN)))
  plans = {}
  for method in demo.METHODS:
    config = demo.get_config(method)
    config.data.root = str(tmp_path)
    plan = train.make_plan(config, train.open_train_sources(config, None))
    plans[method] = (plan.schedule_steps, plan.eval_steps(config.eval.every_epochs))
  # 396 unlabeled images at batch 4: 99 steps per epoch, 6 epochs, evaluated every 2; the
  # supervised variant: 4 labeled images, 1 step per epoch, 594 epochs, evaluated every 198.
  assert plans['uccl'] == plans['unimatch'] == plans['supervised'] == (594, [198, 396, 594])
