"""Tests of the grain train/val pipeline: order, shards, determinism, workers, resume, contract."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import data_fixtures
from uccl_jax import parallel
from uccl_jax.data import pipeline
from uccl_jax.data import transforms

CROP = 12


class RecordingSource:
  """An in-memory source of tiny records that logs which indices were read (in this process)."""

  def __init__(self, count: int, *, labeled: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.records = []
    for index in range(count):
      height, width = int(rng.integers(6, 20)), int(rng.integers(6, 20))
      record = {'image': rng.integers(0, 256, (height, width, 3), dtype=np.uint8), 'name': f'r{index}'}
      if labeled:
        record['mask'] = rng.integers(0, 5, (height, width), dtype=np.uint8)
      self.records.append(record)
    self.reads: list[int] = []

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    self.reads.append(int(index))
    return self.records[index]

  def __getstate__(self):  # workers get the records, not the log
    return {'records': self.records, 'reads': []}


def _maker(num_labeled=3, num_unlabeled=10, *, global_batch=4, seed=0, process_index=0, process_count=1,
           supervised=False):
  labeled = RecordingSource(num_labeled, labeled=True, seed=1)
  unlabeled = None if supervised else RecordingSource(num_unlabeled, labeled=False, seed=2)
  return pipeline.make_batch_maker(labeled, unlabeled, crop_size=CROP, global_batch=global_batch, seed=seed,
                                   process_index=process_index, process_count=process_count)


def _take(iterator, count):
  batches = [next(iterator) for _ in range(count)]
  return batches


def _assert_same(first, second):
  assert first.keys() == second.keys()
  for stream in first:
    assert first[stream].keys() == second[stream].keys()
    for key in first[stream]:
      np.testing.assert_array_equal(first[stream][key], second[stream][key], err_msg=f'{stream}/{key}')


def _stream_reads(maker, stream: str, steps):
  """Record indices the maker reads for `stream` over `steps` (labeled | unlabeled | mix)."""
  order = {'labeled': maker.labeled_order, 'unlabeled': maker.unlabeled_order, 'mix': maker.mix_order}[stream]
  return [order.record_index(position) for step in steps for position in maker.positions(step)]


def test_batch_contract_shapes_and_dtypes():
  """The host batch is what uccl_jax.inputs documents: bytes, parameters and boxes, nothing dense."""
  batch = _maker(global_batch=4, process_count=2).batch(0)
  assert set(batch) == {'labeled', 'unlabeled', 'mix'}
  assert set(batch['labeled']) == {'image', 'mask'}
  assert batch['labeled']['image'].shape == (2, CROP, CROP, 3) and batch['labeled']['image'].dtype == np.uint8
  assert batch['labeled']['mask'].shape == (2, CROP, CROP) and batch['labeled']['mask'].dtype == np.uint8
  num_params = len(transforms.STRONG_PARAMS)
  for stream, boxes in (('unlabeled', {'box1', 'box2'}), ('mix', set())):
    assert set(batch[stream]) == {'weak', 'strong1', 'strong2', 'valid'} | boxes
    assert batch[stream]['weak'].shape == (2, CROP, CROP, 3) and batch[stream]['weak'].dtype == np.uint8
    for key in ('strong1', 'strong2'):
      assert batch[stream][key].shape == (2, num_params) and batch[stream][key].dtype == np.float32
    for key in {'valid'} | boxes:
      assert batch[stream][key].shape == (2, 4) and batch[stream][key].dtype == np.int32
      top, left, height, width = batch[stream][key].T
      assert np.all((top >= 0) & (left >= 0) & (top + height <= CROP) & (left + width <= CROP))


def test_iterator_matches_the_maker_and_sizes_a_lean_batch():
  """grain stacks per-sample elements into exactly the maker's batches."""
  maker = _maker(global_batch=4)
  iterator = pipeline.TrainIterator(maker, workers=0)
  got = _take(iterator, 2)
  iterator.close()
  for step, batch in enumerate(got):
    _assert_same(batch, maker.batch(step))


def test_unlabeled_epochs_visit_each_image_once_and_reshuffle():
  maker = _maker(num_unlabeled=10, global_batch=4)  # 2 steps per epoch, 2 images dropped each epoch
  epoch0 = _stream_reads(maker, 'unlabeled', range(0, 2))
  epoch1 = _stream_reads(maker, 'unlabeled', range(2, 4))
  assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8
  assert epoch0 != epoch1
  mix0 = _stream_reads(maker, 'mix', range(0, 2))
  assert len(set(mix0)) == 8 and mix0 != epoch0  # the mixing stream is shuffled independently


def test_labeled_stream_repeats_reshuffled_passes():
  maker = _maker(num_labeled=3, num_unlabeled=12, global_batch=4)  # 3 steps: 12 labeled samples = 4 passes
  reads = _stream_reads(maker, 'labeled', range(3))
  passes = [reads[i:i + 3] for i in range(0, 12, 3)]
  assert all(sorted(one) == [0, 1, 2] for one in passes)
  assert len({tuple(one) for one in passes}) > 1
  assert collections.Counter(reads) == {0: 4, 1: 4, 2: 4}


def test_supervised_epoch_is_one_pass_over_the_labeled_list():
  maker = _maker(num_labeled=9, global_batch=4, supervised=True)
  batch = maker.batch(0)
  assert set(batch) == {'labeled'}
  epoch0 = _stream_reads(maker, 'labeled', range(2))
  assert len(set(epoch0)) == 8  # 9 // 4 = 2 steps, one image dropped


@pytest.mark.parametrize('stream', ['labeled', 'unlabeled', 'mix'])
def test_two_process_shards_are_disjoint_and_cover_the_global_batch(stream):
  one = _maker(num_labeled=5, num_unlabeled=12, global_batch=4)
  shards = [_maker(num_labeled=5, num_unlabeled=12, global_batch=4, process_index=p, process_count=2)
            for p in range(2)]
  steps = range(3)  # one epoch
  for step in steps:
    parts = [_stream_reads(maker, stream, [step]) for maker in shards]
    assert len(parts[0]) == len(parts[1]) == 2
    # Together they are the single-process global batch of the step, in order.
    assert parts[0] + parts[1] == _stream_reads(one, stream, [step])
  whole = [_stream_reads(maker, stream, steps) for maker in shards]
  if stream != 'labeled':  # an unlabeled epoch: disjoint shards covering the list
    assert not set(whole[0]) & set(whole[1])
    assert sorted(whole[0] + whole[1]) == list(range(12))


def test_process_reads_only_its_shard():
  makers = [_maker(num_unlabeled=12, global_batch=4, process_index=p, process_count=2) for p in range(2)]
  for maker in makers:
    maker.batch(0)
  for maker in makers:
    # Its own 2 unlabeled + 2 mixing samples, nothing of the other process's half.
    assert sorted(maker.unlabeled_source.reads) == sorted(_stream_reads(maker, 'unlabeled', [0])
                                                          + _stream_reads(maker, 'mix', [0]))
    assert len(maker.labeled_source.reads) == 2
  own = [set(_stream_reads(maker, 'unlabeled', [0])) for maker in makers]
  assert not own[0] & own[1]
  # The global batch: the same views whichever process computes them.
  whole = _maker(num_unlabeled=12, global_batch=4).batch(0)
  halves = [maker.batch(0) for maker in makers]
  for key in whole['unlabeled']:
    np.testing.assert_array_equal(whole['unlabeled'][key],
                                  np.concatenate([h['unlabeled'][key] for h in halves]))


def test_same_seed_same_batches_other_seed_other_batches():
  first = _take(pipeline.TrainIterator(_maker(seed=3), workers=0), 3)
  again = _take(pipeline.TrainIterator(_maker(seed=3), workers=0), 3)
  other = _take(pipeline.TrainIterator(_maker(seed=4), workers=0), 3)
  for a, b in zip(first, again):
    _assert_same(a, b)
  assert not np.array_equal(first[0]['unlabeled']['weak'], other[0]['unlabeled']['weak'])
  assert not np.array_equal(first[0]['labeled']['image'], other[0]['labeled']['image'])


def test_resumed_iterator_continues_with_the_same_batches():
  uninterrupted = _take(pipeline.TrainIterator(_maker(), workers=0), 5)
  first = pipeline.TrainIterator(_maker(), workers=0)
  _take(first, 2)
  state = first.get_state()
  first.close()
  assert state == {'step': 2}
  resumed = pipeline.TrainIterator(_maker(), workers=0)
  resumed.set_state(state)
  for want, got in zip(uninterrupted[2:], _take(resumed, 3)):
    _assert_same(want, got)


def test_bad_iterator_state_is_a_clear_error():
  iterator = pipeline.TrainIterator(_maker(), workers=0)
  with pytest.raises(pipeline.PipelineError, match='step'):
    iterator.set_state({'next_index': 3})


def test_worker_count_does_not_change_batches_and_resume_crosses_it():
  in_process = _take(pipeline.TrainIterator(_maker(), workers=0), 4)
  with_workers = pipeline.TrainIterator(_maker(), workers=2)
  try:
    got = _take(with_workers, 2)
    state = with_workers.get_state()
  finally:
    with_workers.close()
  for want, batch in zip(in_process, got):
    _assert_same(want, batch)
  assert all(type(leaf) is np.ndarray for leaf in got[0]['unlabeled'].values())  # pylint: disable=unidiomatic-typecheck
  resumed = pipeline.TrainIterator(_maker(), workers=0)
  resumed.set_state(state)
  for want, batch in zip(in_process[2:], _take(resumed, 2)):
    _assert_same(want, batch)


def test_workers_default_to_this_process_share_of_the_cpus(monkeypatch):
  monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
  monkeypatch.delenv('UCCL_LOCAL_PROCESS_COUNT', raising=False)
  monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
  monkeypatch.delenv('SLURM_NTASKS_PER_NODE', raising=False)
  assert pipeline.resolve_workers(-1) == 15  # one CPU left to the training loop
  monkeypatch.setenv('SLURM_NTASKS_PER_NODE', '4(x2)')  # 4 processes on this node
  assert pipeline.resolve_workers(-1) == 3
  monkeypatch.setenv('UCCL_LOCAL_PROCESS_COUNT', '16')
  assert pipeline.resolve_workers(-1) == 1  # never fewer than one worker
  assert pipeline.resolve_workers(0) == 0 and pipeline.resolve_workers(5) == 5
  for bad in (-2, 1.5, True):
    with pytest.raises(pipeline.PipelineError, match='data.workers'):
      pipeline.resolve_workers(bad)


def test_batch_size_must_divide_by_process_count():
  # The check is parallel.check_batch_size's, the one place for it.
  with pytest.raises(parallel.BatchSizeError,
                     match=r'train\.batch_size=6 must be divisible by the number of processes \(4\)'):
    _maker(global_batch=6, process_count=4)


def test_list_shorter_than_a_batch_names_the_split():
  with pytest.raises(pipeline.PipelineError, match='data.unlabeled_split'):
    _maker(num_unlabeled=3, global_batch=4)


@pytest.fixture(scope='module')
def cityscapes_config(tmp_path_factory):
  tree = data_fixtures.make_cityscapes_tree(tmp_path_factory.mktemp('data'), n_train=9, n_val=3,
                                            size=(16, 32), num_labeled=3)
  config = data_fixtures.data_config(tree, 'cityscapes', crop_size=CROP)
  config.train.batch_size = 4
  return config


def test_make_train_iterator_on_a_folder_dataset(cityscapes_config):
  assert pipeline.steps_per_epoch(cityscapes_config) == 6 // 4
  with pytest.raises(pipeline.PipelineError, match='data.labeled_split'):  # 3 labeled < one batch of 4
    pipeline.steps_per_epoch(cityscapes_config, with_unlabeled=False)
  iterator = pipeline.make_train_iterator(cityscapes_config, process_index=1, process_count=2)
  batch = next(iterator)
  iterator.close()
  assert batch['labeled']['image'].shape == (2, CROP, CROP, 3)
  assert batch['unlabeled']['box2'].shape == (2, 4) and 'box2' not in batch['mix']
  assert set(np.unique(batch['labeled']['mask']).tolist()) <= set(range(19)) | {255}


def test_make_train_iterator_rejects_indivisible_batch(cityscapes_config):
  with pytest.raises(parallel.BatchSizeError, match='train.batch_size=4'):
    pipeline.make_train_iterator(cityscapes_config, process_index=0, process_count=3)


def test_val_dataset_shards_cover_the_list_at_full_resolution(cityscapes_config):
  from uccl_jax.data import val_input  # pylint: disable=g-import-not-at-top
  shards = [val_input.make_val_dataset(cityscapes_config, process_index=p, process_count=2) for p in range(2)]
  names = [[example['name'] for example in shard] for shard in shards]
  assert len(names[0]) == 2 and len(names[1]) == 1
  assert not set(names[0]) & set(names[1]) and len(set(names[0] + names[1])) == 3
  example = shards[0][0]
  # Raw bytes: evaluation normalises on the device.
  assert example['image'].shape == (16, 32, 3) and example['image'].dtype == np.uint8
  assert example['mask'].shape == (16, 32) and example['mask'].dtype == np.uint8
