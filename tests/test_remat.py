"""model.remat: same variables, loss, gradients and BN statistics as without it, and less kept.

Rematerialisation must change what the backward pass keeps, never what it
computes. The reference for the values is an independent one: PyTorch autograd
through tests/torch_reference.py on the same weights (float64, so any
difference beyond rounding would show); the plain network is compared too, and
the saved residuals show that remat is really on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uccl_jax import config as config_lib
from uccl_jax import convert
from uccl_jax import models
import torch_reference

torch.set_num_threads(1)

# (backbone, torch_reference.Arch): one net per block type and stem, tiny widths.
NETS = {
    'resnet50-deep': ('resnet50', torch_reference.Arch()),
    'resnet18-standard': ('resnet18', torch_reference.Arch(block='basic', layers=(2, 2, 2, 2),
                                                           stem='standard')),
}


def _model(backbone: str, arch: torch_reference.Arch, remat: bool,
           dtype=jnp.float32) -> models.DeepLabV3Plus:
  return models.DeepLabV3Plus(num_classes=arch.num_classes, backbone=backbone, width=arch.width,
                              head_channels=arch.head_channels, stem=arch.stem, dtype=dtype,
                              remat=remat)


def _inputs(arch: torch_reference.Arch, seed: int = 0):
  """Images (2, 33, 35) and a fixed random weighting of the logits, float64."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, 33, 35, 3))
  weights = rng.normal(size=(2, 33, 35, arch.num_classes))
  return images, weights


def _loss_from_outputs(logits, features, weights, xp):
  """A loss touching every output nonlinearly: weighted log-softmax plus a feature term."""
  log_probs = logits - xp.logsumexp(logits, axis=-1, keepdims=True)
  return -(weights * log_probs).mean() + 0.1 * (features ** 2).mean()


def _jax_loss_grads_stats(model, variables, images, weights):
  def loss_fn(params):
    out, updated = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                               train=True, mutable=['batch_stats'])
    return _loss_from_outputs(out['logits'], out['features'], weights, jax.nn), updated['batch_stats']

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return float(loss), grads, stats


def _torch_loss_grads_stats(state, images, weights, arch):
  """Autograd through the reference network in training mode (running stats updated in place)."""
  state = {key: value.double().requires_grad_(value.is_floating_point() and 'running' not in key)
           if value.is_floating_point() else value for key, value in state.items()}
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  c1, _, _, c4 = torch_reference.resnet_forward(state, x, arch, True, prefix='backbone.')
  logits_lowres, features = torch_reference.decode(state, c1, c4, arch, True)
  logits = F.interpolate(logits_lowres, size=x.shape[-2:], mode='bilinear', align_corners=True)

  class TorchOps:
    logsumexp = staticmethod(lambda t, axis, keepdims: torch.logsumexp(t, dim=axis, keepdim=keepdims))

  loss = _loss_from_outputs(logits.permute(0, 2, 3, 1), features.permute(0, 2, 3, 1),
                            torch.from_numpy(weights), TorchOps)
  loss.backward()
  grads = {key: value.grad.numpy() for key, value in state.items() if value.grad is not None}
  stats = {key: value.detach().numpy() for key, value in state.items() if 'running' in key}
  return float(loss.detach()), grads, stats


@pytest.mark.parametrize('net', sorted(NETS))
def test_remat_keeps_loss_gradients_and_batch_stats(net):
  backbone, arch = NETS[net]
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(arch), seed=3)
  images, weights = _inputs(arch)
  with jax.enable_x64(True):
    results = {}
    for remat in (False, True):
      model = _model(backbone, arch, remat, dtype=jnp.float64)
      variables = convert.variables_from_torch({k: v.numpy() for k, v in state.items()}, model)
      variables = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), variables)
      results[remat] = _jax_loss_grads_stats(model, variables, images, weights)
  torch_loss, torch_grads, torch_stats = _torch_loss_grads_stats(state, images, weights, arch)

  (loss_plain, grads_plain, stats_plain), (loss_remat, grads_remat, stats_remat) = (
      results[False], results[True])
  # Same tree with and without remat (names, shapes), and converted weights fill both.
  assert jax.tree.structure(grads_plain) == jax.tree.structure(grads_remat)
  assert jax.tree.structure(stats_plain) == jax.tree.structure(stats_remat)

  np.testing.assert_allclose(loss_remat, torch_loss, rtol=1e-10)
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-12)
  flat_grads = convert._flatten(grads_remat)  # pylint: disable=protected-access
  flat_plain = convert._flatten(grads_plain)  # pylint: disable=protected-access
  assert len(flat_grads) == len(torch_grads)
  for path, grad in flat_grads.items():
    torch_grad = torch_grads[convert.torch_key(path, 'params')]
    if grad.ndim == 4:  # HWIO kernel <- OIHW weight
      torch_grad = torch_grad.transpose(2, 3, 1, 0)
    scale = max(np.abs(torch_grad).max(), 1e-12)
    assert np.abs(np.asarray(grad) - torch_grad).max() / scale < 1e-9, path
    np.testing.assert_allclose(np.asarray(grad), np.asarray(flat_plain[path]), rtol=1e-9,
                               atol=1e-12 * scale, err_msg=str(path))
  flat_stats = convert._flatten(stats_remat)  # pylint: disable=protected-access
  flat_stats_plain = convert._flatten(stats_plain)  # pylint: disable=protected-access
  assert len(flat_stats) == len(torch_stats)
  for path, value in flat_stats.items():
    np.testing.assert_allclose(np.asarray(value), torch_stats[convert.torch_key(path, 'batch_stats')],
                               rtol=1e-10, atol=1e-13, err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_stats_plain[path]))


def test_remat_keeps_the_feature_perturbation_pass():
  """The decoder draws its channel dropout inside the remat'd decoder: same masks, same gradients."""
  backbone, arch = NETS['resnet18-standard']
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(arch), seed=4)
  images, weights = _inputs(arch, seed=1)
  outputs = {}
  for remat in (False, True):
    model = _model(backbone, arch, remat)
    variables = convert.variables_from_torch({k: v.numpy() for k, v in state.items()}, model)

    def loss_fn(params, model=model, variables=variables):
      out, updated = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 images.astype(np.float32), train=True, feature_perturbation=True,
                                 rngs={'dropout': jax.random.key(7)}, mutable=['batch_stats'])
      loss = (_loss_from_outputs(out['logits'], out['features'], weights, jax.nn) +
              _loss_from_outputs(out['logits_fp'], out['features'], weights, jax.nn))
      return loss, (updated['batch_stats'], out['logits_fp'])

    outputs[remat] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  (loss0, (stats0, fp0)), grads0 = outputs[False]
  (loss1, (stats1, fp1)), grads1 = outputs[True]
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(fp1), np.asarray(fp0), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    scale = max(float(jnp.abs(b).max()), 1e-12)
    assert float(jnp.abs(a - b).max()) / scale < 1e-4


def _activation_residual_bytes(model, variables, images) -> int:
  """Bytes of the per-image values (leading batch axis) the backward pass keeps.

  jax.vjp's backward function carries its residuals as pytree leaves; traced
  with jax.eval_shape, nothing runs. Kernels and BN vectors never lead with
  the batch size used here, so the filter keeps activations only.
  """
  def residuals(params):
    def loss_fn(params):
      out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                           train=True, mutable=['batch_stats'])
      return out['logits'].sum()

    return jax.tree.leaves(jax.vjp(loss_fn, params)[1])

  leaves = jax.eval_shape(residuals, variables['params'])
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves
             if leaf.ndim >= 3 and leaf.shape[0] == images.shape[0])


def test_remat_keeps_less_for_the_backward_pass():
  """What jax.checkpoint saves, independent of how a compiler later schedules it.

  Without remat the backward keeps every conv/BN/ReLU activation (about 14
  feature maps per bottleneck); with it, each block's input and the decoder's
  inputs and its convolutions' outputs: about 7x less for this net at 97x97.
  How much of that a compiled step gains is up to the compiler's schedule
  (docs/RESULTS.md, "Memory per device").
  """
  backbone, arch = NETS['resnet50-deep']
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(arch), seed=5)
  images = np.random.default_rng(2).normal(size=(2, 97, 97, 3)).astype(np.float32)
  kept = {}
  for remat in (False, True):
    model = _model(backbone, arch, remat)
    variables = convert.variables_from_torch({k: v.numpy() for k, v in state.items()}, model)
    kept[remat] = _activation_residual_bytes(model, variables, images)
  assert kept[True] < kept[False] / 5, kept


def test_variables_are_the_same_tree_with_remat_on_or_off():
  """Checkpoints and converted weights load either way: init gives identical names and shapes."""
  images = jnp.zeros((1, 33, 33, 3))
  trees = {}
  for remat in (False, True):
    model = models.DeepLabV3Plus(num_classes=21, remat=remat)  # the real network
    trees[remat] = jax.eval_shape(lambda key, m=model: m.init(key, images, train=False),
                                  jax.random.key(0))
  assert jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), trees[True]) == (
      jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), trees[False]))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(trees[True]['params'])) == 40_475_957


def test_from_config_reads_model_remat():
  config = config_lib.base_config()
  assert config.model.remat is False
  assert models.from_config(config.model, num_classes=21).remat is False
  config.model.remat = True
  assert models.from_config(config.model, num_classes=21).remat is True
  # A config written before the field existed (a run folder's saved config) means remat off.
  legacy = {key: value for key, value in config.model.items() if key != 'remat'}
  assert models.from_config(legacy, num_classes=21).remat is False
  with pytest.raises(ValueError, match='config.model.remat'):
    models.from_config({**legacy, 'remat': 'yes'}, num_classes=21)
