"""The network: size, BatchNorm semantics, dilation, feature perturbation, dtypes, config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uccl_jax import config as config_lib
from uccl_jax import convert
from uccl_jax import models
from uccl_jax.models import resnet
import torch_reference

torch.set_num_threads(1)

TINY = dict(num_classes=5, backbone='resnet50', width=8, head_channels=16)  # real blocks, tiny widths


def _tiny_model(**overrides) -> models.DeepLabV3Plus:
  return models.DeepLabV3Plus(**{**TINY, **overrides})


def _images(shape=(2, 49, 57, 3), seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _param_count(model: models.DeepLabV3Plus) -> tuple[int, set]:
  images = jnp.zeros((1, 65, 65, 3))
  shapes = jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))
  leaves = jax.tree.leaves(shapes['params'])
  return sum(int(np.prod(leaf.shape)) for leaf in leaves), {leaf.dtype for leaf in leaves}


def test_real_network_has_the_papers_parameter_count():
  count, dtypes = _param_count(models.DeepLabV3Plus(num_classes=21))
  assert count == 40_475_957
  assert dtypes == {np.dtype('float32')}
  # bfloat16 compute leaves the parameters float32.
  count_bf16, dtypes_bf16 = _param_count(models.DeepLabV3Plus(num_classes=21, dtype=jnp.bfloat16))
  assert (count_bf16, dtypes_bf16) == (count, {np.dtype('float32')})


def _run_batch_norm(x, mean, var, dtype=jnp.float32):
  module = models.BatchNorm()
  variables = {'params': {'scale': jnp.asarray(np.linspace(0.5, 1.5, x.shape[-1]), jnp.float32),
                          'bias': jnp.asarray(np.linspace(-0.2, 0.3, x.shape[-1]), jnp.float32)},
               'batch_stats': {'mean': jnp.asarray(mean), 'var': jnp.asarray(var)}}
  out, updated = module.apply(variables, jnp.asarray(x, dtype), train=True, mutable=['batch_stats'])
  out_eval = module.apply(variables, jnp.asarray(x, dtype), train=False)
  return variables, out, updated['batch_stats'], out_eval


def test_batch_norm_matches_torch_in_training_and_eval():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 5, 6, 3)) * 3 + 1).astype(np.float32)
  mean = rng.normal(size=3).astype(np.float32)
  var = rng.uniform(0.5, 2, size=3).astype(np.float32)
  variables, out, stats, out_eval = _run_batch_norm(x, mean, var)

  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2))
  weight = torch.from_numpy(np.array(variables['params']['scale']))
  bias = torch.from_numpy(np.array(variables['params']['bias']))
  running_mean, running_var = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
  expected = F.batch_norm(x_t, running_mean, running_var, weight, bias, training=True, momentum=0.1, eps=1e-5)
  np.testing.assert_allclose(np.asarray(out), expected.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  # running_var takes the UNBIASED batch variance (n / (n - 1)), as PyTorch does.
  np.testing.assert_allclose(np.asarray(stats['mean']), running_mean.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats['var']), running_var.numpy(), rtol=1e-6, atol=1e-6)
  n = 4 * 5 * 6
  by_hand = 0.9 * var + 0.1 * x.reshape(-1, 3).var(axis=0, ddof=0) * n / (n - 1)
  np.testing.assert_allclose(np.asarray(stats['var']), by_hand, rtol=1e-5)

  expected_eval = F.batch_norm(x_t, torch.from_numpy(mean), torch.from_numpy(var), weight, bias,
                               training=False, eps=1e-5)
  np.testing.assert_allclose(np.asarray(out_eval), expected_eval.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)


def test_batch_norm_keeps_float32_statistics_for_bfloat16_inputs():
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(4, 3, 3, 2)) * 2 + 5).astype(np.float32)
  x_bf16_as_f32 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  zeros, ones = np.zeros(2, np.float32), np.ones(2, np.float32)
  _, out, stats, _ = _run_batch_norm(x, zeros, ones, dtype=jnp.bfloat16)
  _, out32, stats32, _ = _run_batch_norm(x_bf16_as_f32, zeros, ones, dtype=jnp.float32)
  assert out.dtype == jnp.bfloat16
  assert stats['mean'].dtype == jnp.float32 and stats['var'].dtype == jnp.float32
  # Statistics of the same (bf16-representable) values are computed exactly as in float32.
  np.testing.assert_allclose(np.asarray(stats['mean']), np.asarray(stats32['mean']), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats['var']), np.asarray(stats32['var']), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out32), atol=2e-2)


def test_batch_norm_refuses_one_value_per_channel_in_training():
  with pytest.raises(ValueError, match='more than 1 value per channel'):
    _run_batch_norm(np.ones((1, 1, 1, 2), np.float32), np.zeros(2, np.float32), np.ones(2, np.float32))


def test_batch_norm_over_a_sharded_batch_uses_the_global_batch():
  """Under jit with the batch split over 4 devices, statistics are those of the whole batch (SyncBN)."""
  mesh = jax.make_mesh((4,), ('data',))
  per_sample_scale = np.arange(1, 9)[:, None, None, None]  # devices hold very different samples
  x = (np.random.default_rng(2).normal(size=(8, 3, 3, 4)) * per_sample_scale).astype(np.float32)
  module = models.BatchNorm()
  variables = module.init(jax.random.key(0), x, train=False)
  apply = jax.jit(lambda v, batch: module.apply(v, batch, train=True, mutable=['batch_stats']))
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec('data')))
  out, stats = apply(variables, sharded)
  out_single, stats_single = apply(variables, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_single), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats['batch_stats']['var']),
                             0.9 + 0.1 * x.reshape(-1, 4).var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats['batch_stats']['var']),
                             np.asarray(stats_single['batch_stats']['var']), rtol=1e-6)


def test_max_pool_pads_with_minus_infinity_like_torch():
  x = -np.abs(np.random.default_rng(3).normal(size=(1, 7, 6, 2))).astype(np.float32) - 1.0
  expected = F.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, stride=2, padding=1)
  got = resnet.max_pool_3x3_s2(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), expected.numpy().transpose(0, 2, 3, 1))


def _torch_weights(arch: torch_reference.Arch, seed: int = 0):
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(arch), seed)
  return state, {key: value.numpy() for key, value in state.items()}


RESNET18 = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2))


def _tiny_resnet18_variables(model: models.DeepLabV3Plus, seed: int = 0) -> dict:
  """Random variables without model.init: on CPU, init compiles one RNG kernel per shape (slow)."""
  return convert.variables_from_torch(_torch_weights(RESNET18, seed)[1], model)


def test_output_stride_8_matches_torch_reference():
  """OS 8 dilates layer3 (2) and layer4 (4) with PyTorch's first-block rule (basic blocks: cheaper)."""
  arch = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2), output_stride=8)
  state, numpy_state = _torch_weights(arch)
  model = _tiny_model(backbone='resnet18', output_stride=8)
  variables = convert.variables_from_torch(numpy_state, model)
  images = _images((1, 33, 41, 3))
  got = model.apply(variables, images, train=False)
  expected = torch_reference.deeplab_forward(state, images, arch)
  assert got['features'].shape == (1, 9, 11, 16)
  assert got['logits_lowres'].shape == (1, 9, 11, 5)
  for key in expected:
    assert torch_reference.relative_error(got[key], expected[key]) < 1e-4, key


def test_training_mode_matches_torch_including_running_statistics():
  """Train-mode BN everywhere (incl. the 2-value ASPP pooling branch) in float64: outputs and all stats."""
  arch = torch_reference.Arch()
  state, _ = _torch_weights(arch, seed=1)
  state = {key: value.double() if value.is_floating_point() else value for key, value in state.items()}
  images = _images((2, 33, 35, 3), seed=1).astype(np.float64)
  with jax.enable_x64(True):
    model = _tiny_model(dtype=jnp.float64)
    variables = convert.variables_from_torch({k: v.numpy() for k, v in state.items()}, model)
    variables = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), variables)
    got, updated = model.apply(variables, images, train=True, mutable=['batch_stats'])
  expected = torch_reference.deeplab_forward(state, images, arch, training=True)  # updates `state` in place
  for key in expected:
    assert torch_reference.relative_error(got[key], expected[key]) < 1e-9, key
  flat = convert._flatten(updated['batch_stats'])  # pylint: disable=protected-access
  assert len(flat) == sum(key.endswith('running_mean') or key.endswith('running_var') for key in state)
  for path, value in flat.items():
    reference = state[convert.torch_key(path, 'batch_stats')].numpy()
    np.testing.assert_allclose(np.asarray(value), reference, rtol=1e-9, atol=1e-12, err_msg=str(path))


def test_channel_dropout_zeroes_whole_channels_per_sample_and_doubles_survivors():
  x = jnp.asarray(np.random.default_rng(4).uniform(1, 2, size=(16, 3, 4, 64)), jnp.float32)
  out = np.asarray(models.channel_dropout(x, jax.random.key(0), 0.5))
  ratio = out / np.asarray(x)
  kept = ratio[:, 0, 0, :] == 2.0
  dropped = ratio[:, 0, 0, :] == 0.0
  assert np.all(kept | dropped)
  # The decision is per (sample, channel): constant over each channel's whole map.
  np.testing.assert_array_equal(ratio, np.broadcast_to(ratio[:, :1, :1, :], ratio.shape))
  assert 0.4 < dropped.mean() < 0.6  # 1024 Bernoulli(0.5) draws
  assert not np.all(dropped[0] == dropped[1])  # drawn per sample, not shared
  bf16 = models.channel_dropout(x.astype(jnp.bfloat16), jax.random.key(1))
  assert bf16.dtype == jnp.bfloat16


def test_feature_perturbation_shapes_clean_half_and_shared_batch_norm():
  model = _tiny_model(backbone='resnet18')
  images = _images((2, 33, 35, 3), seed=2)
  variables = _tiny_resnet18_variables(model)
  rngs = {'dropout': jax.random.key(5)}
  clean = model.apply(variables, images, train=False)
  perturbed = model.apply(variables, images, train=False, feature_perturbation=True, rngs=rngs)
  assert set(perturbed) == {'logits', 'logits_lowres', 'features', 'logits_fp'}
  assert perturbed['logits_fp'].shape == perturbed['logits'].shape == (2, 33, 35, 5)
  assert perturbed['features'].shape == (2, 9, 9, 16)  # c1 is at stride 4
  # Eval-mode BN is per sample, so the clean half is the unperturbed network's output.
  for key in clean:
    np.testing.assert_allclose(perturbed[key], clean[key], rtol=1e-5, atol=1e-5)
  assert not np.allclose(perturbed['logits_fp'], perturbed['logits'], atol=1e-3)

  # Training: the decoder BNs normalise over [clean; dropped] (2B samples), the backbone over B.
  outputs, updated = model.apply(
      variables, images, train=True, feature_perturbation=True, rngs=rngs,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda module, _: module.name in ('reduce_0', 'conv1_0'))
  reduce_in = np.asarray(updated['intermediates']['reduce_0']['__call__'][0])
  assert reduce_in.shape[0] == 4
  stem_out = np.asarray(updated['intermediates']['backbone']['conv1_0']['__call__'][0])
  assert stem_out.shape[0] == 2
  old = np.asarray(variables['batch_stats']['reduce_1']['mean'])
  np.testing.assert_allclose(np.asarray(updated['batch_stats']['reduce_1']['mean']),
                             0.9 * old + 0.1 * reduce_in.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  n = reduce_in.size // reduce_in.shape[-1]
  np.testing.assert_allclose(np.asarray(updated['batch_stats']['reduce_1']['var']),
                             0.9 * np.asarray(variables['batch_stats']['reduce_1']['var'])
                             + 0.1 * reduce_in.reshape(n, -1).var(axis=0, ddof=1), rtol=1e-5, atol=1e-6)
  assert 'logits_fp' in outputs


def test_feature_perturbation_needs_a_dropout_rng():
  model = _tiny_model(backbone='resnet18')
  images = _images((1, 33, 33, 3))
  variables = _tiny_resnet18_variables(model)
  with pytest.raises(Exception, match='dropout'):
    model.apply(variables, images, train=False, feature_perturbation=True)


def test_bfloat16_compute_runs_with_float32_params_stats_and_outputs():
  model32 = _tiny_model(backbone='resnet18')
  model16 = _tiny_model(backbone='resnet18', dtype=jnp.bfloat16)
  images = _images((2, 33, 33, 3), seed=3)
  variables = _tiny_resnet18_variables(model32, seed=1)
  variables16 = jax.eval_shape(lambda key: model16.init(key, images, train=False), jax.random.key(1))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables16)} == {jnp.dtype('float32')}
  out16, updated = model16.apply(variables, images, train=True, feature_perturbation=True,
                                 rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])
  out32 = model32.apply(variables, images, train=True, feature_perturbation=True,
                        rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])[0]
  assert {leaf.dtype for leaf in jax.tree.leaves(updated)} == {jnp.dtype('float32')}
  for key in out32:
    assert out16[key].dtype == jnp.float32, key
    assert np.all(np.isfinite(out16[key])), key
    correlation = np.corrcoef(np.ravel(out16[key]), np.ravel(out32[key]))[0, 1]
    assert correlation > 0.98, (key, correlation)


def test_from_config_builds_the_configured_network_and_names_bad_fields():
  config = config_lib.base_config()
  model = models.from_config(config.model, num_classes=21)
  assert (model.backbone, model.width, model.head_channels, model.stem, model.output_stride,
          tuple(model.dilations), model.dtype, model.num_classes) == (
              'resnet50', 64, 256, 'deep', 16, (6, 12, 18), jnp.float32, 21)
  config.model.backbone = 'resnet18'
  config.model.width = 8
  config.model.head_channels = 32
  config.model.dtype = 'bfloat16'
  model = models.from_config(config.model, num_classes=3)
  assert (model.backbone, model.width, model.head_channels, model.dtype, model.reduce_channels) == (
      'resnet18', 8, 32, jnp.bfloat16, 6)
  bad_values = (('backbone', 'resnet42'), ('stem', 'wide'), ('output_stride', 32), ('dtype', 'float16'),
                ('width', 0), ('dilations', (6, 12)))
  for field, value in bad_values:
    bad = config_lib.base_config()
    bad.model[field] = value
    with pytest.raises(ValueError, match=f'config.model.{field}'):
      models.from_config(bad.model, num_classes=21)
