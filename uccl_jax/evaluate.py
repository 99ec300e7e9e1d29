"""Evaluation protocols, intersection/union counts and mIoU, as UniMatch evaluates.

The numbers must be comparable with the PyTorch papers, so the protocols follow
UniMatch's `evaluate()` (supervised.py) exactly:

- 'original': each image whole, at its own size (Pascal VOC).
- 'center_crop': the centred `crop_size` square of image and mask (start
  `(h - crop) // 2`); an image smaller than the crop keeps its whole extent
  on that axis (UniMatch would slice with a negative start there, an accident
  we do not copy).
- 'sliding_window': windows of `crop_size`, stride `int(crop_size * 2 / 3)`,
  placed by UniMatch's loop `row, col = 0, stride, 2 * stride, ... < h, w` and
  cut at the image border (`img[row:min(h, row + grid), col:min(w, col + grid)]`,
  so border windows are smaller, never shifted back); the softmax probabilities
  of all windows are summed in that raster order, then argmax (Cityscapes).

Counts follow UniMatch's `intersectionAndUnion`: pixels whose label is the
ignore index (255) do not count; per class, intersection = pixels predicted and
labelled c, union = predicted c + labelled c - intersection, both summed over
all images of all processes; IoU_c = I_c / (U_c + 1e-10) * 100 and mIoU is the
plain mean over *all* classes. A class that appears in neither labels nor
predictions thus scores 0 and pulls the mean down, exactly as in UniMatch (on
the real validation sets every class appears, so this never matters there);
`EvalResult.present` says which classes had a non-zero union.

How it runs (DESIGN.md, "Feeding accelerators"). The host ships uint8 images
and byte masks (`data.val_input`, which decodes them ahead in threads); one
jitted program per image shape normalises the images (bit-identical to the
host's `transforms.normalize`, so the counts are those of a float32 host
path), runs the protocol, and adds the image's counts to int32 counters that
stay on the devices, one set per device (kept as 30-bit halves, so they never
overflow). The host never waits for a result: it dispatches batch n+1 while
the devices work on batch n (at most `max_in_flight` batches queued), and reads
the counters once, at the end. Every image is evaluated at its own size, as
the protocol asks, so there is one XLA program per distinct shape (jit's
cache; Cityscapes has one, Pascal VOC many, each compiled once per run; a fresh
`make_predict_fn` with new variables reuses them). A batch holds
`images_per_device` images per local device, all of one shape: images are
grouped by shape within a window of upcoming images, so a device gets a filler
only when a shape runs out (the last batch of Cityscapes; the tail of each
Pascal size). A filler is zeros with an all-ignore mask, so it counts nothing
and no image is ever evaluated twice. In 'sliding_window' all windows of one
shape of all images of a batch go through the network in one call. Each
process works on its own images with its own local devices only (image shapes
differ between processes, so no global program spans them); only the counts
are summed across processes at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uccl_jax import inputs

MODES = ('original', 'center_crop', 'sliding_window')

# predict_fn(images f32 [N, h, w, 3], normalised) -> logits [N, h, w, C]. A
# `jax.tree_util.Partial` (what `make_predict_fn` returns) passes its arrays,
# the model variables, into the evaluation programs as arguments; any other
# callable is traced with whatever it closes over baked in as constants.
PredictFn = Callable[[jax.Array], jax.Array]

# The device counters keep each count as high * 2**30 + low with 0 <= low < 2**30,
# so adding one batch's counts (< 2**30 per device, checked) never overflows int32.
_LOW_BITS = 30
_NO_IMAGE = np.iinfo(np.int32).max  # "no bad image yet" in the bad-label counter
_PENDING_BATCHES = 4  # images held back for grouping by shape: this many batches' worth


class EvalError(ValueError):
  """Bad evaluation input (mode, crop size, mask values, logits shape): one clear line."""


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Summed counts and the IoUs derived from them; IoUs are in percent, as UniMatch logs them."""

  miou: float  # mean of iou_per_class over all classes, percent
  iou_per_class: np.ndarray  # f64 [K], percent
  intersection: np.ndarray  # i64 [K], pixels predicted c and labelled c
  union: np.ndarray  # i64 [K], pixels predicted c or labelled c
  target: np.ndarray  # i64 [K], pixels labelled c (not ignored)
  num_images: int

  @property
  def present(self) -> np.ndarray:
    """bool [K]: classes with a non-zero union (labelled or predicted somewhere)."""
    return self.union > 0

  @property
  def pixel_accuracy(self) -> float:
    """Fraction of non-ignored pixels predicted right, percent."""
    total = int(self.target.sum())
    return 100.0 * int(self.intersection.sum()) / total if total else 0.0

  @classmethod
  def from_counts(cls, counts: np.ndarray, num_images: int) -> EvalResult:
    """Builds the result from summed counts i64 [3, K] (intersection, union, target rows)."""
    counts = np.asarray(counts, dtype=np.int64)
    intersection, union, target = counts
    iou = intersection / (union + 1e-10) * 100.0
    return cls(miou=float(np.mean(iou)), iou_per_class=iou, intersection=intersection,
               union=union, target=target, num_images=int(num_images))


# ----------------------------------------------------------------------------
# Geometry of the protocols.


def sliding_window_stride(window: int) -> int:
  """UniMatch's stride, `int(grid * 2 / 3)`, computed the same way (float then truncate)."""
  return int(window * 2 / 3)


def sliding_window_tiles(height: int, width: int, window: int) -> list[tuple[int, int, int, int]]:
  """(row, col, h, w) of every window in UniMatch's raster order, cut at the image border."""
  if window < 2:
    raise EvalError(f'sliding_window needs a crop size >= 2 (stride int(2/3 * crop) > 0), '
                    f'got {window}')
  stride = sliding_window_stride(window)
  tiles = []
  row = 0
  while row < height:
    col = 0
    while col < width:
      tiles.append((row, col, min(height, row + window) - row, min(width, col + window) - col))
      col += stride
    row += stride
  return tiles


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
  """(row, col, h, w) of UniMatch's centre crop; an axis shorter than `crop` is kept whole."""
  if crop < 1:
    raise EvalError(f'center_crop needs a crop size >= 1, got {crop}')
  row = max((height - crop) // 2, 0)
  col = max((width - crop) // 2, 0)
  return row, col, min(crop, height), min(crop, width)


# ----------------------------------------------------------------------------
# Counts.


def intersection_union_counts(pred: np.ndarray, mask: np.ndarray, num_classes: int,
                              ignore_index: int = 255, name: str = '') -> np.ndarray:
  """i64 [3, K]: intersection, union and target pixel counts of one prediction, as UniMatch's.

  A mask value that is neither a class in [0, K) nor `ignore_index`, or a
  predicted class >= K, is an error, not silently binned: it means the dataset,
  the model and `num_classes` disagree.
  """
  pred = np.asarray(pred)
  mask = np.asarray(mask)
  if pred.shape != mask.shape:
    raise EvalError(f'prediction shape {pred.shape} != mask shape {mask.shape}'
                    + (f' for image {name!r}' if name else ''))
  valid = mask != ignore_index
  labels = mask[valid].astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise EvalError(f'mask of image {name!r} has label {bad}, outside [0, {num_classes}) and not '
                    f'the ignore index {ignore_index}: check data.num_classes and the label '
                    'encoding')
  predicted = pred[valid].astype(np.int64)
  if predicted.size and (predicted.min() < 0 or predicted.max() >= num_classes):
    raise EvalError(f'prediction for image {name!r} has class {predicted.max()}, outside '
                    f'[0, {num_classes}): the model has more outputs than data.num_classes')
  area_intersection = np.bincount(predicted[predicted == labels], minlength=num_classes)
  area_pred = np.bincount(predicted, minlength=num_classes)
  area_target = np.bincount(labels, minlength=num_classes)
  area_union = area_pred + area_target - area_intersection
  return np.stack([area_intersection, area_union, area_target])[:, :num_classes].astype(np.int64)


def sum_counts_over_processes(counts: np.ndarray, num_images: int) -> tuple[np.ndarray, int]:
  """Sums the per-process counts i64 [3, K] and image counts over all JAX processes.

  Every process must call this (it is a collective), also one that had no images.
  """
  local = np.concatenate([np.asarray(counts, np.int64).reshape(-1), [num_images]]).astype(np.int64)
  if jax.process_count() == 1:
    total = local
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # With x64 off (the default) JAX moves int64 as int32, which a Cityscapes
    # scale count can overflow: send 31-bit halves and rebuild int64 here.
    halves = np.stack([local & 0x7FFFFFFF, local >> 31]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
    gathered = gathered.reshape(jax.process_count(), 2, -1)
    total = (gathered[:, 0] + (gathered[:, 1] << 31)).sum(axis=0)
  return total[:-1].reshape(np.shape(counts)), int(total[-1])


# ----------------------------------------------------------------------------
# Prediction.


@dataclasses.dataclass(frozen=True)
class _InferenceLogits:
  """model.apply in inference mode (BN running statistics, no dropout) -> full-size logits.

  A frozen dataclass, equal when the models are equal, so a fresh
  `make_predict_fn` after every epoch hits jit's cache instead of recompiling.
  """

  model: Any

  def __call__(self, variables: Any, images: jax.Array) -> jax.Array:
    return self.model.apply(variables, images, train=False)['logits']


def make_predict_fn(model: Any, variables: Mapping[str, Any]) -> jax.tree_util.Partial:
  """predict_fn for `evaluate`: the model in inference mode with these variables.

  `variables` is `{'params', 'batch_stats'}` as in the train state; global
  replicated arrays of a multi-host run are fine (`evaluate` takes the local
  copy).
  """
  variables = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  return jax.tree_util.Partial(_InferenceLogits(model), variables)


def _local_mesh(devices: Sequence[jax.Device] | None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.local_devices()
  return jax.sharding.Mesh(np.array(devices), ('batch',))


def _to_local(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Replicates every leaf of `tree` on the local mesh (global replicated arrays: local copy)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def localize(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        raise EvalError('predict_fn holds an array sharded across processes; evaluation needs '
                        'replicated variables (params and batch_stats)')
      leaf = leaf.addressable_data(0)
    return jax.device_put(leaf, replicated)

  return jax.tree_util.tree_map(localize, tree)


def _as_partial(predict_fn: PredictFn) -> jax.tree_util.Partial:
  if isinstance(predict_fn, jax.tree_util.Partial):
    return predict_fn
  return jax.tree_util.Partial(predict_fn)


def normalize_on_device(images: jax.Array) -> jax.Array:
  """uint8 images [..., 3] -> float32 ImageNet-normalised, bit for bit `transforms.normalize`.

  A table look-up rather than `(x / 255 - mean) / std` in float32, which
  differs from the float64-then-rounded values in the last bit for more than
  half of the 768 (value, channel) pairs and could flip a near-tie pixel:
  evaluation must give the mIoU the host path gave. Float images are taken
  as normalised already and only cast (tests, custom pipelines).
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(jnp.float32)
  if images.dtype != jnp.uint8:
    raise EvalError(f'images must be uint8 (raw pixels) or float (normalised), got {images.dtype}')
  return inputs.normalize(images)


def _checked_logits(predict_fn: PredictFn, images: jax.Array) -> jax.Array:
  logits = predict_fn(images)
  if logits.ndim != 4 or logits.shape[:3] != images.shape[:3]:
    raise EvalError(f'predict_fn returned logits of shape {tuple(logits.shape)} for images of '
                    f'shape {tuple(images.shape)}; expected [N, h, w, C] at the input size')
  return logits.astype(jnp.float32)


def sliding_window_probabilities(predict_fn: PredictFn, images: jax.Array,
                                 window: int) -> tuple[jax.Array, np.ndarray]:
  """The sliding-window protocol's class scores of images f32 [B, H, W, 3] (traceable).

  Returns (f32 [B, H, W, C], the softmax of every window summed in UniMatch's
  order over `sliding_window_tiles`; f32 [H, W], how many windows cover each
  pixel). Its argmax is the protocol's prediction; prediction's confidence maps
  divide the maximum by the coverage. One network call per window shape.
  """
  batch, height, width, _ = images.shape
  tiles = sliding_window_tiles(height, width, window)
  by_shape: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
  for index, (_, _, h, w) in enumerate(tiles):
    by_shape[(h, w)].append(index)
  probs_of_tile = {}
  for (h, w), indices in by_shape.items():
    # [B, T, h, w, 3] -> [B*T, ...]: the batch axis stays outermost, so the
    # device sharding of the images carries over to the windows.
    windows = jnp.stack([images[:, tiles[i][0]:tiles[i][0] + h, tiles[i][1]:tiles[i][1] + w]
                         for i in indices], axis=1).reshape(batch * len(indices), h, w, -1)
    probs = jax.nn.softmax(_checked_logits(predict_fn, windows), axis=-1)
    probs = probs.reshape(batch, len(indices), h, w, -1)
    for t, i in enumerate(indices):
      probs_of_tile[i] = probs[:, t]
  num_classes = probs_of_tile[0].shape[-1]
  total = jnp.zeros((batch, height, width, num_classes), jnp.float32)
  coverage = np.zeros((height, width), np.float32)
  for i, (row, col, h, w) in enumerate(tiles):  # UniMatch's summation order
    total = total.at[:, row:row + h, col:col + w].add(probs_of_tile[i])
    coverage[row:row + h, col:col + w] += 1.0
  return total, coverage


def _protocol_labels(predict_fn: PredictFn, images: jax.Array,
                     window: int | None) -> tuple[jax.Array, int]:
  """(i32 [B, H, W] labels, number of classes C) of images [B, H, W, 3] (uint8 or normalised)."""
  images = normalize_on_device(images)
  if window is None:
    logits = _checked_logits(predict_fn, images)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits.shape[-1]
  total, _ = sliding_window_probabilities(predict_fn, images, window)
  return jnp.argmax(total, axis=-1).astype(jnp.int32), total.shape[-1]


@functools.partial(jax.jit, static_argnames=('window',))
def _predict_labels_program(predict_fn: jax.tree_util.Partial, images: jax.Array,
                            window: int | None) -> jax.Array:
  """i32 [B, H, W] labels of images [B, H, W, 3]: whole image (window None) or windows."""
  return _protocol_labels(predict_fn, images, window)[0]


def _check_mode(mode: str, crop_size: int) -> None:
  if mode not in MODES:
    raise EvalError(f'eval.mode must be one of {", ".join(MODES)}; got {mode!r}')
  if mode == 'sliding_window' and crop_size < 2:
    raise EvalError(f'sliding_window needs data.crop_size >= 2, got {crop_size}')
  if mode == 'center_crop' and crop_size < 1:
    raise EvalError(f'center_crop needs data.crop_size >= 1, got {crop_size}')


def predict_labels(predict_fn: PredictFn, images: np.ndarray, *, mode: str, crop_size: int,
                   devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """i32 [B, h, w] labels of equal-size images [B, H, W, 3] under one protocol.

  Images are uint8 pixels (normalised on the device) or float32 already
  normalised. For 'center_crop' the labels cover the crop (`center_crop_box`).
  The batch is spread over `devices` (default: this process's local devices),
  filled up with zero images to a multiple of their number. A helper for one
  batch (predictions, tests); `evaluate` is the path that scores a data set.
  """
  _check_mode(mode, crop_size)
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise EvalError(f'images must be [B, H, W, 3], got shape {images.shape}')
  if mode == 'center_crop':
    row, col, h, w = center_crop_box(images.shape[1], images.shape[2], crop_size)
    images = images[:, row:row + h, col:col + w]
  mesh = _local_mesh(devices)
  count = images.shape[0]
  filler = -count % mesh.devices.size
  if filler:
    images = np.concatenate([images, np.zeros((filler,) + images.shape[1:], images.dtype)])
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  labels = _predict_labels_program(
      _to_local(_as_partial(predict_fn), mesh), jax.device_put(images, batch_sharding),
      window=crop_size if mode == 'sliding_window' else None)
  return np.asarray(labels)[:count]


# ----------------------------------------------------------------------------
# Counts on the device.


def device_counts(labels: jax.Array, masks: jax.Array, *, num_classes: int,
                  ignore_index: int = 255) -> tuple[jax.Array, jax.Array]:
  """Per-image counts of predictions i32 [B, h, w] against masks [B, h, w] (traceable).

  Returns (i32 [B, 3, K]: intersection, union, target as `intersection_union_counts`
  counts them; bool [B, h, w]: pixels whose label is neither a class in [0, K)
  nor `ignore_index`, which count nothing and make `evaluate` fail). One
  scatter-add into a K x K confusion histogram per image (label * K + predicted;
  ignored pixels go to an extra bin that is dropped): on a CPU this is 50x
  faster than K one-hot comparisons, which XLA materialises there.
  """
  masks = masks.astype(jnp.int32)
  labelled = masks != ignore_index
  in_range = (masks >= 0) & (masks < num_classes)
  bad = labelled & ~in_range
  dropped = num_classes * num_classes
  index = jnp.where(labelled & in_range, masks * num_classes + labels, dropped)
  confusion = jax.vmap(lambda i: jnp.bincount(i.reshape(-1), length=dropped + 1))(index)
  confusion = confusion[:, :dropped].reshape(-1, num_classes, num_classes).astype(jnp.int32)
  intersection = jnp.diagonal(confusion, axis1=1, axis2=2)
  predicted = jnp.sum(confusion, axis=1)  # over labels
  target = jnp.sum(confusion, axis=2)  # over predictions
  return jnp.stack([intersection, predicted + target - intersection, target], axis=1), bad


def _zero_counters(num_devices: int, num_classes: int) -> dict[str, np.ndarray]:
  """Per-device counters: counts = high * 2**30 + low (each i32 [D, 3, K]); bad-label record."""
  return {'low': np.zeros((num_devices, 3, num_classes), np.int32),
          'high': np.zeros((num_devices, 3, num_classes), np.int32),
          # images with bad labels, the smallest such image id, the largest bad label
          'bad': np.tile(np.array([0, _NO_IMAGE, -1], np.int32), (num_devices, 1))}


@functools.partial(jax.jit, static_argnames=('window', 'num_classes', 'ignore_index', 'sharding'))
def _evaluate_batch(predict_fn: jax.tree_util.Partial, counters: dict[str, jax.Array],
                    images: jax.Array, masks: jax.Array, ids: jax.Array, *, window: int | None,
                    num_classes: int, ignore_index: int,
                    sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Counters + one batch: images [D*n, H, W, 3], masks [D*n, H, W], ids i32 [D*n], all sharded.

  Everything is per image along the sharded batch axis, so no device talks to
  another; each adds its own n images into its own row of the counters.
  """
  labels, classes = _protocol_labels(predict_fn, images, window)
  if classes > num_classes:
    raise EvalError(f'the model has {classes} outputs but data.num_classes is {num_classes}: '
                    'check the config and the weights')
  counts, bad = device_counts(labels, masks, num_classes=num_classes, ignore_index=ignore_index)
  devices = counters['low'].shape[0]
  counts = jnp.sum(counts.reshape(devices, -1, 3, num_classes), axis=1)
  low = counters['low'] + counts
  high = counters['high'] + (low >> _LOW_BITS)
  low = low & ((1 << _LOW_BITS) - 1)
  image_bad = jnp.any(bad, axis=(1, 2))
  bad_label = jnp.max(jnp.where(bad, masks.astype(jnp.int32), -1), axis=(1, 2))
  per_device = lambda x: x.reshape(devices, -1)
  record = counters['bad']
  record = jnp.stack([
      record[:, 0] + jnp.sum(per_device(image_bad), axis=1, dtype=jnp.int32),
      jnp.minimum(record[:, 1], jnp.min(per_device(jnp.where(image_bad, ids, _NO_IMAGE)), axis=1)),
      jnp.maximum(record[:, 2], jnp.max(per_device(bad_label), axis=1))], axis=1)
  out = {'low': low, 'high': high, 'bad': record}
  return jax.lax.with_sharding_constraint(out, sharding)


def _evaluated_region(record: Mapping[str, Any], mode: str,
                      crop_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(image [h, w, 3], mask [h, w]) the protocol scores: the whole image, or its centre crop."""
  image, mask = np.asarray(record['image']), np.asarray(record['mask'])
  name = record.get('name', '')
  if image.ndim != 3 or image.shape[-1] != 3:
    raise EvalError(f'image {name!r}: expected [H, W, 3], got shape {image.shape}')
  if mask.shape != image.shape[:2]:
    raise EvalError(f'image {name!r}: mask shape {mask.shape} != image shape {image.shape[:2]}')
  if not np.issubdtype(mask.dtype, np.integer):
    raise EvalError(f'image {name!r}: mask must hold integer labels, got {mask.dtype}')
  if image.dtype != np.uint8:
    image = image.astype(np.float32)
  if mask.dtype != np.uint8:
    mask = mask.astype(np.int32)  # JAX moves int64 as int32 anyway; bytes stay bytes
  if mode == 'center_crop':
    row, col, h, w = center_crop_box(mask.shape[0], mask.shape[1], crop_size)
    image, mask = image[row:row + h, col:col + w], mask[row:row + h, col:col + w]
  return image, mask


def _batches_by_shape(items: Iterable[tuple[int, np.ndarray, np.ndarray]], batch_size: int,
                      max_pending: int) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
  """Groups (id, image, mask) items into batches of one shape, at most `batch_size` each.

  A batch leaves as soon as it is full; while more than `max_pending` items wait
  (many shapes, as in Pascal VOC), the oldest shape leaves part-filled; at the
  end every shape leaves. The order of images changes, the counts (sums) do not.
  """
  pending: dict[tuple[Any, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
  waiting = 0
  for item in items:
    _, image, mask = item
    key = (image.shape, image.dtype.str, mask.dtype.str)
    group = pending.setdefault(key, [])
    group.append(item)
    waiting += 1
    if len(group) == batch_size:
      waiting -= len(pending.pop(key))
      yield group
    elif waiting > max_pending:
      oldest = pending.pop(next(iter(pending)))
      waiting -= len(oldest)
      yield oldest
  for group in pending.values():
    yield group


def _host_batch(group: Sequence[tuple[int, np.ndarray, np.ndarray]], batch_size: int,
                ignore_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, masks, ids) of one batch; missing slots are zero images with all-ignore masks.

  A filler counts nothing (every pixel ignored), so it never needs masking out;
  it is zeros, not a copy of a real image, and only fills slots a shape left.
  """
  ids, images, masks = zip(*group)
  if len(group) == batch_size == 1:
    return images[0][None], masks[0][None], np.asarray(ids, np.int32)  # views, no copy
  filler = batch_size - len(group)
  images = list(images) + [np.zeros_like(images[0])] * filler
  masks = list(masks) + [np.full_like(masks[0], ignore_index)] * filler
  return np.stack(images), np.stack(masks), np.asarray(list(ids) + [-1] * filler, np.int32)


def evaluate_local_counts(predict_fn: PredictFn, dataset: Iterable[Mapping[str, Any]], *,
                          num_classes: int, mode: str, crop_size: int, ignore_index: int = 255,
                          images_per_device: int = 1,
                          devices: Sequence[jax.Device] | None = None,
                          progress: Callable[[int], None] | None = None,
                          max_in_flight: int = 2) -> tuple[np.ndarray, int]:
  """This process's counts i64 [3, K] (intersection, union, target) and number of images.

  `dataset` yields `{'image': uint8 [H, W, 3] (or float32 normalised), 'mask':
  uint8/int [H, W], 'name'}` one image at a time (`data.val_input`). The
  counts stay on the devices until the end: this reads from them once.
  `progress(n)` is called with the number of images handed to the devices
  after each batch; at most `max_in_flight` batches are queued ahead of the
  devices, which bounds the device memory the queue holds.
  """
  _check_mode(mode, crop_size)
  if images_per_device < 1:
    raise EvalError(f'images_per_device must be >= 1, got {images_per_device}')
  mesh = _local_mesh(devices)
  num_devices = int(mesh.devices.size)
  predict_fn = _to_local(_as_partial(predict_fn), mesh)  # once, not per batch
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  batch_size = num_devices * images_per_device
  window = crop_size if mode == 'sliding_window' else None
  names: list[str] = []

  def items() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for record in dataset:
      image, mask = _evaluated_region(record, mode, crop_size)
      if images_per_device * mask.size >= 1 << _LOW_BITS:
        raise EvalError(f'image {record.get("name", "")!r}: {images_per_device} x {mask.size} '
                        'pixels per device and batch is more than the counters take (2**30)')
      names.append(str(record.get('name', '')))
      yield len(names) - 1, image, mask

  counters = None
  in_flight: collections.deque[Any] = collections.deque()
  done = 0
  for group in _batches_by_shape(items(), batch_size, _PENDING_BATCHES * batch_size):
    if counters is None:
      counters = jax.device_put(_zero_counters(num_devices, num_classes), sharding)
    images, masks, ids = jax.device_put(_host_batch(group, batch_size, ignore_index), sharding)
    counters = _evaluate_batch(predict_fn, counters, images, masks, ids, window=window,
                               num_classes=num_classes, ignore_index=ignore_index,
                               sharding=sharding)
    in_flight.append(counters)
    if len(in_flight) > max_in_flight:  # waits on the device, reads nothing back
      jax.block_until_ready(in_flight.popleft())
    done += len(group)
    if progress is not None:
      progress(done)
  if counters is None:
    return np.zeros((3, num_classes), np.int64), 0
  return _read_counters(counters, names, ignore_index), len(names)


def _read_counters(counters: Mapping[str, jax.Array], names: Sequence[str],
                   ignore_index: int) -> np.ndarray:
  """The devices' counters -> i64 [3, K] summed over devices; EvalError for a bad mask label."""
  host = jax.device_get(counters)  # the one read of the evaluation
  bad_images, first_bad, bad_label = (host['bad'][:, 0].sum(), host['bad'][:, 1].min(),
                                      host['bad'][:, 2].max())
  num_classes = host['low'].shape[-1]
  if bad_images:
    raise EvalError(f'mask of image {names[first_bad]!r} has label {bad_label}, outside '
                    f'[0, {num_classes}) and not the ignore index {ignore_index} ({bad_images} '
                    'images like it): check data.num_classes and the label encoding')
  counts = (host['high'].astype(np.int64) << _LOW_BITS) + host['low'].astype(np.int64)
  return counts.sum(axis=0)


def evaluate(predict_fn: PredictFn, dataset: Iterable[Mapping[str, Any]], *, num_classes: int,
             mode: str, crop_size: int, ignore_index: int = 255, images_per_device: int = 1,
             devices: Sequence[jax.Device] | None = None,
             progress: Callable[[int], None] | None = None) -> EvalResult:
  """Evaluates this process's share of the validation set; counts summed over all processes.

  A collective: every process calls it, with its own shard of the images.
  """
  counts, num_images = evaluate_local_counts(
      predict_fn, dataset, num_classes=num_classes, mode=mode, crop_size=crop_size,
      ignore_index=ignore_index, images_per_device=images_per_device, devices=devices,
      progress=progress)
  counts, num_images = sum_counts_over_processes(counts, num_images)
  return EvalResult.from_counts(counts, num_images)


def evaluate_model(model: Any, variables: Mapping[str, Any], dataset: Iterable[Mapping[str, Any]],
                   config: Any, progress: Callable[[int], None] | None = None) -> EvalResult:
  """`evaluate` with the protocol of `config.eval.mode` and `config.data` (crop, classes)."""
  return evaluate(make_predict_fn(model, variables), dataset,
                  num_classes=config.data.num_classes, mode=config.eval.mode,
                  crop_size=config.data.crop_size, ignore_index=config.data.ignore_index,
                  progress=progress)


def format_iou_table(result: EvalResult, class_names: Sequence[str] | None = None) -> str:
  """Per-class IoU table ending with the line `mIoU: <percent, two decimals>`."""
  num_classes = len(result.iou_per_class)
  if class_names is None:
    class_names = [f'class {k}' for k in range(num_classes)]
  if len(class_names) != num_classes:
    raise EvalError(f'{len(class_names)} class names for {num_classes} classes')
  name_width = max([len('class')] + [len(name) for name in class_names])
  lines = [f'{"#":>3}  {"class":<{name_width}}  {"IoU":>6}']
  for k, (name, iou) in enumerate(zip(class_names, result.iou_per_class)):
    note = '' if result.present[k] else '  (absent: counts as 0)'
    lines.append(f'{k:>3}  {name:<{name_width}}  {iou:6.2f}{note}')
  lines.append(f'images: {result.num_images}, pixel accuracy: {result.pixel_accuracy:.2f}')
  lines.append(f'mIoU: {result.miou:.2f}')
  return '\n'.join(lines)
