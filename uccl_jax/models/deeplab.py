"""DeepLabv3+ exactly as UniMatch/UCCL build it, NHWC, Flax Linen.

Module names mirror the PyTorch state-dict names with '.' replaced by '_'
(`head/b4_gap_1` is `head.b4.gap.1`, `fuse_3` is `fuse.3`), so convert.py maps
weights by name alone. With the defaults this is the real network: 40,475,957
parameters for 21 classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uccl_jax import ops
from uccl_jax.models import resnet

# The PyTorch head's convs keep torch's default init, kaiming_uniform_(a=sqrt(5)):
# uniform with bound 1/sqrt(fan_in), i.e. variance 1/(3 fan_in).
head_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# What a rematerialised decoder (ASPP, decoder, classifier) keeps: its convolutions'
# outputs, so the backward pass recomputes only BatchNorm, ReLU, concatenations,
# resizes and the dropout masks. Measured on the UCCL Cityscapes step (docs/RESULTS.md,
# "Memory per device"): as much memory saved as recomputing everything
# (nothing_saveable), without recomputing the decoder's convolutions, which are 3x3
# at stride 4 with 256 channels and cost +14% of the step's FLOPs to redo. None leaves
# the decoder as it is (only the backbone rematerialised).
DECODER_REMAT_POLICY: Any = jax.checkpoint_policies.dots_saveable


def _torch_bias_init(fan_in: int):
  """torch Conv2d bias default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def channel_dropout(x: jax.Array, key: jax.Array, rate: float = 0.5) -> jax.Array:
  """nn.Dropout2d in training mode on NHWC: whole channels zeroed per sample, survivors / (1 - rate).

  UniMatch's feature perturbation builds a fresh nn.Dropout2d(0.5) inside
  forward, which is always in training mode, so this applies whether or not
  the rest of the network is training.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout rate must be in [0, 1), got {rate}')
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _conv_bn_relu(x: jax.Array, features: int, kernel: int, prefix: str, train: bool, dtype: Any,
                  dilation: int = 1) -> jax.Array:
  """Conv2d(bias=False) + BatchNorm2d + ReLU named `<prefix>_0` and `<prefix>_1`.

  Called inside the caller's compact method, so both layers belong to the
  caller (no wrapper module) and their names match torch's flat Sequential
  indices, e.g. `head.b1.0.weight` <-> params['head']['b1_0']['kernel'].
  """
  x = resnet.conv(features, kernel, dilation=dilation, dtype=dtype, kernel_init=head_kernel_init,
                  name=f'{prefix}_0')(x)
  return nn.relu(resnet.BatchNorm(name=f'{prefix}_1')(x, train))


class ASPP(nn.Module):
  """UniMatch's ASPPModule: 1x1, three dilated 3x3, image pooling; concat; 1x1 projection."""
  features: int = 256
  dilations: Sequence[int] = (6, 12, 18)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if len(self.dilations) != 3:
      raise ValueError(f'ASPP needs 3 dilations, got {tuple(self.dilations)}')
    branches = [_conv_bn_relu(x, self.features, 1, 'b0', train, self.dtype)]
    for index, rate in enumerate(self.dilations):
      branches.append(_conv_bn_relu(x, self.features, 3, f'b{index + 1}', train, self.dtype,
                                    dilation=rate))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.promote_types(x.dtype, jnp.float32))
    pooled = pooled.astype(x.dtype)
    # b4.gap = Sequential(AdaptiveAvgPool2d, Conv2d, BN, ReLU): indices 1 and 2.
    pooled = resnet.conv(self.features, 1, dtype=self.dtype, kernel_init=head_kernel_init,
                         name='b4_gap_1')(pooled)
    pooled = nn.relu(resnet.BatchNorm(name='b4_gap_2')(pooled, train))
    branches.append(ops.resize_bilinear_align_corners(pooled, x.shape[1:3]))
    y = jnp.concatenate(branches, axis=-1)
    return _conv_bn_relu(y, self.features, 1, 'project', train, self.dtype)


class DeepLabV3Plus(nn.Module):
  """UniMatch's DeepLabV3Plus: ResNet backbone, ASPP on c4, decoder with c1, classifier.

  Attributes:
    num_classes: classifier outputs.
    backbone: 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101'.
    width: backbone base width (64 = the real network; smaller for tests/demos).
    head_channels: ASPP/decoder width (256 = real). The c1 reduction has
      48 * head_channels / 256 channels (48 for the real network).
    stem: 'deep' (UniMatch) | 'standard' (torchvision 7x7).
    output_stride: 16 (dilated layer4) or 8 (dilated layer3 and layer4).
    dilations: the three ASPP rates.
    dtype: compute dtype; parameters, BN statistics and the returned outputs
      are float32 whatever it is.
    remat: rematerialise the backbone's stem and blocks (resnet.REMAT_POLICY:
      everything inside recomputed) and the decoder (DECODER_REMAT_POLICY:
      all but its convolutions recomputed) in the backward pass instead of
      keeping their activations. Same variables (names and shapes), outputs
      and gradients; less memory for about one more backbone forward pass.
  """
  num_classes: int
  backbone: str = 'resnet50'
  width: int = 64
  head_channels: int = 256
  stem: str = 'deep'
  output_stride: int = 16
  dilations: Sequence[int] = (6, 12, 18)
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def reduce_channels(self) -> int:
    return max(1, (48 * self.head_channels) // 256)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               feature_perturbation: bool = False) -> dict[str, jax.Array]:
    """images [B,H,W,3] normalised -> dict of float32 outputs (see docs/ARCHITECTURE.md).

    With feature_perturbation the decoder (ASPP included, as in UniMatch) runs
    once on the batch [clean; channel-dropped] of c1 and c4, so in training its
    BatchNorms see both halves; the dropout draws from the 'dropout' rng.
    """
    height, width = images.shape[1:3]
    c1, _, _, c4 = resnet.build_resnet(self.backbone, width=self.width, stem=self.stem,
                                       output_stride=self.output_stride, dtype=self.dtype,
                                       remat=self.remat, name='backbone')(images, train)
    batch = images.shape[0]
    dropout_keys = None
    if feature_perturbation:
      dropout_keys = tuple(jax.random.split(self.make_rng('dropout')))
    decode = _remat_decoder(_decode) if self.remat and DECODER_REMAT_POLICY is not None else _decode
    logits_lowres, logits, features = decode(self, c1, c4, dropout_keys, train, (height, width))
    outputs = {
        'logits': logits[:batch],
        'logits_lowres': logits_lowres[:batch],
        'features': features[:batch],
    }
    if feature_perturbation:
      outputs['logits_fp'] = logits[batch:]
    return outputs


def _decode(module: DeepLabV3Plus, c1: jax.Array, c4: jax.Array,
            dropout_keys: tuple[jax.Array, jax.Array] | None, train: bool,
            size: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ASPP, decoder and classifier of `module`: (low-res logits, logits at `size`, features).

  A function of the module rather than a submodule so that nn.remat can wrap it
  while its layers keep torch's flat names (`head`, `reduce_0`, `fuse_3`,
  `classifier`). With dropout_keys (feature perturbation) it runs on
  [clean; channel-dropped] c1 and c4; the dropout is drawn here, from keys
  passed in, so a rematerialised decoder keeps c1 and c4 (which the backbone
  keeps anyway) rather than their doubled, dropped copies. Outputs are float32
  (the losses' dtype) and cover the doubled batch.
  """
  if dropout_keys is not None:
    c1 = jnp.concatenate([c1, channel_dropout(c1, dropout_keys[0])], axis=0)
    c4 = jnp.concatenate([c4, channel_dropout(c4, dropout_keys[1])], axis=0)
  dtype = module.dtype
  x = ASPP(module.head_channels, tuple(module.dilations), dtype=dtype, name='head')(c4, train)
  x = ops.resize_bilinear_align_corners(x, c1.shape[1:3])
  low = _conv_bn_relu(c1, module.reduce_channels, 1, 'reduce', train, dtype)
  x = jnp.concatenate([low, x], axis=-1)
  x = _conv_bn_relu(x, module.head_channels, 3, 'fuse', train, dtype)
  # fuse = Sequential(conv, bn, relu, conv, bn, relu): the second pair is fuse.3 / fuse.4.
  x = resnet.conv(module.head_channels, 3, dtype=dtype, kernel_init=head_kernel_init,
                  name='fuse_3')(x)
  features = nn.relu(resnet.BatchNorm(name='fuse_4')(x, train))
  logits_lowres = resnet.conv(module.num_classes, 1, use_bias=True, dtype=dtype,
                              kernel_init=head_kernel_init,
                              bias_init=_torch_bias_init(module.head_channels),
                              name='classifier')(features)
  # Losses work in float32, so the outputs leave the network in float32.
  out_dtype = jnp.promote_types(dtype, jnp.float32)
  logits_lowres = logits_lowres.astype(out_dtype)
  logits = ops.resize_bilinear_align_corners(logits_lowres, size)
  return logits_lowres, logits, features.astype(out_dtype)


def _remat_decoder(decode: Any) -> Any:
  """`decode` under nn.remat with DECODER_REMAT_POLICY; `train` and `size` are static."""
  return nn.remat(decode, static_argnums=(4, 5), policy=DECODER_REMAT_POLICY)


def from_config(model_config: Mapping[str, Any], num_classes: int) -> DeepLabV3Plus:
  """Builds the network from `config.model` (see uccl_jax/config.py), checking every field."""
  def field(name: str) -> Any:
    try:
      return model_config[name]
    except (KeyError, AttributeError) as error:
      raise ValueError(f'config.model.{name} is missing') from error

  backbone = field('backbone')
  if backbone not in resnet.ARCHS:
    raise ValueError(f"config.model.backbone: '{backbone}' is not one of {sorted(resnet.ARCHS)}")
  stem = field('stem')
  if stem not in resnet.STEMS:
    raise ValueError(f"config.model.stem: '{stem}' is not one of {list(resnet.STEMS)}")
  output_stride = field('output_stride')
  if output_stride not in (8, 16):
    raise ValueError(f'config.model.output_stride: {output_stride} is not 8 or 16')
  dtype_name = field('dtype')
  if dtype_name not in DTYPES:
    raise ValueError(f"config.model.dtype: '{dtype_name}' is not one of {sorted(DTYPES)}")
  dilations = tuple(int(d) for d in field('dilations'))
  if len(dilations) != 3 or min(dilations) < 1:
    raise ValueError(f'config.model.dilations: {dilations} is not three positive rates')
  for name in ('width', 'head_channels'):
    if int(field(name)) < 1:
      raise ValueError(f'config.model.{name}: {field(name)} is not a positive integer')
  if num_classes < 1:
    raise ValueError(f'num_classes: {num_classes} is not a positive integer')
  # A config saved before model.remat existed (a run folder's config) reads as remat off.
  remat = model_config.get('remat', False)
  if not isinstance(remat, bool):
    raise ValueError(f'config.model.remat: {remat!r} is not True or False')
  return DeepLabV3Plus(num_classes=num_classes, backbone=backbone, width=int(field('width')),
                       head_channels=int(field('head_channels')), stem=stem,
                       output_stride=output_stride, dilations=dilations, dtype=DTYPES[dtype_name],
                       remat=remat)
