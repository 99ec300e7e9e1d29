"""grain input pipeline: per-process NumPy batches for the train step, and the val images.

Which record goes where is decided by pure index arithmetic, so a run is
repeatable, independent of the worker count, and resumable from a step count:

* Streams. A step takes G = train.batch_size samples from each of three
  streams. The *unlabeled* stream visits the unlabeled list once per epoch in
  a fresh order (a permutation seeded by (train.seed, stream, epoch)); the
  remainder that does not fill a global batch is dropped, as UniMatch's
  `drop_last=True` does; `steps_per_epoch = len(unlabeled) // G`. The *mix*
  stream (`data.mix_images`): 'other' (default) visits the unlabeled list with
  its own permutations, so each image is mixed with an independent one (the
  intent); 'same' reads, at each position, the record the unlabeled stream
  reads there, decoded once, with its own augmentation draw: another crop of
  the same image, which is what UniMatch and the UCCL release do (they zip one
  DataLoader with itself; its DistributedSampler seeds its shuffle with
  seed + epoch, so both iterations give the same order). The *labeled*
  stream is the labeled list repeated, each pass reshuffled, read
  continuously, so an epoch holds `steps_per_epoch * G` labeled samples (the
  labeled list repeated to the length of the unlabeled list) and every
  labeled image is seen equally often.
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
* Elements. One grain element is one sample slot of one step: the labeled,
  unlabeled and mixing samples of position q (three decodes, two with
  data.mix_images='same'; the cost per step: docs/RESULTS.md section 4a). grain's
  `mp_prefetch` spreads the elements over `data.workers` processes and
  `batch` stacks B of them in the calling process, so N workers share every
  batch. `data.workers = -1` (the default) takes the CPUs this process may
  use (`os.sched_getaffinity`) divided by the processes on this host, minus
  one for the training loop; 0 keeps all input work in the calling process
  (one background read thread).
* Layout. Samples are what `uccl_jax.inputs` documents: uint8 images and masks,
  the strong views as photometric parameters, boxes as four numbers; the device
  builds the rest inside the step (the bytes per step: docs/RESULTS.md section 4a).

The returned iterator (a grain DatasetIterator) has `get_state()` ->
{'step': n} and `set_state()`; a restored iterator yields exactly the batches
an uninterrupted one would, whatever the worker or process count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import math
import os

from absl import flags
import grain
import ml_collections
import numpy as np

from uccl_jax.data import transforms

STREAM_LABELED = 0
STREAM_UNLABELED = 1
STREAM_MIX = 2
MIX_IMAGES = ('other', 'same')  # data.mix_images
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
  """train.batch_size divided over the processes (each process feeds its own devices).

  A batch that does not divide is `parallel.BatchSizeError` (the check is parallel's).
  """
  from uccl_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.check_batch_size(global_batch, None, process_count=process_count)
  return global_batch // process_count


@dataclasses.dataclass
class TrainSampleMaker:
  """Sample slot -> one sample of each stream; step -> this process's batch (picklable: grain workers).

  `sample(index)`: index = step * B + q is slot q of `step` on this process; it
  returns {'labeled': ..., 'unlabeled': ..., 'mix': ...} for that slot (only
  'labeled' in supervised runs). `batch(step)` stacks the B slots of a step,
  exactly what the iterator yields for it.
  """
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
  mix_images: str = 'other'  # 'other' | 'same' (module docstring)

  def positions(self, step: int) -> range:
    start = step * self.global_batch + self.process_index * self.batch_size
    return range(start, start + self.batch_size)

  def position(self, index: int) -> int:
    """The global stream position of this process's sample slot `index`."""
    step, slot = divmod(int(index), self.batch_size)
    return step * self.global_batch + self.process_index * self.batch_size + slot

  def _view(self, source: Any, order: StreamOrder, position: int,
            view_fn: Callable[..., dict[str, np.ndarray]], *,
            record: Any = None) -> dict[str, np.ndarray]:
    """One view of the record `order` puts at `position` (or of `record`, already decoded),
    augmented by the generator of (the order's stream, `position`)."""
    if record is None:
      record = source[order.record_index(position)]
    rng = augment_rng(self.seed, order.stream, position)
    return view_fn(record, self.crop_size, rng, vflip_prob=self.vflip_prob)

  def sample(self, index: int) -> dict[str, dict[str, np.ndarray]]:
    position = self.position(index)
    out = {'labeled': self._view(self.labeled_source, self.labeled_order, position,
                                 transforms.labeled_view)}
    if self.unlabeled_source is not None:
      record = None
      if self.mix_images == 'same':  # one decode, two independently augmented views
        record = self.unlabeled_source[self.unlabeled_order.record_index(position)]
      out['unlabeled'] = self._view(self.unlabeled_source, self.unlabeled_order, position,
                                    transforms.unlabeled_views, record=record)
      mix = self._view(self.unlabeled_source, self.mix_order, position, transforms.unlabeled_views,
                       record=record)
      # The mixing images' own CutMix boxes are drawn (the random stream stays UniMatch's) but
      # never read by the step, so they are not sent.
      out['mix'] = {key: value for key, value in mix.items() if key not in ('box1', 'box2')}
    return out

  def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
    step = int(step)
    return stack_samples([self.sample(step * self.batch_size + q) for q in range(self.batch_size)])


def stack_samples(samples: Sequence[Any]) -> Any:
  """Stacks a list of equal-structure sample dicts into one batch dict (grain's batch function)."""
  first = samples[0]
  if isinstance(first, dict):
    return {key: stack_samples([sample[key] for sample in samples]) for key in first}
  return np.stack(samples)


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
                     vflip_prob: float = 0.0, mix_images: str = 'other') -> TrainSampleMaker:
  """The maker of this process's train samples and batches, for sources given directly.

  `unlabeled_source=None` gives supervised batches ({'labeled'} only, epochs over
  the labeled list). Sources are random-access sequences of records
  {'image': uint8 [H,W,3], 'mask': uint8 [H,W] (labeled only), ...}.
  """
  batch_size = per_process_batch(global_batch, process_count)
  if mix_images not in MIX_IMAGES:
    raise PipelineError(f'data.mix_images={mix_images!r}: expected one of {", ".join(MIX_IMAGES)}')
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
  return TrainSampleMaker(labeled_source, unlabeled_source, labeled_order, unlabeled_order,
                          mix_order, crop_size, global_batch, batch_size, process_index, seed,
                          vflip_prob, mix_images)


class TrainIterator(grain.DatasetIterator):
  """Endless train batches; its state is the next step, so it resumes anywhere.

  The state `{'step': n}` does not depend on the worker or process count: a run
  resumed on another machine layout continues with the same global batches.
  It is a grain DatasetIterator, so grain's / orbax's checkpoint handlers take it.
  """

  def __init__(self, maker: TrainSampleMaker, workers: int, *, start_step: int = 0):
    super().__init__()
    if workers < 0:
      raise PipelineError(f'data.workers={workers} must be >= 0 here (-1 is resolved by '
                          'make_train_iterator)')
    self._maker = maker
    self._workers = workers
    self._step = start_step
    self._batches: grain.DatasetIterator | None = None

  @property
  def workers(self) -> int:
    return self._workers

  def _ensure_started(self) -> grain.DatasetIterator:
    if self._batches is None:
      batch_size = self._maker.batch_size
      samples = grain.MapDataset.range(self._step * batch_size, _ENDLESS_STEPS * batch_size)
      self._batches = to_iterator(samples.map(self._maker.sample), self._workers,
                                  batch_size=batch_size)
    return self._batches

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    self._assert_not_closed()
    batch = next(self._ensure_started())
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    step = state.get('step') if isinstance(state, dict) else None
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise PipelineError(f'train iterator state {state!r} is not {{"step": <non-negative int>}}')
    self._stop_batches()
    self._step = int(step)

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


def to_iterator(dataset: grain.MapDataset, workers: int, *,
                batch_size: int | None = None) -> grain.DatasetIterator:
  """Iterates `dataset` with `workers` grain processes (0: one read thread in this process).

  With `batch_size`, consecutive elements are stacked (`stack_samples`) in the
  calling process after the workers, so every worker contributes to every
  batch. Buffers hold about two batches: a Cityscapes sample is ~5 MB.
  """
  if workers < 0:
    raise PipelineError(f'data.workers={workers} must be >= 0')
  per_batch = batch_size or 1
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * per_batch))
  if workers > 0:
    # grain's worker start-up reads its absl flags; outside an absl app (tests, notebooks,
    # the benchmark) nobody parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers,
                                     per_worker_buffer_size=max(2, math.ceil(2 * per_batch / workers))),
        worker_init_fn=_init_worker)
  if batch_size is not None:
    iter_dataset = iter_dataset.batch(batch_size, drop_remainder=True, batch_fn=stack_samples)
  return iter(iter_dataset)


def local_process_count() -> int:
  """Training processes on this host, from the launcher's environment (1 when none says)."""
  for name in ('UCCL_LOCAL_PROCESS_COUNT', 'LOCAL_WORLD_SIZE', 'SLURM_NTASKS_PER_NODE'):
    value = os.environ.get(name, '')
    digits = value.split('(')[0].split(',')[0]  # SLURM writes e.g. '4(x2)'
    if digits.isdigit() and int(digits) > 0:
      return int(digits)
  return 1


def available_cpus() -> int:
  """CPUs this process may run on (its affinity mask, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
  """data.workers as a count: -1 = this process's share of the CPUs, minus one for the loop."""
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < -1:
    raise PipelineError(f'data.workers={workers!r} must be -1 (automatic), 0 (in-process) or a '
                        'positive number of worker processes')
  if workers >= 0:
    return workers
  return max(1, available_cpus() // local_process_count() - 1)


@dataclasses.dataclass(frozen=True)
class TrainSources:
  """The train lists of a run, opened once: labeled, and unlabeled (None in supervised runs)."""
  labeled: Any
  unlabeled: Any | None

  def steps_per_epoch(self, global_batch: int) -> int:
    """len(unlabeled) // batch (len(labeled) // batch for supervised runs), remainder dropped."""
    if self.unlabeled is None:
      return epoch_steps(len(self.labeled), global_batch, list_field='data.labeled_split')
    return epoch_steps(len(self.unlabeled), global_batch, list_field='data.unlabeled_split')


def load_train_sources(config: ml_collections.ConfigDict, *, workdir: str | None = None,
                       with_unlabeled: bool = True) -> TrainSources:
  """Opens the run's train lists (reads the split files; DataError for a missing root or list)."""
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  labeled = sources.make_source(config, 'labeled', workdir=workdir)
  unlabeled = sources.make_source(config, 'unlabeled', workdir=workdir) if with_unlabeled else None
  return TrainSources(labeled, unlabeled)


def steps_per_epoch(config: ml_collections.ConfigDict, *, with_unlabeled: bool = True,
                    workdir: str | None = None) -> int:
  """Global steps per epoch (opens the lists; a run opens them once with `load_train_sources`)."""
  train_sources = load_train_sources(config, workdir=workdir, with_unlabeled=with_unlabeled)
  return train_sources.steps_per_epoch(int(config.train.batch_size))


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                        process_count: int | None = None, workdir: str | None = None,
                        with_unlabeled: bool = True,
                        train_sources: TrainSources | None = None) -> TrainIterator:
  """This process's endless iterator of train batches (layout in `uccl_jax.inputs`).

  Per-process batch B = train.batch_size // process_count; crop data.crop_size;
  seeds from train.seed; `resolve_workers(data.workers)` grain worker
  processes. `train_sources` reuses lists already opened (else they are opened
  here). Call `close()` when done to stop the workers; `get_state()` /
  `set_state()` to checkpoint.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  per_process_batch(config.train.batch_size, process_count)  # fail before reading any list
  workers = resolve_workers(config.data.workers)
  if train_sources is None:
    train_sources = load_train_sources(config, workdir=workdir, with_unlabeled=with_unlabeled)
  maker = make_batch_maker(
      train_sources.labeled, train_sources.unlabeled, crop_size=config.data.crop_size,
      global_batch=config.train.batch_size, seed=config.train.seed, process_index=process_index,
      process_count=process_count, vflip_prob=config.data.vflip_prob,
      mix_images=config.data.mix_images)
  return TrainIterator(maker, workers)
