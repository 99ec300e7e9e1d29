"""Loop references of the losses in `uccl_jax.losses`, written from their definitions.

What these are for: an independent check of the vectorised losses (tests) and the
"per-image, per-class loops" baseline of `python -m uccl_jax.benchmark losses`.
They follow the definitions of issue 2, section 4 literally: plain Python loops
over images and classes, boolean selection of a class's pixels, a softmax over
exactly the pixels the definition names, and, for CKR, the class-level maps
built pixel by pixel before the mean cosine. They share no code with
`uccl_jax.losses` (no segment ids, no one-hot sums, no n_bc * cos shortcut).

How gradients are checked: each loop is written once against a tiny array
namespace (`_NumpyOps`, `_TorchOps`), so the SAME loops run
  * on NumPy arrays (backend='numpy', the default): values only; what the
    benchmark times and what needs no torch;
  * on torch tensors (backend='torch'): the caller passes float64 tensors with
    requires_grad and calls .backward(); torch's autograd through the loops gives
    a gradient reference that agrees with JAX's to ~1e-13 in float64, which
    finite differences cannot reach. "No gradient" in a definition is a
    .detach() here (a no-op on NumPy). torch is imported lazily, only on that
    path.
Inputs follow `uccl_jax.losses`: NHWC logits/features, [B, h, w] labels/masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

COSINE_EPS = 1e-6  # PyTorch's CosineSimilarity default, as the released code uses


class _NumpyOps:
  """The handful of array operations the loops need, on NumPy."""

  @staticmethod
  def detach(x: Any) -> Any:
    return x

  @staticmethod
  def exp(x: Any) -> Any:
    return np.exp(x)

  @staticmethod
  def log(x: Any) -> Any:
    return np.log(x)

  @staticmethod
  def sqrt(x: Any) -> Any:
    return np.sqrt(x)

  @staticmethod
  def sum(x: Any, axis: int | None = None) -> Any:
    return np.sum(x, axis=axis)

  @staticmethod
  def max(x: Any, axis: int | None = None) -> Any:
    return np.max(x, axis=axis)

  @staticmethod
  def argmax(x: Any, axis: int) -> Any:
    return np.argmax(x, axis=axis)

  @staticmethod
  def clamp_min(x: Any, low: float) -> Any:
    return np.maximum(x, low)

  @staticmethod
  def where(mask: Any, x: Any, y: float) -> Any:
    return np.where(mask, x, y)

  @staticmethod
  def arange(n: int) -> Any:
    return np.arange(n)

  @staticmethod
  def copy(x: Any) -> Any:
    return np.array(x, copy=True)

  @staticmethod
  def scalar(value: float, like: Any) -> Any:
    return np.asarray(value, dtype=like.dtype)

  @staticmethod
  def from_numpy_mask(mask: np.ndarray) -> Any:
    return mask


class _TorchOps:
  """The same operations on torch tensors, differentiable by autograd."""

  def __init__(self) -> None:
    import torch  # pylint: disable=g-import-not-at-top  # only on this path
    self.torch = torch

  def detach(self, x: Any) -> Any:
    return x.detach()

  def exp(self, x: Any) -> Any:
    return self.torch.exp(x)

  def log(self, x: Any) -> Any:
    return self.torch.log(x)

  def sqrt(self, x: Any) -> Any:
    return self.torch.sqrt(x)

  def sum(self, x: Any, axis: int | None = None) -> Any:
    return x.sum() if axis is None else x.sum(dim=axis)

  def max(self, x: Any, axis: int | None = None) -> Any:
    return x.max() if axis is None else x.max(dim=axis).values

  def argmax(self, x: Any, axis: int) -> Any:
    return x.argmax(dim=axis)

  def clamp_min(self, x: Any, low: float) -> Any:
    return self.torch.clamp_min(x, low)

  def where(self, mask: Any, x: Any, y: float) -> Any:
    return self.torch.where(mask, x, self.torch.as_tensor(y, dtype=x.dtype))

  def arange(self, n: int) -> Any:
    return self.torch.arange(n)

  def copy(self, x: Any) -> Any:
    return x.clone()

  def scalar(self, value: float, like: Any) -> Any:
    return self.torch.as_tensor(value, dtype=like.dtype)

  def from_numpy_mask(self, mask: np.ndarray) -> Any:
    return self.torch.from_numpy(mask)


def _ops(backend: str) -> Any:
  if backend == 'numpy':
    return _NumpyOps()
  if backend == 'torch':
    return _TorchOps()
  raise ValueError(f"losses_reference: backend must be 'numpy' or 'torch', got {backend!r}")


def _softmax(o: Any, scores: Any) -> Any:
  """exp(s - max s) / sum exp(s - max s) over the last axis: the definition, shifted for range."""
  numerators = o.exp(scores - o.max(scores, axis=-1)[..., None])
  return numerators / o.sum(numerators, axis=-1)[..., None]


def _pixel_cross_entropy(o: Any, logits: Any, labels: Any) -> Any:
  """CE of each row of logits [n, C] against labels [n] in [0, C): -log softmax[label]."""
  probs = _softmax(o, logits)
  return -o.log(probs[o.arange(logits.shape[0]), labels])


def _cosine(o: Any, a: Any, b: Any) -> Any:
  """Row-wise a.b / (max(|a|, eps) * max(|b|, eps)) of [n, D] arrays (or [D] vectors)."""
  dot = o.sum(a * b, axis=-1)
  norm_a = o.clamp_min(o.sqrt(o.sum(a * a, axis=-1)), COSINE_EPS)
  norm_b = o.clamp_min(o.sqrt(o.sum(b * b, axis=-1)), COSINE_EPS)
  return dot / (norm_a * norm_b)


def _weak_labels_and_conf(o: Any, weak_logits_image: Any) -> tuple[Any, Any]:
  """y = argmax_c p_w and conf = max_c p_w of one image's weak logits [n, C], no gradient."""
  probs = _softmax(o, o.detach(weak_logits_image))
  return o.argmax(probs, axis=-1), o.max(probs, axis=-1)


def cross_entropy(logits: Any, labels: Any, ignore_index: int = 255, *,
                  backend: str = 'numpy') -> Any:
  """Mean CE over pixels with label != ignore_index (0 if none), image by image."""
  o = _ops(backend)
  batch, height, width, num_classes = logits.shape
  total, count = 0.0, 0
  for b in range(batch):
    image_logits = logits[b].reshape(height * width, num_classes)
    image_labels = labels[b].reshape(height * width)
    valid = image_labels != ignore_index
    if int(valid.sum()) == 0:
      continue
    total = total + o.sum(_pixel_cross_entropy(o, image_logits[valid], image_labels[valid]))
    count += int(valid.sum())
  return total / count if count else o.scalar(0.0, logits)


def _ohem_one_group(o: Any, logits: Any, labels: Any, thresh: float, min_kept: int,
                    ignore_index: int) -> Any:
  """One GPU's OHEM as the released ProbOhemCrossEntropy2d does it, on [n, C] logits, [n] labels.

  Mines only when 0 < min_kept <= number of valid pixels: q = probability of
  the label class (1 for ignored pixels); the threshold is `thresh`, or the q
  found at position min_kept - 1 of the ascending order when that is larger;
  the kept pixels are the valid ones with q <= threshold. The loss is the mean
  CE over the kept pixels (over all valid pixels when not mining; 0 when
  there are none, where PyTorch gives NaN).
  """
  valid = labels != ignore_index
  kept = valid
  if 0 < min_kept <= int(valid.sum()):
    probs = _softmax(o, o.detach(logits))
    q = np.ones(labels.shape[0])
    for p in range(labels.shape[0]):
      if bool(valid[p]):
        q[p] = float(probs[p, int(labels[p])])
    order = np.argsort(q, kind='stable')
    threshold = thresh
    if q[order[min(len(order), min_kept) - 1]] > thresh:
      threshold = q[order[min(len(order), min_kept) - 1]]
    kept = np.logical_and(np.asarray(valid), q <= threshold)
  if not kept.any():
    return o.scalar(0.0, logits)
  kept = o.from_numpy_mask(np.asarray(kept))
  ce = _pixel_cross_entropy(o, logits[kept], labels[kept])
  return o.sum(ce) / int(kept.sum())


def ohem_cross_entropy(logits: Any, labels: Any, *, thresh: float = 0.7, min_kept: int = 200000,
                       ignore_index: int = 255, images_per_group: int | None = None,
                       backend: str = 'numpy') -> Any:
  """OHEM CE mined group by group (see uccl_jax.losses): the mean of the groups' losses.

  A group is `images_per_group` consecutive images (all images when None), the
  batch of one GPU in the release; DDP's average over the GPUs is the mean here.
  """
  o = _ops(backend)
  batch, height, width, num_classes = logits.shape
  group = batch if images_per_group is None else images_per_group
  if group < 1 or batch % group:
    raise ValueError(f'images_per_group={images_per_group} does not divide {batch} images')
  group_losses = []
  for start in range(0, batch, group):
    group_losses.append(_ohem_one_group(
        o, logits[start:start + group].reshape(group * height * width, num_classes),
        labels[start:start + group].reshape(group * height * width), thresh, min_kept,
        ignore_index))
  total = group_losses[0]
  for loss in group_losses[1:]:
    total = total + loss
  return total / len(group_losses)


def pseudo_label_loss(student_logits: Any, pseudo_labels: Any, conf: Any, ignore: Any, *,
                      threshold: float, backend: str = 'numpy') -> Any:
  """sum of CE over confident valid pixels / number of valid pixels, image by image."""
  o = _ops(backend)
  batch, height, width, num_classes = student_logits.shape
  total, num_valid = o.scalar(0.0, student_logits), 0
  for b in range(batch):
    valid = ~ignore[b].reshape(-1)
    num_valid += int(valid.sum())
    confident = (conf[b].reshape(-1) >= threshold) & valid
    if int(confident.sum()) == 0:
      continue
    logits = student_logits[b].reshape(height * width, num_classes)[confident]
    total = total + o.sum(_pixel_cross_entropy(o, logits, pseudo_labels[b].reshape(-1)[confident]))
  return total / max(num_valid, 1)


def sbu_loss(weak_logits: Any, strong_logits: Any, weak_features: Any, strong_features: Any,
             ignore: Any, *, threshold: float, variant: str = 'reference',
             backend: str = 'numpy') -> Any:
  """SBU by loops over images and classes (definition in `uccl_jax.losses.sbu_loss`)."""
  if variant not in ('reference', 'paper'):
    raise ValueError(f'unknown SBU variant {variant!r}')
  o = _ops(backend)
  batch, height, width, num_classes = weak_logits.shape
  pixels = height * width
  total = o.scalar(0.0, strong_logits)
  for b in range(batch):
    labels, conf = _weak_labels_and_conf(o, weak_logits[b].reshape(pixels, num_classes))
    valid = ~ignore[b].reshape(pixels)
    uncertain = (conf <= threshold) & valid
    weak = o.detach(weak_features[b].reshape(pixels, -1))
    strong = strong_features[b].reshape(pixels, -1)
    similarity = _cosine(o, weak, strong)  # S_p
    ce = _pixel_cross_entropy(o, strong_logits[b].reshape(pixels, num_classes), labels)
    class_losses = []
    for c in range(num_classes):
      members = (labels == c) & uncertain
      if int(members.sum()) == 0:
        continue
      if variant == 'reference':
        weights = _softmax(o, o.where(members, -similarity, 0.0))  # over all h*w pixels
        class_losses.append(o.sum(weights[valid] * ce[valid]))
      else:
        weights = _softmax(o, -similarity[members])  # over the members only
        class_losses.append(o.sum(weights * ce[members]))
    if class_losses:
      image_loss = class_losses[0]
      for class_loss in class_losses[1:]:
        image_loss = image_loss + class_loss
      total = total + image_loss / len(class_losses)
  return total / batch


def _class_level_map(o: Any, features: Any, own_logits: Any, labels: Any, valid: Any,
                     num_classes: int) -> Any:
  """One image's map: valid pixels get their class's feature, ignored ones their own."""
  class_map = o.copy(features)
  for c in range(num_classes):
    members = (labels == c) & valid
    if int(members.sum()) == 0:
      continue
    weights = _softmax(o, own_logits[members][:, c])
    class_feature = o.sum(weights[:, None] * features[members], axis=0)
    class_map[members] = class_feature
  return class_map


def ckr_loss(weak_logits: Any, weak_features: Any, strong_features: Any, ignore: Any, *,
             backend: str = 'numpy') -> Any:
  """CKR by loops over images and classes (definition in `uccl_jax.losses.ckr_loss`)."""
  o = _ops(backend)
  batch, height, width, num_classes = weak_logits.shape
  pixels = height * width
  cosine_sum = o.scalar(0.0, strong_features)
  for b in range(batch):
    logits = weak_logits[b].reshape(pixels, num_classes)
    labels, _ = _weak_labels_and_conf(o, logits)
    valid = ~ignore[b].reshape(pixels)
    weak_map = _class_level_map(o, o.detach(weak_features[b].reshape(pixels, -1)),
                                o.detach(logits), labels, valid, num_classes)
    strong_map = _class_level_map(o, strong_features[b].reshape(pixels, -1), logits, labels,
                                  valid, num_classes)
    cosine_sum = cosine_sum + o.sum(_cosine(o, weak_map, strong_map))
  return 1.0 - cosine_sum / (batch * pixels)
