"""The training losses of UniMatch and UCCL: pure, jit-able functions on NHWC arrays.

Shapes: logits [B, h, w, C], features [B, h, w, D], labels [B, h, w] int,
`ignore` [B, h, w] bool (True = ignored; the caller brings masks to the loss
resolution). Every loss returns a scalar. Inputs of any float dtype are accepted
(bf16 logits and features from a bf16 network included); the arithmetic runs in
float32 (float64 when an input already is, which the tests use), so the loss
value and the accumulations never see bf16 rounding.

Notation of the UCCL losses: p_w = softmax(weak logits), conf = max_c p_w,
y = argmax_c p_w (computed as the argmax of the logits, which is the same class),
valid = not ignore, cos = `ops.cosine_similarity` (PyTorch's CosineSimilarity,
eps 1e-6).

Why it looks the way it does. The released PyTorch code loops over images and
classes, which is slow at the paper's sizes (`python -m uccl_jax.benchmark
losses --torch_loops` times those loops against this module). Here each
(image b, class c) pair is one segment, segment id b * C + c:
  * Scalar per-segment reductions (counts, maxima, softmax denominators,
    weighted CE sums) are masked reductions over the pixel axis of the [B, P, C]
    one-hot membership (P = h*w): the dense equivalent of
    `jax.ops.segment_sum` / `segment_max` with the id kept as the two axes
    [B, C]; linear in B*P*C, deterministic, no scatter.
  * CKR's D-dimensional class features are a `jax.ops.segment_sum` over the
    B*P pixels with segment id b * C + y_p (linear in B*P*D; no [B, h, w, C, D]
    array), with a written-out backward that gathers each pixel's own class row
    (see `_weighted_class_sums`). `python -m uccl_jax.benchmark losses
    --compare_segment_ops` times it against the generic segment_sum gradient and
    a one-hot matmul (B*P*C*D multiply-adds); neither was faster on a 2-core
    CPU. On GPUs the scatter-add is nondeterministic in the last bits unless XLA
    runs with --xla_gpu_deterministic_ops.
  * Pixels of one class share one pair of class features, so CKR's class term
    is sum_c n_bc * cos(weak class feature, strong class feature) with no
    per-pixel gather.
  * Softmaxes over segments subtract the segment maximum (held without
    gradient, which changes neither value nor gradient).
  * `sbu_and_ckr_losses` computes both UCCL losses in one pass sharing the weak
    argmax/confidence and the per-pixel cross-view cosine.

Empty denominators: where the PyTorch code would divide by zero (no valid pixel
at all), these losses return 0 instead of NaN, so one fully padded batch does
not poison training.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from uccl_jax import ops

SbuVariant = Literal['reference', 'paper']
SBU_VARIANTS = ('reference', 'paper')


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32 for bf16/f16/f32 inputs, float64 when an input is float64."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """Boolean one-hot over a new last axis; labels outside [0, C) give an all-False row."""
  labels = jnp.asarray(labels)
  return labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)


def _pixel_cross_entropy(logits: jax.Array, label_one_hot: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] per pixel, in logits' dtype (already float32/64)."""
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_normalizer = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  return log_normalizer - jnp.sum(jnp.where(label_one_hot, shifted, 0.0), axis=-1)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values over mask; 0 (not NaN) for an empty mask."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1).astype(values.dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255) -> jax.Array:
  """Mean cross-entropy over pixels whose label is not `ignore_index` (0 if there are none).

  Args:
    logits: [B, h, w, C] (any float dtype).
    labels: [B, h, w] int; values in [0, C) or `ignore_index`.
    ignore_index: label value of pixels that do not count.
  """
  dtype = _compute_dtype(logits)
  logits = logits.astype(dtype)
  valid = labels != ignore_index
  ce = _pixel_cross_entropy(logits, _one_hot(labels, logits.shape[-1]))
  return _masked_mean(ce, valid)


def ohem_cross_entropy(logits: jax.Array, labels: jax.Array, *, thresh: float = 0.7,
                       min_kept: int = 200000, ignore_index: int = 255,
                       images_per_group: int | None = None) -> jax.Array:
  """Online hard example mining CE, as the released ProbOhemCrossEntropy2d (the Cityscapes loss).

  Groups: with `images_per_group=g` the B images are cut into B/g consecutive
  groups of g images (images 0..g-1, g..2g-1, ...), each mined on its own as
  the release mines one GPU's batch; the loss is the mean of the groups'
  losses, as DDP averages the GPUs' (every group weighs the same, whatever its
  number of valid or kept pixels). `None`: one group of all B images.

  One group, N = g*h*w pixels of which n are valid (label != ignore_index):
  * min_kept > n, or min_kept <= 0: plain mean CE over the valid pixels (the
    release mines only when 0 < min_kept <= n);
  * otherwise, with q = softmax probability of the label class (ignored
    pixels count as q = 1): threshold = `thresh`, raised to the min_kept-th
    smallest q of the group's N pixels when that value exceeds `thresh`; the
    loss is the mean CE over the valid pixels with q <= threshold (ties kept),
    so at least `min_kept` pixels train.
  A group without valid pixels contributes 0 (PyTorch would give NaN).
  Shapes stay static (one sort of each group's N probabilities; under a mesh
  whose shards hold whole groups, each device sorts its own groups); the
  threshold and the kept set carry no gradient, so gradient reaches only the
  kept pixels' CE.

  Args:
    logits: [B, h, w, C] (any float dtype).
    labels: [B, h, w] int; values in [0, C) or `ignore_index`.
    thresh: probability below which a pixel is "hard".
    min_kept: minimum number of pixels kept per group (a static Python int).
    ignore_index: label value of pixels that do not count.
    images_per_group: g, a positive divisor of B (static), or None for one group.

  Raises:
    ValueError: `images_per_group` is not a positive divisor of B.
  """
  min_kept = int(min_kept)
  batch = labels.shape[0]
  group = batch if images_per_group is None else images_per_group
  if (isinstance(group, bool) or not isinstance(group, int) or group < 1
      or batch % group):
    raise ValueError(f'ohem_cross_entropy: images_per_group={images_per_group!r} must be a '
                     f'positive divisor of the batch ({batch} images)')
  num_groups = batch // group
  dtype = _compute_dtype(logits)
  logits = logits.astype(dtype)
  per_group = lambda x: x.reshape(num_groups, -1, *x.shape[3:])  # [G, N, ...]
  valid = per_group(labels != ignore_index)
  label_one_hot = per_group(_one_hot(labels, logits.shape[-1]))
  ce = _pixel_cross_entropy(per_group(logits), label_one_hot)  # [G, N]

  def group_means(mask):
    total = jnp.sum(jnp.where(mask, ce, 0.0), axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1).astype(dtype)

  plain = group_means(valid)
  group_pixels = valid.shape[1]
  if min_kept <= 0 or min_kept > group_pixels:  # static: no group can be mined
    return jnp.mean(plain)
  probs = jax.nn.softmax(jax.lax.stop_gradient(per_group(logits)), axis=-1)
  label_prob = jnp.where(valid, jnp.sum(jnp.where(label_one_hot, probs, 0.0), axis=-1), 1.0)
  kth_smallest = jnp.sort(label_prob, axis=1)[:, min_kept - 1]  # [G]
  threshold = jnp.where(kth_smallest > thresh, kth_smallest, jnp.asarray(thresh, dtype))
  mined = group_means(valid & (label_prob <= threshold[:, None]))
  return jnp.mean(jnp.where(min_kept > jnp.sum(valid, axis=1), plain, mined))


def pseudo_label_loss(student_logits: jax.Array, pseudo_labels: jax.Array, conf: jax.Array,
                      ignore: jax.Array, *, threshold: float | jax.Array) -> jax.Array:
  """UniMatch's unlabeled loss: CE on confident pseudo-labels, averaged over ALL valid pixels.

  sum_p CE(student_p, pseudo_label_p) * [conf_p >= threshold] * valid_p divided
  by the number of valid pixels (not of confident ones, as UniMatch does; 0 if
  there are none).

  Args:
    student_logits: [B, h, w, C] logits of the strong (or perturbed) view.
    pseudo_labels: [B, h, w] int in [0, C), usually the weak view's argmax.
    conf: [B, h, w] confidence of the pseudo-labels.
    ignore: [B, h, w] bool, True where the pixel does not count.
    threshold: confidence threshold (a float or a traced scalar).
  """
  dtype = _compute_dtype(student_logits)
  logits = student_logits.astype(dtype)
  valid = jnp.logical_not(ignore)
  ce = _pixel_cross_entropy(logits, _one_hot(pseudo_labels, logits.shape[-1]))
  confident = (conf >= threshold) & valid
  total = jnp.sum(jnp.where(confident, ce, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1).astype(dtype)


def _check_variant(variant: str) -> None:
  if variant not in SBU_VARIANTS:
    raise ValueError(f"sbu_loss: variant must be one of {SBU_VARIANTS}, got {variant!r}")


def _check_shapes(name: str, weak_logits: jax.Array, weak_features: jax.Array,
                  strong_features: jax.Array, ignore: jax.Array,
                  strong_logits: jax.Array | None = None) -> None:
  """Static shape checks, so a mismatch fails at trace time with the shapes named."""
  spatial = weak_logits.shape[:3]
  problems = []
  if weak_logits.ndim != 4:
    problems.append(f'weak_logits {weak_logits.shape} is not [B,h,w,C]')
  if strong_logits is not None and strong_logits.shape != weak_logits.shape:
    problems.append(f'strong_logits {strong_logits.shape} != weak_logits {weak_logits.shape}')
  if weak_features.shape != strong_features.shape or weak_features.shape[:3] != spatial:
    problems.append(f'features {weak_features.shape}/{strong_features.shape} do not match '
                    f'[B,h,w]={spatial}')
  if ignore.shape != spatial:
    problems.append(f'ignore {ignore.shape} != [B,h,w]={spatial}')
  if problems:
    raise ValueError(f'{name}: ' + '; '.join(problems))


class _WeakView:
  """What SBU and CKR share, per image: [B, P = h*w, ...] inputs, weak argmax/confidence, cosine.

  Segment (b, c) holds the pixels p of image b with y_p = c (further restricted
  by each loss); `label_one_hot` [B, P, C] is the segment membership, so a
  per-segment sum is a masked sum over the pixel axis giving [B, C].
  """

  def __init__(self, weak_logits: jax.Array, weak_features: jax.Array,
               strong_features: jax.Array, ignore: jax.Array) -> None:
    batch, height, width, num_classes = weak_logits.shape
    self.batch, self.num_classes = batch, num_classes
    self.num_pixels = batch * height * width
    self.dtype = _compute_dtype(weak_logits, weak_features, strong_features)
    per_image = lambda x: x.reshape(batch, height * width, *x.shape[3:])
    # The weak logits keep their gradient here: CKR's strong class features are
    # weighted by them. Everything derived through `weak_logits_no_grad` has none.
    self.weak_logits = per_image(weak_logits).astype(self.dtype)
    weak_logits_no_grad = jax.lax.stop_gradient(self.weak_logits)
    self.weak_features = jax.lax.stop_gradient(per_image(weak_features).astype(self.dtype))
    self.strong_features = per_image(strong_features).astype(self.dtype)
    self.valid = jnp.logical_not(per_image(ignore))
    self.labels = jnp.argmax(weak_logits_no_grad, axis=-1)  # y_p
    self.label_one_hot = _one_hot(self.labels, num_classes)
    max_logit = jnp.max(weak_logits_no_grad, axis=-1, keepdims=True)
    self.conf = 1.0 / jnp.sum(jnp.exp(weak_logits_no_grad - max_logit), axis=-1)  # max_c p_w
    # S_p = cos(weak_p, strong_p): SBU's weights, and CKR's term of ignored pixels.
    self.cross_view_cos = ops.cosine_similarity(self.weak_features, self.strong_features)

  def segment_sum(self, members: jax.Array, values: jax.Array) -> jax.Array:
    """sum over the member pixels of each segment: members [B, P, C], values [B, P] -> [B, C]."""
    return jnp.sum(jnp.where(members, values[..., None], 0.0), axis=1)

  def own_segment(self, per_segment: jax.Array) -> jax.Array:
    """The value of each pixel's own segment (b, y_p): [B, C] -> [B, P]."""
    return jnp.sum(jnp.where(self.label_one_hot, per_segment[:, None, :], 0.0), axis=-1)

  def softmax_numerators(self, members: jax.Array, scores: jax.Array,
                         floor: float | None = None) -> tuple[jax.Array, jax.Array]:
    """exp(score_p - max of p's segment) for member pixels, 0 for the others.

    Returns (numerators [B, P], shift [B, C]). The shift is the segment maximum
    (raised to `floor` for softmaxes that also span pixels of fixed score
    `floor`); it carries no gradient, which changes neither the softmax nor its
    gradient, and only keeps exp in range. The exponent is masked before exp, so
    non-members can neither overflow nor send NaN back through the gradient.
    """
    segment_max = jnp.max(jnp.where(members, jax.lax.stop_gradient(scores)[..., None], -jnp.inf),
                          axis=1)
    if floor is not None:
      segment_max = jnp.maximum(segment_max, floor)
    shift = jnp.where(jnp.isfinite(segment_max), segment_max, 0.0)
    is_member = jnp.any(members, axis=-1)
    exponent = jnp.where(is_member, scores - self.own_segment(shift), 0.0)
    return jnp.where(is_member, jnp.exp(exponent), 0.0), shift


def _class_rows(labels: jax.Array, num_classes: int) -> jax.Array:
  """Segment id b * C + y_p of every pixel: [B, P] -> [B * P]."""
  image = jnp.arange(labels.shape[0], dtype=labels.dtype)[:, None]
  return (image * num_classes + labels).reshape(-1)


def _class_sums_forward(weights: jax.Array, features: jax.Array, labels: jax.Array,
                        num_classes: int) -> jax.Array:
  batch, pixels, channels = features.shape
  sums = jax.ops.segment_sum((weights[..., None] * features).reshape(batch * pixels, channels),
                             _class_rows(labels, num_classes), batch * num_classes,
                             mode='promise_in_bounds')
  return sums.reshape(batch, num_classes, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_class_sums(weights: jax.Array, features: jax.Array, labels: jax.Array,
                         num_classes: int) -> jax.Array:
  """R[b, c] = sum over the pixels p of image b with y_p = c of weights_p * features_p.

  weights [B, P], features [B, P, D], labels [B, P] -> [B, C, D]: a
  `jax.ops.segment_sum` with segment id b * C + y_p. The backward is written
  out: d features_p = weights_p * dR[b, y_p] and d weights_p = features_p .
  dR[b, y_p], one gather of each pixel's own class row (linear in B*P*D) with
  no bounds handling (the ids are in range by construction), where the generic
  one masks the gathered cotangent for out-of-range ids first.
  """
  return _class_sums_forward(weights, features, labels, num_classes)


def _weighted_class_sums_fwd(weights, features, labels, num_classes):
  return (_class_sums_forward(weights, features, labels, num_classes),
          (weights, features, labels))


def _weighted_class_sums_bwd(num_classes, residuals, cotangent):
  weights, features, labels = residuals
  batch, pixels, channels = features.shape
  table = cotangent.reshape(batch * num_classes, channels)
  rows = _class_rows(labels, num_classes)
  gathered = table.at[rows].get(mode='promise_in_bounds').reshape(batch, pixels, channels)
  d_weights = jnp.sum(features * gathered, axis=-1)  # features_p . dR[b, y_p]
  d_features = weights[..., None] * gathered
  return d_weights, d_features, None


_weighted_class_sums.defvjp(_weighted_class_sums_fwd, _weighted_class_sums_bwd)


def _sbu_from_view(view: _WeakView, strong_logits: jax.Array, threshold: float | jax.Array,
                   variant: str) -> jax.Array:
  dtype = view.dtype
  batch, pixels = view.labels.shape
  strong_logits = strong_logits.reshape(batch, pixels, -1).astype(dtype)
  uncertain = (view.conf <= threshold) & view.valid  # U_p
  members = view.label_one_hot & uncertain[..., None]  # [B, P, C]: y_p = c and U_p
  count = jnp.sum(members, axis=1).astype(dtype)  # n_bc
  present = count > 0
  ce = _pixel_cross_entropy(strong_logits, view.label_one_hot)  # CE(strong_p, y_p)
  scores = -view.cross_view_cos  # lower similarity, larger weight
  # 'reference' also spans every other pixel of the image, with score 0.
  numerators, shift = view.softmax_numerators(
      members, scores, floor=0.0 if variant == 'reference' else None)
  denominator = view.segment_sum(members, numerators)
  weighted_ce = view.segment_sum(members, numerators * ce)
  if variant == 'reference':
    others_weight = jnp.exp(-shift)  # exp(0 - shift), for every non-member pixel
    others = jnp.logical_and(view.valid[..., None], jnp.logical_not(members))
    others_ce = jnp.sum(jnp.where(others, ce[..., None], 0.0), axis=1)  # valid non-members
    denominator = denominator + (pixels - count) * others_weight
    weighted_ce = weighted_ce + others_weight * others_ce
  class_loss = jnp.where(present, weighted_ce / jnp.where(present, denominator, 1.0), 0.0)
  num_present = jnp.sum(present, axis=1)
  image_loss = jnp.sum(class_loss, axis=1) / jnp.maximum(num_present, 1).astype(dtype)
  return jnp.mean(image_loss)


def _ckr_from_view(view: _WeakView) -> jax.Array:
  members = view.label_one_hot & view.valid[..., None]  # valid pixels with y_p = c
  count = jnp.sum(members, axis=1).astype(view.dtype)  # [B, C]
  present = count > 0
  # The weak logit of the pixel's own class, with gradient (the strong map's weights).
  own_logit = jnp.sum(jnp.where(view.label_one_hot, view.weak_logits, 0.0), axis=-1)
  numerators, _ = view.softmax_numerators(members, own_logit)
  denominator = jnp.where(present, view.segment_sum(members, numerators), 1.0)  # [B, C]
  class_sums = functools.partial(_weighted_class_sums, labels=view.labels,
                                 num_classes=view.num_classes)
  strong_class = class_sums(numerators, view.strong_features) / denominator[..., None]
  weak_class = class_sums(jax.lax.stop_gradient(numerators), view.weak_features)
  weak_class = weak_class / jax.lax.stop_gradient(denominator)[..., None]
  # Absent classes get a dummy non-zero vector: cos of a zero vector has a NaN gradient.
  strong_class = jnp.where(present[..., None], strong_class, 1.0)
  weak_class = jnp.where(present[..., None], weak_class, 1.0)
  class_cos = ops.cosine_similarity(weak_class, strong_class)  # [B, C]
  class_term = jnp.sum(jnp.where(present, count * class_cos, 0.0))
  ignored_term = jnp.sum(jnp.where(view.valid, 0.0, view.cross_view_cos))
  return 1.0 - (class_term + ignored_term) / view.num_pixels


def sbu_loss(weak_logits: jax.Array, strong_logits: jax.Array, weak_features: jax.Array,
             strong_features: jax.Array, ignore: jax.Array, *, threshold: float | jax.Array,
             variant: SbuVariant = 'reference') -> jax.Array:
  """Semantic Backpropagation Update: uncertain pixels still train the strong view.

  S_p = cos(weak_features_p, strong_features_p); U_p = (conf_p <= threshold) and
  valid_p; CE_p = CE(strong_logits_p, y_p). For each image b and class c with
  n_bc = #{p : y_p = c, U_p} > 0:
    'reference' (the released code): weights = softmax over ALL h*w pixels of the
      image of the score -S_p on the members and 0 on every other pixel;
      L_bc = sum over valid pixels of weight_p * CE_p.
    'paper' (Eq. 7): weights = softmax of -S_p over the members only;
      L_bc = sum over the members of weight_p * CE_p.
  L_b = mean of L_bc over the classes with n_bc > 0 (0 if none); the loss is the
  mean of L_b over the B images. The weak logits and features carry no gradient;
  gradient reaches the strong logits (CE) and the strong features (weights).

  Args:
    weak_logits, strong_logits: [B, h, w, C].
    weak_features, strong_features: [B, h, w, D].
    ignore: [B, h, w] bool.
    threshold: confidence at or below which a pixel is uncertain.
    variant: 'reference' or 'paper' (static).
  """
  _check_variant(variant)
  _check_shapes('sbu_loss', weak_logits, weak_features, strong_features, ignore, strong_logits)
  view = _WeakView(jax.lax.stop_gradient(weak_logits), weak_features, strong_features, ignore)
  return _sbu_from_view(view, strong_logits, threshold, variant)


def ckr_loss(weak_logits: jax.Array, weak_features: jax.Array, strong_features: jax.Array,
             ignore: jax.Array) -> jax.Array:
  """Class-aware Knowledge Regulation: class-level features of the two views pulled together.

  For each image b and class c, over the valid pixels with y_p = c: weights =
  softmax of the weak logit of class c (the logit, not the probability); class
  feature R_bc(F) = sum_p weight_p * F_p. The map gives each valid pixel the
  class feature of its class and each ignored pixel its own feature. Loss =
  1 - mean over all B*h*w pixels of cos(map(weak_features), map(strong_features)).
  The weak map carries no gradient; the strong map passes gradient to the strong
  features and, through its weights, to the weak logits.

  Args:
    weak_logits: [B, h, w, C].
    weak_features, strong_features: [B, h, w, D].
    ignore: [B, h, w] bool.
  """
  _check_shapes('ckr_loss', weak_logits, weak_features, strong_features, ignore)
  return _ckr_from_view(_WeakView(weak_logits, weak_features, strong_features, ignore))


def sbu_and_ckr_losses(weak_logits: jax.Array, strong_logits: jax.Array,
                       weak_features: jax.Array, strong_features: jax.Array, ignore: jax.Array, *,
                       threshold: float | jax.Array,
                       variant: SbuVariant = 'reference') -> tuple[jax.Array, jax.Array]:
  """(sbu_loss(...), ckr_loss(...)) in one pass sharing the weak argmax and the cosine.

  Same values and gradients as calling the two functions; meant for the train step
  (one jit). SBU's stop-gradient on the weak logits is applied to its own terms only,
  so CKR's gradient into the weak logits is kept.
  """
  _check_variant(variant)
  _check_shapes('sbu_and_ckr_losses', weak_logits, weak_features, strong_features, ignore,
                strong_logits)
  view = _WeakView(weak_logits, weak_features, strong_features, ignore)
  return _sbu_from_view(view, strong_logits, threshold, variant), _ckr_from_view(view)
