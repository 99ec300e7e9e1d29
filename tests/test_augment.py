"""The strong views split into host draws (`transforms.draw_strong_params`) and device ops
(`uccl_jax.augment.strong_views`): same random stream as before, the host view unchanged bit for
bit, and the device view equal to the host's up to rounding."""

from __future__ import annotations

import itertools

import cv2
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from PIL import Image, ImageEnhance
import pytest

from uccl_jax import augment
from uccl_jax.data import transforms

P = {name: i for i, name in enumerate(transforms.STRONG_PARAMS)}

# x86 builds of OpenCV convert HSV->RGB with IPP, which the device follows; OpenCV's own code (ARM
# builds, or IPP switched off) reads the hue on another scale, several grey levels apart.
requires_ipp = pytest.mark.skipif(not cv2.ipp.useIPP(), reason='the device hue op follows IPP')


# --- The strong view as it was before the host/device split (uccl_jax/data/transforms.py at
# --- 2dc443a), the reference for the random stream and the host result.

def _reference_adjust_hue(image, hue_factor):
  hsv = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2HSV_FULL)
  hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(hue_factor * 255)) % 256).astype(np.uint8)
  return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


def _reference_color_jitter(image, rng):
  order = rng.permutation(4)
  brightness = rng.uniform(0.5, 1.5)
  contrast = rng.uniform(0.5, 1.5)
  saturation = rng.uniform(0.5, 1.5)
  hue = rng.uniform(-0.25, 0.25)
  for op in order:
    if op == 0:
      image = ImageEnhance.Brightness(image).enhance(brightness)
    elif op == 1:
      image = ImageEnhance.Contrast(image).enhance(contrast)
    elif op == 2:
      image = ImageEnhance.Color(image).enhance(saturation)
    else:
      image = _reference_adjust_hue(image, hue)
  return image


def _reference_strong_view(weak, rng):
  image = Image.fromarray(weak)
  if rng.random() < 0.8:
    image = _reference_color_jitter(image, rng)
  if rng.random() < 0.2:
    image = image.convert('L').convert('RGB')
  strong = np.asarray(image)
  if rng.random() < 0.5:
    strong = cv2.GaussianBlur(strong, (0, 0), sigmaX=rng.uniform(0.1, 2.0), borderType=cv2.BORDER_REPLICATE)
  return strong


# --- Test images: every branch of the colour code, at a small odd size.

def _image(seed: int, height: int = 33, width: int = 47) -> np.ndarray:
  """Noise, a smooth scene, saturated and black pixels, greys (S = 0) and reds on both sides of
  the hue wrap-around (H near 0 and near 255)."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  low = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
  image[height // 3:] = np.asarray(Image.fromarray(low).resize((width, height - height // 3), Image.BICUBIC))
  image[:3, :, :] = 255
  image[3:5, :] = 0
  image[5:8] = image[5:8, :, :1]  # greys
  image[8:11, :, 0] = 255  # reds with a little green (H just above 0) or blue (H just below 256)
  image[8:11, :, 1] = rng.integers(0, 12, (3, width))
  image[8:11, :, 2] = rng.integers(0, 12, (3, width))
  image[8:11, ::2, 1] = 0
  image[11:13, :, :] = rng.choice(np.array([0, 1, 254, 255], np.uint8), (2, width, 3))
  return image


def _params(**values) -> np.ndarray:
  """A parameter vector: neutral (nothing applied) except for `values`."""
  p = dict(transforms._NEUTRAL_STRONG_PARAMS)  # pylint: disable=protected-access
  p.update(values)
  return np.array([p[name] for name in transforms.STRONG_PARAMS], np.float32)


def _crafted_params() -> np.ndarray:
  """Every op order (all 24) with extreme factors and hue shifts, then grayscale and blurs at the
  ends of the sigma range (3 and 13 taps)."""
  rows = []
  shifts = [-63, 63, -1, 1, 0, 37]
  for k, order in enumerate(itertools.permutations(range(4))):
    rows.append(_params(jitter=1.0, **{f'order{slot}': op for slot, op in enumerate(order)},
                        brightness=(0.5, 1.5, 1.2)[k % 3], contrast=(1.5, 0.5, 0.8)[k % 3],
                        saturation=(0.5, 1.5, 1.37)[k % 3], hue_shift=shifts[k % len(shifts)],
                        grayscale=float(k % 5 == 0), blur=float(k % 2), sigma=(0.1, 1.9999, 0.7, 1.3)[k % 4]))
  rows.append(_params(grayscale=1.0))
  rows.append(_params(blur=1.0, sigma=0.1))
  rows.append(_params(blur=1.0, sigma=1.9999))
  rows.append(_params(grayscale=1.0, blur=1.0, sigma=1.05))
  return np.stack(rows)


_STRONG_VIEWS = jax.jit(augment.strong_views)
_CHUNK = 16  # batches go through in chunks of one size, so that XLA compiles once per image size


def _device(images: np.ndarray, params: np.ndarray) -> np.ndarray:
  out = []
  for start in range(0, len(images), _CHUNK):
    chunk, chunk_params = images[start:start + _CHUNK], params[start:start + _CHUNK]
    missing = _CHUNK - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((missing,) + chunk.shape[1:], chunk.dtype)])
    chunk_params = np.concatenate([chunk_params, np.stack([_params()] * missing)]) if missing else chunk_params
    out.append(np.asarray(_STRONG_VIEWS(chunk, chunk_params))[:_CHUNK - missing])
  return np.concatenate(out)


def _host(images: np.ndarray, params: np.ndarray) -> np.ndarray:
  return np.stack([transforms.apply_strong_params_host(image, p) for image, p in zip(images, params)])


# Host vs device. Both compute the same integer formulas (PIL's float32 blends with truncation,
# PIL's fixed-point luma and integer contrast mean, OpenCV's integer RGB->HSV tables, the exact
# HSV->RGB values rounded as IPP rounds them, OpenCV's fixed-point blur), so most views are equal
# bit for bit (all 48 drawn views below; over 256 64x64 views, 1.6e-6 of the values differ, at
# most by 3). What is left: IPP misrounds ~220 of the 2^24 colours by one level (its float32
# arithmetic; the device is exact), a blur tap may round the other way (float32 exp vs softdouble,
# ~1 sigma in 20,000 of the range), and XLA may fuse a blend into one FMA (PIL rounds twice). A
# one-level difference from the hue op grows with the blends after it, by about their factor
# (<= 1.5) each: ~3.4 levels after three of them; the blur only averages. A contrast mean moved
# by one level shifts its image by at most 0.5 before flooring: one level over that image.
MAX_LEVELS = 4
MAX_MEAN = 0.05


def _assert_close(device: np.ndarray, host: np.ndarray) -> tuple[float, float]:
  difference = np.abs(device.astype(np.float64) - host.astype(np.float64))
  assert difference.max() <= MAX_LEVELS, difference.max()
  assert difference.mean() <= MAX_MEAN, difference.mean()
  return float(difference.max()), float(difference.mean())


# --- (a) the random stream.

@pytest.mark.parametrize('seed', range(40))
def test_draw_strong_params_consumes_the_stream_of_the_old_strong_view(seed):
  weak = _image(seed)
  old, new = np.random.default_rng(seed), np.random.default_rng(seed)
  _reference_strong_view(weak, old)
  transforms.draw_strong_params(new)
  assert new.bit_generator.state == old.bit_generator.state
  assert new.random() == old.random()


def test_draw_strong_params_layout_and_neutral_values():
  seen_orders, flags = set(), {name: set() for name in ('jitter', 'grayscale', 'blur')}
  for seed in range(200):
    params = transforms.draw_strong_params(np.random.default_rng(seed))
    assert params.dtype == np.float32 and params.shape == (len(transforms.STRONG_PARAMS),)
    p = dict(zip(transforms.STRONG_PARAMS, params.tolist()))
    for name in flags:
      assert p[name] in (0.0, 1.0)
      flags[name].add(p[name])
    order = tuple(int(p[f'order{k}']) for k in range(4))
    assert sorted(order) == [0, 1, 2, 3]
    if p['jitter']:
      seen_orders.add(order)
      for name in ('brightness', 'contrast', 'saturation'):
        assert 0.5 <= p[name] <= 1.5
      assert p['hue_shift'] == int(p['hue_shift']) and -63 <= p['hue_shift'] <= 63
    else:
      assert order == (0, 1, 2, 3) and p['brightness'] == p['contrast'] == p['saturation'] == 1.0
      assert p['hue_shift'] == 0
    assert (0.1 <= p['sigma'] < 2.0) if p['blur'] else p['sigma'] == 0.0
  assert len(seen_orders) == 24
  assert all(values == {0.0, 1.0} for values in flags.values())


def test_float64_draws_equal_float32_draws_rounded():
  for seed in range(20):
    wide = transforms.draw_strong_params(np.random.default_rng(seed), dtype=np.float64)
    narrow = transforms.draw_strong_params(np.random.default_rng(seed))
    np.testing.assert_array_equal(wide.astype(np.float32), narrow)


# --- (c) the host view is unchanged.

@pytest.mark.parametrize('seed', range(40))
def test_strong_view_is_bit_identical_to_the_original(seed):
  weak = _image(seed)
  old, new = np.random.default_rng(seed), np.random.default_rng(seed)
  want = _reference_strong_view(weak, old)
  got = transforms.strong_view(weak, new)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  assert new.bit_generator.state == old.bit_generator.state


def test_float32_params_give_the_original_host_view():
  """What the pipeline ships (float32) renders as the original view on the host too (only sigma
  is rounded, and OpenCV's 8-bit kernel rarely notices)."""
  for seed in range(40):
    weak = _image(seed)
    want = _reference_strong_view(weak, np.random.default_rng(seed))
    got = transforms.apply_strong_params_host(weak, transforms.draw_strong_params(np.random.default_rng(seed)))
    np.testing.assert_array_equal(got, want)


# --- (b) device vs host.

@requires_ipp
def test_device_matches_host_on_drawn_params():
  seeds = range(48)
  images = np.stack([_image(1000 + seed) for seed in seeds])
  params = np.stack([transforms.draw_strong_params(np.random.default_rng(seed)) for seed in seeds])
  # The seeds reach every branch: jitter on/off, every op in every slot, grayscale, blur.
  assert {(slot, int(p[P[f'order{slot}']])) for p in params if p[P['jitter']] for slot in range(4)} == {
      (slot, op) for slot in range(4) for op in range(4)}
  for name in ('jitter', 'grayscale', 'blur'):
    assert set(params[:, P[name]].tolist()) == {0.0, 1.0}
  _assert_close(_device(images, params), _host(images, params))


@requires_ipp
def test_device_matches_host_on_many_consecutive_views():
  rng = np.random.default_rng(7)  # one generator for all, as a sample draws its views in turn
  images = np.stack([_image(4000 + k) for k in range(128)])
  params = np.stack([transforms.draw_strong_params(rng) for _ in range(128)])
  device, host = _device(images, params), _host(images, params)
  _assert_close(device, host)
  assert np.mean(device != host) < 1e-4


@requires_ipp
def test_device_matches_host_on_every_order_and_extreme():
  params = _crafted_params()
  images = np.stack([_image(2000 + k) for k in range(len(params))])
  _assert_close(_device(images, params), _host(images, params))


@requires_ipp
def test_device_matches_strong_view_with_float64_draws():
  images = np.stack([_image(3000 + seed) for seed in range(16)])
  params = np.stack([transforms.draw_strong_params(np.random.default_rng(seed)) for seed in range(16)])
  host = np.stack([transforms.strong_view(image, np.random.default_rng(seed)) for seed, image in enumerate(images)])
  _assert_close(_device(images, params), host)


@requires_ipp
def test_hue_shift_matches_opencv_on_a_sample_of_all_colours():
  colours = np.random.default_rng(0).integers(0, 256, (1, 256, 1024, 3), dtype=np.uint8)
  for shift in (0, 63, -63, 1):
    planes = [jnp.asarray(colours[..., c], jnp.int32) for c in range(3)]
    device = np.stack(augment._shift_hue(*planes, jnp.array([shift], jnp.int32)), -1)  # pylint: disable=protected-access
    host = np.asarray(transforms._shift_hue(Image.fromarray(colours[0]), shift))  # pylint: disable=protected-access
    difference = np.abs(device[0] - host.astype(int))
    assert difference.max() <= 1
    assert np.mean(difference.any(-1)) < 1e-4  # IPP's float rounding, ~220 of 2^24 colours


def test_blur_matches_opencv_for_sigmas_across_the_range():
  rng = np.random.default_rng(0)
  sigmas = np.concatenate([[0.1, 0.25, 0.5, 1.0, 1.5, 1.9999], rng.uniform(0.1, 2.0, 58)]).astype(np.float32)
  shapes = [(33, 47), (5, 3), (1, 9)]  # also narrower than the 13-tap kernel
  for height, width in shapes:
    images = rng.integers(0, 256, (len(sigmas), height, width, 3), dtype=np.uint8)
    params = np.stack([_params(blur=1.0, sigma=s) for s in sigmas])
    device = _device(images, params)
    host = np.stack([cv2.GaussianBlur(image, (0, 0), sigmaX=float(s), borderType=cv2.BORDER_REPLICATE)
                     for image, s in zip(images, sigmas)])
    difference = np.abs(device - host)
    assert difference.max() <= 1
    assert np.mean(difference > 0) < 1e-3


def test_blur_kernels_are_opencv_sizes_and_sum_to_256():
  sigmas = jnp.asarray([0.1, 0.25, 0.75, 1.0, 1.2, 1.5, 1.75, 1.9999], jnp.float32)
  kernels = np.asarray(augment.blur_kernels(sigmas))
  assert kernels.shape == (8, augment.MAX_BLUR_TAPS) and augment.MAX_BLUR_TAPS == 13
  np.testing.assert_array_equal(kernels.sum(1), 256)
  np.testing.assert_array_equal(kernels, kernels[:, ::-1])
  for sigma, kernel in zip(np.asarray(sigmas).tolist(), kernels):
    size = int(np.rint(sigma * 6 + 1)) | 1  # cvRound(sigma * 6 + 1) | 1 for 8-bit images
    outside = (augment.MAX_BLUR_TAPS - size) // 2
    assert not kernel[:outside].any() and not kernel[augment.MAX_BLUR_TAPS - outside:].any()


def test_luma_mean_rounds_half_up_as_pil():
  gray = np.array([[[0, 1], [1, 1]], [[0, 1], [0, 1]], [[0, 0], [0, 1]], [[255, 254], [255, 255]]], np.int32)
  want = [1, 1, 0, 255]  # means 0.75, 0.5 (a tie: up), 0.25, 254.75
  np.testing.assert_array_equal(augment._luma_mean(jnp.asarray(gray)), want)  # pylint: disable=protected-access


# --- The device function's contract.

def test_no_op_params_return_the_image():
  images = np.stack([_image(k) for k in range(3)])
  params = np.stack([_params()] * 3)
  out = _device(images, params)
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_array_equal(out, images)


def test_uint8_and_float_inputs_agree_and_shapes_vary():
  for shape in ((_CHUNK, 33, 47), (3, 16, 9)):
    images = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    params = np.stack([transforms.draw_strong_params(np.random.default_rng(k)) for k in range(shape[0])])
    from_bytes = np.asarray(_STRONG_VIEWS(images, params))
    assert from_bytes.shape == images.shape and from_bytes.dtype == np.float32
    assert np.all(from_bytes == np.round(from_bytes)) and from_bytes.min() >= 0 and from_bytes.max() <= 255
  np.testing.assert_array_equal(np.asarray(_STRONG_VIEWS(images.astype(np.float32), params)), from_bytes)


def test_batch_sharded_over_data_runs_without_collectives():
  """Per-image work only: sharded over a 'data' axis it compiles to no cross-device traffic and
  gives the unsharded result."""
  devices = np.array(jax.devices()[:4])
  if devices.size < 2:
    pytest.skip('needs several devices (tests/conftest.py fakes 4 CPU devices)')
  mesh = Mesh(devices, ('data',))
  images = np.stack([_image(k, 17, 23) for k in range(2 * devices.size)])
  params = np.stack([transforms.draw_strong_params(np.random.default_rng(k)) for k in range(len(images))])
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  strong = jax.jit(augment.strong_views, in_shardings=(sharding, sharding), out_shardings=sharding)
  hlo = strong.lower(images, params).compile().as_text()
  for collective in ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute', 'reduce-scatter'):
    assert collective not in hlo
  np.testing.assert_array_equal(np.asarray(strong(images, params)), _device(images, params))
