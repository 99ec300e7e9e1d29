"""PyTorch state dicts -> Flax variables: outputs equal a torch reference; strictness; .pth reading."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from uccl_jax import convert
from uccl_jax import models
from uccl_jax.models import resnet
import torch_reference

torch.set_num_threads(1)

ARCH = torch_reference.Arch()  # deep stem, Bottleneck [3, 4, 6, 3], width 8, head 16, reduce 3, 5 classes


def _tiny_deeplab() -> models.DeepLabV3Plus:
  return models.DeepLabV3Plus(num_classes=5, backbone='resnet50', width=8, head_channels=16)


def _images(shape=(2, 41, 47, 3), seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
  return {key: value.numpy() for key, value in state.items()}


def test_unimatch_checkpoint_file_converts_and_reproduces_the_reference_outputs(tmp_path):
  """A latest.pth-style file: {'model': {'module.' + key: tensor}, 'epoch', ...} written by torch.save."""
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=0)
  path = tmp_path / 'latest.pth'
  torch.save({'model': {f'module.{key}': value for key, value in state.items()}, 'epoch': 3,
              'previous_best': 61.5}, path)
  model = _tiny_deeplab()
  variables = convert.variables_from_torch(convert.load_torch_file(path), model)
  assert set(variables) == {'params', 'batch_stats'}
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype('float32')}

  images = _images()
  got = model.apply(variables, images, train=False)
  expected = torch_reference.deeplab_forward(state, images, ARCH)
  for key in ('logits', 'logits_lowres', 'features'):
    assert got[key].shape == expected[key].shape, key
    assert torch_reference.relative_error(got[key], expected[key]) < 1e-4, key


def test_backbone_only_dict_fills_the_backbone_and_merges_into_fresh_variables():
  full_state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=1)
  backbone_state = torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=2)
  model = _tiny_deeplab()
  fresh = convert.variables_from_torch(_numpy(full_state), model)  # stands in for model.init(...)

  converted = convert.variables_from_torch(_numpy(backbone_state), model)
  assert {collection: set(tree) for collection, tree in converted.items()} == {
      'params': {'backbone'}, 'batch_stats': {'backbone'}}
  merged = convert.merge_variables(fresh, converted)

  # The network with the new backbone and the old head is the reference on the combined dict.
  combined = {key: value for key, value in full_state.items() if not key.startswith('backbone.')}
  combined |= {f'backbone.{key}': value for key, value in backbone_state.items()}
  images = _images(seed=1)
  got = model.apply(merged, images, train=False)
  expected = torch_reference.deeplab_forward(combined, images, ARCH)
  for key in expected:
    assert torch_reference.relative_error(got[key], expected[key]) < 1e-4, key
  np.testing.assert_array_equal(merged['params']['classifier']['kernel'],
                                fresh['params']['classifier']['kernel'])

  # The same dict converts for a bare ResNet, whose (c1, ..., c4) match the reference backbone.
  backbone = resnet.build_resnet('resnet50', width=8)
  backbone_variables = convert.variables_from_torch(_numpy(backbone_state), backbone)
  outputs = backbone.apply(backbone_variables, images, train=False)
  for got_c, expected_c in zip(outputs, torch_reference.backbone_forward(backbone_state, images, ARCH)):
    assert torch_reference.relative_error(got_c, expected_c) < 1e-4


def test_torchvision_layout_standard_stem_basic_blocks():
  """torchvision's resnet18 keys (conv1.weight 7x7, bn1, BasicBlocks); its fc only with ignore_prefixes."""
  arch = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2), stem='standard')
  state = torch_reference.random_state_dict(torch_reference.backbone_shapes(arch), seed=3)
  with_fc = _numpy(state) | {'fc.weight': np.zeros((10, 64), np.float32), 'fc.bias': np.zeros(10, np.float32)}
  model = resnet.build_resnet('resnet18', width=8, stem='standard')
  with pytest.raises(convert.ConversionError, match=r'2 unexpected: fc\.bias, fc\.weight'):
    convert.variables_from_torch(with_fc, model)
  variables = convert.variables_from_torch(with_fc, model, ignore_prefixes=('fc.',))
  images = _images((1, 45, 39, 3), seed=3)
  outputs = model.apply(variables, images, train=False)
  for got_c, expected_c in zip(outputs, torch_reference.backbone_forward(state, images, arch)):
    assert got_c.shape == expected_c.shape
    assert torch_reference.relative_error(got_c, expected_c) < 1e-4


def test_real_network_layout_converts_strictly():
  """The full-size key set (ResNet-50 deep stem, head 256, reduce 48, 21 classes) fits exactly."""
  arch = torch_reference.Arch(width=64, head_channels=256, reduce_channels=48, num_classes=21)
  shapes = torch_reference.state_dict_shapes(arch)
  state = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}  # calloc: cheap
  variables = convert.variables_from_torch(state, models.DeepLabV3Plus(num_classes=21))
  count = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
  assert count == 40_475_957
  assert variables['params']['backbone']['layer4_2']['conv2']['kernel'].shape == (3, 3, 512, 512)  # HWIO


def test_strictness_lists_missing_unexpected_and_misshaped_keys():
  state = _numpy(torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=4))
  model = _tiny_deeplab()
  # num_batches_tracked is optional either way.
  without_counters = {key: value for key, value in state.items() if not key.endswith('num_batches_tracked')}
  convert.variables_from_torch(without_counters, model)

  broken = dict(state)
  del broken['backbone.layer4.2.bn3.running_var']
  broken['head.b5.0.weight'] = np.zeros((16, 256, 1, 1), np.float32)
  broken['fuse.3.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(convert.ConversionError) as error:
    convert.variables_from_torch(broken, model)
  message = str(error.value)
  assert '\n' not in message
  assert '1 missing: backbone.layer4.2.bn3.running_var' in message
  assert '1 unexpected: head.b5.0.weight' in message
  assert '1 mis-shaped: fuse.3.weight (16, 16, 1, 1) (model needs (16, 16, 3, 3))' in message


def test_a_dict_for_another_size_is_rejected():
  state = _numpy(torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=5))
  with pytest.raises(convert.ConversionError, match='mis-shaped'):
    convert.variables_from_torch(state, models.DeepLabV3Plus(num_classes=5, backbone='resnet50', width=16,
                                                             head_channels=16))
  with pytest.raises(convert.ConversionError, match='missing'):  # resnet101 has more blocks
    convert.variables_from_torch(state, models.DeepLabV3Plus(num_classes=5, backbone='resnet101', width=8,
                                                             head_channels=16))


def test_load_torch_file_returns_numpy_and_reports_bad_files_in_one_line(tmp_path):
  path = tmp_path / 'weights.pth'
  torch.save({'a': torch.ones(2, 3, dtype=torch.bfloat16), 'b': {'c': torch.arange(4)}, 'epoch': 2}, path)
  loaded = convert.load_torch_file(path)
  assert loaded['a'].dtype == np.float32 and loaded['a'].shape == (2, 3)
  np.testing.assert_array_equal(loaded['b']['c'], np.arange(4))
  assert loaded['epoch'] == 2

  missing = tmp_path / 'nope.pth'
  with pytest.raises(convert.ConversionError, match=f'{missing}: no such file'):
    convert.load_torch_file(missing)
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(convert.ConversionError,
                     match=f'{garbage}: not a PyTorch checkpoint .torch.load failed: Unsupported operand'):
    convert.load_torch_file(garbage)
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  with pytest.raises(convert.ConversionError, match=f'{empty}: an empty file, not a PyTorch checkpoint'):
    convert.load_torch_file(empty)
  whole = path.read_bytes()
  for name, head in (('truncated.pth', whole[:len(whole) // 2]), ('zip-header.pth', whole[:64])):
    (tmp_path / name).write_bytes(head)  # a download cut short: the zip's directory is missing
    with pytest.raises(convert.ConversionError, match=f'{name}: a damaged or truncated PyTorch checkpoint'):
      convert.load_torch_file(tmp_path / name)
  unsafe = tmp_path / 'unsafe.pth'
  torch.save({'model': _Unsafe()}, unsafe)  # an arbitrary pickled object: weights_only refuses it
  with pytest.raises(convert.ConversionError, match='holds pickled Python objects besides tensors') as error:
    convert.load_torch_file(unsafe)
  # One line, with torch's reason but without its advice to switch the safe loader off.
  assert '\n' not in str(error.value) and 'weights_only' not in str(error.value)
  assert f'GLOBAL {__name__}._Unsafe' in str(error.value)


class _Unsafe:
  pass
