"""The generated demo dataset: street-like scenes with 7 classes, in the Cityscapes folder layout.

Why generated: the demo and the end-to-end tests need a segmentation problem
that a tiny model can learn in minutes on a CPU, that ships with no download,
and that still behaves like the real thing: a few labeled images leave a
supervised model clearly short of one trained on every label, and unlabeled
images of the same distribution can close part of that gap. So the classes are
told apart by shape, texture and context rather than by colour: buildings and
cars draw their colours from the same palette (buildings carry window grids,
cars have wheels and cabins and stand on the ground), trees are speckled blobs
whose hue wanders, people are thin figures with heads, poles are thin with a
sign on top; objects occlude each other far-to-near, clutter (stains, graffiti,
lane marks) is painted without changing the labels, and lighting and noise
vary per image. `difficulty` (0..1) turns up noise, clutter, colour overlap and
the number of small objects. `lighting='varied'` (not the demo's) gives every
image its own gain, contrast, saturation, colour cast, haze and blur.

Version 2 draws persons and poles about 1.6 and 2 times as large as version 1
did: at 2-7 pixels wide no run, even with every image labeled, learned them
(docs/RESULTS.md 2c). Version 4 (3 was an unreleased step) labels 4 of the
400 train images by default instead of 16, drawn so that every class is
labeled (`choose_labeled`), and draws poles wider (6 instead of 5 pixels at
scale 1, at least 4), with larger signs, and 1-3 of them per image instead of 0-2: with
4 labeled images, one or two thin poles were too little to learn the class
from (docs/RESULTS.md 2a and 2c-3). Version 5 draws the same images; its
`choose_labeled` covers every class once before it covers any twice (version
4's walk took any image showing a class seen fewer than twice, and sky and
ground are in every image, so it could fill the slots without a tree: the
ablation's 196-image set had none). The demo's 4 labeled images are the same
in both versions.

Written exactly as real data is read: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png,
gtFine/.../*_gtFine_labelTrainIds.png, and UniMatch split files splits/labeled.txt,
splits/unlabeled.txt, splits/val.txt (+ splits/train_all.txt: every train image,
labeled, for the fully supervised reference). Each image depends only on
(seed, split, index, difficulty, size), so the same seed gives the same bytes.

  python -m uccl_jax.data.synthetic --out DIR [--seed 0] [--difficulty 0.5]
"""

from __future__ import annotations

import colorsys
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
from PIL import Image

from uccl_jax import cache
from uccl_jax.data import classes
from uccl_jax.data.errors import DataError

VERSION = 5  # bump when the generator's output changes, so cached copies are not reused
SKY, GROUND, BUILDING, TREE, CAR, PERSON, POLE = range(7)
NUM_CLASSES = len(classes.SYNTHETIC_NAMES)
_TRAIN_CITY, _VAL_CITY = 'synthville', 'synthtown'
LIGHTING = ('mild', 'varied')  # per-image conditions: render_scene
DEMO_NUM_TRAIN, DEMO_NUM_LABELED = 400, 4  # the demo's dataset (configs/synthetic.py relies on them)


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), np.float32) * 255.0


def _object_color(rng: np.random.Generator, difficulty: float) -> np.ndarray:
  """A colour from the palette shared by buildings, cars and clothes: colour alone names no class."""
  return _hsv(rng.random(), rng.uniform(0.1, 0.5 + 0.4 * difficulty), rng.uniform(0.3, 0.95))


def _region(shape: tuple[int, int], draw) -> np.ndarray:
  """A boolean region drawn by `draw(canvas)` with OpenCV on a uint8 canvas."""
  canvas = np.zeros(shape, np.uint8)
  draw(canvas)
  return canvas > 0


def _paint(image: np.ndarray, mask: np.ndarray, region: np.ndarray, pixels: np.ndarray | None,
           label: int | None) -> None:
  """Paints `pixels` ([H,W,3] or a colour) into `region`, and `label` into the mask (None keeps labels)."""
  if pixels is not None:
    if pixels.ndim == 3:
      pixels = np.broadcast_to(pixels, image.shape)
      image[region] = pixels[region]
    else:
      image[region] = pixels
  if label is not None:
    mask[region] = label


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float, amplitude: float) -> np.ndarray:
  """Low-frequency noise [H, W, 1]: a coarse random grid resized up (cheap texture)."""
  height, width = shape
  coarse = rng.normal(0.0, amplitude, (max(2, int(height / scale)), max(2, int(width / scale)))).astype(np.float32)
  return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]


def _draw_building(image, mask, rng, horizon, difficulty):
  height, width = mask.shape
  building_width = int(rng.uniform(0.12, 0.35) * width)
  left = int(rng.uniform(-0.1, 0.95) * width)
  top = int(rng.uniform(0.05, 0.85) * horizon)
  bottom = horizon + int(rng.uniform(0.0, 0.08) * height)
  region = _region(mask.shape, lambda c: cv2.rectangle(c, (left, top), (left + building_width, bottom), 1, -1))
  wall = _object_color(rng, difficulty)
  ys, xs = np.mgrid[0:height, 0:width]
  pitch_x, pitch_y = int(rng.integers(6, 14)), int(rng.integers(7, 14))
  window_w, window_h = int(pitch_x * rng.uniform(0.35, 0.7)), int(pitch_y * rng.uniform(0.35, 0.65))
  windows = (((xs - left) % pitch_x) < window_w) & (((ys - top) % pitch_y) < window_h) & (ys > top + 2)
  window_color = _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.35))
  if rng.random() < 0.3:  # lit windows
    window_color = _hsv(rng.uniform(0.1, 0.17), 0.5, 0.95)
  pixels = np.where(windows[..., None], window_color, wall) + _smooth_noise(rng, mask.shape, 6, 6)
  _paint(image, mask, region, pixels, BUILDING)


def _draw_tree(image, mask, rng, base_y, scale, difficulty):
  height, width = mask.shape
  center_x = int(rng.uniform(0, width))
  trunk_h, trunk_w = int(22 * scale), max(2, int(4 * scale))
  trunk = _region(mask.shape, lambda c: cv2.rectangle(c, (center_x - trunk_w // 2, base_y - trunk_h),
                                                      (center_x + trunk_w // 2, base_y), 1, -1))
  _paint(image, mask, trunk, _hsv(0.07, 0.6, rng.uniform(0.2, 0.45)), TREE)
  radius = max(4, int(rng.uniform(10, 18) * scale))

  def crown(canvas):
    for _ in range(5):
      offset_x, offset_y = rng.normal(0, radius * 0.45, 2)
      cv2.circle(canvas, (int(center_x + offset_x), int(base_y - trunk_h - radius * 0.6 + offset_y)),
                 int(radius * rng.uniform(0.55, 0.9)), 1, -1)
  region = _region(mask.shape, crown)
  hue = rng.uniform(0.18, 0.42) if rng.random() > 0.35 * difficulty else rng.uniform(0.0, 0.15)  # autumn
  leaves = _hsv(hue, rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.7))
  speckle = rng.normal(0, 28, mask.shape + (1,)).astype(np.float32)
  speckle = cv2.GaussianBlur(speckle, (3, 3), 0.7)[..., None]
  _paint(image, mask, region, leaves + speckle, TREE)


def _draw_car(image, mask, rng, base_y, scale, difficulty):
  width = mask.shape[1]
  car_w, car_h = int(rng.uniform(34, 46) * scale), int(rng.uniform(10, 14) * scale)
  left = int(rng.uniform(-0.1, 0.95) * width)
  wheel_r = max(2, int(4 * scale))
  body_bottom = base_y - wheel_r
  body_top = body_bottom - car_h
  cabin_top = body_top - int(car_h * rng.uniform(0.6, 0.9))
  inset_l, inset_r = int(car_w * rng.uniform(0.15, 0.3)), int(car_w * rng.uniform(0.15, 0.3))
  cabin = np.array([[left + inset_l // 2, body_top], [left + inset_l, cabin_top],
                    [left + car_w - inset_r, cabin_top], [left + car_w - inset_r // 2, body_top]], np.int32)
  paint_color = _object_color(rng, difficulty)
  shade = np.linspace(25, -25, mask.shape[0], dtype=np.float32)[:, None, None]  # glossy top-down shading
  body = _region(mask.shape, lambda c: (cv2.rectangle(c, (left, body_top), (left + car_w, body_bottom), 1, -1),
                                        cv2.fillConvexPoly(c, cabin, 1)))
  _paint(image, mask, body, paint_color + shade, CAR)
  glass = _region(mask.shape, lambda c: cv2.fillConvexPoly(
      c, (cabin + np.array([[2, -1], [2, 2], [-2, 2], [-2, -1]]) * max(1, int(scale))).astype(np.int32), 1))
  _paint(image, mask, glass, _hsv(0.58, 0.3, rng.uniform(0.15, 0.4)), CAR)
  for wheel_x in (left + int(car_w * 0.2), left + int(car_w * 0.8)):
    wheel = _region(mask.shape, lambda c, x=wheel_x: cv2.circle(c, (x, body_bottom), wheel_r, 1, -1))
    _paint(image, mask, wheel, np.full(3, 20.0, np.float32), CAR)


def _draw_person(image, mask, rng, base_y, scale, difficulty):
  width = mask.shape[1]
  person_h = int(rng.uniform(40, 56) * scale)
  center_x = int(rng.uniform(0, width))
  head_r = max(2, int(person_h * 0.1))
  torso_top = base_y - person_h + 2 * head_r
  legs_top = base_y - int(person_h * 0.45)
  half_w = max(3, int(person_h * 0.16))
  torso = _region(mask.shape, lambda c: cv2.ellipse(c, (center_x, (torso_top + legs_top) // 2),
                                                    (half_w, max(2, (legs_top - torso_top) // 2 + 1)), 0, 0, 360, 1, -1))
  _paint(image, mask, torso, _object_color(rng, difficulty), PERSON)
  legs = _region(mask.shape, lambda c: (
      cv2.line(c, (center_x - half_w // 2, legs_top), (center_x - half_w // 2 - int(rng.integers(0, 3)), base_y), 1,
               max(1, half_w // 2)),
      cv2.line(c, (center_x + half_w // 2, legs_top), (center_x + half_w // 2 + int(rng.integers(0, 3)), base_y), 1,
               max(1, half_w // 2))))
  _paint(image, mask, legs, _object_color(rng, difficulty) * 0.6, PERSON)
  head = _region(mask.shape, lambda c: cv2.circle(c, (center_x, torso_top - head_r), head_r, 1, -1))
  _paint(image, mask, head, _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.9)), PERSON)


def _draw_pole(image, mask, rng, base_y, scale, difficulty):
  width = mask.shape[1]
  x = int(rng.uniform(0, width))
  pole_h = int(rng.uniform(50, 75) * scale)
  pole_w = max(4, int(6 * scale))
  top = base_y - pole_h
  shaft = _region(mask.shape, lambda c: cv2.rectangle(c, (x, top), (x + pole_w, base_y), 1, -1))
  _paint(image, mask, shaft, _hsv(0, 0, rng.uniform(0.35, 0.7)), POLE)
  size = max(5, int(rng.uniform(8, 13) * scale))
  sign_color = _hsv(rng.choice([0.0, 0.15, 0.6]), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
  if rng.random() < 0.5:
    sign = _region(mask.shape, lambda c: cv2.circle(c, (x + pole_w // 2, top), size, 1, -1))
  else:
    sign = _region(mask.shape, lambda c: cv2.rectangle(c, (x - size, top - size), (x + size, top + size), 1, -1))
  _paint(image, mask, sign, sign_color, POLE)


def _draw_clutter(image, mask, rng, difficulty):
  """Stains, graffiti and marks painted over whatever is there, labels unchanged: colour is no class cue."""
  height, width = mask.shape
  for _ in range(int(rng.integers(1, 3 + int(10 * difficulty)))):
    center = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
    axes = (int(rng.uniform(2, 5 + 10 * difficulty)), int(rng.uniform(1, 4 + 6 * difficulty)))
    region = _region(mask.shape, lambda c: cv2.ellipse(c, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1))
    region &= mask != SKY  # keep the sky clean of ground stains (context stays meaningful)
    color = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.1, 1))
    alpha = rng.uniform(0.3, 0.8)
    image[region] = (1 - alpha) * image[region] + alpha * color


def render_scene(rng: np.random.Generator, size: tuple[int, int] = (128, 256),
                 difficulty: float = 0.5, lighting: str = 'mild') -> tuple[np.ndarray, np.ndarray]:
  """One scene: (image uint8 [H, W, 3], mask uint8 [H, W] of class indices 0..6)."""
  height, width = size
  image = np.zeros((height, width, 3), np.float32)
  mask = np.zeros((height, width), np.uint8)
  horizon = int(rng.uniform(0.35, 0.55) * height)

  # Sky: a vertical gradient, sometimes dusk-coloured, with soft clouds.
  top_color = _hsv(rng.uniform(0.52, 0.66) if rng.random() > 0.4 * difficulty else rng.uniform(0.0, 0.12),
                   rng.uniform(0.2, 0.7), rng.uniform(0.55, 1.0))
  bottom_color = top_color * 0.6 + 255 * 0.4 * rng.uniform(0.5, 1.0)
  ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
  image[:] = top_color * (1 - ramp) + bottom_color * ramp
  image += np.clip(_smooth_noise(rng, size, 24, 30), 0, None)  # clouds brighten
  mask[:] = SKY

  # Ground: textured, with perspective lane marks (still ground).
  ground = _object_color(rng, difficulty) * 0.7 + _smooth_noise(rng, size, 4, 10) + rng.normal(0, 8, size + (1,))
  ground_region = np.zeros(size, bool)
  ground_region[horizon:] = True
  _paint(image, mask, ground_region, ground.astype(np.float32), GROUND)
  for _ in range(int(rng.integers(0, 3))):
    x_far, x_near = rng.uniform(0.3, 0.7) * width, rng.uniform(-0.5, 1.5) * width
    marks = _region(size, lambda c, a=x_far, b=x_near: cv2.line(c, (int(a), horizon), (int(b), height), 1, 2))
    _paint(image, mask, marks & (mask == GROUND), _hsv(0.15, rng.uniform(0, 0.6), 0.9), None)

  for _ in range(int(rng.integers(1, 5))):
    _draw_building(image, mask, rng, horizon, difficulty)

  # Ground objects, drawn far to near so nearer ones occlude; lower (nearer) means larger.
  kinds = [_draw_tree] * int(rng.integers(0, 3)) + [_draw_car] * int(rng.integers(1, 4))
  kinds += [_draw_person] * int(rng.integers(0, 3 + int(3 * difficulty))) + [_draw_pole] * int(rng.integers(1, 4))
  placements = sorted((int(rng.uniform(horizon + 4, height + 6)), kind_index) for kind_index in range(len(kinds)))
  for base_y, kind_index in placements:
    scale = 0.45 + 1.2 * (base_y - horizon) / max(1, height - horizon)
    kinds[kind_index](image, mask, rng, base_y, scale * height / 128, difficulty)

  _draw_clutter(image, mask, rng, difficulty)
  if lighting == 'varied':
    image = _vary_conditions(image, rng)
  else:
    # Lighting and sensor noise per image.
    image = image * rng.uniform(0.7 - 0.2 * difficulty, 1.15) + rng.uniform(-15, 15, 3)
    image += rng.normal(0, 3 + 12 * difficulty, image.shape)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
  return np.clip(image, 0, 255).astype(np.uint8), mask


def _vary_conditions(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each image's own light, weather and camera: the variety a few labeled images cannot cover.

  Gain, contrast, saturation, colour cast, haze, blur and noise are drawn per image over wide
  ranges, so a few labeled images show a few conditions while the unlabeled images show hundreds.
  """
  luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
  image = luma[..., None] + rng.uniform(0.0, 1.4) * (image - luma[..., None])  # saturation
  mean = float(image.mean())
  image = mean + rng.uniform(0.35, 1.3) * (image - mean)  # contrast
  image = image * np.exp(rng.uniform(np.log(0.35), np.log(1.5))) * rng.uniform(0.75, 1.25, 3)  # gain, cast
  if rng.random() < 0.4:  # haze
    image = image + rng.uniform(0.15, 0.55) * (rng.uniform(150, 230) - image)
  image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.2))
  return image + rng.normal(0, rng.uniform(2, 18), image.shape)


def write_scenes(root: pathlib.Path, split: str, city: str,
                 scenes: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[str]:
  """Writes (image, mask) pairs in the Cityscapes layout under `root`; returns their split lines."""
  (root / 'leftImg8bit' / split / city).mkdir(parents=True, exist_ok=True)
  (root / 'gtFine' / split / city).mkdir(parents=True, exist_ok=True)
  lines = []
  for index, (image, mask) in enumerate(scenes):
    stem = f'{city}_{index:06d}_000019'
    image_rel = f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'
    mask_rel = f'gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png'
    Image.fromarray(image).save(root / image_rel)
    Image.fromarray(mask).save(root / mask_rel)
    lines.append(f'{image_rel} {mask_rel}\n')
  return lines


def choose_labeled(image_classes: list[set[int]], num_labeled: int, rng: np.random.Generator,
                   images_per_class: int = 2) -> set[int]:
  """Indices of `num_labeled` images, drawn in a random order so that every class is labeled.

  Why: with a handful of labeled images a class can be missing from all of them (a plain
  draw of 4 demo images had no pole), and no method can learn a class it never sees
  labeled; the unlabeled images can only spread labels that exist. So, as split lists for
  few labels are usually made, the draw covers every class: walking one random permutation,
  first every image that shows a class no chosen image shows yet is taken (every class once,
  if the slots allow), then, walking it again, every image that shows a class fewer than
  `images_per_class` chosen images show; the remaining slots take the next images of the
  same permutation. (A class counts as shown by any pixel of it.)
  """
  order = rng.permutation(len(image_classes)).tolist()
  shown_by = {label: 0 for label in set().union(*image_classes)} if image_classes else {}
  chosen: list[int] = []
  for level in range(1, images_per_class + 1):
    for index in order:
      if len(chosen) == num_labeled:
        break
      if index not in chosen and any(shown_by[label] < level for label in image_classes[index]):
        chosen.append(index)
        for label in image_classes[index]:
          shown_by[label] += 1
  for index in order:
    if len(chosen) == num_labeled:
      break
    if index not in chosen:
      chosen.append(index)
  return set(chosen)


def generate(root: str | os.PathLike[str], *, seed: int = 0, num_train: int = DEMO_NUM_TRAIN,
             num_labeled: int = DEMO_NUM_LABELED,
             num_val: int = 64, size: tuple[int, int] = (128, 256), difficulty: float = 0.5,
             lighting: str = 'mild') -> pathlib.Path:
  """Writes the dataset under `root` (which must not hold a dataset already) and returns `root`.

  The labeled images are `num_labeled` train images drawn with `seed` so that every class is
  labeled somewhere (`choose_labeled`); the unlabeled list holds the other train images;
  `train_all.txt` lists every train image with its mask.
  """
  if not 0.0 <= difficulty <= 1.0:
    raise ValueError(f'difficulty must lie in [0, 1], not {difficulty}')
  if lighting not in LIGHTING:
    raise ValueError(f'lighting must be one of {", ".join(LIGHTING)}, not {lighting!r}')
  if not 0 < num_labeled <= num_train or num_val <= 0:
    raise ValueError(f'need 0 < num_labeled ({num_labeled}) <= num_train ({num_train}) and num_val > 0')
  root = pathlib.Path(root)
  lines = {'train': [], 'val': []}
  train_classes: list[set[int]] = []  # the classes each train image shows

  def scenes(split: str, count: int):
    for index in range(count):
      image, mask = render_scene(np.random.default_rng([seed, 0 if split == 'train' else 1, index]),
                                 size, difficulty, lighting)
      if split == 'train':
        train_classes.append(set(np.unique(mask).tolist()) - {255})  # 255: ignored
      yield image, mask

  for split, city, count in (('train', _TRAIN_CITY, num_train), ('val', _VAL_CITY, num_val)):
    lines[split] = write_scenes(root, split, city, scenes(split, count))
  labeled = choose_labeled(train_classes, num_labeled, np.random.default_rng(seed))
  (root / 'splits').mkdir(exist_ok=True)
  (root / 'splits' / 'labeled.txt').write_text(''.join(l for i, l in enumerate(lines['train']) if i in labeled))
  (root / 'splits' / 'unlabeled.txt').write_text(''.join(l for i, l in enumerate(lines['train']) if i not in labeled))
  (root / 'splits' / 'train_all.txt').write_text(''.join(lines['train']))
  (root / 'splits' / 'val.txt').write_text(''.join(lines['val']))
  settings = {'version': VERSION, 'seed': seed, 'num_train': num_train, 'num_labeled': num_labeled,
              'num_val': num_val, 'size': list(size), 'difficulty': difficulty, 'lighting': lighting,
              'classes': list(classes.SYNTHETIC_NAMES)}
  (root / 'synthetic.json').write_text(json.dumps(settings, indent=1) + '\n')
  return root


def ensure_dataset(root: str | os.PathLike[str] | None = None, *, seed: int = 0, **settings: Any) -> pathlib.Path:
  """The dataset's folder, generated on first use; a cut-off generation never leaves a trusted half.

  Generation goes into a temporary sibling folder renamed into place at the end
  (uccl_jax/cache.py), so `root` exists only when complete. An existing `root`
  is reused when its synthetic.json matches the settings; anything else there is
  left alone (DataError). `root` None: a folder in the cache named by the settings.
  """
  if root is None:
    suffix = '' if not settings else '-' + '-'.join(f'{k}{v}' for k, v in sorted(settings.items()))
    root = cache.default_cache_dir() / f'synthetic-v{VERSION}-seed{seed}{suffix.replace(" ", "")}'
  wanted = {'version': VERSION, 'seed': seed, **settings}
  return cache.ensure_folder(root, wanted, 'synthetic.json',
                             lambda staging: generate(staging, seed=seed, **settings),
                             'a generated synthetic dataset', error=DataError)


def main(argv: list[str] | None = None) -> int:
  """`python -m uccl_jax.data.synthetic --out DIR`: generate the dataset into DIR."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m uccl_jax.data.synthetic', description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder to create (must not exist)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--difficulty', type=float, default=0.5, help='0 (easy) .. 1 (hard)')
  parser.add_argument('--lighting', default='mild', choices=LIGHTING)
  parser.add_argument('--num_train', type=int, default=400)
  parser.add_argument('--num_labeled', type=int, default=DEMO_NUM_LABELED)
  parser.add_argument('--num_val', type=int, default=64)
  parser.add_argument('--height', type=int, default=128)
  parser.add_argument('--width', type=int, default=256)
  args = parser.parse_args(argv)
  try:
    root = ensure_dataset(args.out, seed=args.seed, difficulty=args.difficulty, lighting=args.lighting,
                          num_train=args.num_train,
                          num_labeled=args.num_labeled, num_val=args.num_val, size=(args.height, args.width))
  except (DataError, ValueError) as error:
    print(f'error: {error}')
    return 1
  print(f'synthetic dataset in {root} (use --config.data.name=synthetic --config.data.root={root} '
        f'--config.data.num_classes={NUM_CLASSES})')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
