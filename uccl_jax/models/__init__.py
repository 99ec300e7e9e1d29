"""The segmentation network: DeepLabv3+ on a ResNet backbone, laid out like UniMatch's."""

from __future__ import annotations

from uccl_jax.models.deeplab import DeepLabV3Plus, channel_dropout, from_config
from uccl_jax.models.resnet import BatchNorm, ResNet, build_resnet

__all__ = ['BatchNorm', 'DeepLabV3Plus', 'ResNet', 'channel_dropout', 'build_resnet', 'from_config']
