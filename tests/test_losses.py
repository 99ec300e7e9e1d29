"""Tests of uccl_jax.losses against the loop references of uccl_jax.losses_reference.

Values: the vectorised, jitted losses against the NumPy loops. Gradients: JAX's
against torch autograd through the same loops on float64 tensors (an
independent implementation of the definitions; see losses_reference). float64
runs inside `jax.enable_x64(True)` so x64 does not leak into other test files.
"""

from __future__ import annotations

import functools
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uccl_jax import losses
from uccl_jax import losses_reference as reference

torch = pytest.importorskip('torch')

FLOAT_NAMES = ('weak_logits', 'strong_logits', 'weak_features', 'strong_features')


def _uccl_case(seed: int, batch: int = 4, height: int = 4, width: int = 5, classes: int = 5,
               channels: int = 3) -> dict[str, np.ndarray]:
  """Random float64 inputs covering the cases the losses branch on.

  Image 0: mixed confidence, ~25% ignored pixels. Image 1: all confident (conf
  is exactly 1.0). Image 2: all uncertain (conf ~ 1/C). Image 3: the last class
  never wins (absent), ~25% ignored. Weak features are post-ReLU-like (>= 0 with
  an offset, never a zero vector).
  """
  rng = np.random.default_rng(seed)
  shape = (batch, height, width, classes)
  weak = rng.normal(size=shape) * rng.uniform(0.5, 4.0, size=(batch, height, width, 1))
  weak[1] = 60.0 * np.eye(classes)[rng.integers(0, classes, (height, width))]
  weak[2] = 1e-3 * rng.normal(size=(height, width, classes))
  weak[3, ..., -1] -= 20.0
  ignore = rng.random((batch, height, width)) < 0.25
  ignore[1:3] = False
  ignore[1, 0, 0] = True
  return {
      'weak_logits': weak,
      'strong_logits': 2.0 * rng.normal(size=shape),
      'weak_features': np.abs(rng.normal(size=(batch, height, width, channels))) + 0.1,
      'strong_features': rng.normal(size=(batch, height, width, channels)),
      'ignore': ignore,
  }


def _reference_value_and_grads(fn, case: dict[str, np.ndarray], names: tuple[str, ...], **kwargs):
  """The loop reference on float64 torch tensors: value and d/d(each float input)."""
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in case.items()}
  for name in names:
    tensors[name] = tensors[name].double().requires_grad_(True)
  value = fn(**{k: tensors[k] for k in case}, backend='torch', **kwargs)
  if value.requires_grad:
    value.backward()
  grads = {
      name: (tensors[name].grad.numpy() if tensors[name].grad is not None
             else np.zeros(case[name].shape))
      for name in names
  }
  return float(value.detach()), grads


@functools.cache
def _jitted_value_and_grad(fn, static_kwargs: tuple[tuple[str, object], ...]):
  """One compiled value_and_grad per loss and static options (thresholds are traced)."""

  def loss(float_inputs, other_inputs, dynamic_kwargs):
    return fn(**float_inputs, **other_inputs, **dynamic_kwargs, **dict(static_kwargs))

  return jax.jit(jax.value_and_grad(loss))


def _jax_value_and_grads(fn, case: dict[str, np.ndarray], names: tuple[str, ...], dtype,
                         **kwargs):
  """JAX's value and d/d(names) of fn on case; float kwargs are traced, others static."""
  arrays = {k: jnp.asarray(v, dtype=dtype if k in names else None) for k, v in case.items()}
  dynamic = {k: jnp.asarray(v, dtype) for k, v in kwargs.items() if isinstance(v, float)}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dynamic))
  value, grads = _jitted_value_and_grad(fn, static)(
      {k: arrays[k] for k in names}, {k: v for k, v in arrays.items() if k not in names}, dynamic)
  return float(value), {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}


def _assert_close(actual: float, expected: float, rtol: float, atol: float = 0.0) -> None:
  assert abs(actual - expected) <= atol + rtol * abs(expected), (actual, expected)


def _assert_grads_close(actual: dict, expected: dict, rtol: float) -> None:
  for name in expected:
    scale = max(1.0, float(np.max(np.abs(expected[name]))))
    error = float(np.max(np.abs(actual[name] - expected[name])))
    assert error <= rtol * scale, f'{name}: max error {error:.3g} (scale {scale:.3g})'


def _sbu_inputs(case):
  return {k: case[k] for k in (*FLOAT_NAMES, 'ignore')}


def _ckr_inputs(case):
  return {k: case[k] for k in ('weak_logits', 'weak_features', 'strong_features', 'ignore')}


@pytest.mark.parametrize('variant', ['reference', 'paper'])
@pytest.mark.parametrize('threshold', [0.0, 0.7, 1.0])
def test_sbu_matches_loops_float64(variant, threshold):
  case = _sbu_inputs(_uccl_case(seed=1))
  numpy_value = reference.sbu_loss(**case, threshold=threshold, variant=variant)
  torch_value, torch_grads = _reference_value_and_grads(reference.sbu_loss, case, FLOAT_NAMES,
                                                        threshold=threshold, variant=variant)
  with jax.enable_x64(True):
    value, grads = _jax_value_and_grads(losses.sbu_loss, case, FLOAT_NAMES, jnp.float64,
                                        threshold=threshold, variant=variant)
  _assert_close(value, float(numpy_value), rtol=1e-10, atol=1e-12)
  _assert_close(torch_value, float(numpy_value), rtol=1e-12, atol=1e-14)
  _assert_grads_close(grads, torch_grads, rtol=1e-10)
  # The weak view carries no gradient; the strong view does whenever SBU is active.
  assert not grads['weak_logits'].any() and not grads['weak_features'].any()
  if threshold == 0.0:
    assert value == 0.0 and not grads['strong_logits'].any()
  else:
    assert grads['strong_logits'].any() and grads['strong_features'].any()


def test_ckr_matches_loops_float64():
  for seed in (2, 3):
    case = _ckr_inputs(_uccl_case(seed=seed))
    names = ('weak_logits', 'weak_features', 'strong_features')
    numpy_value = reference.ckr_loss(**case)
    _, torch_grads = _reference_value_and_grads(reference.ckr_loss, case, names)
    with jax.enable_x64(True):
      value, grads = _jax_value_and_grads(losses.ckr_loss, case, names, jnp.float64)
    _assert_close(value, float(numpy_value), rtol=1e-10, atol=1e-12)
    _assert_grads_close(grads, torch_grads, rtol=1e-10)
    assert not grads['weak_features'].any()
    assert grads['weak_logits'].any()  # through the strong map's weights


@pytest.mark.parametrize('variant', ['reference', 'paper'])
def test_sbu_and_ckr_float32_match_loops(variant):
  case = _uccl_case(seed=4, batch=4, height=6, width=7, classes=6, channels=8)
  # The reference runs in float64 on the float32-rounded inputs.
  case = {k: (v.astype(np.float32).astype(np.float64) if v.dtype == np.float64 else v)
          for k, v in case.items()}
  sbu_value, sbu_grads = _reference_value_and_grads(reference.sbu_loss, _sbu_inputs(case),
                                                    FLOAT_NAMES, threshold=0.9, variant=variant)
  ckr_names = ('weak_logits', 'weak_features', 'strong_features')
  ckr_value, ckr_grads = _reference_value_and_grads(reference.ckr_loss, _ckr_inputs(case),
                                                    ckr_names)
  value, grads = _jax_value_and_grads(losses.sbu_loss, _sbu_inputs(case), FLOAT_NAMES,
                                      jnp.float32, threshold=0.9, variant=variant)
  _assert_close(value, sbu_value, rtol=1e-5)
  _assert_grads_close(grads, sbu_grads, rtol=1e-5)
  value, grads = _jax_value_and_grads(losses.ckr_loss, _ckr_inputs(case), ckr_names,
                                      jnp.float32)
  _assert_close(value, ckr_value, rtol=1e-5)
  _assert_grads_close(grads, ckr_grads, rtol=1e-5)


def test_fused_sbu_and_ckr_equals_separate_losses():
  case = _sbu_inputs(_uccl_case(seed=5))
  with jax.enable_x64(True):
    arrays = {k: jnp.asarray(v) for k, v in case.items()}

    def fused(floats):
      sbu, ckr = losses.sbu_and_ckr_losses(**{**arrays, **floats}, threshold=0.8)
      return sbu + 2.0 * ckr

    def separate(floats):
      inputs = {**arrays, **floats}
      sbu = losses.sbu_loss(**inputs, threshold=0.8)
      del inputs['strong_logits']
      return sbu + 2.0 * losses.ckr_loss(**inputs)

    floats = {k: arrays[k] for k in FLOAT_NAMES}
    fused_value, fused_grads = jax.jit(jax.value_and_grad(fused))(floats)
    separate_value, separate_grads = jax.jit(jax.value_and_grad(separate))(floats)
  _assert_close(float(fused_value), float(separate_value), rtol=1e-13)
  for name in FLOAT_NAMES:
    np.testing.assert_allclose(fused_grads[name], separate_grads[name], rtol=0, atol=1e-13)


def test_sbu_hand_checked_case():
  """One image, 3 pixels of class 0; pixel 2 ignored. S = (1, 0, .), CE = (log 2, log(1 + e))."""
  weak_logits = np.zeros((1, 1, 3, 2))
  weak_logits[..., 0] = 0.1  # class 0 everywhere, conf = 1 / (1 + e^-0.1) ~ 0.525
  strong_logits = np.zeros((1, 1, 3, 2))
  strong_logits[0, 0, 1] = [0.0, 1.0]  # CE of class 0 = log(1 + e)
  weak_features = np.array([[[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]]])
  strong_features = np.array([[[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]]])
  ignore = np.array([[[False, False, True]]])
  ce = (math.log(2.0), math.log(1.0 + math.e))
  weighted = math.exp(-1.0) * ce[0] + ce[1]  # exp(-S_p) * CE_p
  expected = {'paper': weighted / (math.exp(-1.0) + 1.0),
              'reference': weighted / (math.exp(-1.0) + 1.0 + 1.0)}  # + the ignored pixel
  for variant, value in expected.items():
    actual = losses.sbu_loss(weak_logits.astype(np.float32), strong_logits.astype(np.float32),
                             weak_features.astype(np.float32),
                             strong_features.astype(np.float32), ignore, threshold=0.6,
                             variant=variant)
    _assert_close(float(actual), value, rtol=1e-6)
    # conf ~ 0.525 > 0.5: no uncertain pixel, no class, loss 0.
    assert float(losses.sbu_loss(weak_logits, strong_logits, weak_features, strong_features,
                                 ignore, threshold=0.5, variant=variant)) == 0.0


def test_ckr_hand_checked_case():
  """Two valid pixels of class 0 (weak logits 1 and log 3) and an ignored pixel."""
  weak_logits = np.array([[[[1.0, 0.0], [math.log(3.0), 0.0], [5.0, 0.0]]]], np.float32)
  weak_features = np.array([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]], np.float32)
  strong_features = np.array([[[[4.0, 0.0], [0.0, 4.0], [1.0, 1.0]]]], np.float32)
  ignore = np.array([[[False, False, True]]])
  # Weights: softmax of the weak logit of class 0 over pixels 0 and 1: (e, 3) / (e + 3).
  w = np.array([math.e, 3.0]) / (math.e + 3.0)
  strong_class = w[0] * strong_features[0, 0, 0] + w[1] * strong_features[0, 0, 1]
  class_cos = strong_class[0] / np.linalg.norm(strong_class)  # weak class feature is (1, 0)
  ignored_cos = 1.0 / math.sqrt(2.0)  # the ignored pixel keeps its own features
  expected = 1.0 - (2.0 * class_cos + ignored_cos) / 3.0
  actual = losses.ckr_loss(weak_logits, weak_features, strong_features, ignore)
  _assert_close(float(actual), float(expected), rtol=1e-6)


def test_cross_entropy_and_pseudo_label_loss_match_loops():
  rng = np.random.default_rng(6)
  logits = 3.0 * rng.normal(size=(3, 4, 5, 6))
  labels = rng.integers(0, 6, size=(3, 4, 5))
  labels[rng.random(labels.shape) < 0.3] = 255
  labels[1] = 255  # an image without any valid pixel
  conf = rng.random((3, 4, 5))
  ignore = rng.random((3, 4, 5)) < 0.3
  for threshold in (0.0, 0.5, 1.0):
    case = {'student_logits': logits, 'pseudo_labels': np.where(labels == 255, 0, labels),
            'conf': conf, 'ignore': ignore}
    names = ('student_logits',)
    numpy_value = reference.pseudo_label_loss(**case, threshold=threshold)
    _, torch_grads = _reference_value_and_grads(reference.pseudo_label_loss, case, names,
                                                threshold=threshold)
    with jax.enable_x64(True):
      value, grads = _jax_value_and_grads(losses.pseudo_label_loss, case, names, jnp.float64,
                                          threshold=threshold)
    _assert_close(value, float(numpy_value), rtol=1e-10, atol=1e-14)
    _assert_grads_close(grads, torch_grads, rtol=1e-10)
  case = {'logits': logits, 'labels': labels}
  _, torch_grads = _reference_value_and_grads(reference.cross_entropy, case, ('logits',))
  with jax.enable_x64(True):
    value, grads = _jax_value_and_grads(losses.cross_entropy, case, ('logits',), jnp.float64)
  _assert_close(value, float(reference.cross_entropy(**case)), rtol=1e-10)
  _assert_grads_close(grads, torch_grads, rtol=1e-10)
  # Against torch's own CrossEntropyLoss(ignore_index=255), what UniMatch uses.
  expected = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels), ignore_index=255)
  _assert_close(float(losses.cross_entropy(logits.astype(np.float32), labels)),
                float(expected), rtol=1e-5)
  assert float(losses.cross_entropy(logits, np.full_like(labels, 255))) == 0.0


def _label_probabilities(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  valid = labels != 255
  picked = np.take_along_axis(probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return np.where(valid, picked, 1.0)


@pytest.mark.parametrize('thresh, min_kept, branch', [
    (0.7, 10_000, 'plain'),  # min_kept > number of pixels (static)
    (0.7, 100, 'plain'),  # number of valid pixels < min_kept <= number of pixels
    (0.05, 40, 'kth'),  # the 40th smallest q exceeds thresh: threshold raised to it
    (0.6, 10, 'thresh'),  # the 10th smallest q is below thresh: threshold stays
    (0.6, 0, 'plain'),  # min_kept = 0: no mining (the release mines only when min_kept > 0)
])
def test_ohem_branches_values_and_gradients(thresh, min_kept, branch):
  rng = np.random.default_rng(7)
  logits = 2.0 * rng.normal(size=(2, 6, 8, 4))
  labels = rng.integers(0, 4, size=(2, 6, 8))
  labels[rng.random(labels.shape) < 0.2] = 255
  q = _label_probabilities(logits, labels)
  valid = labels != 255
  kth = np.sort(q.ravel())[min_kept - 1] if 0 < min_kept <= q.size else None
  if branch == 'plain':
    assert min_kept > valid.sum() or min_kept <= 0
    kept = valid
  elif branch == 'kth':
    assert kth > thresh
    kept = valid & (q <= kth)
  else:
    assert kth is None or kth <= thresh
    kept = valid & (q <= thresh)
  assert 0 < kept.sum() < valid.sum() or branch == 'plain'
  case = {'logits': logits, 'labels': labels}
  kwargs = {'thresh': thresh, 'min_kept': min_kept}
  numpy_value = reference.ohem_cross_entropy(**case, **kwargs)
  _, torch_grads = _reference_value_and_grads(reference.ohem_cross_entropy, case, ('logits',),
                                              **kwargs)
  with jax.enable_x64(True):
    value, grads = _jax_value_and_grads(losses.ohem_cross_entropy, case, ('logits',),
                                        jnp.float64, **kwargs)
  _assert_close(value, float(numpy_value), rtol=1e-10)
  _assert_grads_close(grads, torch_grads, rtol=1e-10)
  # The loss is the mean CE of exactly the kept pixels, and only they get gradient.
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  _assert_close(value, float(ce[kept].mean()), rtol=1e-10)
  has_grad = np.abs(grads['logits']).sum(-1) > 0
  np.testing.assert_array_equal(has_grad, kept)


def _release_style_ohem(pred, target, thresh, min_kept, ignore_index=255):
  """One GPU's OHEM written the way the release computes it, on torch: mine, then mask the target
  and hand it to torch's own cross_entropy (pred [b, C, h, w] float64, target [b, h, w] long)."""
  num_classes = pred.shape[1]
  flat = target.reshape(-1)
  valid = flat != ignore_index
  if 0 < min_kept <= int(valid.sum()):
    probs = torch.softmax(pred.detach(), dim=1).transpose(0, 1).reshape(num_classes, -1)
    q = probs.gather(0, torch.where(valid, flat, 0)[None])[0]
    q = torch.where(valid, q, torch.ones_like(q))
    kth = torch.sort(q).values[min_kept - 1]
    threshold = kth if kth > thresh else torch.as_tensor(thresh, dtype=q.dtype)
    valid = valid & (q <= threshold)
  masked = torch.where(valid, flat, torch.full_like(flat, ignore_index)).reshape(target.shape)
  return torch.nn.functional.cross_entropy(pred, masked, ignore_index=ignore_index)


def _grouped_ohem_case(seed=11):
  """8 images of 6x8, 4 classes; with thresh 0.5 and min_kept 30 each 2-image group takes a
  different branch of the release's OHEM (asserted by the test)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, size=(8, 6, 8))
  logits = 2.0 * rng.normal(size=(8, 6, 8, 4))
  logits[2:4] += 6.0 * np.eye(4)[labels[2:4]]  # group 1 mostly right: q > 0.5 -> kth branch
  labels[rng.random(labels.shape) < 0.15] = 255
  labels[4:6][rng.random((2, 6, 8)) < 0.8] = 255  # group 2: fewer valid pixels than min_kept
  return logits, labels


def test_ohem_groups_equal_the_release_per_gpu_float64():
  """images_per_group=2 on 8 images = the mean of the release's OHEM over its four 2-image
  'GPUs' (DDP's average), values and gradients; each group takes its own branch."""
  logits, labels = _grouped_ohem_case()
  thresh, min_kept = 0.5, 30
  q = _label_probabilities(logits, labels).reshape(4, -1)
  valid = (labels != 255).reshape(4, -1)
  kth = np.sort(q, axis=1)[:, min_kept - 1]
  branches = ['plain' if valid[g].sum() < min_kept else 'kth' if kth[g] > thresh else 'thresh'
              for g in range(4)]
  assert set(branches) == {'plain', 'kth', 'thresh'}, branches
  case = {'logits': logits, 'labels': labels}
  kwargs = {'thresh': thresh, 'min_kept': min_kept, 'images_per_group': 2}
  numpy_value = reference.ohem_cross_entropy(**case, **kwargs)
  _, loop_grads = _reference_value_and_grads(reference.ohem_cross_entropy, case, ('logits',),
                                             **kwargs)
  # The release's structure on torch: per 'GPU', mine, mask the target, torch's own CE; mean.
  pred = torch.from_numpy(logits).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  target = torch.from_numpy(labels).long()
  release = sum(_release_style_ohem(pred[g:g + 2], target[g:g + 2], thresh, min_kept)
                for g in range(0, 8, 2)) / 4
  release.backward()
  release_grads = {'logits': pred.grad.permute(0, 2, 3, 1).numpy()}
  with jax.enable_x64(True):
    value, grads = _jax_value_and_grads(losses.ohem_cross_entropy, case, ('logits',),
                                        jnp.float64, **kwargs)
    whole = float(losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                            thresh=thresh, min_kept=min_kept))
  _assert_close(value, float(numpy_value), rtol=1e-10)
  _assert_close(value, float(release.detach()), rtol=1e-10)
  _assert_grads_close(grads, loop_grads, rtol=1e-10)
  _assert_grads_close(grads, release_grads, rtol=1e-10)
  # Mining the 8 images as one group (what the loss did before) is a different loss.
  assert abs(whole - value) > 1e-3 * abs(value)


def test_ohem_group_edge_cases():
  logits, labels = _grouped_ohem_case(seed=12)
  logits32, labels32 = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)
  # None = one group of the whole batch = images_per_group=B.
  np.testing.assert_allclose(
      float(losses.ohem_cross_entropy(logits32, labels32, thresh=0.5, min_kept=30)),
      float(losses.ohem_cross_entropy(logits32, labels32, thresh=0.5, min_kept=30,
                                      images_per_group=8)), rtol=1e-6)
  # A group without valid pixels counts as 0 in the mean (PyTorch would give NaN).
  empty = labels.copy()
  empty[6:] = 255
  per_group = [float(reference.ohem_cross_entropy(logits[g:g + 2], empty[g:g + 2], thresh=0.5,
                                                  min_kept=30)) for g in range(0, 8, 2)]
  assert per_group[3] == 0.0
  value = float(losses.ohem_cross_entropy(logits32, jnp.asarray(empty), thresh=0.5, min_kept=30,
                                          images_per_group=2))
  _assert_close(value, sum(per_group) / 4, rtol=1e-5)
  for bad in (0, 3, -2, 2.0):
    with pytest.raises(ValueError, match='images_per_group'):
      losses.ohem_cross_entropy(logits32, labels32, images_per_group=bad)


def test_bfloat16_inputs_accumulate_in_float32():
  case = _uccl_case(seed=8, channels=16)
  bf16 = {k: (jnp.asarray(v, jnp.bfloat16) if k in FLOAT_NAMES else jnp.asarray(v))
          for k, v in case.items()}
  upcast = {k: (v.astype(jnp.float32) if k in FLOAT_NAMES else v) for k, v in bf16.items()}

  def total(inputs):
    sbu, ckr = losses.sbu_and_ckr_losses(**inputs, threshold=0.9)
    return sbu + ckr

  floats = {k: bf16[k] for k in FLOAT_NAMES}
  value, grads = jax.jit(jax.value_and_grad(lambda f: total({**bf16, **f})))(floats)
  expected = jax.jit(total)(upcast)
  assert value.dtype == jnp.float32
  _assert_close(float(value), float(expected), rtol=1e-6)
  assert all(grads[k].dtype == jnp.bfloat16 for k in FLOAT_NAMES)
  assert all(bool(jnp.isfinite(grads[k].astype(jnp.float32)).all()) for k in FLOAT_NAMES)
  assert losses.cross_entropy(bf16['strong_logits'], jnp.zeros((4, 4, 5), jnp.int32)).dtype == (
      jnp.float32)


def test_all_pixels_ignored_gives_zero_not_nan():
  case = _sbu_inputs(_uccl_case(seed=9))
  case['ignore'] = np.ones_like(case['ignore'])
  value, grads = _jax_value_and_grads(losses.sbu_loss, case, FLOAT_NAMES, jnp.float32,
                                      threshold=1.0)
  assert value == 0.0
  assert all(np.isfinite(g).all() and not g.any() for g in grads.values())
  # CKR with every pixel ignored: 1 - mean cos of the pixels' own features.
  ckr_case = _ckr_inputs(case)
  names = ('weak_logits', 'weak_features', 'strong_features')
  value, grads = _jax_value_and_grads(losses.ckr_loss, ckr_case, names, jnp.float32)
  _assert_close(value, float(reference.ckr_loss(**ckr_case)), rtol=1e-5)
  assert np.isfinite(grads['strong_features']).all() and grads['strong_features'].any()


def test_batch_sharded_inputs_give_the_same_losses_and_gradients():
  """Under jit with the batch split over the 4 test devices (as the train step runs)."""
  case = _sbu_inputs(_uccl_case(seed=11))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ('data',))  # as uccl_jax.parallel
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  arrays = {k: jnp.asarray(v, jnp.float32 if k in FLOAT_NAMES else None) for k, v in case.items()}
  sharded = {k: jax.device_put(v, sharding) for k, v in arrays.items()}

  def total(floats, ignore):
    sbu, ckr = losses.sbu_and_ckr_losses(**floats, ignore=ignore, threshold=0.8)
    return sbu + ckr

  step = jax.jit(jax.value_and_grad(total))
  floats = lambda inputs: {k: inputs[k] for k in FLOAT_NAMES}
  value, grads = step(floats(arrays), arrays['ignore'])
  sharded_value, sharded_grads = step(floats(sharded), sharded['ignore'])
  _assert_close(float(sharded_value), float(value), rtol=1e-6)
  for name in FLOAT_NAMES:
    np.testing.assert_allclose(sharded_grads[name], grads[name], rtol=1e-5, atol=1e-8)
  assert sharded_grads['strong_features'].sharding.is_equivalent_to(sharding, 4)


def test_bad_arguments_raise_clear_errors():
  case = _sbu_inputs(_uccl_case(seed=10))
  with pytest.raises(ValueError, match='variant'):
    losses.sbu_loss(**case, threshold=0.5, variant='eq7')
  with pytest.raises(ValueError, match='ignore'):
    losses.ckr_loss(case['weak_logits'], case['weak_features'], case['strong_features'],
                    case['ignore'][:, :2])
  with pytest.raises(ValueError, match='strong_logits'):
    losses.sbu_loss(**{**case, 'strong_logits': case['strong_logits'][..., :2]}, threshold=0.5)


def test_importing_losses_imports_neither_torch_nor_tensorflow():
  code = ('import sys, uccl_jax.losses, uccl_jax.losses_reference; '
          'assert "torch" not in sys.modules and "tensorflow" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=pathlib.Path(__file__).parents[1])
