"""An independent PyTorch reference of UniMatch's DeepLabV3Plus, for the tests only.

Written from the PyTorch code's structure with torch.nn.functional, on a state
dict in UniMatch's key layout: `state_dict_shapes` lists the keys a network
of the given size has (built here, not taken from the JAX side), and the
forward functions read exactly those keys. BatchNorm in training mode updates
the running statistics in place, as nn.BatchNorm2d does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Arch:
  block: str = 'bottleneck'  # 'bottleneck' | 'basic'
  layers: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 8
  stem: str = 'deep'  # 'deep' | 'standard'
  output_stride: int = 16
  head_channels: int = 16
  reduce_channels: int = 3
  dilations: tuple[int, int, int] = (6, 12, 18)
  num_classes: int = 5

  @property
  def expansion(self) -> int:
    return 4 if self.block == 'bottleneck' else 1


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
  return {f'{prefix}.{name}': (channels,) for name in ('weight', 'bias', 'running_mean', 'running_var')} | {
      f'{prefix}.num_batches_tracked': ()}


def _stage_plan(arch: Arch) -> list[list[tuple[int, int, int, int, bool]]]:
  """Per stage, per block: (in_channels, planes, stride, dilation, has_downsample), PyTorch's rule."""
  dilate = {16: (False, False, True), 8: (False, True, True)}[arch.output_stride]
  inplanes = 2 * arch.width if arch.stem == 'deep' else arch.width
  current_dilation = 1
  plan = []
  for index, blocks in enumerate(arch.layers):
    planes = arch.width * 2**index
    stride = 1 if index == 0 else 2
    previous = current_dilation
    if index > 0 and dilate[index - 1]:
      current_dilation *= stride
      stride = 1
    downsample = stride != 1 or inplanes != planes * arch.expansion
    stage = [(inplanes, planes, stride, previous, downsample)]
    inplanes = planes * arch.expansion
    stage += [(inplanes, planes, 1, current_dilation, False) for _ in range(1, blocks)]
    plan.append(stage)
  return plan


def backbone_shapes(arch: Arch, prefix: str = '') -> dict[str, tuple[int, ...]]:
  """Keys and shapes of UniMatch's (stem='deep') or torchvision's (stem='standard') ResNet."""
  w = arch.width
  shapes: dict[str, tuple[int, ...]] = {}
  if arch.stem == 'deep':
    shapes[f'{prefix}conv1.0.weight'] = (w, 3, 3, 3)
    shapes |= _bn_shapes(f'{prefix}conv1.1', w)
    shapes[f'{prefix}conv1.3.weight'] = (w, w, 3, 3)
    shapes |= _bn_shapes(f'{prefix}conv1.4', w)
    shapes[f'{prefix}conv1.6.weight'] = (2 * w, w, 3, 3)
    shapes |= _bn_shapes(f'{prefix}bn1', 2 * w)
  else:
    shapes[f'{prefix}conv1.weight'] = (w, 3, 7, 7)
    shapes |= _bn_shapes(f'{prefix}bn1', w)
  for s, stage in enumerate(_stage_plan(arch)):
    for b, (inplanes, planes, _, _, downsample) in enumerate(stage):
      p = f'{prefix}layer{s + 1}.{b}'
      out = planes * arch.expansion
      if arch.block == 'bottleneck':
        shapes[f'{p}.conv1.weight'] = (planes, inplanes, 1, 1)
        shapes |= _bn_shapes(f'{p}.bn1', planes)
        shapes[f'{p}.conv2.weight'] = (planes, planes, 3, 3)
        shapes |= _bn_shapes(f'{p}.bn2', planes)
        shapes[f'{p}.conv3.weight'] = (out, planes, 1, 1)
        shapes |= _bn_shapes(f'{p}.bn3', out)
      else:
        shapes[f'{p}.conv1.weight'] = (planes, inplanes, 3, 3)
        shapes |= _bn_shapes(f'{p}.bn1', planes)
        shapes[f'{p}.conv2.weight'] = (planes, planes, 3, 3)
        shapes |= _bn_shapes(f'{p}.bn2', planes)
      if downsample:
        shapes[f'{p}.downsample.0.weight'] = (out, inplanes, 1, 1)
        shapes |= _bn_shapes(f'{p}.downsample.1', out)
  return shapes


def state_dict_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
  """Keys and shapes of UniMatch's whole DeepLabV3Plus state dict."""
  shapes = backbone_shapes(arch, prefix='backbone.')
  low = arch.width * arch.expansion
  high = 8 * arch.width * arch.expansion
  d = arch.head_channels
  shapes['head.b0.0.weight'] = (d, high, 1, 1)
  shapes |= _bn_shapes('head.b0.1', d)
  for i in (1, 2, 3):
    shapes[f'head.b{i}.0.weight'] = (d, high, 3, 3)
    shapes |= _bn_shapes(f'head.b{i}.1', d)
  shapes['head.b4.gap.1.weight'] = (d, high, 1, 1)
  shapes |= _bn_shapes('head.b4.gap.2', d)
  shapes['head.project.0.weight'] = (d, 5 * d, 1, 1)
  shapes |= _bn_shapes('head.project.1', d)
  shapes['reduce.0.weight'] = (arch.reduce_channels, low, 1, 1)
  shapes |= _bn_shapes('reduce.1', arch.reduce_channels)
  shapes['fuse.0.weight'] = (d, d + arch.reduce_channels, 3, 3)
  shapes |= _bn_shapes('fuse.1', d)
  shapes['fuse.3.weight'] = (d, d, 3, 3)
  shapes |= _bn_shapes('fuse.4', d)
  shapes['classifier.weight'] = (arch.num_classes, d, 1, 1)
  shapes['classifier.bias'] = (arch.num_classes,)
  return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
  """Random weights and running statistics (so eval-mode BN is not the identity)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in shapes.items():
    if key.endswith('num_batches_tracked'):
      value = np.array(7, np.int64)
    elif key.endswith('running_mean'):
      value = rng.normal(0.0, 0.2, shape)
    elif key.endswith('running_var'):
      value = rng.uniform(0.5, 2.0, shape)
    elif len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif key.endswith('weight'):  # BN scale
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BN / classifier bias
      value = rng.normal(0.0, 0.2, shape)
    state[key] = torch.from_numpy(np.asarray(value, np.float32 if value.dtype.kind == 'f' else value.dtype))
  return state


def _bn(x, sd, prefix, training):
  return F.batch_norm(x, sd[f'{prefix}.running_mean'], sd[f'{prefix}.running_var'], sd[f'{prefix}.weight'],
                      sd[f'{prefix}.bias'], training=training, momentum=0.1, eps=1e-5)


def _conv(x, sd, key, stride=1, dilation=1, bias=None):
  weight = sd[key]
  pad = dilation * (weight.shape[-1] // 2)
  return F.conv2d(x, weight, bias, stride=stride, padding=pad, dilation=dilation)


def resnet_forward(sd, x, arch: Arch, training: bool, prefix: str = ''):
  """Returns (c1, c2, c3, c4) for NCHW input x."""
  if arch.stem == 'deep':
    x = F.relu(_bn(_conv(x, sd, f'{prefix}conv1.0.weight', stride=2), sd, f'{prefix}conv1.1', training))
    x = F.relu(_bn(_conv(x, sd, f'{prefix}conv1.3.weight'), sd, f'{prefix}conv1.4', training))
    x = _conv(x, sd, f'{prefix}conv1.6.weight')
  else:
    x = _conv(x, sd, f'{prefix}conv1.weight', stride=2)
  x = F.relu(_bn(x, sd, f'{prefix}bn1', training))
  x = F.max_pool2d(x, 3, stride=2, padding=1)
  outputs = []
  for s, stage in enumerate(_stage_plan(arch)):
    for b, (_, _, stride, dilation, downsample) in enumerate(stage):
      p = f'{prefix}layer{s + 1}.{b}'
      identity = x
      if arch.block == 'bottleneck':
        out = F.relu(_bn(_conv(x, sd, f'{p}.conv1.weight'), sd, f'{p}.bn1', training))
        out = F.relu(_bn(_conv(out, sd, f'{p}.conv2.weight', stride, dilation), sd, f'{p}.bn2', training))
        out = _bn(_conv(out, sd, f'{p}.conv3.weight'), sd, f'{p}.bn3', training)
      else:
        out = F.relu(_bn(_conv(x, sd, f'{p}.conv1.weight', stride, dilation), sd, f'{p}.bn1', training))
        out = _bn(_conv(out, sd, f'{p}.conv2.weight', 1, dilation), sd, f'{p}.bn2', training)
      if downsample:
        identity = _bn(_conv(x, sd, f'{p}.downsample.0.weight', stride), sd, f'{p}.downsample.1', training)
      x = F.relu(out + identity)
    outputs.append(x)
  return tuple(outputs)


def _cbr(x, sd, prefix, training, dilation=1):
  return F.relu(_bn(_conv(x, sd, f'{prefix}.0.weight', dilation=dilation), sd, f'{prefix}.1', training))


def decode(sd, c1, c4, arch: Arch, training: bool):
  """UniMatch's _decode: returns (low-resolution logits, decoder features)."""
  h, w = c4.shape[-2:]
  branches = [_cbr(c4, sd, 'head.b0', training)]
  for i, rate in enumerate(arch.dilations):
    branches.append(_cbr(c4, sd, f'head.b{i + 1}', training, dilation=rate))
  pool = F.adaptive_avg_pool2d(c4, 1)
  pool = F.relu(_bn(_conv(pool, sd, 'head.b4.gap.1.weight'), sd, 'head.b4.gap.2', training))
  branches.append(F.interpolate(pool, (h, w), mode='bilinear', align_corners=True))
  x = _cbr(torch.cat(branches, 1), sd, 'head.project', training)
  x = F.interpolate(x, size=c1.shape[-2:], mode='bilinear', align_corners=True)
  low = _cbr(c1, sd, 'reduce', training)
  x = torch.cat([low, x], 1)
  x = _cbr(x, sd, 'fuse', training)
  features = F.relu(_bn(_conv(x, sd, 'fuse.3.weight'), sd, 'fuse.4', training))
  logits = _conv(features, sd, 'classifier.weight', bias=sd['classifier.bias'])
  return logits, features


def deeplab_forward(sd, images_nhwc: np.ndarray, arch: Arch, training: bool = False) -> dict[str, np.ndarray]:
  """The whole network on NHWC NumPy images; returns NHWC NumPy outputs like the JAX model."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    c1, _, _, c4 = resnet_forward(sd, x, arch, training, prefix='backbone.')
    logits_lowres, features = decode(sd, c1, c4, arch, training)
    logits = F.interpolate(logits_lowres, size=x.shape[-2:], mode='bilinear', align_corners=True)
  to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return {'logits': to_nhwc(logits), 'logits_lowres': to_nhwc(logits_lowres), 'features': to_nhwc(features)}


def backbone_forward(sd, images_nhwc: np.ndarray, arch: Arch, training: bool = False,
                     prefix: str = '') -> tuple[np.ndarray, ...]:
  """(c1, c2, c3, c4) as NHWC NumPy arrays."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    outputs = resnet_forward(sd, x, arch, training, prefix=prefix)
  return tuple(t.numpy().transpose(0, 2, 3, 1) for t in outputs)


def relative_error(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))
