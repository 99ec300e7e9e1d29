"""Random-access record sources: folder datasets named by UniMatch split files, and TFDS Cityscapes.

A source is what grain's `RandomAccessDataSource` protocol asks for (`__len__`,
`__getitem__`, picklable for worker processes), so grain can shuffle, shard
and checkpoint by index. Records are

  {'image': uint8 [H, W, 3], 'mask': uint8 [H, W] (class indices, 255 ignored), 'name': str}

with no 'mask' for unlabeled images: training never reads unlabeled labels,
although UniMatch's unlabeled lists name them.

Every problem with the data raises `DataError` with one line naming the file
and the split-file line that named it, so a bad image found in hour five of a
run says which file to fix instead of ending in a bare traceback.

Split paths in the config are used as given when absolute, else relative to
the current directory when that file exists, else relative to `data.root`
(so both `--config.data.labeled_split=splits/x.txt` run from the repository
and UniMatch's `splits/...` copied into the dataset root work).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
from typing import Any, Sequence

import numpy as np
from PIL import Image

from uccl_jax.data import classes
from uccl_jax.data.errors import DataError  # re-exported: sources.DataError is the public name

SPLITS = ('labeled', 'unlabeled', 'val')
IGNORE_LABEL = 255
_TRAIN_IDS_SUFFIX = '_labelTrainIds.png'
_LABEL_IDS_SUFFIX = '_labelIds.png'
_CITYSCAPES_LAYOUT = ('cityscapes', 'synthetic')  # data.name values that use the Cityscapes folders


@dataclasses.dataclass(frozen=True)
class SplitLine:
  """One record of a split file: paths relative to the data root, and where it was written."""
  image: str
  mask: str | None  # None when the line names only an image (unlabeled lists may)
  line: int  # 1-based line number in the split file (0 for lists built from the layout)


def read_split_file(path: str | os.PathLike[str]) -> list[SplitLine]:
  """Parses a UniMatch split file: one 'image_path [mask_path]' per line.

  Blank lines, surrounding spaces, Windows line ends and '#' comments are
  accepted, since lists are often edited by hand; a line with more than two
  fields, or a file without any record, is a DataError naming file and line.
  """
  path = pathlib.Path(path)
  try:
    text = path.read_bytes().decode('utf-8')
  except FileNotFoundError:
    raise DataError(f'{path}: split file not found') from None
  except (OSError, UnicodeDecodeError) as error:
    raise DataError(f'{path}: cannot read split file ({error})') from None
  entries = []
  for number, raw_line in enumerate(text.splitlines(), start=1):
    content = raw_line.split('#', 1)[0].strip()
    if not content:
      continue
    fields = content.split()
    if len(fields) > 2:
      raise DataError(f'{path}:{number}: expected "image_path [mask_path]", found {len(fields)} fields')
    entries.append(SplitLine(fields[0], fields[1] if len(fields) == 2 else None, number))
  if not entries:
    raise DataError(f'{path}: split file lists no images')
  return entries


def _where(split_file: str | None, line: int) -> str:
  """' (named in FILE:LINE)' for messages, or '' when the record was not read from a file."""
  if not split_file:
    return ''
  return f' (named in {split_file}:{line})' if line else f' (listed in {split_file})'


def record_name(image_path: str) -> str:
  """The record's name: the image file's stem without Cityscapes' '_leftImg8bit' (= the TFDS image_id)."""
  stem = pathlib.PurePosixPath(image_path.replace('\\', '/')).stem
  return stem[:-len('_leftImg8bit')] if stem.endswith('_leftImg8bit') else stem


def decode_image(path: pathlib.Path, where: str = '') -> np.ndarray:
  """Reads an image file as uint8 RGB [H, W, 3]; DataError when missing or undecodable.

  An RGB file is not converted: PIL's convert('RGB') of an RGB image is a full
  copy (~20% of a Cityscapes PNG's decode time).
  """
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image if image.mode == 'RGB' else image.convert('RGB'))
  except FileNotFoundError:
    raise DataError(f'{path}: image file not found{where}') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise DataError(f'{path}: cannot decode image ({error}){where}') from None


def decode_mask(path: pathlib.Path, where: str = '') -> np.ndarray:
  """Reads a class-index mask as uint8 [H, W].

  Palette PNGs (VOC) give their indices, never their colours; 8-bit grayscale
  PNGs (Cityscapes) give their values. A colour (RGB) mask would give wrong
  classes, so it is an error rather than a silent conversion.
  """
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode not in ('P', 'L'):
        raise DataError(f'{path}: mask has image mode {image.mode}; expected class indices '
                        f'(palette or 8-bit grayscale PNG){where}')
      return np.asarray(image)
  except FileNotFoundError:
    raise DataError(f'{path}: mask file not found{where}') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise DataError(f'{path}: cannot decode mask ({error}){where}') from None


def check_mask_values(mask: np.ndarray, num_classes: int, path: pathlib.Path | str, where: str = '') -> None:
  """DataError unless every value lies in {0..num_classes-1, 255}."""
  if int(mask.max(initial=0)) < num_classes:
    return
  bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_LABEL)])
  if bad.size:
    shown = ', '.join(str(int(value)) for value in bad[:8])
    raise DataError(f'{path}: mask values {shown} outside 0..{num_classes - 1} and 255{where}')


class FolderSource:
  """Records of a dataset on disk, in the order of a split list (grain RandomAccessDataSource).

  For Cityscapes, a listed `*_labelTrainIds.png` that does not exist is read
  from the `*_labelIds.png` beside it, mapped to train ids with the label table
  of cityscapesscripts, so a dataset without the generated train-id files
  (cityscapesscripts' `csCreateTrainIdLabelImgs`) still works.
  """

  def __init__(self, root: str | os.PathLike[str], entries: Sequence[SplitLine], *, num_classes: int,
               read_masks: bool, split_file: str | None = None, map_label_ids: bool = False):
    self.root = pathlib.Path(root)
    self.entries = list(entries)
    self.num_classes = num_classes
    self.read_masks = read_masks
    self.split_file = split_file
    self._id_to_train_id = classes.cityscapes_id_to_train_id() if map_label_ids else None
    if read_masks:
      for entry in self.entries:
        if entry.mask is None:
          raise DataError(f'{split_file}:{entry.line}: a labeled list needs "image_path mask_path", '
                          'found only an image path')

  def __len__(self) -> int:
    return len(self.entries)

  def __repr__(self) -> str:
    return (f'FolderSource({len(self)} records, root={str(self.root)!r}, split_file={self.split_file!r}, '
            f'masks={self.read_masks})')

  def where(self, index: int) -> str:
    """' (named in split_file:line)' for the record at `index`."""
    return _where(self.split_file, self.entries[index].line)

  def mask_file(self, index: int) -> tuple[pathlib.Path, bool]:
    """The mask file to read for record `index`, and whether its label ids need mapping to train ids."""
    listed = self.root / self.entries[index].mask
    if self._id_to_train_id is not None and listed.name.endswith(_TRAIN_IDS_SUFFIX) and not listed.exists():
      label_ids = listed.with_name(listed.name[:-len(_TRAIN_IDS_SUFFIX)] + _LABEL_IDS_SUFFIX)
      if label_ids.exists():
        return label_ids, True
    return listed, False

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    entry = self.entries[index]
    where = self.where(index)
    image_path = self.root / entry.image
    record = {'image': decode_image(image_path, where), 'name': record_name(entry.image)}
    if self.read_masks:
      mask_path, needs_mapping = self.mask_file(index)
      mask = decode_mask(mask_path, where)
      if mask.shape != record['image'].shape[:2]:
        raise DataError(f'{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size '
                        f'{record["image"].shape[1]}x{record["image"].shape[0]} of {image_path}{where}')
      if needs_mapping:
        mask = self._id_to_train_id[mask]
      check_mask_values(mask, self.num_classes, mask_path, where)
      record['mask'] = mask
    return record


class _Listings:
  """Which files exist, from one directory listing per folder (os.scandir), cached.

  Checking a Cityscapes run's ~3,500 list lines this way takes a few dozen
  listings instead of thousands of stat calls.
  """

  def __init__(self):
    self._names: dict[str, frozenset[str] | None] = {}

  def exists(self, path: pathlib.Path) -> bool:
    folder, name = os.path.split(os.path.normpath(path))
    if folder not in self._names:
      try:
        with os.scandir(folder or '.') as entries:
          self._names[folder] = frozenset(entry.name for entry in entries)
      except (FileNotFoundError, NotADirectoryError):
        self._names[folder] = frozenset()
      except OSError:  # unreadable folder: ask about each file instead
        self._names[folder] = None
    names = self._names[folder]
    return os.path.exists(path) if names is None else name in names


def missing_files(source: Any, listings: _Listings | None = None) -> list[str]:
  """One line per image or mask that a FolderSource's list names and that does not exist.

  Each line is what reading the record would raise ('PATH: image file not
  found (named in SPLIT_FILE:LINE)'). Masks are checked only where the source
  reads them (not for unlabeled lists); Cityscapes' `*_labelIds.png` stands in
  for a missing `*_labelTrainIds.png` as when reading. Other sources (TFDS)
  have no files: [].
  """
  if not isinstance(source, FolderSource):
    return []
  listings = listings or _Listings()
  missing = []
  for index, entry in enumerate(source.entries):
    where = _where(source.split_file, entry.line)
    image = source.root / entry.image
    if not listings.exists(image):
      missing.append(f'{image}: image file not found{where}')
    if source.read_masks:
      mask = source.root / entry.mask
      if listings.exists(mask):
        continue
      if source._id_to_train_id is not None and mask.name.endswith(_TRAIN_IDS_SUFFIX):  # pylint: disable=protected-access
        label_ids = mask.with_name(mask.name[:-len(_TRAIN_IDS_SUFFIX)] + _LABEL_IDS_SUFFIX)
        if listings.exists(label_ids):
          continue
      missing.append(f'{mask}: mask file not found{where}')
  return missing


def check_files_exist(sources: Sequence[Any], shown: int = 3) -> None:
  """DataError naming the first missing files (with split file and line) of `sources`.

  Existence only, no decoding: cheap enough to run before every training run.
  None entries (no unlabeled list) are skipped.
  """
  listings = _Listings()
  missing = [line for source in sources if source is not None
             for line in missing_files(source, listings)]
  if missing:
    more = f' (and {len(missing) - shown} more)' if len(missing) > shown else ''
    raise DataError(f'{len(missing)} files named in the data lists are missing: '
                    f'{"; ".join(missing[:shown])}{more}')


class TfdsSource:
  """Records from `tfds.data_source` Cityscapes (a `tfds build`-prepared copy), label ids mapped to train ids.

  Reads with NumPy decoding only (no TensorFlow). `indices` picks the records
  of this split (e.g. the labeled subset chosen by image id).
  """

  def __init__(self, data_source: Sequence[dict[str, Any]], indices: Sequence[int] | None, *, read_masks: bool,
               description: str, num_classes: int = 19):
    self.data_source = data_source
    self.indices = np.arange(len(data_source)) if indices is None else np.asarray(indices, np.int64)
    self.read_masks = read_masks
    self.description = description
    self.num_classes = num_classes
    self._id_to_train_id = classes.cityscapes_id_to_train_id()

  def __len__(self) -> int:
    return len(self.indices)

  def __repr__(self) -> str:
    return f'TfdsSource({len(self)} records of {self.description}, masks={self.read_masks})'

  def where(self, index: int) -> str:
    return f' (record {int(self.indices[index])} of {self.description})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    position = int(self.indices[int(index)])
    try:
      example = self.data_source[position]
    except Exception as error:  # pylint: disable=broad-except  (any reader failure becomes one line)
      raise DataError(f'{self.description}: cannot read record {position} ({type(error).__name__}: {error})') from None
    image = np.asarray(example['image_left'], np.uint8)
    name = example['image_id']
    record = {'image': image, 'name': name.decode() if isinstance(name, bytes) else str(name)}
    if self.read_masks:
      mask = np.asarray(example['segmentation_label'], np.uint8)
      if mask.ndim == 3:
        mask = mask[..., 0]
      if mask.shape != image.shape[:2]:
        raise DataError(f'{self.description}: record {position} ({record["name"]}): mask size differs from image size')
      record['mask'] = self._id_to_train_id[mask]
    return record


# ----------------------------------------------------------------------------------------------
# Building the sources from the config.


def resolve_split_path(split_path: str, root: str | os.PathLike[str]) -> pathlib.Path:
  """Absolute as given; relative: the current directory when the file exists there, else data.root."""
  path = pathlib.Path(split_path).expanduser()
  if path.is_absolute() or path.exists():
    return path
  return pathlib.Path(root).expanduser() / path


def _layout_train_list(name: str, root: pathlib.Path, val_entries: Sequence[SplitLine] | None) -> list[SplitLine]:
  """The full train list of a dataset folder, from its layout (sorted, so a seed draws the same subset)."""
  if name in _CITYSCAPES_LAYOUT:
    images = sorted((root / 'leftImg8bit' / 'train').glob('*/*_leftImg8bit.png'))
    lines = []
    for image in images:
      city, stem = image.parent.name, image.name[:-len('_leftImg8bit.png')]
      lines.append(SplitLine(f'leftImg8bit/train/{city}/{image.name}',
                             f'gtFine/train/{city}/{stem}_gtFine{_TRAIN_IDS_SUFFIX}', 0))
  else:
    excluded = {record_name(entry.image) for entry in val_entries or ()}
    lines = [SplitLine(f'JPEGImages/{mask.stem}.jpg', f'SegmentationClass/{mask.name}', 0)
             for mask in sorted((root / 'SegmentationClass').glob('*.png'))
             if mask.stem not in excluded and (root / 'JPEGImages' / f'{mask.stem}.jpg').exists()]
  if not lines:
    where = 'leftImg8bit/train/<city>/*_leftImg8bit.png' if name in _CITYSCAPES_LAYOUT else 'SegmentationClass/*.png'
    raise DataError(f'{root}: no training images found ({where}); set data.labeled_split and data.unlabeled_split')
  return lines


def _layout_val_list(name: str, root: pathlib.Path) -> list[SplitLine]:
  """The val list from the layout: Cityscapes' leftImg8bit/val, VOC's ImageSets/Segmentation/val.txt."""
  if name in _CITYSCAPES_LAYOUT:
    lines = [SplitLine(f'leftImg8bit/val/{image.parent.name}/{image.name}',
                       f'gtFine/val/{image.parent.name}/{image.name[:-len("_leftImg8bit.png")]}_gtFine{_TRAIN_IDS_SUFFIX}', 0)
             for image in sorted((root / 'leftImg8bit' / 'val').glob('*/*_leftImg8bit.png'))]
  else:
    voc_list = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    lines = [SplitLine(f'JPEGImages/{entry.image}.jpg', f'SegmentationClass/{entry.image}.png', entry.line)
             for entry in read_split_file(voc_list)] if voc_list.exists() else []
  if not lines:
    raise DataError(f'{root}: no validation images found in the layout; set data.val_split')
  return lines


def _draw_labeled(count: int, config_data: Any) -> int:
  """How many labeled images to draw from `count`, from data.num_labeled or data.labeled_fraction."""
  if config_data.num_labeled > 0:
    if config_data.num_labeled > count:
      raise DataError(f'data.num_labeled: {config_data.num_labeled} labeled images asked for, '
                      f'but the train list has only {count}')
    return int(config_data.num_labeled)
  if 0.0 < config_data.labeled_fraction <= 1.0:
    return max(1, int(round(config_data.labeled_fraction * count)))
  raise DataError('data.labeled_split is empty: give a split file, or data.num_labeled > 0, '
                  'or data.labeled_fraction in (0, 1]')


def draw_split(lines: Sequence[SplitLine], num_labeled: int, seed: int) -> tuple[list[SplitLine], list[SplitLine]]:
  """Splits a train list into (labeled, unlabeled) with a seeded draw; order within each kept."""
  chosen = set(np.random.default_rng(seed).permutation(len(lines))[:num_labeled].tolist())
  labeled = [line for index, line in enumerate(lines) if index in chosen]
  unlabeled = [line for index, line in enumerate(lines) if index not in chosen]
  return labeled, unlabeled


def write_split_file(path: pathlib.Path, lines: Sequence[SplitLine]) -> pathlib.Path:
  """Writes a UniMatch-format list atomically; an existing file with other content is kept (DataError)."""
  text = ''.join(f'{line.image} {line.mask}\n' if line.mask else f'{line.image}\n' for line in lines)
  if path.exists():
    if path.read_text() == text:
      return path
    raise DataError(f'{path}: exists with a different list (dataset, data.num_labeled or data.split_seed '
                    'changed?); move it away, or pass it as data.labeled_split/unlabeled_split')
  path.parent.mkdir(parents=True, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  with os.fdopen(descriptor, 'w') as file:
    file.write(text)
  os.replace(temporary, path)
  return path


def _generated_split(split: str, lines: list[SplitLine], config_data: Any,
                     workdir: str | os.PathLike[str] | None) -> tuple[list[SplitLine], str]:
  """The labeled or unlabeled part of a seeded draw; both lists are written to <workdir>/splits/."""
  labeled, unlabeled = draw_split(lines, _draw_labeled(len(lines), config_data), config_data.split_seed)
  chosen = labeled if split == 'labeled' else unlabeled
  if workdir is None:
    logging.warning('No %s split file: drew %d labeled of %d images with data.split_seed=%d '
                    '(not saved: no workdir).', split, len(labeled), len(lines), config_data.split_seed)
    return chosen, f'<{split} list drawn with data.split_seed={config_data.split_seed}>'
  split_dir = pathlib.Path(workdir) / 'splits'
  labeled_file = write_split_file(split_dir / 'labeled.txt', labeled)
  unlabeled_file = write_split_file(split_dir / 'unlabeled.txt', unlabeled)
  logging.info('No split files given: drew %d labeled of %d images with data.split_seed=%d; lists written to '
               '%s and %s (pass them as data.labeled_split/unlabeled_split to repeat the run).',
               len(labeled), len(lines), config_data.split_seed, labeled_file, unlabeled_file)
  return chosen, str(labeled_file if split == 'labeled' else unlabeled_file)


def dataset_root(config: Any) -> pathlib.Path:
  """data.root, or for the generated datasets (demo, source domain) with an empty root their cache folder."""
  data = config.data
  if not data.root:
    if data.name == 'synthetic':
      from uccl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
      return synthetic.ensure_dataset(seed=data.synthetic_seed)
    if data.name == 'synthetic_source':
      from uccl_jax.data import synthetic_source  # pylint: disable=g-import-not-at-top
      return synthetic_source.ensure_dataset(seed=data.synthetic_seed)
    raise DataError('data.root is empty: set it to the dataset folder')
  root = pathlib.Path(data.root).expanduser()
  if not root.is_dir():
    raise DataError(f'data.root: dataset folder {root} does not exist')
  return root


def split_entries(config: Any, split: str,
                  workdir: str | os.PathLike[str] | None = None) -> tuple[pathlib.Path, list[SplitLine], str]:
  """(root, entries, split-file description) of a folder dataset split, by the rules in the module doc."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, not {split!r}')
  data = config.data
  root = dataset_root(config)
  split_field = getattr(data, f'{split}_split')
  if split_field:
    path = resolve_split_path(split_field, root)
    if not path.exists():
      raise DataError(f'data.{split}_split: split file {split_field} not found '
                      f'(looked in the current directory and in data.root {root})')
    return root, read_split_file(path), str(path)
  if split == 'val':
    return root, _layout_val_list(data.name, root), f'<val images found under {root}>'
  val_entries = None
  if data.name not in _CITYSCAPES_LAYOUT:
    val_entries = (read_split_file(resolve_split_path(data.val_split, root)) if data.val_split
                   else _layout_val_list(data.name, root))
  lines = _layout_train_list(data.name, root, val_entries)
  if split == 'unlabeled' and data.labeled_split:
    labeled_names = {record_name(entry.image) for entry in read_split_file(resolve_split_path(data.labeled_split, root))}
    rest = [line for line in lines if record_name(line.image) not in labeled_names]
    if not rest:
      raise DataError('data.unlabeled_split is empty and every train image is in data.labeled_split')
    return root, rest, f'<train images under {root} not in data.labeled_split>'
  chosen, description = _generated_split(split, lines, data, workdir)
  return root, chosen, description


def _num_classes(config: Any) -> int:
  return int(config.data.num_classes)


def make_source(config: Any, split: str, workdir: str | os.PathLike[str] | None = None):
  """The record source of `split` ('labeled', 'unlabeled', 'val') that the config describes.

  Labeled and val records carry masks; unlabeled records carry only the image.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, not {split!r}')
  if config.data.source == 'tfds':
    return make_tfds_source(config, split, workdir)
  if config.data.source != 'folder':
    raise DataError(f'data.source: unknown source {config.data.source!r}; choose folder or tfds')
  root, entries, description = split_entries(config, split, workdir)
  return FolderSource(root, entries, num_classes=_num_classes(config), read_masks=split != 'unlabeled',
                      split_file=description, map_label_ids=config.data.name == 'cityscapes')


# ----------------------------------------------------------------------------------------------
# TFDS.


def _open_tfds(config: Any, tfds_split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only with data.source=tfds)
  data_dir = config.data.tfds_data_dir or None
  try:
    return tfds.data_source(config.data.tfds_name, split=tfds_split, data_dir=data_dir)
  except Exception as error:  # pylint: disable=broad-except  (tfds raises many kinds; one line for the user)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise DataError(f'data.tfds_name: cannot open {config.data.tfds_name} split {tfds_split} '
                    f'(data.tfds_data_dir={config.data.tfds_data_dir!r}): {first_line}') from None


def _tfds_image_ids(data_source: Sequence[dict[str, Any]]) -> list[str]:
  """The image_id of every record. Decodes every record once (TFDS has no NumPy-only partial decoding)."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  def image_id(position: int) -> str:
    value = data_source[position]['image_id']
    return value.decode() if isinstance(value, bytes) else str(value)
  with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
    return list(pool.map(image_id, range(len(data_source))))


def make_tfds_source(config: Any, split: str, workdir: str | os.PathLike[str] | None = None) -> TfdsSource:
  """TFDS Cityscapes: val = 'validation'; labeled/unlabeled = 'train' records chosen by image id.

  The labeled split file is a UniMatch list (its leftImg8bit file names give the
  ids, e.g. 'jena_000078_000019'); unlabeled = the unlabeled list when given,
  else every train record not labeled. Without a labeled list, data.num_labeled
  (or labeled_fraction) ids are drawn with data.split_seed and written as
  UniMatch lists to <workdir>/splits/.
  """
  description = f'tfds {config.data.tfds_name} split'
  if split == 'val':
    return TfdsSource(_open_tfds(config, 'validation'), None, read_masks=True,
                      description=f'{description} validation', num_classes=_num_classes(config))
  data_source = _open_tfds(config, 'train')
  description = f'{description} train'
  ids = _tfds_image_ids(data_source)
  position_of = {image_id: position for position, image_id in enumerate(ids)}

  def positions(split_field: str) -> list[int]:
    path = resolve_split_path(split_field, config.data.root or '.')
    found = []
    for entry in read_split_file(path):
      name = record_name(entry.image)
      if name not in position_of:
        raise DataError(f'{path}:{entry.line}: image id {name} is not in {description}')
      found.append(position_of[name])
    return found

  if config.data.labeled_split:
    labeled = positions(config.data.labeled_split)
    if split == 'labeled':
      chosen = labeled
    elif config.data.unlabeled_split:
      chosen = positions(config.data.unlabeled_split)
    else:
      taken = set(labeled)
      chosen = [position for position in range(len(ids)) if position not in taken]
  else:
    spaced = [image_id for image_id in ids if len(image_id.split()) != 1]
    if spaced:
      raise DataError(f'{description}: image id {spaced[0]!r} cannot be written to a split list; '
                      'set data.labeled_split')
    order = sorted(range(len(ids)), key=lambda position: ids[position])
    lines = [SplitLine(f'leftImg8bit/train/{ids[p].split("_")[0]}/{ids[p]}_leftImg8bit.png',
                       f'gtFine/train/{ids[p].split("_")[0]}/{ids[p]}_gtFine{_TRAIN_IDS_SUFFIX}', 0) for p in order]
    chosen_lines, _ = _generated_split(split, lines, config.data, workdir)
    chosen = [position_of[record_name(line.image)] for line in chosen_lines]
  if not chosen:
    raise DataError(f'{description}: the {split} split selects no records')
  return TfdsSource(data_source, chosen, read_masks=split == 'labeled', description=description,
                    num_classes=_num_classes(config))
