"""The source domain of the demo's pretraining: what ImageNet is to Pascal and Cityscapes.

Why: the paper, like every method it compares with, fine-tunes an
ImageNet-pretrained ResNet-50; a backbone trained from scratch on the demo's 16
labeled images gives a teacher too unsure of itself for the unlabeled images
to matter (docs/RESULTS.md). This generator makes a labeled dataset that plays
ImageNet's part for the demo: disjoint from the demo's images, labeled in full,
and different from the demo's task in the ways ImageNet differs from a street
dataset, so that what a backbone learns here transfers (edges, textures,
the shapes of objects) without handing over the demo's labels:

- other classes: 8 of them (`classes.SYNTHETIC_SOURCE_NAMES`). Five are object
  kinds the demo also has (window-gridded facades, speckled foliage, vehicles,
  figures, posts), as ImageNet has cars and people: they are drawn by the
  demo's own drawing functions, then named by the source's classes. The demo's
  sky and ground, its horizon and its street layout have no counterpart;
  discs and striped panels exist only here;
- another layout: no horizon, no sky above ground; objects float at any
  height, size and overlap on a textured backdrop;
- other appearance: each image's palette is turned (hue rotation, channel
  order, sometimes inverted), lit from a random side, with its own noise.

Why these objects (docs/RESULTS.md 2c-2 and 2a): a backbone has to know
what objects look like for a few labeled images to be enough to start a
teacher, as an ImageNet backbone does for Pascal's 92 labels. Version 4 drew
only generic shapes (discs, rings, stars, ...): its backbone taught edges and
textures but not objects, so every method learned persons, poles and cars
barely, even with all 400 train images labeled. This version (the same scenes
as version 3) is paired with a demo of 4 labeled images: with 16 labeled
images a backbone of this kind (version 2's, the first footing) needed nothing
from the unlabeled ones (16 did as well as 400), with 4 they leave a supervised
model far short of all labels.

Each image depends only on (seed, split, index, size), on random streams of
their own (the demo's streams are (seed, 0|1, index), these (seed, 2|3,
index)), so the images are disjoint from the demo's and the same seed gives
the same bytes. Written in the Cityscapes layout with UniMatch split files
(splits/labeled.txt lists every train image: the source is labeled in full).

  python -m uccl_jax.data.synthetic_source --out DIR [--seed 0]
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import cv2
import numpy as np

from uccl_jax import cache
from uccl_jax.data import classes
from uccl_jax.data import synthetic
from uccl_jax.data.errors import DataError

VERSION = 5  # bump when the generator's output changes, so cached copies are not reused


def version() -> str:
  """This generator's version and the demo generator's: the source draws with the demo's
  drawing functions, so a change there (synthetic.VERSION) is a change here too."""
  return f'{VERSION}.{synthetic.VERSION}'

INFO_FILE = 'synthetic_source.json'
BACKDROP, FACADE, FOLIAGE, VEHICLE, FIGURE, POST, DISC, STRIPES = range(8)
# The demo's drawing functions paint the demo's class ids; this table gives the source's class
# for each (indexed by the demo's id; sky and ground are never painted by them).
_FROM_DEMO = np.zeros(synthetic.NUM_CLASSES, np.uint8)
_FROM_DEMO[[synthetic.BUILDING, synthetic.TREE, synthetic.CAR, synthetic.PERSON, synthetic.POLE]] = (
    FACADE, FOLIAGE, VEHICLE, FIGURE, POST)
NUM_CLASSES = len(classes.SYNTHETIC_SOURCE_NAMES)
_CITY = {'train': 'sourceville', 'val': 'sourcetown'}
_STREAM = {'train': 2, 'val': 3}  # the demo uses 0 (train) and 1 (val)


def _backdrop(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """A textured backdrop [H, W, 3] float: two colours blended by smooth noise, sometimes banded."""
  first, second = synthetic._hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 0.9)), \
      synthetic._hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 0.9))
  blend = synthetic._smooth_noise(rng, size, rng.uniform(8, 40), 1.0)
  blend = 1.0 / (1.0 + np.exp(-2.0 * blend))
  if rng.random() < 0.3:
    ys, xs = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    bands = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) / rng.uniform(6, 20))
    blend = np.clip(blend + 0.25 * bands[..., None], 0, 1)
  return first * blend + second * (1 - blend) + rng.normal(0, 6, size + (1,)).astype(np.float32)


def _draw_disc(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
  """A disc with concentric rings (a source-only class)."""
  height, width = mask.shape
  center = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
  radius = int(rng.uniform(5, 22))
  region = synthetic._region(mask.shape, lambda c: cv2.circle(c, center, radius, 1, -1))
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  rings = np.sin(np.hypot(xs - center[0], ys - center[1]) / rng.uniform(1.5, 4))[..., None]
  color = synthetic._hsv(rng.random(), rng.uniform(0.2, 1), rng.uniform(0.4, 1))
  synthetic._paint(image, mask, region, color + 40 * rings, DISC)


def _draw_stripes(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
  """A rotated panel of parallel stripes (a source-only class)."""
  height, width = mask.shape
  center = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
  box = cv2.boxPoints((center, (float(rng.uniform(10, 45)), float(rng.uniform(8, 30))),
                       float(rng.uniform(0, 180)))).astype(np.int32)
  region = synthetic._region(mask.shape, lambda c: cv2.fillConvexPoly(c, box, 1))
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  stripes = (np.sin((xs * np.cos(angle) + ys * np.sin(angle)) / rng.uniform(1.2, 3)) > 0)[..., None]
  pixels = np.where(stripes, synthetic._hsv(rng.random(), rng.uniform(0.3, 1), rng.uniform(0.6, 1)),
                    synthetic._hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.05, 0.4)))
  synthetic._paint(image, mask, region, pixels.astype(np.float32), STRIPES)


def _turn_palette(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Another palette and light per image: hue rotation, channel order, inversion, a light gradient."""
  image = np.clip(image, 0, 255).astype(np.uint8)
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(0, 180))) % 180
  hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.4), 0, 255).astype(np.uint8)
  image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)[..., rng.permutation(3)]
  if rng.random() < 0.25:
    image = 255.0 - image
  height, width = image.shape[:2]
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)
  image = image * (rng.uniform(0.8, 1.15) + rng.uniform(0.2, 0.6) * ramp)[..., None]
  return image + rng.normal(0, rng.uniform(2, 10), image.shape)


def render_source_scene(rng: np.random.Generator,
                        size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
  """One source image: (image uint8 [H, W, 3], mask uint8 [H, W] of source class indices 0..7)."""
  height, width = size
  image = _backdrop(rng, size)
  demo_mask = np.zeros(size, np.uint8)  # the demo's drawing functions paint the demo's ids
  mask = np.full(size, BACKDROP, np.uint8)
  objects = ['facade'] * int(rng.integers(0, 3)) + ['tree'] * int(rng.integers(0, 3))
  # Thin objects (figures, posts) are the hardest to learn from few labels: the source has many.
  objects += ['car'] * int(rng.integers(0, 3)) + ['person'] * int(rng.integers(1, 6))
  objects += ['pole'] * int(rng.integers(1, 4)) + ['disc'] * int(rng.integers(0, 3))
  objects += ['stripes'] * int(rng.integers(0, 3))
  for index in rng.permutation(len(objects)):
    kind = objects[index]
    before = demo_mask.copy()
    if kind == 'disc':
      _draw_disc(image, mask, rng)
      continue
    if kind == 'stripes':
      _draw_stripes(image, mask, rng)
      continue
    if kind == 'facade':
      synthetic._draw_building(image, demo_mask, rng, int(rng.uniform(0.3, 1.0) * height), 0.5)
    else:
      draw = {'tree': synthetic._draw_tree, 'car': synthetic._draw_car, 'person': synthetic._draw_person,
              'pole': synthetic._draw_pole}[kind]
      draw(image, demo_mask, rng, int(rng.uniform(0.3, 1.1) * height), rng.uniform(0.7, 2.0) * height / 128, 0.5)
    painted = demo_mask != before
    mask[painted] = _FROM_DEMO[demo_mask[painted]]
  image = cv2.GaussianBlur(_turn_palette(image, rng), (3, 3), 0.6)
  return np.clip(image, 0, 255).astype(np.uint8), mask


def generate(root: str | os.PathLike[str], *, seed: int = 0, num_train: int = 512, num_val: int = 64,
             size: tuple[int, int] = (128, 128)) -> pathlib.Path:
  """Writes the source dataset under `root` (which must not hold one already) and returns `root`."""
  if num_train <= 0 or num_val <= 0:
    raise ValueError(f'need num_train ({num_train}) > 0 and num_val ({num_val}) > 0')
  root = pathlib.Path(root)
  lines = {}
  for split, count in (('train', num_train), ('val', num_val)):
    lines[split] = synthetic.write_scenes(
        root, split, _CITY[split],
        (render_source_scene(np.random.default_rng([seed, _STREAM[split], index]), size)
         for index in range(count)))
  (root / 'splits').mkdir(exist_ok=True)
  (root / 'splits' / 'labeled.txt').write_text(''.join(lines['train']))
  (root / 'splits' / 'val.txt').write_text(''.join(lines['val']))
  settings = {'version': version(), 'seed': seed, 'num_train': num_train, 'num_val': num_val,
              'size': list(size), 'classes': list(classes.SYNTHETIC_SOURCE_NAMES)}
  (root / INFO_FILE).write_text(json.dumps(settings, indent=1) + '\n')
  return root


def default_root(seed: int = 0, **settings: Any) -> pathlib.Path:
  """The cache folder of the source dataset made with these settings."""
  return cache.default_cache_dir() / (f'synthetic-source-v{version()}-seed{seed}-'
                                      f'{cache.settings_key(settings)}')


def ensure_dataset(root: str | os.PathLike[str] | None = None, *, seed: int = 0,
                   **settings: Any) -> pathlib.Path:
  """The source dataset's folder, generated once (atomically, uccl_jax/cache.py) and then reused."""
  root = default_root(seed, **settings) if root is None else root
  return cache.ensure_folder(root, {'version': version(), 'seed': seed, **settings}, INFO_FILE,
                             lambda staging: generate(staging, seed=seed, **settings),
                             'a generated source dataset', error=DataError)


def main(argv: list[str] | None = None) -> int:
  """`python -m uccl_jax.data.synthetic_source --out DIR`: generate the source dataset into DIR."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m uccl_jax.data.synthetic_source',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder to create (must not exist)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_train', type=int, default=512)
  parser.add_argument('--num_val', type=int, default=64)
  args = parser.parse_args(argv)
  try:
    root = ensure_dataset(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val)
  except (DataError, ValueError) as error:
    print(f'error: {error}')
    return 1
  print(f'source dataset in {root} ({NUM_CLASSES} classes: {", ".join(classes.SYNTHETIC_SOURCE_NAMES)})')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
