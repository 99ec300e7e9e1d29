"""The source domain of the demo's pretraining: what ImageNet is to Pascal and Cityscapes.

Why: the paper, like every method it compares with, fine-tunes an
ImageNet-pretrained ResNet-50; a backbone trained from scratch on the demo's 16
labeled images gives a teacher too unsure of itself for the unlabeled images
to matter (docs/RESULTS.md). This generator makes a labeled dataset that plays
ImageNet's part for the demo: disjoint from the demo's images, labeled in full,
and different from the demo's task in the ways ImageNet differs from a street
dataset, so that what a backbone learns here transfers (edges, corners,
textures, outlines, occlusion) without handing over the demo's classes:

- other classes: 7 generic shapes and the backdrop (`classes.SYNTHETIC_SOURCE_NAMES`:
  disc, ring, triangle, star, cross, panel, irregular blob), each filled with
  a random colour and one of a few textures (flat, noise, bands, checks). None
  is one of the demo's object kinds. Version 2 of this generator drew facades,
  foliage, vehicles, figures and posts with the demo's own drawing functions:
  its backbone already knew the demo's object shapes, so 16 labeled demo images
  did as well as 400 and the unlabeled ones had nothing to add
  (docs/RESULTS.md 2c-2);
- another layout: no horizon, no sky above ground; shapes float at any
  position, size and overlap on a textured backdrop;
- other appearance: each image's palette is turned (hue rotation, channel
  order, sometimes inverted), lit from a random side, with its own noise.

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

VERSION = 4  # bump when the generator's output changes, so cached copies are not reused
INFO_FILE = 'synthetic_source.json'
BACKDROP = 0  # classes 1..7: SHAPES, in order
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


def _textured(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """A fill [H, W, 3]: a colour with one of a few textures (flat, noise, bands, checks)."""
  height, width = shape
  color = synthetic._hsv(rng.random(), rng.uniform(0.1, 1), rng.uniform(0.3, 1))
  kind = int(rng.integers(0, 4))
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  if kind == 1:
    texture = rng.normal(0, 25, shape + (1,)).astype(np.float32)
  elif kind == 2:
    angle = rng.uniform(0, np.pi)
    texture = 35 * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) / rng.uniform(1.5, 5))[..., None]
  elif kind == 3:
    cell = rng.uniform(2, 7)
    texture = 35 * ((np.floor(xs / cell) + np.floor(ys / cell)) % 2 * 2 - 1)[..., None]
  else:
    texture = np.zeros(shape + (1,), np.float32)
  return color + texture


def _shape_region(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """The region of one generic shape: none of the demo's object kinds."""
  height, width = shape
  cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
  size = float(rng.uniform(6, 32))
  angle = rng.uniform(0, 2 * np.pi)

  def polygon(radii, count):
    t = angle + np.arange(count) * 2 * np.pi / count
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], -1).astype(np.int32)

  def draw(canvas):
    if kind == 'disc':
      cv2.circle(canvas, (int(cx), int(cy)), int(size), 1, -1)
    elif kind == 'ring':
      cv2.circle(canvas, (int(cx), int(cy)), int(size), 1, max(2, int(size / 3)))
    elif kind == 'triangle':
      cv2.fillConvexPoly(canvas, polygon(np.full(3, size), 3), 1)
    elif kind == 'star':
      cv2.fillPoly(canvas, [polygon(np.tile([size, size * 0.45], 5), 10)], 1)
    elif kind == 'cross':
      arm = max(2, int(size / 3))
      box = cv2.boxPoints(((cx, cy), (2 * size, arm), float(np.degrees(angle)))).astype(np.int32)
      cv2.fillConvexPoly(canvas, box, 1)
      box = cv2.boxPoints(((cx, cy), (arm, 2 * size), float(np.degrees(angle)))).astype(np.int32)
      cv2.fillConvexPoly(canvas, box, 1)
    elif kind == 'panel':
      box = cv2.boxPoints(((cx, cy), (2 * size, size * rng.uniform(0.4, 1.2)),
                           float(np.degrees(angle)))).astype(np.int32)
      cv2.fillConvexPoly(canvas, box, 1)
    else:  # 'blob': an irregular polygon
      count = int(rng.integers(6, 11))
      cv2.fillPoly(canvas, [polygon(size * rng.uniform(0.4, 1.0, count), count)], 1)
  return synthetic._region(shape, draw)


SHAPES = ('disc', 'ring', 'triangle', 'star', 'cross', 'panel', 'blob')  # classes 1..7


def render_source_scene(rng: np.random.Generator,
                        size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
  """A source image of generic shapes (classes 1..7 = SHAPES, 0 = backdrop), each filled with a
  random colour and texture: edges, corners, textures and occlusion, none of the demo's objects."""
  image = _backdrop(rng, size)
  mask = np.full(size, BACKDROP, np.uint8)
  for _ in range(int(rng.integers(6, 15))):
    kind = int(rng.integers(0, len(SHAPES)))
    region = _shape_region(SHAPES[kind], rng, size)
    synthetic._paint(image, mask, region, _textured(rng, size), kind + 1)
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
  settings = {'version': VERSION, 'seed': seed, 'num_train': num_train, 'num_val': num_val,
              'size': list(size), 'classes': list(classes.SYNTHETIC_SOURCE_NAMES)}
  (root / INFO_FILE).write_text(json.dumps(settings, indent=1) + '\n')
  return root


def default_root(seed: int = 0, **settings: Any) -> pathlib.Path:
  """The cache folder of the source dataset made with these settings."""
  return cache.default_cache_dir() / (f'synthetic-source-v{VERSION}-seed{seed}-'
                                      f'{cache.settings_key(settings)}')


def ensure_dataset(root: str | os.PathLike[str] | None = None, *, seed: int = 0,
                   **settings: Any) -> pathlib.Path:
  """The source dataset's folder, generated once (atomically, uccl_jax/cache.py) and then reused."""
  root = default_root(seed, **settings) if root is None else root
  return cache.ensure_folder(root, {'version': VERSION, 'seed': seed, **settings}, INFO_FILE,
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
