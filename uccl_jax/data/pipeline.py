"""grain input pipeline: per-process NumPy batches for the train step, and the val images.

Which record goes where is decided by pure index arithmetic, so a run is
repeatable, independent of the worker count, and resumable from a step count:

* Streams. A step takes G = train.batch_size samples from each of three
  streams. The *unlabeled* stream visits the unlabeled list once per epoch in
  a fresh order (a permutation seeded by (train.seed, stream, epoch)); the
  remainder that does not fill a global batch is dropped, as UniMatch's
  `drop_last=True` does; `steps_per_epoch = len(unlabeled) // G`. The *mix*
  stream is the same with its own permutations (UniMatch's second, independently
  shuffled loader over the unlabeled list). The *labeled* stream is the labeled
  list repeated, each pass reshuffled, read continuously, so an epoch holds
  `steps_per_epoch * G` labeled samples (the labeled list repeated to the
  length of the unlabeled list) and every labeled image is seen equally often.
* Supervised runs (`with_unlabeled=False`, method 'supervised') yield only
  'labeled' and follow UniMatch's supervised baseline: an epoch is one pass over
  the labeled list, `len(labeled) // G` steps, remainder dropped.
* Processes. Global sample q of step t is position t * G + q of its stream.
  Process p of P computes positions t * G + p * B ... t * G + p * B + B - 1
  (B = G / P): the process shards of a step are disjoint and together make the
  global batch, and the global batch is the same whatever P is. Each process
  reads only the records of its own positions.
* Randomness. The augmentation generator of a sample is seeded by (train.seed,
  stream, position), never by worker or process.
* Workers. grain's `mp_prefetch` hands whole per-process batches to
  `data.workers` processes (0 = in the calling process); the order is fixed.

The returned iterator (a grain DatasetIterator) has `get_state()` ->
{'step': n} and `set_state()`; a restored iterator yields exactly the batches
an uninterrupted one would, whatever the worker or process count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from uccl_jax.data import transforms

STREAM_LABELED = 0
STREAM_UNLABELED = 1
STREAM_MIX = 2
_AUGMENT_TAG = 7  # separates augmentation seeds from permutation seeds

# Effectively endless: the train loop decides when to stop (epochs / max_steps).
_ENDLESS_STEPS = 2**40


class PipelineError(ValueError):
  """A configuration the pipeline cannot serve (the message names the config field)."""


@dataclasses.dataclass
class StreamOrder:
  """Maps a position of an endless sample stream to a record index of a list.

  mode 'epochs': epoch e = positions [e * per_epoch, (e + 1) * per_epoch) read
  the first `per_epoch` entries of permutation e (the rest of the list is this
  epoch's dropped remainder). mode 'passes': pass k = positions [k * n, (k + 1) * n)
  read all of permutation k.
  """
  num_records: int
  seed: int
  stream: int
  mode: str = 'epochs'
  per_epoch: int = 0
  _cache: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def permutation(self, epoch: int) -> np.ndarray:
    """The record order of one epoch (or pass); cached, since consecutive positions share it."""
    order = self._cache.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.num_records)
      if len(self._cache) > 4:
        self._cache.clear()
      self._cache[epoch] = order
    return order

  def record_index(self, position: int) -> int:
    span = self.per_epoch if self.mode == 'epochs' else self.num_records
    epoch, offset = divmod(position, span)
    return int(self.permutation(epoch)[offset])


def augment_rng(seed: int, stream: int, position: int) -> np.random.Generator:
  """The generator of one sample's augmentation: a function of the run seed and its global position."""
  return np.random.default_rng([seed, _AUGMENT_TAG, stream, position])


def epoch_steps(num_records: int, global_batch: int, *, list_field: str) -> int:
  """Steps in one pass over a list with the remainder dropped; an error when not one batch fits."""
  steps = num_records // global_batch
  if steps < 1:
    raise PipelineError(
        f'{list_field} lists {num_records} images, fewer than one global batch '
        f'(train.batch_size={global_batch})')
  return steps


def per_process_batch(global_batch: int, process_count: int) -> int:
  """train.batch_size divided over the processes (each process feeds its own devices)."""
  if global_batch <= 0 or global_batch % process_count:
    raise PipelineError(
        f'train.batch_size={global_batch} must be a positive multiple of the process count '
        f'({process_count})')
  return global_batch // process_count


@dataclasses.dataclass
class TrainBatchMaker:
  """step -> this process's batch dict of that step (runs in grain workers, so it is picklable)."""
  labeled_source: Any
  unlabeled_source: Any | None
  labeled_order: StreamOrder
  unlabeled_order: StreamOrder | None
  mix_order: StreamOrder | None
  crop_size: int
  global_batch: int
  batch_size: int
  process_index: int
  seed: int
  vflip_prob: float = 0.0

  def positions(self, step: int) -> range:
    start = step * self.global_batch + self.process_index * self.batch_size
    return range(start, start + self.batch_size)

  def _views(self, source: Any, order: StreamOrder, step: int,
             view_fn: Callable[..., dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    samples = []
    for position in self.positions(step):
      record = source[order.record_index(position)]
      rng = augment_rng(self.seed, order.stream, position)
      samples.append(view_fn(record, self.crop_size, rng, vflip_prob=self.vflip_prob))
    return {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}

  def __call__(self, step: int) -> dict[str, dict[str, np.ndarray]]:
    step = int(step)
    batch = {'labeled': self._views(self.labeled_source, self.labeled_order, step, transforms.labeled_view)}
    if self.unlabeled_source is not None:
      batch['unlabeled'] = self._views(self.unlabeled_source, self.unlabeled_order, step,
                                       transforms.unlabeled_views)
      batch['mix'] = self._views(self.unlabeled_source, self.mix_order, step, transforms.unlabeled_views)
    return batch


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to JAX's process index and count (imported lazily: the data side needs no JAX)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise PipelineError(f'process_index={process_index} is outside [0, process_count={process_count})')
  return process_index, process_count


def make_batch_maker(labeled_source: Sequence[Mapping[str, Any]],
                     unlabeled_source: Sequence[Mapping[str, Any]] | None, *, crop_size: int,
                     global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                     vflip_prob: float = 0.0) -> TrainBatchMaker:
  """The function step -> this process's train batch, for sources given directly.

  `unlabeled_source=None` gives supervised batches ({'labeled'} only, epochs over
  the labeled list). Sources are random-access sequences of records
  {'image': uint8 [H,W,3], 'mask': uint8 [H,W] (labeled only), ...}.
  """
  batch_size = per_process_batch(global_batch, process_count)
  if not 0 <= process_index < process_count:
    raise PipelineError(f'process_index={process_index} is outside [0, process_count={process_count})')
  if unlabeled_source is None:
    per_epoch = epoch_steps(len(labeled_source), global_batch, list_field='data.labeled_split') * global_batch
    labeled_order = StreamOrder(len(labeled_source), seed, STREAM_LABELED, 'epochs', per_epoch)
    unlabeled_order = mix_order = None
  else:
    if len(labeled_source) == 0:
      raise PipelineError('data.labeled_split lists no images')
    per_epoch = epoch_steps(len(unlabeled_source), global_batch, list_field='data.unlabeled_split') * global_batch
    labeled_order = StreamOrder(len(labeled_source), seed, STREAM_LABELED, 'passes')
    unlabeled_order = StreamOrder(len(unlabeled_source), seed, STREAM_UNLABELED, 'epochs', per_epoch)
    mix_order = StreamOrder(len(unlabeled_source), seed, STREAM_MIX, 'epochs', per_epoch)
  return TrainBatchMaker(labeled_source, unlabeled_source, labeled_order, unlabeled_order, mix_order,
                         crop_size, global_batch, batch_size, process_index, seed, vflip_prob)


def _to_plain_arrays(tree: Any) -> Any:
  """Copies grain's shared-memory arrays into ordinary ones, so no /dev/shm segment outlives its batch."""
  if isinstance(tree, dict):
    return {key: _to_plain_arrays(value) for key, value in tree.items()}
  return np.array(tree, copy=True) if type(tree) is not np.ndarray else tree  # pylint: disable=unidiomatic-typecheck


class TrainIterator(grain.DatasetIterator):
  """Endless train batches; its state is the next step, so it resumes anywhere.

  The state `{'step': n}` does not depend on the worker or process count: a run
  resumed on another machine layout continues with the same global batches.
  It is a grain DatasetIterator, so grain's / orbax's checkpoint handlers take it.
  """

  def __init__(self, maker: TrainBatchMaker, workers: int, *, start_step: int = 0):
    super().__init__()
    if workers < 0:
      raise PipelineError(f'data.workers={workers} must be >= 0')
    self._maker = maker
    self._workers = workers
    self._step = start_step
    self._batches: grain.DatasetIterator | None = None

  def _ensure_started(self) -> grain.DatasetIterator:
    if self._batches is None:
      dataset = grain.MapDataset.range(self._step, _ENDLESS_STEPS).map(self._maker)
      self._batches = to_iterator(dataset, self._workers)
    return self._batches

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    self._assert_not_closed()
    batch = next(self._ensure_started())
    self._step += 1
    return _to_plain_arrays(batch)

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    step = state.get('step') if isinstance(state, dict) else None
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise PipelineError(f'train iterator state {state!r} is not {{"step": <non-negative int>}}')
    self._stop_batches()
    self._step = int(step)

  def start_prefetch(self) -> None:
    self._ensure_started().start_prefetch()

  def _stop_batches(self) -> None:
    if self._batches is not None:
      self._batches.close()
      self._batches = None

  def close(self) -> None:
    self._stop_batches()
    super().close()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """One OpenCV thread per grain worker: the workers are the parallelism, threads would oversubscribe."""
  del worker_index, worker_count
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)


def to_iterator(dataset: grain.MapDataset, workers: int) -> grain.DatasetIterator:
  """Iterates `dataset` with `workers` grain processes (0: in this process), two elements buffered each.

  The buffers stay small on purpose: a Cityscapes batch is tens of MB.
  """
  if workers < 0:
    raise PipelineError(f'data.workers={workers} must be >= 0')
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers > 0:
    # grain's worker start-up reads its absl flags; outside an absl app (tests, notebooks,
    # the benchmark) nobody parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
        worker_init_fn=_init_worker)
  return iter(iter_dataset)


def _train_sources(config: ml_collections.ConfigDict, workdir: str | None,
                   with_unlabeled: bool) -> tuple[Any, Any | None]:
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  labeled = sources.make_source(config, 'labeled', workdir=workdir)
  unlabeled = sources.make_source(config, 'unlabeled', workdir=workdir) if with_unlabeled else None
  return labeled, unlabeled


def steps_per_epoch(config: ml_collections.ConfigDict, *, with_unlabeled: bool = True,
                    workdir: str | None = None) -> int:
  """Global steps per epoch: len(unlabeled) // batch (len(labeled) // batch for supervised runs)."""
  labeled, unlabeled = _train_sources(config, workdir, with_unlabeled)
  if unlabeled is None:
    return epoch_steps(len(labeled), config.train.batch_size, list_field='data.labeled_split')
  return epoch_steps(len(unlabeled), config.train.batch_size, list_field='data.unlabeled_split')


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                        process_count: int | None = None, workdir: str | None = None,
                        with_unlabeled: bool = True) -> TrainIterator:
  """This process's endless iterator of train batches (layout in docs/ARCHITECTURE.md).

  Per-process batch B = train.batch_size // process_count; crop data.crop_size;
  seeds from train.seed; data.workers grain worker processes. Call `close()`
  when done to stop the workers; `get_state()` / `set_state()` to checkpoint.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  per_process_batch(config.train.batch_size, process_count)  # fail before reading any list
  labeled, unlabeled = _train_sources(config, workdir, with_unlabeled)
  maker = make_batch_maker(
      labeled, unlabeled, crop_size=config.data.crop_size, global_batch=config.train.batch_size,
      seed=config.train.seed, process_index=process_index, process_count=process_count,
      vflip_prob=config.data.vflip_prob)
  return TrainIterator(maker, config.data.workers)


@dataclasses.dataclass
class ValExampleMaker:
  """record -> {'image': f32 [H,W,3] normalised, 'mask': i32 [H,W], 'name': str} at full resolution."""

  def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {'image': transforms.normalize(record['image']),
            'mask': np.asarray(record['mask'], np.int32),
            'name': record.get('name', '')}


def build_val_dataset(source: Sequence[Mapping[str, Any]], *, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
  """Records index % process_count == process_index of the val list (disjoint, together all)."""
  if not 0 <= process_index < process_count:
    raise PipelineError(f'process_index={process_index} is outside [0, process_count={process_count})')
  return grain.MapDataset.source(source)[process_index::process_count].map(ValExampleMaker())


def make_val_dataset(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                     process_count: int | None = None) -> grain.MapDataset:
  """This process's share of the val list, one full-resolution image per element.

  A MapDataset (len() and indexing work); iterate it directly, or
  `.to_iter_dataset()` for threaded decoding. Shares differ by at most one
  image when the list does not divide by the process count.
  """
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process_layout(process_index, process_count)
  return build_val_dataset(sources.make_source(config, 'val'), process_index=process_index,
                           process_count=process_count)
