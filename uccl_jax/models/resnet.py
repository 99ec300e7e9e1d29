"""ResNet backbones laid out like UniMatch's (and torchvision's), NHWC, Flax Linen.

Module names mirror the PyTorch parameter names with '.' replaced by '_'
(`conv1_0` is `conv1.0`, `layer4_2/bn3` is `layer4.2.bn3`, `downsample_1` is
`downsample.1`), so that convert.py maps every weight by name alone.

Rematerialisation (`remat=True`, config `model.remat`): each residual block and
the stem run under `jax.checkpoint` (Flax's lifted `nn.remat`) with
REMAT_POLICY, so the backward pass keeps only their inputs and recomputes the
rest. The lifted transform keeps every module's name and scope, so the
variables are the same tree with remat on or off and checkpoints and converted
weights load into either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults, which the reference network uses everywhere.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch

# torchvision/UniMatch initialise backbone convs with kaiming_normal_(mode='fan_out', relu).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}
STEMS = ('deep', 'standard')

# What a rematerialised block or stem keeps for the backward pass besides its inputs:
# nothing, so the backward keeps one feature map per block (its input, the previous
# block's output) and recomputes the rest: one more backbone forward per trained pass.
# On the UCCL Cityscapes step, dots_saveable (keep the conv outputs, recompute BN and
# ReLU) costs no FLOPs but keeps several feature maps per block, which leaves XLA's
# estimate well above nothing_saveable's (the figures: docs/RESULTS.md section 1f,
# "The checkpoint policy").
REMAT_POLICY: Any = jax.checkpoint_policies.nothing_saveable


def remat_module(module_cls: type[nn.Module]) -> type[nn.Module]:
  """`module_cls` under nn.remat; its `__call__(self, x, train)` has `train` static.

  Instances take the same `name` and hold the same variables as the plain class.
  """
  return nn.remat(module_cls, static_argnums=(2,), policy=REMAT_POLICY)


class BatchNorm(nn.Module):
  """PyTorch BatchNorm2d semantics over all axes but the last (channels).

  Why not flax.linen.BatchNorm: PyTorch normalises with the biased batch
  variance but stores the UNBIASED one (n / (n - 1)) in running_var; converted
  checkpoints and continued training only match if we do the same. Statistics
  and the normalisation are computed in float32 whatever the input dtype (so
  bfloat16 compute keeps float32 BN); the output has the input's dtype.
  Reductions run over the batch axis of the global array, so under jit with a
  batch-sharded input this is SyncBatchNorm with no extra code.

  Variables: params `scale` (torch `weight`), `bias`; batch_stats `mean`
  (`running_mean`), `var` (`running_var`).
  """
  epsilon: float = BN_EPSILON
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64 tests
    x32 = x.astype(stats_dtype)
    if train:
      axes = tuple(range(x.ndim - 1))
      count = 1
      for axis in axes:
        count *= x.shape[axis]
      if count < 2 and not self.is_initializing():
        raise ValueError(
            f'BatchNorm {"/".join(self.scope.path)}: training needs more than 1 value per channel, '
            f'got input shape {x.shape} (PyTorch raises here too); use a larger batch')
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # biased: used to normalise
      if not self.is_initializing():
        unbiased = var * (count / (count - 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((x32 - mean) * multiplier + bias).astype(x.dtype)


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, use_bias: bool = False,
         dtype: Any = jnp.float32, kernel_init: Any = conv_kernel_init, name: str | None = None,
         **kwargs: Any) -> nn.Conv:
  """A PyTorch-style Conv2d: padding = dilation * (kernel // 2), float32 params."""
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kernel_init, name=name, **kwargs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch MaxPool2d(3, stride=2, padding=1): the padding is -inf, never a real value."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (ResNet-18/34): two 3x3 convs; dilation allowed on both."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(BatchNorm(name='bn1')(out, train))
    out = conv(self.planes, 3, dilation=self.dilation, dtype=self.dtype, name='conv2')(out)
    out = BatchNorm(name='bn2')(out, train)
    if self.downsample:
      x = conv(self.planes, 1, stride=self.stride, dtype=self.dtype, name='downsample_0')(x)
      x = BatchNorm(name='downsample_1')(x, train)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """UniMatch's / torchvision v1.5 Bottleneck: 1x1, 3x3 (stride and dilation here), 1x1 x4."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(BatchNorm(name='bn1')(out, train))
    out = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
               name='conv2')(out)
    out = nn.relu(BatchNorm(name='bn2')(out, train))
    out = conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(out)
    out = BatchNorm(name='bn3')(out, train)
    if self.downsample:
      x = conv(self.planes * 4, 1, stride=self.stride, dtype=self.dtype, name='downsample_0')(x)
      x = BatchNorm(name='downsample_1')(x, train)
    return nn.relu(out + x)


def stage_dilations(output_stride: int) -> tuple[bool, bool, bool]:
  """replace_stride_with_dilation for layer2..4, as UniMatch's configs set it."""
  if output_stride == 16:
    return (False, False, True)
  if output_stride == 8:
    return (False, True, True)
  if output_stride == 32:
    return (False, False, False)
  raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride}')


def _stem(module: 'ResNet', x: jax.Array, train: bool) -> jax.Array:
  """The stem of `module` through the max-pool; a function so that nn.remat can wrap it.

  The stem's layers sit directly in the ResNet (torch's `conv1.0`, `bn1`), not in
  a submodule of their own, so a rematerialised stem cannot be a remat'd module
  class without renaming them; Flax's function form keeps them where they are.
  """
  w = module.width
  x = x.astype(module.dtype)
  if module.stem == 'deep':
    x = conv(w, 3, stride=2, dtype=module.dtype, name='conv1_0')(x)
    x = nn.relu(BatchNorm(name='conv1_1')(x, train))
    x = conv(w, 3, dtype=module.dtype, name='conv1_3')(x)
    x = nn.relu(BatchNorm(name='conv1_4')(x, train))
    x = conv(2 * w, 3, dtype=module.dtype, name='conv1_6')(x)
  else:
    x = conv(w, 7, stride=2, dtype=module.dtype, name='conv1')(x)
  x = nn.relu(BatchNorm(name='bn1')(x, train))
  return max_pool_3x3_s2(x)


class ResNet(nn.Module):
  """ResNet returning (c1, c2, c3, c4), the outputs of layer1..layer4 (like base_forward).

  stem='deep' is UniMatch's: conv3x3(3->w, s2) BN ReLU, conv3x3(w->w) BN ReLU,
  conv3x3(w->2w), then bn1, ReLU, max-pool (w = width; 64 in the real net).
  stem='standard' is torchvision's: conv1 7x7 s2 (3->w), bn1, ReLU, max-pool.
  Stages use planes w, 2w, 4w, 8w. A stride replaced by dilation follows
  PyTorch's rule: the first block of that stage keeps the previous dilation in
  its 3x3 conv, the others use the new one.

  remat=True rematerialises the stem and every block (module docstring): same
  outputs, variables and gradients, less memory for the backward pass, one
  more forward pass of compute.
  """
  block: str = 'bottleneck'
  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  stem: str = 'deep'
  output_stride: int = 16
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    if self.block not in EXPANSION:
      raise ValueError(f"block must be one of {sorted(EXPANSION)}, got '{self.block}'")
    if self.stem not in STEMS:
      raise ValueError(f"stem must be one of {STEMS}, got '{self.stem}'")
    block_cls = BasicBlock if self.block == 'basic' else Bottleneck
    stem_fn = _stem
    if self.remat:
      block_cls = remat_module(block_cls)
      stem_fn = nn.remat(_stem, static_argnums=(2,), policy=REMAT_POLICY)
    expansion = EXPANSION[self.block]
    w = self.width
    x = stem_fn(self, x, train)
    in_channels = 2 * w if self.stem == 'deep' else w

    dilate = (False,) + stage_dilations(self.output_stride)
    dilation = 1
    outputs = []
    for stage, (num_blocks, stage_dilate) in enumerate(zip(self.layers, dilate)):
      planes = w * 2**stage
      stride = 1 if stage == 0 else 2
      previous_dilation = dilation
      if stage_dilate:
        dilation *= stride
        stride = 1
      out_channels = planes * expansion
      x = block_cls(planes, stride=stride, dilation=previous_dilation,
                    downsample=stride != 1 or in_channels != out_channels, dtype=self.dtype,
                    name=f'layer{stage + 1}_0')(x, train)
      in_channels = out_channels
      for index in range(1, num_blocks):
        x = block_cls(planes, dilation=dilation, dtype=self.dtype,
                      name=f'layer{stage + 1}_{index}')(x, train)
      outputs.append(x)
    return tuple(outputs)


def build_resnet(arch: str, *, width: int = 64, stem: str = 'deep', output_stride: int = 16,
                 dtype: Any = jnp.float32, remat: bool = False, name: str | None = None) -> ResNet:
  """ResNet by architecture name ('resnet18' | 'resnet34' | 'resnet50' | 'resnet101')."""
  if arch not in ARCHS:
    raise ValueError(f"backbone must be one of {sorted(ARCHS)}, got '{arch}'")
  block, layers = ARCHS[arch]
  return ResNet(block=block, layers=layers, width=width, stem=stem, output_stride=output_stride,
                dtype=dtype, remat=remat, name=name)


def channels(arch: str, width: int) -> tuple[int, int]:
  """(c1 channels, c4 channels) of a backbone: what the DeepLab head is sized from."""
  if arch not in ARCHS:
    raise ValueError(f"backbone must be one of {sorted(ARCHS)}, got '{arch}'")
  expansion = EXPANSION[ARCHS[arch][0]]
  return width * expansion, 8 * width * expansion
