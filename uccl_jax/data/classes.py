"""Class names and colour palettes per dataset, for the checker's statistics and coloured previews.

Cityscapes' names and colours come from cityscapesscripts (the dataset's own
label table), so they cannot drift from the official ones; the VOC colour map
is the standard bit-interleaved one the VOC devkit defines; the synthetic demo
dataset's classes are defined here because `synthetic.py` draws them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_COLOR = (255, 255, 255)  # 255 (ignored / padding) pixels in coloured masks


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """The classes of one dataset: names[i] and colors[i] belong to class index i."""
  dataset: str
  names: tuple[str, ...]
  colors: tuple[tuple[int, int, int], ...]

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def color_lookup(self) -> np.ndarray:
    """A [256, 3] uint8 table: class index -> colour (IGNORE_COLOR for 255, grey for the rest)."""
    lookup = np.full((256, 3), 128, np.uint8)
    lookup[:self.num_classes] = np.array(self.colors, np.uint8)
    lookup[255] = IGNORE_COLOR
    return lookup

  def colorize(self, mask: np.ndarray) -> np.ndarray:
    """Colours a class-index mask [H, W] as an RGB uint8 image [H, W, 3]."""
    return self.color_lookup()[np.asarray(mask, np.uint8)]


def cityscapes() -> ClassTable:
  """The 19 train-id classes of Cityscapes, ordered by train id, with the official colours."""
  from cityscapesscripts.helpers import labels as cityscapes_labels  # pylint: disable=g-import-not-at-top
  train_labels = sorted((label for label in cityscapes_labels.labels if 0 <= label.trainId < 255),
                        key=lambda label: label.trainId)
  return ClassTable('cityscapes', tuple(label.name for label in train_labels),
                    tuple(tuple(label.color) for label in train_labels))


def cityscapes_id_to_train_id() -> np.ndarray:
  """A [256] uint8 lookup from Cityscapes label ids (as in *_labelIds.png) to train ids (255 = ignored)."""
  from cityscapesscripts.helpers import labels as cityscapes_labels  # pylint: disable=g-import-not-at-top
  lookup = np.full(256, 255, np.uint8)
  for label in cityscapes_labels.labels:
    if 0 <= label.id < 256:
      lookup[label.id] = label.trainId if 0 <= label.trainId < 255 else 255
  return lookup


PASCAL_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
                'sheep', 'sofa', 'train', 'tvmonitor')


def voc_colormap(count: int = 256) -> np.ndarray:
  """The VOC devkit colour map: the bits of the index spread over the top bits of R, G and B."""
  colors = np.zeros((count, 3), np.uint8)
  for index in range(count):
    value, red, green, blue = index, 0, 0, 0
    for shift in range(7, -1, -1):
      red |= (value & 1) << shift
      green |= ((value >> 1) & 1) << shift
      blue |= ((value >> 2) & 1) << shift
      value >>= 3
    colors[index] = (red, green, blue)
  return colors


def pascal() -> ClassTable:
  """The 21 Pascal VOC classes (background first) with the VOC colour map."""
  colors = voc_colormap(len(PASCAL_NAMES))
  return ClassTable('pascal', PASCAL_NAMES, tuple(tuple(int(c) for c in color) for color in colors))


# The demo dataset's classes; synthetic.py draws them with these indices.
SYNTHETIC_NAMES = ('sky', 'ground', 'building', 'tree', 'car', 'person', 'pole')
SYNTHETIC_COLORS = ((70, 130, 180), (128, 64, 128), (70, 70, 70), (107, 142, 35), (0, 0, 142),
                    (220, 20, 60), (220, 220, 0))


def synthetic() -> ClassTable:
  """The generated demo dataset's classes (colours borrowed from the Cityscapes look-alikes)."""
  return ClassTable('synthetic', SYNTHETIC_NAMES, SYNTHETIC_COLORS)


# The source domain the demo's backbone is pretrained on (synthetic_source.py draws them).
SYNTHETIC_SOURCE_NAMES = ('backdrop', 'facade', 'foliage', 'vehicle', 'figure', 'post', 'disc', 'stripes')
SYNTHETIC_SOURCE_COLORS = ((0, 0, 0), (70, 70, 70), (107, 142, 35), (0, 0, 142), (220, 20, 60),
                           (220, 220, 0), (255, 128, 0), (0, 200, 200))


def synthetic_source() -> ClassTable:
  """The demo's pretraining source domain's classes (uccl_jax/data/synthetic_source.py)."""
  return ClassTable('synthetic_source', SYNTHETIC_SOURCE_NAMES, SYNTHETIC_SOURCE_COLORS)


_TABLES = {'cityscapes': cityscapes, 'pascal': pascal, 'synthetic': synthetic,
           'synthetic_source': synthetic_source}


def for_dataset(name: str) -> ClassTable:
  """The class table of `data.name`; ValueError naming the field for an unknown dataset."""
  if name not in _TABLES:
    raise ValueError(f'data.name: unknown dataset {name!r}; choose one of {", ".join(sorted(_TABLES))}')
  return _TABLES[name]()
