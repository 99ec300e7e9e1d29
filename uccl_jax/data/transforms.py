"""The training views of UniMatch/UCCL: labeled crops, weak and strong unlabeled views, CutMix boxes.

These are the semantics of UniMatch's `dataset/transform.py` and `dataset/semi.py`
(which UCCL reuses unchanged), rewritten on NumPy/PIL so that grain workers can
run them without PyTorch:

* resize: the long side is drawn uniformly among the integers
  [int(0.5 * L), int(2.0 * L)] (L = the image's long side), the short side keeps
  the aspect ratio (rounded); bilinear for the image (PIL, antialiased when
  shrinking), nearest for the mask;
* pad to the crop size on the right/bottom: image 0, mask 255 for labeled
  images and 254 for unlabeled ones (UniMatch's marker for "padding", which
  becomes the ignore mask);
* random crop (top/left uniform over the valid integer range), horizontal flip
  with p 0.5;
* vertical flip with p `vflip_prob`, default 0: the paper's text lists vertical
  flips among the weak augmentations, the released code has none;
* strong views (two, independent): torchvision's ColorJitter(0.5, 0.5, 0.5,
  0.25) with p 0.8 (the four ops in a random order; brightness, contrast and
  saturation with PIL's ImageEnhance as torchvision does, the hue shift in
  OpenCV's 8-bit HSV), RandomGrayscale p 0.2 (PIL luma), Gaussian blur with
  sigma U(0.1, 2.0) with p 0.5 (OpenCV), then a CutMix box with p 0.5.

Every random draw comes from the `np.random.Generator` the caller passes in
(the pipeline derives it from the record's position and the run's seed), so a
run is repeatable and independent of how many workers compute it.

Speed: instead of resizing the whole image and then cropping (UniMatch), only
the part of the source image that lands inside the crop is resampled (PIL's
`resize(box=...)` computes the same sample positions). At the Cityscapes
setting this avoids resampling up to 4096x2048 pixels for an 801x801 crop. The
image can differ from the resize-then-crop result by a rounding step (PIL
works in fixed point); the mask uses the nearest-neighbour rule below exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image, ImageEnhance

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

RESIZE_RANGE = (0.5, 2.0)
LABELED_PAD_VALUE = 255  # the ignore index: padding is not trained
UNLABELED_PAD_MARKER = 254  # marks padding of unlabeled crops; becomes the ignore mask
IGNORE_VALUE = 255

# Strong-view recipe (UniMatch's semi.py).
COLOR_JITTER_PROB = 0.8
BRIGHTNESS = CONTRAST = SATURATION = 0.5
HUE = 0.25
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
CUTMIX_PROB = 0.5
CUTMIX_AREA_RANGE = (0.02, 0.4)  # fraction of crop_size ** 2
CUTMIX_RATIO_RANGE = (0.3, 1 / 0.3)
CUTMIX_MAX_TRIES = 1000  # UniMatch redraws until the box fits; we give up (no box) after this many


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where a crop comes from: the rescaled size, the crop's top-left corner there, and the flips."""
  resized_height: int
  resized_width: int
  top: int
  left: int
  hflip: bool
  vflip: bool


# value -> normalised value per channel, as an OpenCV lookup table [256, 1, 3]: a table lookup is
# ~7x faster than the float arithmetic at 801x801, and exact (computed in float64).
_NORMALIZE_TABLE = ((np.arange(256, dtype=np.float64)[:, None] / 255.0 - IMAGENET_MEAN.astype(np.float64))
                    / IMAGENET_STD.astype(np.float64)).astype(np.float32).reshape(256, 1, 3)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 with ImageNet mean/std (torchvision ToTensor + Normalize, channels last)."""
  image = np.ascontiguousarray(image, np.uint8)
  flat = cv2.LUT(image.reshape(-1, 1, 3), _NORMALIZE_TABLE)
  return flat.reshape(image.shape)


def draw_geometry(height: int, width: int, crop_size: int, rng: np.random.Generator, *,
                  vflip_prob: float = 0.0) -> Geometry:
  """Draws rescale, crop position and flips in UniMatch's order (resize, crop, hflip; then vflip)."""
  long_side = max(height, width)
  low, high = int(long_side * RESIZE_RANGE[0]), int(long_side * RESIZE_RANGE[1])
  new_long = int(rng.integers(low, high + 1))
  if height > width:
    resized_height, resized_width = new_long, int(1.0 * width * new_long / height + 0.5)
  else:
    resized_height, resized_width = int(1.0 * height * new_long / width + 0.5), new_long
  resized_height, resized_width = max(resized_height, 1), max(resized_width, 1)
  padded_height, padded_width = max(resized_height, crop_size), max(resized_width, crop_size)
  # UniMatch draws x (left) before y (top).
  left = int(rng.integers(0, padded_width - crop_size + 1))
  top = int(rng.integers(0, padded_height - crop_size + 1))
  hflip = bool(rng.random() < 0.5)
  vflip = bool(rng.random() < vflip_prob) if vflip_prob > 0 else False
  return Geometry(resized_height, resized_width, top, left, hflip, vflip)


def nearest_indices(start: int, stop: int, source_size: int, resized_size: int) -> np.ndarray:
  """Source pixel of each resized pixel in [start, stop): the one whose area holds its centre."""
  positions = (np.arange(start, stop, dtype=np.float64) + 0.5) * (source_size / resized_size)
  return np.minimum(np.floor(positions).astype(np.int64), source_size - 1)


def apply_geometry(image: np.ndarray, mask: np.ndarray | None, geometry: Geometry, crop_size: int,
                   mask_pad_value: int) -> tuple[np.ndarray, np.ndarray | None]:
  """Rescale + pad + crop + flips of a uint8 image [H,W,3] (and mask [H,W]) into crop_size^2.

  Equal to resizing the whole image, padding right/bottom (image 0, mask
  `mask_pad_value`) and cropping, but resamples only the cropped part.
  """
  height, width = image.shape[:2]
  g = geometry
  valid_bottom = min(g.top + crop_size, g.resized_height)
  valid_right = min(g.left + crop_size, g.resized_width)
  valid_height, valid_width = valid_bottom - g.top, valid_right - g.left
  scale_y, scale_x = height / g.resized_height, width / g.resized_width
  box = (g.left * scale_x, g.top * scale_y,
         min(valid_right * scale_x, float(width)), min(valid_bottom * scale_y, float(height)))
  out_image = np.zeros((crop_size, crop_size, 3), np.uint8)
  resized = Image.fromarray(np.ascontiguousarray(image)).resize(
      (valid_width, valid_height), Image.BILINEAR, box=box)
  out_image[:valid_height, :valid_width] = np.asarray(resized)
  out_mask = None
  if mask is not None:
    rows = nearest_indices(g.top, valid_bottom, height, g.resized_height)
    cols = nearest_indices(g.left, valid_right, width, g.resized_width)
    out_mask = np.full((crop_size, crop_size), mask_pad_value, np.uint8)
    out_mask[:valid_height, :valid_width] = mask[rows[:, None], cols[None, :]]
  if g.hflip:
    out_image = out_image[:, ::-1]
    out_mask = None if out_mask is None else out_mask[:, ::-1]
  if g.vflip:
    out_image = out_image[::-1]
    out_mask = None if out_mask is None else out_mask[::-1]
  return np.ascontiguousarray(out_image), (None if out_mask is None else np.ascontiguousarray(out_mask))


def _adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision's PIL hue shift: rotate the 8-bit HSV hue by hue_factor * 255 (mod 256).

  OpenCV's full-range HSV (hue 0..255, as PIL's) is ~8x faster than PIL's
  conversions; hues agree with PIL's within 2 steps of 256.
  """
  hsv = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2HSV_FULL)
  hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(hue_factor * 255)) % 256).astype(np.uint8)
  return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


def color_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """torchvision ColorJitter(0.5, 0.5, 0.5, 0.25) on a PIL image: four ops in a random order."""
  order = rng.permutation(4)
  brightness = rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
  contrast = rng.uniform(1 - CONTRAST, 1 + CONTRAST)
  saturation = rng.uniform(1 - SATURATION, 1 + SATURATION)
  hue = rng.uniform(-HUE, HUE)
  for op in order:
    if op == 0:
      image = ImageEnhance.Brightness(image).enhance(brightness)
    elif op == 1:
      image = ImageEnhance.Contrast(image).enhance(contrast)
    elif op == 2:
      image = ImageEnhance.Color(image).enhance(saturation)
    else:
      image = _adjust_hue(image, hue)
  return image


def cutmix_box(crop_size: int, rng: np.random.Generator, *, prob: float = CUTMIX_PROB) -> np.ndarray:
  """int32 [S,S], 1 inside a CutMix box wholly inside the crop, present with p `prob` (else all 0).

  The area is drawn once, U(0.02, 0.4) * S^2; ratio and corner are redrawn until
  the box fits, as in UniMatch (which loops forever; after CUTMIX_MAX_TRIES
  misses, practically never at real crop sizes, there is no box).
  """
  box = np.zeros((crop_size, crop_size), np.int32)
  if rng.random() > prob:
    return box
  area = rng.uniform(*CUTMIX_AREA_RANGE) * crop_size * crop_size
  for _ in range(CUTMIX_MAX_TRIES):
    ratio = rng.uniform(*CUTMIX_RATIO_RANGE)
    box_width = int(np.sqrt(area / ratio))
    box_height = int(np.sqrt(area * ratio))
    left = int(rng.integers(0, crop_size))
    top = int(rng.integers(0, crop_size))
    if left + box_width <= crop_size and top + box_height <= crop_size:
      box[top:top + box_height, left:left + box_width] = 1
      return box
  return box


def strong_view(weak: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 [S,S,3] -> uint8 strong view: colour jitter p .8, grayscale p .2, blur p .5 (same geometry)."""
  image = Image.fromarray(weak)
  if rng.random() < COLOR_JITTER_PROB:
    image = color_jitter(image, rng)
  if rng.random() < GRAYSCALE_PROB:
    image = image.convert('L').convert('RGB')
  strong = np.asarray(image)
  if rng.random() < BLUR_PROB:
    # PIL's GaussianBlur(radius=sigma) in UniMatch; OpenCV's true Gaussian with the same sigma and
    # edge replication agrees within a few grey levels and is 5-50x faster.
    strong = cv2.GaussianBlur(strong, (0, 0), sigmaX=rng.uniform(*BLUR_SIGMA_RANGE),
                              borderType=cv2.BORDER_REPLICATE)
  return strong


def labeled_view(record: Mapping[str, Any], crop_size: int, rng: np.random.Generator, *,
                 vflip_prob: float = 0.0, normalize: bool = True) -> dict[str, np.ndarray]:
  """A labeled training crop: {'image': f32 [S,S,3] (uint8 if not normalize), 'mask': i32 [S,S]}.

  Padding is 255 in the mask (ignored by the loss).
  """
  image, mask = record['image'], record['mask']
  geometry = draw_geometry(image.shape[0], image.shape[1], crop_size, rng, vflip_prob=vflip_prob)
  crop, crop_mask = apply_geometry(image, mask, geometry, crop_size, LABELED_PAD_VALUE)
  return {'image': _normalize(crop) if normalize else crop, 'mask': crop_mask.astype(np.int32)}


def unlabeled_views(record: Mapping[str, Any], crop_size: int, rng: np.random.Generator, *,
                    vflip_prob: float = 0.0, normalize: bool = True) -> dict[str, np.ndarray]:
  """The views of an unlabeled image: weak, two strong views, ignore mask, two CutMix boxes.

  Returns {'weak', 'strong1', 'strong2': f32 [S,S,3] (uint8 if not normalize),
  'ignore': i32 [S,S] 255 at padding else 0, 'box1', 'box2': i32 [S,S]}. The
  record's mask, if any, is never read: the padding marker comes from a mask of
  zeros of the image's size.
  """
  image = record['image']
  zeros = np.zeros(image.shape[:2], np.uint8)
  geometry = draw_geometry(image.shape[0], image.shape[1], crop_size, rng, vflip_prob=vflip_prob)
  weak, padded = apply_geometry(image, zeros, geometry, crop_size, UNLABELED_PAD_MARKER)
  strong1 = strong_view(weak, rng)
  box1 = cutmix_box(crop_size, rng)
  strong2 = strong_view(weak, rng)
  box2 = cutmix_box(crop_size, rng)
  ignore = np.where(padded == UNLABELED_PAD_MARKER, IGNORE_VALUE, 0).astype(np.int32)
  convert = _normalize if normalize else (lambda x: x)
  return {'weak': convert(weak), 'strong1': convert(strong1), 'strong2': convert(strong2),
          'ignore': ignore, 'box1': box1, 'box2': box2}


_normalize = normalize  # the keyword argument `normalize` shadows the function inside the views
