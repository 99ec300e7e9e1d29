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

Speed: every image is evaluated at its own size, as the protocol asks. One XLA
program per distinct image shape (jit's cache; Cityscapes has one shape, Pascal
VOC many, each compiled once per run; a fresh `make_predict_fn` with new
variables reuses them). Consecutive images of the same shape
are batched, one per local device, and in 'sliding_window' all windows of one
shape from all images of the batch go through the network in one call. Each
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

MODES = ('original', 'center_crop', 'sliding_window')

# predict_fn(images f32 [N, h, w, 3]) -> logits [N, h, w, C]. A
# `jax.tree_util.Partial` (what `make_predict_fn` returns) passes its arrays,
# the model variables, into the evaluation programs as arguments; any other
# callable is traced with whatever it closes over baked in as constants.
PredictFn = Callable[[jax.Array], jax.Array]


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


@functools.partial(jax.jit, static_argnames=('window',))
def _predict_labels_program(predict_fn: jax.tree_util.Partial, images: jax.Array,
                            window: int | None) -> jax.Array:
  """i32 [B, H, W] labels of images f32 [B, H, W, 3]: whole image (window None) or windows."""
  if window is None:
    return jnp.argmax(_checked_logits(predict_fn, images), axis=-1).astype(jnp.int32)
  total, _ = sliding_window_probabilities(predict_fn, images, window)
  return jnp.argmax(total, axis=-1).astype(jnp.int32)


def _check_mode(mode: str, crop_size: int) -> None:
  if mode not in MODES:
    raise EvalError(f'eval.mode must be one of {", ".join(MODES)}; got {mode!r}')
  if mode == 'sliding_window' and crop_size < 2:
    raise EvalError(f'sliding_window needs data.crop_size >= 2, got {crop_size}')
  if mode == 'center_crop' and crop_size < 1:
    raise EvalError(f'center_crop needs data.crop_size >= 1, got {crop_size}')


def predict_labels(predict_fn: PredictFn, images: np.ndarray, *, mode: str, crop_size: int,
                   devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """i32 [B, h, w] labels of equal-size images f32 [B, H, W, 3] under one protocol.

  For 'center_crop' the labels cover the crop (`center_crop_box`). The batch is
  spread over `devices` (default: this process's local devices), padded with
  copies of the last image to a multiple of their number.
  """
  _check_mode(mode, crop_size)
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise EvalError(f'images must be [B, H, W, 3], got shape {images.shape}')
  if mode == 'center_crop':
    row, col, h, w = center_crop_box(images.shape[1], images.shape[2], crop_size)
    images = images[:, row:row + h, col:col + w]
  mesh = _local_mesh(devices)
  num_devices = mesh.devices.size
  count = images.shape[0]
  padded = -count % num_devices
  if padded:
    images = np.concatenate([images, np.repeat(images[-1:], padded, axis=0)])
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  labels = _predict_labels_program(
      _to_local(_as_partial(predict_fn), mesh), jax.device_put(images, batch_sharding),
      window=crop_size if mode == 'sliding_window' else None)
  return np.asarray(labels)[:count]


def _same_shape_batches(dataset: Iterable[Mapping[str, Any]],
                        batch_size: int) -> Iterator[list[Mapping[str, Any]]]:
  """Groups consecutive records whose images have one shape, at most `batch_size` per group."""
  group: list[Mapping[str, Any]] = []
  for record in dataset:
    if group and (len(group) == batch_size
                  or np.shape(record['image']) != np.shape(group[0]['image'])):
      yield group
      group = []
    group.append(record)
  if group:
    yield group


def evaluate_local_counts(predict_fn: PredictFn, dataset: Iterable[Mapping[str, Any]], *,
                          num_classes: int, mode: str, crop_size: int, ignore_index: int = 255,
                          images_per_batch: int | None = None,
                          devices: Sequence[jax.Device] | None = None,
                          progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
  """This process's counts i64 [3, K] (intersection, union, target) and number of images.

  `dataset` yields `{'image': f32 [H, W, 3], 'mask': i32 [H, W], 'name'}` one
  image at a time (`data.pipeline.make_val_dataset`). `progress(n)` is called
  with the number of images done after each batch.
  """
  _check_mode(mode, crop_size)
  mesh = _local_mesh(devices)
  predict_fn = _to_local(_as_partial(predict_fn), mesh)  # once, not per batch
  batch_size = images_per_batch or mesh.devices.size
  counts = np.zeros((3, num_classes), np.int64)
  num_images = 0
  for group in _same_shape_batches(dataset, batch_size):
    images = np.stack([np.asarray(record['image'], np.float32) for record in group])
    labels = predict_labels(predict_fn, images, mode=mode, crop_size=crop_size,
                            devices=mesh.devices.tolist())
    for record, pred in zip(group, labels):
      mask = np.asarray(record['mask'])
      if mask.shape != np.shape(record['image'])[:2]:
        raise EvalError(f'image {record.get("name", "")!r}: mask shape {mask.shape} != image shape '
                        f'{np.shape(record["image"])[:2]}')
      if mode == 'center_crop':
        row, col, h, w = center_crop_box(mask.shape[0], mask.shape[1], crop_size)
        mask = mask[row:row + h, col:col + w]
      counts += intersection_union_counts(pred, mask, num_classes, ignore_index,
                                          name=str(record.get('name', '')))
    num_images += len(group)
    if progress is not None:
      progress(num_images)
  return counts, num_images


def evaluate(predict_fn: PredictFn, dataset: Iterable[Mapping[str, Any]], *, num_classes: int,
             mode: str, crop_size: int, ignore_index: int = 255,
             images_per_batch: int | None = None, devices: Sequence[jax.Device] | None = None,
             progress: Callable[[int], None] | None = None) -> EvalResult:
  """Evaluates this process's share of the validation set; counts summed over all processes.

  A collective: every process calls it, with its own shard of the images.
  `images_per_batch` defaults to the number of local devices (one image each).
  """
  counts, num_images = evaluate_local_counts(
      predict_fn, dataset, num_classes=num_classes, mode=mode, crop_size=crop_size,
      ignore_index=ignore_index, images_per_batch=images_per_batch, devices=devices,
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
