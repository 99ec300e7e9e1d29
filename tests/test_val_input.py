"""The validation input: raw bytes, process shares, decoding ahead, the whole path to the counts."""

from __future__ import annotations

import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

import data_fixtures
from uccl_jax import evaluate
from uccl_jax.data import transforms
from uccl_jax.data import val_input


def test_example_maker_ships_bytes_and_rejects_what_would_ship_more():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  example = val_input.ValExampleMaker()({'image': image, 'mask': np.array([[0, 1, 255]] * 2),
                                         'name': 'a'})
  assert example['image'] is image or np.shares_memory(example['image'], image)  # no copy
  assert example['mask'].dtype == np.uint8 and example['mask'].tolist() == [[0, 1, 255]] * 2
  with pytest.raises(val_input.ValInputError, match=r"'b': image must be uint8"):
    val_input.ValExampleMaker()({'image': image.astype(np.float32), 'mask': np.zeros((2, 3)),
                                 'name': 'b'})
  with pytest.raises(val_input.ValInputError, match=r"'c': mask must hold labels 0..255"):
    val_input.ValExampleMaker()({'image': image, 'mask': np.full((2, 3), 300), 'name': 'c'})


class _SlowSource:
  """Records 0..n-1 that take a while to 'decode'; remembers which were read."""

  def __init__(self, count: int):
    self.count = count
    self.read: list[int] = []
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict:
    time.sleep(0.02)
    with self._lock:
      self.read.append(int(index))
    return {'image': np.full((2, 2, 3), index, np.uint8), 'mask': np.zeros((2, 2), np.uint8),
            'name': f'r{index}'}


def test_shares_are_disjoint_and_decoding_runs_ahead_in_order():
  source = _SlowSource(7)
  shares = [val_input.build_val_dataset(source, process_index=p, process_count=3) for p in range(3)]
  names = [[example['name'] for example in share] for share in shares]
  assert names == [['r0', 'r3', 'r6'], ['r1', 'r4'], ['r2', 'r5']]
  with pytest.raises(val_input.ValInputError, match='process_index=3'):
    val_input.build_val_dataset(source, process_index=3, process_count=3)

  source = _SlowSource(8)
  iterator = val_input.decode_ahead(val_input.build_val_dataset(source), read_threads=2)
  first = next(iterator)
  deadline = time.monotonic() + 10.0
  while len(source.read) < 3 and time.monotonic() < deadline:  # the threads go on reading
    time.sleep(0.01)
  assert len(source.read) >= 3
  assert [first['name']] + [example['name'] for example in iterator] == [f'r{i}' for i in range(8)]
  in_caller = val_input.decode_ahead(val_input.build_val_dataset(_SlowSource(3)), read_threads=0)
  assert [example['name'] for example in in_caller] == ['r0', 'r1', 'r2']


class _TinyNet(nn.Module):
  @nn.compact
  def __call__(self, images, train: bool = False):
    return {'logits': nn.Conv(19, (3, 3))(images)}


def test_files_to_counts_equal_a_host_normalised_numpy_reference(tmp_path):
  tree = data_fixtures.make_cityscapes_tree(tmp_path, n_train=2, n_val=3, size=(12, 20),
                                            num_labeled=1)
  config = data_fixtures.data_config(tree, 'cityscapes', crop_size=8)
  config.eval.mode = 'original'
  model = _TinyNet()
  variables = model.init(jax.random.key(1), np.zeros((1, 12, 20, 3), np.float32))
  result = evaluate.evaluate_model(model, variables, val_input.make_val_iterator(config), config)

  expected = np.zeros((3, 19), np.int64)
  for example in val_input.make_val_dataset(config):
    logits = model.apply(variables, transforms.normalize(example['image'])[None])['logits'][0]
    predicted, mask = np.asarray(logits).argmax(-1), example['mask']
    valid = mask != 255
    for c in range(19):
      p, t = (predicted == c) & valid, (mask == c) & valid
      expected[:, c] += [np.sum(p & t), np.sum(p | t), np.sum(t)]
  assert result.num_images == 3
  np.testing.assert_array_equal(np.stack([result.intersection, result.union, result.target]),
                                expected)
