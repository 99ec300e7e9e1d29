"""The train state, the optimizer and one UniMatch/UCCL training step.

`train_step(state, batch)` is a pure function: the caller jits it with the
state replicated, the batch sharded on the mesh's 'data' axis and the state
donated (`make_train_step` does exactly that). BatchNorm statistics are then
global-batch statistics, as with the reference's SyncBatchNorm.

One step, as the released PyTorch code orders it, minus its two passes whose
outputs it never uses:
1. Teacher: the mixing batch's weak view, BN in inference mode with the running
   statistics at the start of the step, no gradient -> confidence and argmax.
2. CutMix: weak image k = unlabeled weak view with box k pasted from the mixing
   weak view; strong view k with box k pasted from the mixing strong view k;
   ignore masks likewise (k = 1, 2).
3. Training-mode passes, each starting from the BN running statistics the
   previous pass left: (a) weak image 1, (b) weak image 2 (only when SBU or CKR
   is on: their features and low-resolution logits are the anchors), (c)
   labeled + unlabeled weak images with feature perturbation, (d) strong 1 +
   strong 2. With unsup.anchors = 'pasted', (a) and (b) are not run (below).
   With unsup.bn_stats_from_strong False, pass (d) normalises with its batch's
   statistics as always but leaves the running statistics as pass (c) left
   them (config.py says why).
4. L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2
       + alpha (SBU_1 + SBU_2) / 2 + beta (CKR_1 + CKR_2) / 2.
   L_s, L_fp use pass (c)'s weak prediction (detached) as pseudo labels, with
   the teacher's prediction pasted in the CutMix boxes for L_s. SBU_k and
   CKR_k pair weak image k with strong view k at feature resolution; their
   pseudo labels come from weak image k's own low-resolution logits.

Anchors without extra passes (unsup.anchors = 'pasted'): passes (a) and (b)
cost +38% of a UniMatch step's FLOPs, for outputs the step mostly has already.
Weak image k is the unlabeled weak image with box k pasted from the mixing
weak image, so its anchors are built by pasting at feature resolution: pass
(c)'s features and low-resolution logits of the unlabeled weak images outside
box k, the teacher's (step 1) of the mixing images inside; the box is sampled
at feature resolution like the ignore mask (`nearest_align_corners`). What
changes against 'passes': anchors inside the box come from inference-mode BN
and carry no gradient (CKR's weak-logit weights train only outside the box),
and a feature near the box edge sees the unmixed image around it instead of
the CutMix-ed one. The strong side and every UniMatch term are unchanged.
5. SGD (PyTorch semantics) with the poly schedule, head at lr * lr_multi.

The ignore mask at feature resolution: the released code resizes the 0/255
mask bilinearly (align_corners=True) and ignores pixels that come out exactly
255, so a feature pixel near a padding border is kept or dropped depending on
float rounding. Here a feature pixel takes the mask value of the input pixel
nearest to it on the same align-corners grid (source index
round(i * (H - 1) / (h - 1)), ties rounded up). At the standard crops (321 ->
81, 801 -> 201, 33 -> 9) the grid points fall exactly on input pixels, so this
is the mask sampled at the feature pixels' centres.

Randomness: one key in the state; pass p of micro-batch m at step s uses
fold_in(fold_in(fold_in(key, s), m), p) (`pass_rng`). With
jax_threefry_partitionable on (JAX's default, checked by `make_train_step`)
the random bits do not depend on how the batch is sharded.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uccl_jax import inputs
from uccl_jax import losses
from uccl_jax import parallel

METHODS = ('supervised', 'unimatch', 'uccl')
ANCHORS = ('passes', 'pasted')
LABELED_LOSSES = ('ce', 'ohem')
# The one list of the step's metrics: (name in metrics.jsonl/TensorBoard, short name on the
# console, meaning). LOSS_NAMES, METRIC_NAMES, the fields reporting requires, its console summary
# and the legend a run prints at its start are all read from it.
METRICS = (
    ('loss', 'loss', 'total loss minimised: (x + s/2 + fp/2) / 2 + sbu.weight * sbu '
                     '+ ckr.weight * ckr'),
    ('loss_x', 'x', 'labeled loss: cross-entropy (or OHEM, train.labeled_loss=ohem)'),
    ('loss_s', 's', 'pseudo-label loss on the two CutMix-ed strong views (their mean)'),
    ('loss_fp', 'fp', "feature-perturbation loss: the weak view's pseudo-labels on its "
                      'prediction from dropped-out features'),
    ('loss_sbu', 'sbu', 'SBU: the uncertain pixels training the strong views (unweighted, '
                        'mean of the two views)'),
    ('loss_ckr', 'ckr', 'CKR: class features of the strong views pulled towards the weak '
                        "view's (unweighted, mean of the two views)"),
    ('mask_ratio', 'mask', 'share of the unlabeled pixels whose weak-view confidence is at or '
                           'above unsup.conf_thresh'),
    ('lr', 'lr', 'backbone learning rate of this update (the head: times train.lr_multi)'),
    ('grad_norm', 'grad', 'global L2 norm of the loss gradient'),
)
METRIC_NAMES = tuple(name for name, _, _ in METRICS)
LOSS_NAMES = tuple(name for name in METRIC_NAMES if name.startswith('loss'))

# Pass indices (they name the RNG stream of each training-mode pass).
PASS_WEAK1, PASS_WEAK2, PASS_LABELED_FP, PASS_STRONG = 1, 2, 3, 4


class StepConfigError(ValueError):
  """A config value the train step cannot work with (names the field)."""


class TrainState(struct.PyTreeNode):
  """Everything a training run carries from one step to the next.

  Attributes:
    step: int32 scalar, the number of optimizer updates done (UniMatch's `iters`).
    params: the model parameters ({'backbone': ..., head modules ...}).
    batch_stats: BatchNorm running statistics.
    opt_state: the optax state (momentum buffers, schedule count).
    rng: a raw uint32[2] PRNG key (raw so checkpoints store it as a plain array).
    tx: the optimizer (static, not checkpointed).
    learning_rate_fn: step -> backbone learning rate (static; for the `lr` metric).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  learning_rate_fn: Callable[[Any], Any] = struct.field(pytree_node=False)


# ----------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Poly schedule lr * (1 - step / total_steps) ** 0.9 (backbone; head times lr_multi).

  Step counts from 0, so the update at step s uses the rate for s. (UniMatch
  sets the rate for iteration i after its update, so its update i uses the rate
  of i - 1 and its first two updates use lr: a one-step shift.)
  """
  return _optimizer(*_optimizer_settings(config, total_steps))[1]


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """SGD as PyTorch's torch.optim.SGD does it, with the poly schedule and lr_multi.

  PyTorch: d = g + wd * p; buf = momentum * buf + d (buf = d at the first
  step); p -= lr_group * buf. Weight decay enters the gradient before momentum
  and applies to every parameter (BN scales and biases included), as in the
  reference. The head's rate is the backbone's times train.lr_multi.

  Equal settings return the same object, so train states built by separate
  calls (e.g. a checkpoint target from jax.eval_shape and a fresh state) have
  equal static fields and share one compiled step.
  """
  return _optimizer(*_optimizer_settings(config, total_steps))[0]


def _optimizer_settings(config: ml_collections.ConfigDict,
                        total_steps: int) -> tuple[float, float, float, float, int]:
  if int(total_steps) < 1:
    raise StepConfigError(f'total_steps must be positive (got {total_steps}); check '
                          'train.epochs and the dataset size')
  return (float(config.train.lr), float(config.train.lr_multi), float(config.train.momentum),
          float(config.train.weight_decay), int(total_steps))


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float, lr_multi: float, momentum: float, weight_decay: float,
               total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = optax.polynomial_schedule(init_value=lr, end_value=0.0, power=0.9,
                                       transition_steps=total_steps)
  tx = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(schedule),
      optax.multi_transform({'backbone': optax.identity(), 'head': optax.scale(lr_multi)},
                            _param_group_labels),
  )
  return tx, schedule


def _param_group_labels(params: Any) -> Any:
  """'backbone' for the params['backbone'] subtree, 'head' for everything else."""
  if not isinstance(params, dict) or 'backbone' not in params:
    raise StepConfigError("model parameters have no 'backbone' subtree, so the backbone/head "
                          'learning rates (train.lr_multi) cannot be assigned')
  return {name: jax.tree.map(lambda _, n=name: 'backbone' if n == 'backbone' else 'head', sub)
          for name, sub in params.items()}


# ----------------------------------------------------------------------------
# State


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array,
                       image_shape: tuple[int, int, int], *, total_steps: int,
                       mesh: Mesh | None = None) -> TrainState:
  """Initialises the model on a random image of `image_shape` (H, W, 3) and the optimizer.

  Args:
    config: the run config (train.* fields).
    model: the DeepLabV3Plus module.
    rng: a raw PRNG key (jax.random.PRNGKey(config.train.seed)).
    image_shape: (H, W, 3) of one training crop.
    total_steps: the length of the poly schedule (steps per epoch * epochs).
    mesh: when given, the state is created replicated on it.

  Returns:
    The state at step 0. Works under jax.eval_shape (for checkpoint targets).
  """
  tx = make_optimizer(config, total_steps)
  schedule = learning_rate_schedule(config, total_steps)
  if len(image_shape) != 3:
    raise StepConfigError(f'image_shape must be (H, W, 3), got {tuple(image_shape)}')

  def init(key):
    param_key, image_key, dropout_key, state_key = jax.random.split(key, 4)
    image = jax.random.normal(image_key, (1, *image_shape), jnp.float32)
    variables = model.init({'params': param_key, 'dropout': dropout_key}, image, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=state_key, tx=tx, learning_rate_fn=schedule)

  out_shardings = None if mesh is None else parallel.replicated_sharding(mesh)
  # The initial values are replicated, so no draw is sharded and the plain
  # threefry gives the same values on any device count; XLA compiles it several
  # times faster on CPU than the partitionable variant (for a ResNet-18 DeepLab),
  # which matters for one-off initialisation. The step's
  # own draws (dropout over the sharded batch) stay partitionable.
  with jax.threefry_partitionable(False):
    return jax.jit(init, out_shardings=out_shardings)(rng)


def pass_rng(rng: jax.Array, step: jax.Array, micro_batch: int | jax.Array,
             pass_index: int) -> jax.Array:
  """The key of one training-mode pass (dropout of the feature perturbation)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, step), micro_batch),
                            pass_index)


# ----------------------------------------------------------------------------
# The step


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises StepConfigError naming the field if the step cannot run `config`.

  The one check of the method and the step's fields (train.check_config calls
  it); how the batch splits over processes, micro-batches and devices is
  `parallel.check_batch_size`'s, which `make_train_step` calls.
  """
  if config.method not in METHODS:
    raise StepConfigError(f'method={config.method!r}: expected one of {", ".join(METHODS)}')
  if config.train.labeled_loss not in LABELED_LOSSES:
    raise StepConfigError(
        f'train.labeled_loss={config.train.labeled_loss!r}: expected one of {LABELED_LOSSES}')
  if config.method == 'uccl' and config.unsup.anchors not in ANCHORS:
    raise StepConfigError(f'unsup.anchors={config.unsup.anchors!r}: expected one of {ANCHORS}')
  if config.method == 'uccl' and config.sbu.variant not in ('reference', 'paper'):
    raise StepConfigError(f"sbu.variant={config.sbu.variant!r}: expected 'reference' or 'paper'")
  if config.train.labeled_loss == 'ohem':
    _check_ohem_groups(config)


def _check_ohem_groups(config: ml_collections.ConfigDict) -> None:
  """train.ohem_images_per_group must cut every micro-batch into whole groups."""
  group = config.train.ohem_images_per_group
  if isinstance(group, bool) or not isinstance(group, int) or group < 0:
    raise StepConfigError(f'train.ohem_images_per_group={group!r} must be an integer >= 0 (images '
                          'mined together, as one GPU of the release; 0 = the whole batch)')
  batch, accum = config.train.batch_size, int(config.train.grad_accum)
  if group == 0 and accum > 1:
    raise StepConfigError(f'train.ohem_images_per_group=0 mines the whole batch at once, which '
                          f'train.grad_accum={accum} micro-batches cannot do; set it to a divisor '
                          'of train.batch_size / train.grad_accum (2: the release\'s per-GPU batch)')
  if group > 0 and isinstance(batch, int) and batch > 0 and accum > 0 and batch % (group * accum):
    raise StepConfigError(f'train.ohem_images_per_group={group}: each micro-batch '
                          f'(train.batch_size={batch} / train.grad_accum={accum}) must hold whole '
                          'groups; use a divisor of it')


def ohem_images_per_group(config: ml_collections.ConfigDict) -> int | None:
  """OHEM's group size as `losses.ohem_cross_entropy` takes it (None: the whole batch).

  Groups are consecutive rows of the global labeled batch, so with B/D = g
  rows per device each device's shard is one group: the release's one GPU's
  batch (4 GPUs x 2 images on Cityscapes). The micro-batches of grad_accum
  keep groups whole (`_split_micro_batches`), so the loss, the mean of all
  groups' losses, is the same on any device count and any grad_accum.
  """
  group = int(config.train.ohem_images_per_group)
  return group if group > 0 else None




def nearest_align_corners(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Samples a [B, H, W] mask at `size` = (h, w) on the align-corners grid, nearest pixel.

  Output pixel i reads input row round(i * (H - 1) / (h - 1)) (ties up; exact
  integer arithmetic), likewise for columns: the grid on which the model's
  align-corners resizes place feature pixels.
  """
  def source_index(n_in: int, n_out: int) -> np.ndarray:
    if n_out == 1:
      return np.zeros((1,), np.int32)
    i = np.arange(n_out, dtype=np.int64)
    return ((2 * i * (n_in - 1) + (n_out - 1)) // (2 * (n_out - 1))).astype(np.int32)

  rows = source_index(mask.shape[1], size[0])
  cols = source_index(mask.shape[2], size[1])
  return mask[:, rows][:, :, cols]


def _paste(box: jax.Array, inside: jax.Array, outside: jax.Array) -> jax.Array:
  """CutMix: `inside` where the box map is set, `outside` elsewhere (box [B,H,W] bool or 0/1)."""
  sel = box.astype(jnp.bool_)
  sel = sel.reshape(sel.shape + (1,) * (outside.ndim - sel.ndim))
  return jnp.where(sel, inside, outside)


def _confidence_and_label(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """max softmax probability and argmax over classes, in float32."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.max(probs, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _pasted_anchors(box: jax.Array, teacher: dict[str, jax.Array], out_xw: dict[str, jax.Array],
                    num_labeled: int) -> dict[str, jax.Array]:
  """Weak image k's anchors from existing passes (unsup.anchors = 'pasted', module docstring).

  Features and low-resolution logits of the unlabeled weak images (pass (c),
  after the labeled rows) with the teacher's outputs for the mixing images
  pasted where `box` ([B, H, W], sampled at feature resolution) is 1.
  """
  outside = {name: out_xw[name][num_labeled:] for name in ('features', 'logits_lowres')}
  box_low = nearest_align_corners(box, outside['features'].shape[1:3])
  return {name: _paste(box_low, jax.lax.stop_gradient(teacher[name]).astype(value.dtype), value)
          for name, value in outside.items()}


def _micro_batch_loss_and_grads(params: Any, teacher_stats: Any, batch_stats: Any,
                                batch: dict[str, Any], step: jax.Array, rng: jax.Array,
                                micro_index: int | jax.Array, *, model: nn.Module,
                                config: ml_collections.ConfigDict):
  """Loss, gradient, new BN statistics and metrics of one (micro-)batch (the host layout of
  `uccl_jax.inputs`, expanded here on the device)."""
  batch = inputs.expand(batch)
  method = config.method
  ignore_index = int(config.data.ignore_index)
  conf_thresh = float(config.unsup.conf_thresh)
  use_sbu = method == 'uccl' and bool(config.sbu.enabled)
  use_ckr = method == 'uccl' and bool(config.ckr.enabled)
  anchors = config.unsup.anchors
  bn_stats_from_strong = bool(config.unsup.bn_stats_from_strong)
  labeled = batch['labeled']

  def key(pass_index):
    return pass_rng(rng, step, micro_index, pass_index)

  def labeled_loss(logits, mask):
    if config.train.labeled_loss == 'ohem':
      return losses.ohem_cross_entropy(_f32(logits), mask, thresh=float(config.train.ohem_thresh),
                                       min_kept=int(config.train.ohem_min_kept),
                                       ignore_index=ignore_index,
                                       images_per_group=ohem_images_per_group(config))
    return losses.cross_entropy(_f32(logits), mask, ignore_index=ignore_index)

  zero = jnp.zeros((), jnp.float32)

  if method == 'supervised':
    def supervised_loss(p):
      out, updates = model.apply({'params': p, 'batch_stats': batch_stats}, labeled['image'],
                                 train=True, rngs={'dropout': key(PASS_LABELED_FP)},
                                 mutable=['batch_stats'])
      loss_x = labeled_loss(out['logits'], labeled['mask'])
      metrics = dict(loss=loss_x, loss_x=loss_x, loss_s=zero, loss_fp=zero, loss_sbu=zero,
                     loss_ckr=zero, mask_ratio=zero)
      return loss_x, (updates['batch_stats'], metrics)

    (_, (new_stats, metrics)), grads = jax.value_and_grad(supervised_loss, has_aux=True)(params)
    return grads, new_stats, metrics

  unlabeled, mix = batch['unlabeled'], batch['mix']
  box1, box2 = unlabeled['box1'], unlabeled['box2']

  # 1. Teacher on the mixing batch: inference-mode BN, no gradient.
  teacher = model.apply({'params': params, 'batch_stats': teacher_stats}, mix['weak'], train=False)
  conf_mix, label_mix = _confidence_and_label(jax.lax.stop_gradient(teacher['logits']))

  # 2. CutMix.
  ignore_u, ignore_mix = unlabeled['ignore'], mix['ignore']
  ignore1 = _paste(box1, ignore_mix, ignore_u)
  ignore2 = _paste(box2, ignore_mix, ignore_u)
  strong1 = _paste(box1, mix['strong1'], unlabeled['strong1'])
  strong2 = _paste(box2, mix['strong2'], unlabeled['strong2'])
  num_labeled = labeled['image'].shape[0]

  def loss_fn(p):
    stats = batch_stats

    def run(images, pass_index, feature_perturbation=False, keep_stats=True):
      nonlocal stats
      out, updates = model.apply({'params': p, 'batch_stats': stats}, images, train=True,
                                 feature_perturbation=feature_perturbation,
                                 rngs={'dropout': key(pass_index)}, mutable=['batch_stats'])
      if keep_stats:
        stats = updates['batch_stats']
      return out

    # 3. Training-mode passes, BN statistics threaded in this order.
    weak_out = []
    if (use_sbu or use_ckr) and anchors == 'passes':
      weak1 = _paste(box1, mix['weak'], unlabeled['weak'])
      weak2 = _paste(box2, mix['weak'], unlabeled['weak'])
      weak_out = [run(weak1, PASS_WEAK1), run(weak2, PASS_WEAK2)]
    out_xw = run(jnp.concatenate([labeled['image'], unlabeled['weak']]), PASS_LABELED_FP,
                 feature_perturbation=True)
    out_s = run(jnp.concatenate([strong1, strong2]), PASS_STRONG, keep_stats=bn_stats_from_strong)
    if (use_sbu or use_ckr) and anchors == 'pasted':
      weak_out = [_pasted_anchors(box, teacher, out_xw, num_labeled) for box in (box1, box2)]

    logits_x = out_xw['logits'][:num_labeled]
    logits_w = jax.lax.stop_gradient(out_xw['logits'][num_labeled:])
    logits_fp = out_xw['logits_fp'][num_labeled:]
    logits_s1, logits_s2 = jnp.split(out_s['logits'], 2)

    # 4. Losses.
    conf_w, label_w = _confidence_and_label(logits_w)
    label1 = _paste(box1, label_mix, label_w)
    conf1 = _paste(box1, conf_mix, conf_w)
    label2 = _paste(box2, label_mix, label_w)
    conf2 = _paste(box2, conf_mix, conf_w)

    loss_x = labeled_loss(logits_x, labeled['mask'])
    loss_s1 = losses.pseudo_label_loss(_f32(logits_s1), label1, conf1, ignore1,
                                       threshold=conf_thresh)
    loss_s2 = losses.pseudo_label_loss(_f32(logits_s2), label2, conf2, ignore2,
                                       threshold=conf_thresh)
    loss_fp = losses.pseudo_label_loss(_f32(logits_fp), label_w, conf_w, ignore_u,
                                       threshold=conf_thresh)
    loss = (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2.0

    loss_sbu, loss_ckr = zero, zero
    if weak_out:
      strong_lowres = jnp.split(_f32(out_s['logits_lowres']), 2)
      strong_features = jnp.split(_f32(out_s['features']), 2)
      sbu_terms, ckr_terms = [], []
      for k, ignore_k in enumerate((ignore1, ignore2)):
        weak_lowres = _f32(weak_out[k]['logits_lowres'])
        weak_features = jax.lax.stop_gradient(_f32(weak_out[k]['features']))
        ignore_low = nearest_align_corners(ignore_k, weak_lowres.shape[1:3])
        sbu_kwargs = dict(threshold=float(config.sbu.threshold), variant=config.sbu.variant)
        # The weak logits keep their gradient for CKR: its strong class features
        # are pooled with weights softmax(weak logit), as in the reference. SBU
        # detaches them itself.
        if use_sbu and use_ckr:
          sbu_k, ckr_k = losses.sbu_and_ckr_losses(weak_lowres, strong_lowres[k], weak_features,
                                                   strong_features[k], ignore_low, **sbu_kwargs)
          sbu_terms.append(sbu_k)
          ckr_terms.append(ckr_k)
        elif use_sbu:
          sbu_terms.append(losses.sbu_loss(weak_lowres, strong_lowres[k], weak_features,
                                           strong_features[k], ignore_low, **sbu_kwargs))
        else:
          ckr_terms.append(losses.ckr_loss(weak_lowres, weak_features, strong_features[k],
                                           ignore_low))
      if sbu_terms:
        loss_sbu = (sbu_terms[0] + sbu_terms[1]) / 2.0
        loss = loss + float(config.sbu.weight) * loss_sbu
      if ckr_terms:
        loss_ckr = (ckr_terms[0] + ckr_terms[1]) / 2.0
        loss = loss + float(config.ckr.weight) * loss_ckr

    valid = jnp.logical_not(ignore_u)
    mask_ratio = (jnp.sum((conf_w >= conf_thresh) & valid) /
                  jnp.maximum(jnp.sum(valid), 1)).astype(jnp.float32)
    metrics = dict(loss=loss, loss_x=loss_x, loss_s=(loss_s1 + loss_s2) / 2.0, loss_fp=loss_fp,
                   loss_sbu=loss_sbu, loss_ckr=loss_ckr, mask_ratio=mask_ratio)
    return loss, (stats, metrics)

  (_, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, new_stats, metrics


def _split_micro_batches(batch: Any, k: int, mesh: Mesh | None, labeled_block: int = 1) -> Any:
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, j+2k, ...

  Strided rather than contiguous, so that with the batch sharded on its
  leading axis every device holds an equal share of every micro-batch and no
  data moves between devices. The labeled rows are dealt in blocks of
  `labeled_block` consecutive rows (micro-batch j = blocks j, j+k, ...), so
  that OHEM's groups stay whole; a block of 1 is the row-strided split.
  """
  def split(x, block=1):
    blocks = x.reshape((x.shape[0] // (k * block), k, block) + x.shape[1:]).swapaxes(0, 1)
    micro = blocks.reshape((k, x.shape[0] // k) + x.shape[1:])
    if mesh is not None:
      micro = jax.lax.with_sharding_constraint(
          micro, NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS)))
    return micro
  return {name: jax.tree.map(functools.partial(split, block=labeled_block if name == 'labeled'
                                               else 1), stream)
          for name, stream in batch.items()}


def train_step(state: TrainState, batch: dict[str, Any], *, model: nn.Module,
               config: ml_collections.ConfigDict,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch` (the pipeline's dict); returns (new state, metrics).

  With train.grad_accum = k > 1 the batch is cut into k micro-batches that run
  one after the other (lax.scan); their gradients are averaged into one
  update. BatchNorm then normalises with statistics of B/k images rather than
  B, and the running statistics are updated k times per step (threaded through
  the micro-batches); the teacher uses the statistics from the start of the
  step for all micro-batches. The loss normalisers (valid pixels) are per
  micro-batch. So grad_accum=k on one device follows, but does not exactly
  equal, the k-device recipe. OHEM adds no difference of its own: its groups
  (train.ohem_images_per_group) stay whole in the micro-batches, so given the
  logits its loss is the same on any device count and grad_accum.

  Metrics are float32 scalars (averaged over micro-batches): loss, loss_x,
  loss_s ((L_s1 + L_s2) / 2), loss_fp, loss_sbu and loss_ckr (unweighted
  means of the two views), lr (backbone rate of this update), mask_ratio
  (share of valid unlabeled pixels whose weak confidence >= unsup.conf_thresh,
  as UniMatch logs it), grad_norm (global L2 norm of the loss gradient).
  """
  check_config(config)
  k = int(config.train.grad_accum)
  micro_fn = functools.partial(_micro_batch_loss_and_grads, model=model, config=config)

  if k == 1:
    grads, new_stats, metrics = micro_fn(state.params, state.batch_stats, state.batch_stats,
                                         batch, state.step, state.rng, 0)
  else:
    ohem_group = (ohem_images_per_group(config) or 1
                  if config.train.labeled_loss == 'ohem' else 1)
    micro_batches = _split_micro_batches(batch, k, mesh, labeled_block=ohem_group)

    def body(carry, xs):
      stats, grad_sum, metric_sum = carry
      micro_batch, index = xs
      grads, stats, metrics = micro_fn(state.params, state.batch_stats, stats, micro_batch,
                                       state.step, state.rng, index)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      metric_sum = jax.tree.map(jnp.add, metric_sum, metrics)
      return (stats, grad_sum, metric_sum), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_metrics = {n: jnp.zeros((), jnp.float32) for n in LOSS_NAMES + ('mask_ratio',)}
    (new_stats, grad_sum, metric_sum), _ = jax.lax.scan(
        body, (state.batch_stats, zeros, zero_metrics), (micro_batches, jnp.arange(k)))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    metrics = jax.tree.map(lambda m: m / k, metric_sum)

  updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  metrics = {name: value.astype(jnp.float32) for name, value in metrics.items()}
  metrics['lr'] = jnp.asarray(state.learning_rate_fn(state.step), jnp.float32)
  metrics['grad_norm'] = optax.tree.norm(grads).astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats,
                            opt_state=new_opt_state)
  return new_state, metrics


def make_train_step(model: nn.Module, config: ml_collections.ConfigDict,
                    mesh: Mesh) -> Callable[[TrainState, dict[str, Any]],
                                            tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted on `mesh`: state replicated and donated, batch on 'data'.

  Raises:
    parallel.BatchSizeError: train.batch_size does not split over the devices.
    StepConfigError: an unsupported method, loss or threshold variant.
  """
  check_config(config)
  parallel.check_batch_size(int(config.train.batch_size), mesh,
                            grad_accum=int(config.train.grad_accum))
  if not jax.config.jax_threefry_partitionable:
    raise StepConfigError('jax_threefry_partitionable is off: random draws would depend on the '
                          'device count; turn it on (JAX default)')
  replicated = parallel.replicated_sharding(mesh)
  step_fn = functools.partial(train_step, model=model, config=config, mesh=mesh)
  return jax.jit(step_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
