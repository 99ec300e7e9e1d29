"""The dataset checker's logic: read every record of every split once, collect problems and class shares.

A bad file found in hour five of a run costs the run; found here it costs
seconds. Every record is decoded exactly as training will decode it (through
the same sources), in a thread pool since PIL's decoders release the GIL.
Unlabeled images are checked as images only: training never reads their masks.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent import futures
from typing import Any, Sequence

import numpy as np

from uccl_jax.data import classes
from uccl_jax.data import sources


@dataclasses.dataclass
class SplitReport:
  """What the checker found in one split."""
  split: str
  description: str = ''  # the split file (or how the list was made)
  records: int = 0  # records listed
  readable: int = 0  # records read without a problem
  pixel_counts: np.ndarray | None = None  # int64 [256]: pixels per mask value (labeled splits)
  problems: list[str] = dataclasses.field(default_factory=list)


def _read_record(source: Any, index: int) -> tuple[np.ndarray | None, str | None]:
  """(mask value histogram or None, problem or None) of one record."""
  try:
    record = source[index]
  except sources.DataError as error:
    return None, str(error)
  if 'mask' not in record:
    return None, None
  return np.bincount(record['mask'].ravel(), minlength=256).astype(np.int64), None


def check_source(split: str, source: Any, *, threads: int | None = None) -> SplitReport:
  """Reads every record of `source`, collecting problems (one line each) and mask value counts."""
  report = SplitReport(split, getattr(source, 'split_file', None) or repr(source), len(source))
  counts = np.zeros(256, np.int64)
  with futures.ThreadPoolExecutor(max_workers=threads or min(16, 2 * (os.cpu_count() or 1))) as pool:
    for histogram, problem in pool.map(lambda index: _read_record(source, index), range(len(source))):
      if problem is not None:
        report.problems.append(problem)
        continue
      report.readable += 1
      if histogram is not None:
        counts += histogram
  if getattr(source, 'read_masks', False):
    report.pixel_counts = counts
  return report


def check_dataset(config: Any, splits: Sequence[str] = sources.SPLITS, *, threads: int | None = None,
                  workdir: str | None = None) -> list[SplitReport]:
  """Checks each split the config names; a split whose list cannot be built reports that as its problem."""
  reports = []
  for split in splits:
    try:
      source = sources.make_source(config, split, workdir=workdir)
    except sources.DataError as error:
      reports.append(SplitReport(split, problems=[str(error)]))
      continue
    reports.append(check_source(split, source, threads=threads))
  return reports


def format_report(reports: Sequence[SplitReport], class_table: classes.ClassTable) -> str:
  """Counts per split and the per-class pixel share (of labeled pixels, ignore shown apart)."""
  lines = []
  for report in reports:
    lines.append(f'{report.split:>9}: {report.readable}/{report.records} records read'
                 f'{f" from {report.description}" if report.description else ""}'
                 f'{f", {len(report.problems)} with problems" if report.problems else ""}')
  for report in reports:
    if report.pixel_counts is None or not report.pixel_counts.sum():
      continue
    total = report.pixel_counts.sum()
    lines.append(f'pixel share per class in {report.split} ({total} pixels):')
    for index, name in enumerate(class_table.names):
      share = report.pixel_counts[index] / total
      lines.append(f'  {index:>3} {name:<16} {100 * share:6.2f}%')
    lines.append(f'  255 {"(ignored)":<16} {100 * report.pixel_counts[255] / total:6.2f}%')
  return '\n'.join(lines)


def problems(reports: Sequence[SplitReport]) -> list[str]:
  return [problem for report in reports for problem in report.problems]


def _outline(image: np.ndarray, box: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
  """The image with the bounding rectangle of a CutMix box mask drawn on it (no box: unchanged)."""
  import cv2  # pylint: disable=g-import-not-at-top
  image = np.ascontiguousarray(image.copy())
  rows, cols = np.nonzero(box)
  if rows.size:
    cv2.rectangle(image, (int(cols.min()), int(rows.min())), (int(cols.max()), int(rows.max())), color, 2)
  return image


PREVIEW_CAPTIONS = ('crop', 'mask', 'weak', 'strong 1', 'strong 2')
CAPTION_HEIGHT = 16  # pixels of the header strip above the grid's columns
_GAP = 4  # white pixels between tiles


def caption_strip(captions: Sequence[str], tile_width: int, gap: int = _GAP) -> np.ndarray:
  """uint8 [CAPTION_HEIGHT, W, 3]: each caption in black on white above its column of the grid.

  Each caption is drawn on its own column-wide canvas (centred, clipped when the
  column is narrower than the text), so a long caption never runs into the next column.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  columns = []
  for caption in captions:
    canvas = Image.new('RGB', (tile_width, CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), caption)
    x = max(0, (tile_width - (right - left)) // 2) - left
    y = max(0, (CAPTION_HEIGHT - (bottom - top)) // 2) - top
    draw.text((x, y), caption, fill=(0, 0, 0))
    columns += [np.asarray(canvas), np.full((CAPTION_HEIGHT, gap, 3), 255, np.uint8)]
  return np.concatenate(columns[:-1], axis=1)


def preview_grid(config: Any, *, num_samples: int = 3, seed: int = 0, workdir: str | None = None) -> np.ndarray:
  """A uint8 grid under a caption strip, one row per sample: crop | mask | weak | strong 1 | strong 2.

  The columns are the labeled crop, its coloured mask over it, and an unlabeled
  image's weak and two strong views. The strong views carry their CutMix boxes
  outlined (red, blue). Drawn with the training transforms themselves, so the
  preview shows what the model will see.
  """
  from uccl_jax.data import transforms  # pylint: disable=g-import-not-at-top
  class_table = classes.for_dataset(config.data.name)
  labeled = sources.make_source(config, 'labeled', workdir=workdir)
  unlabeled = sources.make_source(config, 'unlabeled', workdir=workdir)
  rng = np.random.default_rng(seed)
  crop = int(config.data.crop_size)
  width = len(PREVIEW_CAPTIONS) * crop + _GAP * (len(PREVIEW_CAPTIONS) - 1)
  rows = [caption_strip(PREVIEW_CAPTIONS, crop)]
  for sample in range(num_samples):
    labeled_crop = transforms.labeled_view(labeled[sample % len(labeled)], crop, rng,
                                           vflip_prob=config.data.vflip_prob)
    views = transforms.render_unlabeled_views(transforms.unlabeled_views(
        unlabeled[sample % len(unlabeled)], crop, rng, vflip_prob=config.data.vflip_prob))
    colored = class_table.colorize(labeled_crop['mask'].astype(np.uint8))
    overlay = (0.5 * labeled_crop['image'] + 0.5 * colored).astype(np.uint8)
    tiles = [labeled_crop['image'], overlay, views['weak'],
             _outline(views['strong1'], views['box1'], (255, 0, 0)),
             _outline(views['strong2'], views['box2'], (0, 0, 255))]
    separator = np.full((crop, _GAP, 3), 255, np.uint8)
    row = []
    for tile in tiles:
      row += [np.asarray(tile, np.uint8), separator]
    rows += [np.concatenate(row[:-1], axis=1), np.full((_GAP, width, 3), 255, np.uint8)]
  return np.concatenate(rows[:-1], axis=0)
