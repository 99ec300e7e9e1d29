"""Which network a PyTorch state dict describes, read from its keys and shapes alone.

Why: a .pth carries no description of its network, and the converted folder
and the error messages should say what the weights are (backbone, width,
stem, head, classes) and which config field disagrees with them, rather than
list a thousand mis-shaped keys.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np

from uccl_jax.convert.errors import ConversionError
from uccl_jax.models import resnet as resnet_lib
from uccl_jax.models.deeplab import DeepLabV3Plus

KIND_DEEPLAB = 'deeplab'  # a whole DeepLabV3Plus: backbone, ASPP head, decoder, classifier
KIND_BACKBONE = 'backbone'  # a ResNet alone (ImageNet weights)
# A classification head in ImageNet backbone files (torchvision, mmcv): not part of the segmentation network.
CLASSIFIER_PREFIX = 'fc.'


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The network a state dict describes.

  Hyper-parameters that leave no trace in the weights (output stride, ASPP
  dilations) are not part of it: they come from the config that uses them.
  """
  kind: str  # KIND_DEEPLAB | KIND_BACKBONE
  backbone: str  # resnet18 | resnet34 | resnet50 | resnet101
  width: int
  stem: str  # 'deep' | 'standard'
  head_channels: int | None = None  # KIND_DEEPLAB only
  num_classes: int | None = None  # KIND_DEEPLAB only

  def build(self) -> nn.Module:
    """The Flax module these weights fill: a DeepLabV3Plus or a bare ResNet."""
    if self.kind == KIND_DEEPLAB:
      return DeepLabV3Plus(num_classes=int(self.num_classes), backbone=self.backbone, width=self.width,
                           head_channels=int(self.head_channels), stem=self.stem)
    return resnet_lib.build_resnet(self.backbone, width=self.width, stem=self.stem)

  def describe(self) -> str:
    """'DeepLabV3Plus, resnet50 (width 64, deep stem), head 256, 21 classes' or 'backbone only: ...'."""
    text = f'{self.backbone} (width {self.width}, {self.stem} stem)'
    if self.kind == KIND_DEEPLAB:
      return f'DeepLabV3Plus, {text}, head {self.head_channels}, {self.num_classes} classes'
    return f'backbone only: {text}'

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: Mapping[str, Any], where: str) -> Architecture:
    """The architecture stored in a converted folder's JSON; ConversionError naming `where`."""
    try:
      return cls(**{field.name: value[field.name] for field in dataclasses.fields(cls)})
    except (KeyError, TypeError) as error:
      raise ConversionError(f'{where}: "architecture" is incomplete ({error})') from None


def _count_blocks(state: Mapping[str, Any], prefix: str, stage: int) -> int:
  indices = set()
  head = f'{prefix}layer{stage}.'
  for key in state:
    if key.startswith(head):
      index = key[len(head):].split('.', 1)[0]
      if index.isdigit():
        indices.add(int(index))
  return 1 + max(indices) if indices else 0


def is_whole_model(state: Mapping[str, Any]) -> bool:
  """True for a whole DeepLabV3Plus state dict (`backbone.*` keys), False for a backbone alone."""
  return any(key.startswith('backbone.') for key in state)


def detect_architecture(state: Mapping[str, Any], source: str = 'state dict') -> Architecture:
  """Which UniMatch/torchvision network `state` (from state_dict_of) is, or ConversionError.

  Only the layout is read here (stem, block type, blocks per stage, widths,
  class count); whether every tensor fits is variables_from_torch's strict check.
  """
  kind = KIND_DEEPLAB if is_whole_model(state) else KIND_BACKBONE
  prefix = 'backbone.' if kind == KIND_DEEPLAB else ''

  def shape(key: str) -> tuple[int, ...] | None:
    return tuple(np.shape(state[key])) if key in state else None

  deep, standard = shape(f'{prefix}conv1.0.weight'), shape(f'{prefix}conv1.weight')
  if deep is not None and len(deep) == 4:
    stem, width = 'deep', deep[0]
  elif standard is not None and len(standard) == 4 and standard[2:] == (7, 7):
    stem, width = 'standard', standard[0]
  else:
    sample = ', '.join(sorted(state)[:4])
    raise ConversionError(
        f'{source}: unknown architecture: no ResNet stem ({prefix}conv1.0.weight for the deep stem, '
        f'{prefix}conv1.weight 7x7 for torchvision\'s); first keys: {sample}')
  block = 'bottleneck' if f'{prefix}layer1.0.conv3.weight' in state else 'basic'
  layers = tuple(_count_blocks(state, prefix, stage) for stage in (1, 2, 3, 4))
  names = [name for name, (arch_block, arch_layers) in resnet_lib.ARCHS.items()
           if arch_block == block and tuple(arch_layers) == layers]
  if not names:
    raise ConversionError(f'{source}: unknown architecture: {block} blocks per stage {list(layers)} '
                          f'is none of {", ".join(sorted(resnet_lib.ARCHS))}')
  if kind == KIND_BACKBONE:
    return Architecture(KIND_BACKBONE, names[0], int(width), stem)
  head, classifier = shape('head.b0.0.weight'), shape('classifier.weight')
  if head is None or classifier is None or len(head) != 4 or len(classifier) != 4:
    raise ConversionError(f'{source}: unknown architecture: backbone.* keys but no UniMatch '
                          'DeepLabV3Plus head (head.b0.0.weight, classifier.weight)')
  return Architecture(KIND_DEEPLAB, names[0], int(width), stem, head_channels=int(head[0]),
                      num_classes=int(classifier[0]))


def check_architecture(architecture: Architecture, model: nn.Module, source: str) -> None:
  """Names the config.model field that disagrees with the architecture of the weights.

  Checked before the variable-by-variable comparison, whose list of
  mis-shaped keys would not say which setting to change.
  """
  if isinstance(model, DeepLabV3Plus):
    fields = {'backbone': model.backbone, 'width': model.width, 'stem': model.stem}
    if architecture.kind == KIND_DEEPLAB:
      fields['head_channels'] = model.head_channels
  else:
    fields = {'width': model.width, 'stem': model.stem}
  for name, model_value in fields.items():
    value = getattr(architecture, name)
    if model_value != value:
      raise ConversionError(f'{source} holds {architecture.describe()}; config.model.{name} is '
                            f'{model_value!r}, set it to {value!r}')
