"""Small dataset trees on disk, in the Cityscapes and Pascal VOC layouts, for the data tests.

Tests of the sources, the checker and the pipeline all need real files in the
real folder layouts with UniMatch-format split files; these generators write
them (a few tiny PNG/JPEG files) so no test depends on a downloaded dataset.
The API is shared with the pipeline tests: keep it stable.

`make_cityscapes_tree(tmp_path, ...)` and `make_pascal_tree(tmp_path, ...)`
return a dict with
  'root':      Path of the dataset root,
  'labeled':   Path of the labeled split file (UniMatch format),
  'unlabeled': Path of the unlabeled split file,
  'val':       Path of the val split file,
  'train_lines', 'val_lines': the (image, mask) relative paths written,
  'num_classes': the dataset's class count.
`data_config(tree, name, **data_overrides)` turns a tree into a config.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
from PIL import Image

# Cityscapes label ids that map to train ids 0..18 (road, sidewalk, building, ...)
# and some that map to 255 (unlabeled, ego vehicle, parking, caravan).
_CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_CITYSCAPES_IGNORED_LABEL_IDS = (0, 1, 9, 29)


def _blocky_mask(rng: np.random.Generator, size: tuple[int, int], values: np.ndarray) -> np.ndarray:
  """A mask of rectangles of random values (a few classes per image, like real scenes)."""
  height, width = size
  mask = np.full((height, width), values[rng.integers(len(values))], np.uint8)
  for _ in range(4):
    top, left = rng.integers(0, height), rng.integers(0, width)
    bottom = min(height, top + rng.integers(1, height // 2 + 2))
    right = min(width, left + rng.integers(1, width // 2 + 2))
    mask[top:bottom, left:right] = values[rng.integers(len(values))]
  return mask


def _image_for(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
  """An RGB image whose colour follows the mask (plus noise), so crops can be checked by eye."""
  palette = rng.integers(0, 256, size=(256, 3))
  image = palette[mask].astype(np.int32) + rng.integers(-20, 21, size=mask.shape + (3,))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_split_file(path: pathlib.Path, lines: list[tuple[str, str]], *, messy: bool = False) -> pathlib.Path:
  """Writes a UniMatch split file; `messy` adds blank lines, trailing spaces, a comment and CRLF ends."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if not messy:
    path.write_text(''.join(f'{image} {mask}\n' for image, mask in lines))
    return path
  body = ['# written by tests/data_fixtures.py', '']
  for index, (image, mask) in enumerate(lines):
    body.append(f'{image}  {mask}   ' if index % 2 else f'{image} {mask}')
    if index % 3 == 0:
      body.append('   ')
  path.write_bytes(('\r\n'.join(body) + '\r\n\r\n').encode())
  return path


def _tree(root: pathlib.Path, splits: pathlib.Path, train_lines: list[tuple[str, str]],
          val_lines: list[tuple[str, str]], *, num_labeled: int, messy: bool,
          num_classes: int) -> dict[str, Any]:
  """Writes the labeled / unlabeled / val split files and describes the tree."""
  return {
      'root': root,
      'labeled': write_split_file(splits / 'labeled.txt', train_lines[:num_labeled], messy=messy),
      'unlabeled': write_split_file(splits / 'unlabeled.txt', train_lines[num_labeled:], messy=messy),
      'val': write_split_file(splits / 'val.txt', val_lines, messy=messy),
      'train_lines': train_lines,
      'val_lines': val_lines,
      'num_classes': num_classes,
  }


def make_cityscapes_tree(tmp_path: pathlib.Path | str, *, n_train: int = 6, n_val: int = 2,
                         size: tuple[int, int] = (32, 64), num_labeled: int = 2, label_files: str = 'train_ids',
                         messy: bool = False, seed: int = 0) -> dict[str, Any]:
  """Writes a Cityscapes-layout tree with `n_train` train and `n_val` val images of `size` (h, w).

  label_files: 'train_ids' writes `*_gtFine_labelTrainIds.png` (values 0..18 and 255);
    'label_ids' writes only `*_gtFine_labelIds.png` (raw Cityscapes ids), while the split
    files still name the labelTrainIds files, as UniMatch's lists do; 'both' writes both,
    consistent with each other.
  Train images are spread over two cities; the first `num_labeled` go to the labeled split,
  the rest to the unlabeled one.
  """
  if label_files not in ('train_ids', 'label_ids', 'both'):
    raise ValueError(f'label_files must be train_ids, label_ids or both, not {label_files!r}')
  rng = np.random.default_rng(seed)
  root = pathlib.Path(tmp_path) / 'cityscapes'
  id_values = np.array(_CITYSCAPES_TRAIN_LABEL_IDS + _CITYSCAPES_IGNORED_LABEL_IDS, np.uint8)
  lookup = np.full(256, 255, np.uint8)
  lookup[list(_CITYSCAPES_TRAIN_LABEL_IDS)] = np.arange(19)

  def write(split: str, count: int) -> list[tuple[str, str]]:
    lines = []
    for index in range(count):
      city = ('aachen', 'bremen')[index % 2] if split == 'train' else 'frankfurt'
      stem = f'{city}_{index:06d}_000019'
      image_rel = f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'
      mask_rel = f'gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png'
      label_ids = _blocky_mask(rng, size, id_values)
      train_ids = lookup[label_ids]
      (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
      (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(_image_for(rng, label_ids)).save(root / image_rel)
      if label_files in ('train_ids', 'both'):
        Image.fromarray(train_ids).save(root / mask_rel)
      if label_files in ('label_ids', 'both'):
        Image.fromarray(label_ids).save(root / mask_rel.replace('_labelTrainIds.png', '_labelIds.png'))
      lines.append((image_rel, mask_rel))
    return lines

  train_lines = write('train', n_train)
  val_lines = write('val', n_val)
  return _tree(root, pathlib.Path(tmp_path) / 'splits' / 'cityscapes', train_lines, val_lines,
               num_labeled=num_labeled, messy=messy, num_classes=19)


def voc_palette() -> list[int]:
  """The standard VOC colour map as a flat PIL palette (written here independently of classes.py)."""
  palette = []
  for index in range(256):
    red = green = blue = 0
    value = index
    for bit in range(8):
      red |= ((value >> 0) & 1) << (7 - bit)
      green |= ((value >> 1) & 1) << (7 - bit)
      blue |= ((value >> 2) & 1) << (7 - bit)
      value >>= 3
    palette += [red, green, blue]
  return palette


def make_pascal_tree(tmp_path: pathlib.Path | str, *, n_train: int = 6, n_val: int = 2,
                     size: tuple[int, int] = (40, 48), num_labeled: int = 2, messy: bool = False,
                     seed: int = 0) -> dict[str, Any]:
  """Writes a VOC-layout tree: JPEGImages/*.jpg and palette PNGs SegmentationClass/*.png.

  Masks hold class indices 0..20 and 255 (the border class), stored as palette PNGs with
  the VOC colour map, as the dataset ships them. Val images get a second size (h+8, w-8)
  since VOC images differ in size.
  """
  rng = np.random.default_rng(seed)
  root = pathlib.Path(tmp_path) / 'pascal'
  (root / 'JPEGImages').mkdir(parents=True, exist_ok=True)
  (root / 'SegmentationClass').mkdir(parents=True, exist_ok=True)
  values = np.array(list(range(21)) + [255], np.uint8)
  palette = voc_palette()

  def write(prefix: str, count: int, image_size: tuple[int, int]) -> list[tuple[str, str]]:
    lines = []
    for index in range(count):
      stem = f'{prefix}_{index:06d}'
      mask = _blocky_mask(rng, image_size, values)
      Image.fromarray(_image_for(rng, mask)).save(root / 'JPEGImages' / f'{stem}.jpg', quality=95)
      mask_image = Image.frombytes('P', (mask.shape[1], mask.shape[0]), mask.tobytes())
      mask_image.putpalette(palette)
      mask_image.save(root / 'SegmentationClass' / f'{stem}.png')
      lines.append((f'JPEGImages/{stem}.jpg', f'SegmentationClass/{stem}.png'))
    return lines

  train_lines = write('2007', n_train, size)
  val_lines = write('2011', n_val, (size[0] + 8, size[1] - 8))
  return _tree(root, pathlib.Path(tmp_path) / 'splits' / 'pascal', train_lines, val_lines,
               num_labeled=num_labeled, messy=messy, num_classes=21)


def data_config(tree: dict[str, Any], name: str, **data_overrides: Any):
  """A base config whose data section points at `tree` (absolute split paths)."""
  from uccl_jax.config import base_config  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.data.name = name
  config.data.source = 'folder'
  config.data.root = str(tree['root'])
  config.data.labeled_split = str(tree['labeled'])
  config.data.unlabeled_split = str(tree['unlabeled'])
  config.data.val_split = str(tree['val'])
  config.data.num_classes = tree['num_classes']
  config.data.workers = 0
  for key, value in data_overrides.items():
    config.data[key] = value
  return config
