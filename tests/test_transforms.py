"""Tests of the training views against naive references and hand-checked cases."""

from __future__ import annotations

import numpy as np
from PIL import Image
import pytest

from uccl_jax.data import transforms

CROP = 16


def _record(height: int, width: int, seed: int = 0, *, with_mask: bool = True) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  record = {'image': rng.integers(0, 256, (height, width, 3), dtype=np.uint8)}
  if with_mask:
    record['mask'] = rng.integers(0, 19, (height, width), dtype=np.uint8)
  return record


def _naive_geometry(image, mask, g: transforms.Geometry, crop: int, mask_pad: int):
  """UniMatch's order on whole images: resize all, pad right/bottom, crop, flip."""
  height, width = image.shape[:2]
  resized = np.asarray(Image.fromarray(image).resize((g.resized_width, g.resized_height), Image.BILINEAR))
  rows = np.minimum(np.floor((np.arange(g.resized_height) + 0.5) * height / g.resized_height).astype(int), height - 1)
  cols = np.minimum(np.floor((np.arange(g.resized_width) + 0.5) * width / g.resized_width).astype(int), width - 1)
  resized_mask = mask[rows][:, cols]
  pad_h, pad_w = max(crop - g.resized_height, 0), max(crop - g.resized_width, 0)
  padded = np.pad(resized, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
  padded_mask = np.pad(resized_mask, ((0, pad_h), (0, pad_w)), constant_values=mask_pad)
  out = padded[g.top:g.top + crop, g.left:g.left + crop]
  out_mask = padded_mask[g.top:g.top + crop, g.left:g.left + crop]
  if g.hflip:
    out, out_mask = out[:, ::-1], out_mask[:, ::-1]
  if g.vflip:
    out, out_mask = out[::-1], out_mask[::-1]
  return out, out_mask


def test_hand_checked_upscale_crop_flip():
  # 2x2 image doubled to 4x4 (nearest-like for the mask), crop 3 at (1, 1), flipped left-right.
  mask = np.array([[1, 2], [3, 4]], np.uint8)
  image = np.stack([mask * 10] * 3, axis=-1).astype(np.uint8)
  g = transforms.Geometry(resized_height=4, resized_width=4, top=1, left=1, hflip=True, vflip=False)
  _, out_mask = transforms.apply_geometry(image, mask, g, 3, 255)
  # Resized mask rows: [1,1,2,2],[1,1,2,2],[3,3,4,4],[3,3,4,4]; crop rows 1..3, cols 1..3; then flip.
  np.testing.assert_array_equal(out_mask, [[2, 2, 1], [4, 4, 3], [4, 4, 3]])


def test_hand_checked_padding_labeled_and_vflip():
  # A 2x3 image kept at its size (long side 3), crop 4: one row and one column of padding.
  mask = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
  image = np.full((2, 3, 3), 100, np.uint8)
  g = transforms.Geometry(resized_height=2, resized_width=3, top=0, left=0, hflip=False, vflip=True)
  out_image, out_mask = transforms.apply_geometry(image, mask, g, 4, 255)
  np.testing.assert_array_equal(out_mask, [[255] * 4, [255] * 4, [3, 4, 5, 255], [0, 1, 2, 255]])
  assert (out_image[2:, :3] == 100).all() and (out_image[:2] == 0).all() and (out_image[:, 3] == 0).all()


@pytest.mark.parametrize('seed', range(12))
def test_apply_geometry_matches_resize_everything_then_crop(seed):
  rng = np.random.default_rng(seed)
  height, width = (int(v) for v in rng.integers(5, 30, size=2))
  record = _record(height, width, seed)
  g = transforms.draw_geometry(height, width, CROP, rng, vflip_prob=0.5)
  image, mask = transforms.apply_geometry(record['image'], record['mask'], g, CROP, 254)
  want_image, want_mask = _naive_geometry(record['image'], record['mask'], g, CROP, 254)
  np.testing.assert_array_equal(mask, want_mask)
  # PIL resamples the cropped box in fixed point: allow a rounding step or two.
  assert np.abs(image.astype(int) - want_image.astype(int)).max() <= 2


def test_draw_geometry_ranges():
  rng = np.random.default_rng(0)
  longs, hflips = [], []
  for _ in range(400):
    g = transforms.draw_geometry(20, 40, CROP, rng)
    longs.append(g.resized_width)
    assert g.resized_height == int(20 * g.resized_width / 40 + 0.5)
    assert 0 <= g.left <= max(g.resized_width, CROP) - CROP
    assert 0 <= g.top <= max(g.resized_height, CROP) - CROP
    assert not g.vflip
    hflips.append(g.hflip)
  assert min(longs) == 20 and max(longs) == 80  # the integer range [int(0.5 L), int(2 L)], both ends drawn
  assert 0.4 < np.mean(hflips) < 0.6


def test_normalize_matches_torchvision_definition():
  image = np.arange(0, 256, dtype=np.uint8)[None, :, None].repeat(3, axis=2)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  want = (image / 255.0 - mean) / std
  got = transforms.normalize(image)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_labeled_view_shapes_dtypes_and_pad_value():
  record = _record(6, 9)  # small: crop 16 needs padding at any scale up to 2x... and not at some
  seen_pad = False
  for seed in range(10):
    view = transforms.labeled_view(record, CROP, np.random.default_rng(seed))
    assert view['image'].shape == (CROP, CROP, 3) and view['image'].dtype == np.uint8
    assert view['mask'].shape == (CROP, CROP) and view['mask'].dtype == np.uint8
    values = set(np.unique(view['mask']).tolist())
    assert values <= set(range(19)) | {255}
    seen_pad |= 255 in values
  assert seen_pad


def _unlabeled(seed: int, size=(10, 14), crop: int = CROP, vflip_prob: float = 0.0):
  record = _record(*size, seed, with_mask=False)
  return transforms.unlabeled_views(record, crop, np.random.default_rng(seed), vflip_prob=vflip_prob)


def test_unlabeled_views_contract():
  views = _unlabeled(0)
  assert views['weak'].shape == (CROP, CROP, 3) and views['weak'].dtype == np.uint8
  for key in ('strong1', 'strong2'):
    assert views[key].shape == (len(transforms.STRONG_PARAMS),) and views[key].dtype == np.float32
  for key in ('valid', 'box1', 'box2'):
    assert views[key].shape == (4,) and views[key].dtype == np.int32
  rendered = transforms.render_unlabeled_views(views)
  for key in ('weak', 'strong1', 'strong2'):
    assert rendered[key].shape == (CROP, CROP, 3) and rendered[key].dtype == np.uint8
  for key in ('ignore', 'box1', 'box2'):
    assert rendered[key].shape == (CROP, CROP)


def test_unlabeled_views_draw_in_the_order_of_the_dense_host_views():
  """Geometry, strong view 1, box 1, strong view 2, box 2: UniMatch's order, so a seed gives the views
  the host-rendered pipeline gave (the strong views through the host photometric ops)."""
  record = _record(14, 18, 7, with_mask=False)
  views = transforms.unlabeled_views(record, CROP, np.random.default_rng(11))
  rng = np.random.default_rng(11)
  geometry = transforms.draw_geometry(14, 18, CROP, rng)
  weak, _ = transforms.apply_geometry(record['image'], None, geometry, CROP, 254)
  strong1 = transforms.strong_view(weak, rng)
  box1 = transforms.draw_cutmix_box(CROP, rng)
  strong2 = transforms.strong_view(weak, rng)
  box2 = transforms.draw_cutmix_box(CROP, rng)
  rendered = transforms.render_unlabeled_views(views)
  np.testing.assert_array_equal(rendered['weak'], weak)
  np.testing.assert_array_equal(rendered['strong1'], strong1)
  np.testing.assert_array_equal(rendered['strong2'], strong2)
  np.testing.assert_array_equal(views['box1'], box1)
  np.testing.assert_array_equal(views['box2'], box2)


@pytest.mark.parametrize('seed', range(8))
def test_ignore_marks_exactly_the_padding(seed):
  rng = np.random.default_rng(seed)
  record = _record(int(rng.integers(4, 20)), int(rng.integers(4, 20)), seed, with_mask=False)
  vflip_prob = 0.5
  # Same draws as unlabeled_views makes first: the geometry.
  g = transforms.draw_geometry(*record['image'].shape[:2], CROP, np.random.default_rng(100 + seed),
                               vflip_prob=vflip_prob)
  views = transforms.unlabeled_views(record, CROP, np.random.default_rng(100 + seed),
                                     vflip_prob=vflip_prob)
  # The padding is where the resized image does not reach, from the geometry alone.
  inside = np.zeros((CROP, CROP), bool)
  inside[:g.resized_height - g.top, :g.resized_width - g.left] = True
  if g.hflip:
    inside = inside[:, ::-1]
  if g.vflip:
    inside = inside[::-1]
  np.testing.assert_array_equal(transforms.render_unlabeled_views(views)['ignore'],
                                np.where(inside, 0, 255))
  # The weak view is black wherever it is padding.
  assert (views['weak'][~inside] == 0).all()


def test_unlabeled_views_never_read_a_mask():
  record = _record(12, 12, with_mask=True)
  with_mask = transforms.unlabeled_views(record, CROP, np.random.default_rng(3))
  record.pop('mask')
  without = transforms.unlabeled_views(record, CROP, np.random.default_rng(3))
  for key in with_mask:
    np.testing.assert_array_equal(with_mask[key], without[key])


def _luma(image: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(image).convert('L'), np.float64)


@pytest.mark.parametrize('seed', range(10))
def test_strong_view_commutes_with_flips_and_transpose(seed):
  """Only colour ops and a symmetric blur: the same draws on a mirrored/transposed input give the
  mirrored/transposed output (a crop, shift or flip inside the strong view would not)."""
  weak = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
  base = transforms.strong_view(weak, np.random.default_rng(seed)).astype(int)
  mirrored = transforms.strong_view(np.ascontiguousarray(weak[:, ::-1]), np.random.default_rng(seed))
  transposed = transforms.strong_view(np.ascontiguousarray(weak.transpose(1, 0, 2)), np.random.default_rng(seed))
  # PIL's blur runs box passes over rows then columns, rounding in between: allow a few steps
  # (any geometric change would move noise pixels by ~85 on average).
  for candidate in (mirrored[:, ::-1], transposed.transpose(1, 0, 2)):
    difference = np.abs(candidate.astype(int) - base)
    assert difference.max() <= 4 and difference.mean() < 0.5


def test_strong_views_are_aligned_with_the_weak_view():
  """On a smooth scene, a strong view's luma follows the weak view's far better than the mirrored
  weak view's, and some strong views (no op drawn, p 0.08) equal the weak view."""
  low_res = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  scene = np.asarray(Image.fromarray(low_res).resize((30, 24), Image.BICUBIC))
  identical, aligned = 0, 0
  for seed in range(30):
    views = transforms.render_unlabeled_views(
        transforms.unlabeled_views({'image': scene}, 20, np.random.default_rng(seed)))
    weak = _luma(views['weak']).ravel()
    mirrored = _luma(np.ascontiguousarray(views['weak'][:, ::-1])).ravel()
    for key in ('strong1', 'strong2'):
      identical += np.array_equal(views[key], views['weak'])
      strong = _luma(views[key]).ravel()
      if strong.std() == 0:
        continue
      aligned += np.corrcoef(weak, strong)[0, 1] > np.corrcoef(mirrored, strong)[0, 1] + 0.1
  assert identical >= 1
  assert aligned >= 50


def test_strong_view_identity_when_no_op_is_drawn():
  weak = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)

  class NoOpRng:
    """Draws that skip jitter (>= 0.8), grayscale (>= 0.2) and blur (>= 0.5)."""
    def random(self):
      return 0.95
  np.testing.assert_array_equal(transforms.strong_view(weak, NoOpRng()), weak)


def test_strong_view_grayscale_is_pil_luma():
  weak = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)

  class GrayOnlyRng:
    """Skip jitter (0.9), take grayscale (0.1), skip blur (0.9)."""
    def __init__(self):
      self.values = iter([0.9, 0.1, 0.9])

    def random(self):
      return next(self.values)
  gray = transforms.strong_view(weak, GrayOnlyRng())
  r, g, b = (weak[..., i].astype(np.int64) for i in range(3))
  want = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # PIL's ITU-R 601-2 luma in fixed point
  for channel in range(3):
    np.testing.assert_array_equal(gray[..., channel], want)


def test_color_jitter_hue_shift_matches_hsv_rotation():
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 6, 3), dtype=np.uint8))
  shifted = np.asarray(transforms._shift_hue(image, int(0.1 * 255)).convert('HSV'), np.int64)  # pylint: disable=protected-access
  hsv = np.asarray(image.convert('HSV'), np.int64)
  hue_diff = (shifted[..., 0] - hsv[..., 0]) % 256
  # Round-tripping HSV->RGB->HSV moves the hue by at most a couple of steps.
  circular = np.minimum(np.abs(hue_diff - 25), 256 - np.abs(hue_diff - 25))
  assert np.median(circular) <= 2


def test_cutmix_boxes_inside_with_area_and_ratio_in_range():
  crop = 64
  rng = np.random.default_rng(0)
  boxes = [transforms.box_map(transforms.draw_cutmix_box(crop, rng), crop) for _ in range(300)]
  present = [box for box in boxes if box.any()]
  assert 0.4 < len(present) / len(boxes) < 0.6
  for box in present:
    assert box.dtype == np.int32 and set(np.unique(box).tolist()) == {0, 1}
    rows, cols = np.nonzero(box)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert box.sum() == height * width  # one rectangle, wholly inside the crop by construction of the array
    area = height * width
    # int() truncation of sqrt(area/ratio) and sqrt(area*ratio) shrinks each side by < 1 pixel.
    assert area <= 0.4 * crop * crop + 1e-9
    assert (np.sqrt(area) + 1) ** 2 >= 0.02 * crop * crop or area == 0
    assert 0.3 - 0.1 <= height / width <= 1 / 0.3 + 0.5


def test_cutmix_box_probability_zero_and_one():
  rng = np.random.default_rng(0)
  assert not transforms.draw_cutmix_box(16, rng, prob=0.0).any()
  assert all(transforms.draw_cutmix_box(16, rng, prob=1.0)[2:].all() for _ in range(20))


def test_views_are_repeatable_and_seed_dependent():
  first, again, other = _unlabeled(5), _unlabeled(5), _unlabeled(6)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first['weak'], other['weak'])


def test_vflip_prob_one_flips_vertically():
  record = _record(CROP, CROP)
  g_plain = transforms.draw_geometry(CROP, CROP, CROP, np.random.default_rng(4))
  g_flip = transforms.draw_geometry(CROP, CROP, CROP, np.random.default_rng(4), vflip_prob=1.0)
  assert g_flip.vflip and not g_plain.vflip
  assert (g_plain.resized_height, g_plain.top, g_plain.left, g_plain.hflip) == (
      g_flip.resized_height, g_flip.top, g_flip.left, g_flip.hflip)
  _, mask_plain = transforms.apply_geometry(record['image'], record['mask'], g_plain, CROP, 255)
  _, mask_flip = transforms.apply_geometry(record['image'], record['mask'], g_flip, CROP, 255)
  np.testing.assert_array_equal(mask_flip, mask_plain[::-1])
