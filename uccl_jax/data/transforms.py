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
  Drawing a strong view's parameters (`draw_strong_params`) is cheap for the
  host; applying them at 801x801 costs far more CPU, so the train step does it on
  the device (`uccl_jax.augment`); `apply_strong_params_host` is the host twin.

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
# A strong view's draws as one vector (`draw_strong_params`), entries named here: the flags are
# 0/1, `order<k>` is the op of the k-th jitter slot (an index into JITTER_OPS, torchvision's
# numbering), the three factors are as drawn, `hue_shift` is the integer the hue op adds
# (int(hue * 255), exact in float32) and `sigma` the blur's. Ops not drawn hold neutral values.
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')
STRONG_PARAMS = ('jitter', 'order0', 'order1', 'order2', 'order3', 'brightness', 'contrast',
                 'saturation', 'hue_shift', 'grayscale', 'blur', 'sigma')
_NEUTRAL_STRONG_PARAMS = {'jitter': 0.0, 'order0': 0, 'order1': 1, 'order2': 2, 'order3': 3,
                          'brightness': 1.0, 'contrast': 1.0, 'saturation': 1.0, 'hue_shift': 0,
                          'grayscale': 0.0, 'blur': 0.0, 'sigma': 0.0}
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
NORMALIZE_TABLE = ((np.arange(256, dtype=np.float64)[:, None] / 255.0 - IMAGENET_MEAN.astype(np.float64))
                    / IMAGENET_STD.astype(np.float64)).astype(np.float32).reshape(256, 1, 3)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 with ImageNet mean/std (torchvision ToTensor + Normalize, channels last)."""
  image = np.ascontiguousarray(image, np.uint8)
  flat = cv2.LUT(image.reshape(-1, 1, 3), NORMALIZE_TABLE)
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
  resized = Image.fromarray(np.ascontiguousarray(image)).resize(
      (valid_width, valid_height), Image.BILINEAR, box=box)
  # The flips are applied to the small resampled region before it is placed (PIL's transpose and
  # reversed mask indices), so the crop is written once, already in its final orientation.
  if g.hflip:
    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if g.vflip:
    resized = resized.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
  top = crop_size - valid_height if g.vflip else 0
  left = crop_size - valid_width if g.hflip else 0
  out_image = np.zeros((crop_size, crop_size, 3), np.uint8)
  out_image[top:top + valid_height, left:left + valid_width] = np.asarray(resized)
  out_mask = None
  if mask is not None:
    rows = nearest_indices(g.top, valid_bottom, height, g.resized_height)
    cols = nearest_indices(g.left, valid_right, width, g.resized_width)
    rows = rows[::-1] if g.vflip else rows
    cols = cols[::-1] if g.hflip else cols
    out_mask = np.full((crop_size, crop_size), mask_pad_value, np.uint8)
    out_mask[top:top + valid_height, left:left + valid_width] = mask[rows[:, None], cols[None, :]]
  return out_image, out_mask


def _shift_hue(image: Image.Image, shift: int) -> Image.Image:
  """torchvision's PIL hue shift: add `shift` to the 8-bit HSV hue (mod 256).

  OpenCV's full-range HSV (hue 0..255, as PIL's) is ~8x faster than PIL's
  conversions; hues agree with PIL's within 2 steps of 256. The result depends
  on the OpenCV build: x86 wheels convert HSV->RGB with IPP, which reads the
  hue as H * 6/255 sectors (OpenCV's own code, e.g. on ARM, as H * 6/256); the
  device twin (`uccl_jax.augment`) follows IPP.
  """
  hsv = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2HSV_FULL)
  hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
  return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


def draw_strong_params(rng: np.random.Generator, *, dtype: Any = np.float32) -> np.ndarray:
  """A strong view's random draws, [len(STRONG_PARAMS)] laid out as STRONG_PARAMS.

  Exactly the draws UniMatch's strong view makes, in its order (colour jitter
  with p 0.8: permutation, brightness, contrast, saturation, hue; grayscale with
  p 0.2; blur with p 0.5: sigma), so a sample's generator gives the same views
  whether the host (`apply_strong_params_host`) or the device
  (`uccl_jax.augment.strong_views`) applies them. float32 is what the device
  gets; `strong_view` keeps float64, which only matters for sigma (the factors
  are float32 inside PIL, the hue shift is an integer).
  """
  params = dict(_NEUTRAL_STRONG_PARAMS)
  if rng.random() < COLOR_JITTER_PROB:
    params.update(zip(('order0', 'order1', 'order2', 'order3'), rng.permutation(4).tolist()))
    params['brightness'] = rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    params['contrast'] = rng.uniform(1 - CONTRAST, 1 + CONTRAST)
    params['saturation'] = rng.uniform(1 - SATURATION, 1 + SATURATION)
    params['hue_shift'] = int(rng.uniform(-HUE, HUE) * 255)  # torchvision: int(hue_factor * 255)
    params['jitter'] = 1.0
  if rng.random() < GRAYSCALE_PROB:
    params['grayscale'] = 1.0
  if rng.random() < BLUR_PROB:
    params['blur'] = 1.0
    params['sigma'] = rng.uniform(*BLUR_SIGMA_RANGE)
  return np.array([params[name] for name in STRONG_PARAMS], dtype)


def apply_strong_params_host(weak: np.ndarray, params: np.ndarray) -> np.ndarray:
  """uint8 [H,W,3] -> uint8 strong view with the draws `params` (`draw_strong_params`), PIL/OpenCV.

  torchvision's ColorJitter ops in the drawn order (brightness, contrast and
  saturation with PIL's ImageEnhance, the hue shift in OpenCV's 8-bit HSV),
  grayscale with PIL's luma, Gaussian blur with OpenCV.
  """
  p = dict(zip(STRONG_PARAMS, np.asarray(params).tolist()))
  image = Image.fromarray(weak)
  if p['jitter']:
    for slot in range(4):
      op = JITTER_OPS[int(p[f'order{slot}'])]
      if op == 'brightness':
        image = ImageEnhance.Brightness(image).enhance(p['brightness'])
      elif op == 'contrast':
        image = ImageEnhance.Contrast(image).enhance(p['contrast'])
      elif op == 'saturation':
        image = ImageEnhance.Color(image).enhance(p['saturation'])
      else:
        image = _shift_hue(image, int(p['hue_shift']))
  if p['grayscale']:
    image = image.convert('L').convert('RGB')
  strong = np.asarray(image)
  if p['blur']:
    # PIL's GaussianBlur(radius=sigma) in UniMatch; OpenCV's true Gaussian with the same sigma and
    # edge replication agrees within a few grey levels and is 5-50x faster.
    strong = cv2.GaussianBlur(strong, (0, 0), sigmaX=p['sigma'], borderType=cv2.BORDER_REPLICATE)
  return strong


def draw_cutmix_box(crop_size: int, rng: np.random.Generator, *,
                    prob: float = CUTMIX_PROB) -> np.ndarray:
  """A CutMix box as int32 [4] = (top, left, height, width), present with p `prob` (else all 0).

  The area is drawn once, U(0.02, 0.4) * S^2; ratio and corner are redrawn until
  the box fits wholly inside the crop, as in UniMatch (which loops forever;
  after CUTMIX_MAX_TRIES misses, practically never at real crop sizes, there is
  no box). Four numbers instead of an S x S map: the device builds the map
  (`box_map` here, `uccl_jax.inputs` in the step).
  """
  box = np.zeros((4,), np.int32)
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
      return np.array([top, left, box_height, box_width], np.int32)
  return box


def box_map(box: np.ndarray, crop_size: int) -> np.ndarray:
  """int32 [S,S]: 1 inside a (top, left, height, width) box, 0 elsewhere (host twin of the device's)."""
  top, left, height, width = (int(v) for v in box)
  out = np.zeros((crop_size, crop_size), np.int32)
  out[top:top + height, left:left + width] = 1
  return out


def valid_box(geometry: Geometry, crop_size: int) -> np.ndarray:
  """The crop's non-padded region after the flips, as int32 [4] = (top, left, height, width).

  Padding goes right/bottom before the flips, so the image content is always
  one rectangle: the unlabeled ignore mask (255 outside it) is sent as these
  four numbers and drawn on the device.
  """
  height = min(geometry.top + crop_size, geometry.resized_height) - geometry.top
  width = min(geometry.left + crop_size, geometry.resized_width) - geometry.left
  top = crop_size - height if geometry.vflip else 0
  left = crop_size - width if geometry.hflip else 0
  return np.array([top, left, height, width], np.int32)


def strong_view(weak: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 [S,S,3] -> uint8 strong view: colour jitter p .8, grayscale p .2, blur p .5 (same geometry).

  On the host from start to end: `draw_strong_params` (float64), then `apply_strong_params_host`.
  """
  return apply_strong_params_host(weak, draw_strong_params(rng, dtype=np.float64))


def labeled_view(record: Mapping[str, Any], crop_size: int, rng: np.random.Generator, *,
                 vflip_prob: float = 0.0) -> dict[str, np.ndarray]:
  """A labeled training crop: {'image': uint8 [S,S,3], 'mask': uint8 [S,S]}.

  Padding is 255 in the mask (ignored by the loss). Normalisation happens on
  the device, inside the train step (`uccl_jax.inputs`): the host ships bytes.
  """
  image, mask = record['image'], record['mask']
  geometry = draw_geometry(image.shape[0], image.shape[1], crop_size, rng, vflip_prob=vflip_prob)
  crop, crop_mask = apply_geometry(image, mask, geometry, crop_size, LABELED_PAD_VALUE)
  return {'image': crop, 'mask': crop_mask}


def unlabeled_views(record: Mapping[str, Any], crop_size: int, rng: np.random.Generator, *,
                    vflip_prob: float = 0.0) -> dict[str, np.ndarray]:
  """What the device needs to build the views of an unlabeled image, in UniMatch's order of draws.

  Returns {'weak': uint8 [S,S,3], 'strong1', 'strong2': float32 [P] photometric
  parameters of the two strong views (`draw_strong_params`; the device applies
  them to the weak view, `uccl_jax.augment`), 'valid': int32 [4] the
  non-padded region (ignore mask 255 outside it), 'box1', 'box2': int32 [4]
  CutMix boxes (top, left, height, width; all 0 = no box)}. The record's mask,
  if any, is never read. `render_unlabeled_views` turns this into the images
  and maps on the host (previews, tests).
  """
  image = record['image']
  geometry = draw_geometry(image.shape[0], image.shape[1], crop_size, rng, vflip_prob=vflip_prob)
  weak, _ = apply_geometry(image, None, geometry, crop_size, UNLABELED_PAD_MARKER)
  strong1 = draw_strong_params(rng)
  box1 = draw_cutmix_box(crop_size, rng)
  strong2 = draw_strong_params(rng)
  box2 = draw_cutmix_box(crop_size, rng)
  return {'weak': weak, 'strong1': strong1, 'strong2': strong2,
          'valid': valid_box(geometry, crop_size), 'box1': box1, 'box2': box2}


def render_unlabeled_views(views: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The host rendering of `unlabeled_views`: strong views as uint8 images (host photometric ops),
  'ignore' uint8 [S,S] 255 at padding else 0, boxes as int32 [S,S] maps. For previews and tests; the
  train step does the same on the device."""
  crop_size = views['weak'].shape[0]
  ignore = np.where(box_map(views['valid'], crop_size) == 1, 0, IGNORE_VALUE).astype(np.uint8)
  return {'weak': views['weak'],
          'strong1': apply_strong_params_host(views['weak'], views['strong1']),
          'strong2': apply_strong_params_host(views['weak'], views['strong2']),
          'ignore': ignore, 'box1': box_map(views['box1'], crop_size),
          'box2': box_map(views['box2'], crop_size)}
