"""The validation input: this process's share of the val list, raw bytes, decoded ahead in threads.

Evaluation scores every image at full resolution (a Cityscapes image is
1024x2048), so the host does as little per image as it can (DESIGN.md,
"Feeding accelerators"): it decodes the PNG/JPEG and ships the uint8 pixels
and the byte mask; normalisation and every count happen on the device
(`uccl_jax.evaluate`). Decoding, the host's main cost per image (PNG decoding
times: docs/RESULTS.md section 4a), runs in `read_threads` background threads,
a few images ahead, so the decode of image n+1 overlaps the device's work on
image n; PIL and NumPy release the GIL while they decode and check, so threads
suffice and no worker process is started.

Process p of P takes records p, p + P, p + 2P, ... of the val list: the shares
are disjoint, together they are the whole list, and they differ in size by at
most one image.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import grain
import ml_collections
import numpy as np

MAX_READ_THREADS = 4  # enough decoding threads to keep ahead of a GPU evaluating Cityscapes
_AHEAD_PER_THREAD = 2  # decoded images waiting per thread (a Cityscapes pair is 8 MB)


class ValInputError(ValueError):
  """A val input the evaluation cannot use (names the field or record)."""


@dataclasses.dataclass(frozen=True)
class ValExampleMaker:
  """record -> {'image': uint8 [H,W,3], 'mask': uint8 [H,W] (255 = ignore), 'name': str}, full size.

  The sources already decode to these types; this only checks them, so that a
  custom source handing over floats or wide labels fails here with its name
  rather than shipping 4x the bytes to the devices.
  """

  def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
    name = record.get('name', '')
    image = np.asarray(record['image'])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValInputError(f'val record {name!r}: image must be uint8 [H, W, 3], got '
                          f'{image.dtype} {image.shape}')
    mask = np.asarray(record['mask'])
    if mask.dtype != np.uint8:
      integer = np.issubdtype(mask.dtype, np.integer)
      if not integer or (mask.size and (mask.min() < 0 or mask.max() > 255)):
        raise ValInputError(f'val record {name!r}: mask must hold labels 0..255, got {mask.dtype}')
      mask = mask.astype(np.uint8)
    return {'image': image, 'mask': mask, 'name': name}


def build_val_dataset(source: Sequence[Mapping[str, Any]], *, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
  """Records index % process_count == process_index of `source` (disjoint, together all)."""
  if not 0 <= process_index < process_count:
    raise ValInputError(f'process_index={process_index} is outside '
                        f'[0, process_count={process_count})')
  return grain.MapDataset.source(source)[process_index::process_count].map(ValExampleMaker())


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to JAX's process index and count (imported lazily: the data side needs no JAX)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def make_val_dataset(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                     process_count: int | None = None) -> grain.MapDataset:
  """This process's share of `config`'s val list, one full-resolution example per element.

  A MapDataset: len() and indexing work. For evaluation take
  `make_val_iterator`, which decodes ahead with bounded memory.
  """
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process_layout(process_index, process_count)
  return build_val_dataset(sources.make_source(config, 'val'), process_index=process_index,
                           process_count=process_count)


def default_read_threads() -> int:
  """Decoding threads: the CPUs this process may use, at most MAX_READ_THREADS."""
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cpus = os.cpu_count() or 1
  return max(1, min(MAX_READ_THREADS, cpus))


def decode_ahead(dataset: grain.MapDataset, *,
                 read_threads: int | None = None) -> grain.DatasetIterator:
  """One pass over `dataset` in order, `read_threads` threads decoding the next elements.

  None: `default_read_threads()`; 0 decodes in the calling thread (no
  look-ahead). At most 2 decoded images per thread wait: iterating a
  MapDataset directly would use grain's defaults, 16 threads and 500 elements
  ahead, which for Cityscapes is the whole val set in host memory.
  """
  if read_threads is None:
    read_threads = default_read_threads()
  if read_threads < 0:
    raise ValInputError(f'read_threads={read_threads} must be >= 0')
  if read_threads == 0:
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  options = grain.ReadOptions(num_threads=read_threads,
                              prefetch_buffer_size=_AHEAD_PER_THREAD * read_threads)
  return iter(dataset.to_iter_dataset(options))


def make_val_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                      process_count: int | None = None,
                      read_threads: int | None = None) -> grain.DatasetIterator:
  """One pass over this process's share of the val list, decoded ahead: what `evaluate` reads."""
  return decode_ahead(make_val_dataset(config, process_index=process_index,
                                       process_count=process_count), read_threads=read_threads)
