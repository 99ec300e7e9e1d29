"""The demo's pretraining source domain (uccl_jax/data/synthetic_source.py) and the cache it lives in."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from uccl_jax import cache
from uccl_jax.data import classes
from uccl_jax.data import sources
from uccl_jax.data import synthetic
from uccl_jax.data import synthetic_source

SMALL = {'num_train': 6, 'num_val': 2, 'size': (48, 64)}


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob('*')) if path.is_file()}


def _pixels(root: pathlib.Path) -> set[str]:
  """A digest of every image's pixels (not its PNG bytes) under `root`."""
  return {hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()
          for path in root.glob('leftImg8bit/*/*/*.png')}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
  first = _files(synthetic_source.generate(tmp_path / 'a', seed=3, **SMALL))
  second = _files(synthetic_source.generate(tmp_path / 'b', seed=3, **SMALL))
  other = _files(synthetic_source.generate(tmp_path / 'c', seed=4, **SMALL))
  assert first == second
  assert len(first) == 2 * (6 + 2) + 3  # images + masks, labeled.txt + val.txt, the JSON description
  image = 'leftImg8bit/train/sourceville/sourceville_000000_000019_leftImg8bit.png'
  assert first[image] != other[image]


def test_disjoint_from_the_demo_images_and_labeled_in_full(tmp_path):
  source = synthetic_source.generate(tmp_path / 'source', seed=0, **SMALL)
  demo = synthetic.generate(tmp_path / 'demo', seed=0, num_train=6, num_labeled=2, num_val=2, size=(48, 64))
  assert not _pixels(source) & _pixels(demo)
  assert not {p.name for p in source.rglob('*.png')} & {p.name for p in demo.rglob('*.png')}
  labeled = sources.read_split_file(source / 'splits' / 'labeled.txt')
  assert len(labeled) == 6 and not (source / 'splits' / 'unlabeled.txt').exists()
  for entry in labeled:  # every train image has a mask of the source's own classes
    mask = np.asarray(Image.open(source / entry.mask))
    assert mask.shape == (48, 64) and mask.max() < synthetic_source.NUM_CLASSES


def test_every_source_class_appears_under_the_sources_own_names():
  """Over 40 scenes every source class appears; the demo's sky and ground have no counterpart."""
  seen = np.zeros(synthetic_source.NUM_CLASSES, np.int64)
  for index in range(40):
    image, mask = synthetic_source.render_source_scene(np.random.default_rng([0, 2, index]))
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3) and mask.shape == (128, 128)
    seen += np.bincount(mask.ravel(), minlength=synthetic_source.NUM_CLASSES)
  assert (seen > 0).all(), seen
  assert classes.for_dataset('synthetic_source').names == classes.SYNTHETIC_SOURCE_NAMES
  assert not set(classes.SYNTHETIC_NAMES) & set(classes.SYNTHETIC_SOURCE_NAMES)


def test_demo_objects_are_relabeled_to_the_source_classes(monkeypatch):
  """What the demo's drawing functions paint is labeled with the source's class, never the demo's id.

  Each demo function is replaced by one that paints a known square with the demo's class id;
  the source mask must carry the source's class for that object exactly there.
  """
  expected = {'_draw_building': synthetic_source.FACADE, '_draw_tree': synthetic_source.FOLIAGE,
              '_draw_car': synthetic_source.VEHICLE, '_draw_person': synthetic_source.FIGURE,
              '_draw_pole': synthetic_source.POST}
  demo_ids = {'_draw_building': synthetic.BUILDING, '_draw_tree': synthetic.TREE,
              '_draw_car': synthetic.CAR, '_draw_person': synthetic.PERSON, '_draw_pole': synthetic.POLE}
  painted = []
  for name in expected:
    def fake(image, mask, rng, *args, name=name):
      corner = len(painted) * 9 % 100
      mask[corner:corner + 6, corner:corner + 6] = demo_ids[name]
      painted.append((name, corner))
    monkeypatch.setattr(synthetic, name, fake)
  for index in range(5):
    painted.clear()
    _, mask = synthetic_source.render_source_scene(np.random.default_rng([0, 2, index]))
    assert painted  # every scene has at least one figure and one post
    last = {}
    for name, corner in painted:
      last[corner] = name  # a later object covers an earlier one at the same place
    for corner, name in last.items():
      square = mask[corner + 2:corner + 4, corner + 2:corner + 4]
      # Discs and stripes are drawn into the mask directly and may cover the square.
      visible = square[~np.isin(square, (synthetic_source.DISC, synthetic_source.STRIPES))]
      assert (visible == expected[name]).all(), (name, square)


def test_ensure_dataset_is_atomic_reuses_and_refuses_other_settings(tmp_path, monkeypatch):
  root = tmp_path / 'cache' / 'source'
  real_generate = synthetic_source.generate

  def cut_off(staging, **settings):
    real_generate(staging, **settings)
    raise KeyboardInterrupt  # cut off before the rename
  monkeypatch.setattr(synthetic_source, 'generate', cut_off)
  with pytest.raises(KeyboardInterrupt):
    synthetic_source.ensure_dataset(root, seed=1, **SMALL)
  assert list((tmp_path / 'cache').iterdir()) == []
  monkeypatch.setattr(synthetic_source, 'generate', real_generate)
  assert synthetic_source.ensure_dataset(root, seed=1, **SMALL) == root
  stamp = (root / synthetic_source.INFO_FILE).stat().st_mtime_ns
  monkeypatch.setattr(synthetic_source, 'generate', lambda *a, **k: pytest.fail('generated twice'))
  assert synthetic_source.ensure_dataset(root, seed=1, **SMALL) == root
  assert (root / synthetic_source.INFO_FILE).stat().st_mtime_ns == stamp
  with pytest.raises(sources.DataError, match='other settings'):
    synthetic_source.ensure_dataset(root, seed=2, **SMALL)


def test_cache_folder_is_keyed_by_its_settings(tmp_path, monkeypatch):
  monkeypatch.setenv('UCCL_JAX_CACHE', str(tmp_path))
  assert cache.default_cache_dir() == tmp_path
  one = synthetic_source.default_root(0, **SMALL)
  assert one == synthetic_source.default_root(0, **SMALL)
  assert one != synthetic_source.default_root(0, **{**SMALL, 'num_train': 7})
  assert one != synthetic_source.default_root(1, **SMALL)
  assert cache.settings_key({'a': (1, 2)}) == cache.settings_key({'a': [1, 2]})


def test_empty_root_config_resolves_to_the_cached_source(tmp_path, monkeypatch):
  made = synthetic_source.generate(tmp_path / 'made', seed=5, **SMALL)
  asked = []
  monkeypatch.setattr(synthetic_source, 'ensure_dataset', lambda **kwargs: asked.append(kwargs) or made)
  config = type('C', (), {})()
  config.data = type('D', (), {'root': '', 'name': 'synthetic_source', 'synthetic_seed': 5})()
  assert sources.dataset_root(config) == made and asked == [{'seed': 5}]
  assert json.loads((made / synthetic_source.INFO_FILE).read_text())['seed'] == 5
