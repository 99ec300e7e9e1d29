"""The photometric part of UniMatch's strong views, on the device, from parameters drawn on the host.

Applying a strong view on the host costs milliseconds of CPU at 801x801, and a
Cityscapes step has 32 of them (the host's cost per step: docs/RESULTS.md
section 4a), so the host only draws the parameters
(`transforms.draw_strong_params`, in UniMatch's order of draws) and the train
step applies them here, to the weak view it already has. The ops emulate the
host's (`transforms.apply_strong_params_host`) integer by integer, with the
uint8 rounding and clipping between consecutive ops:

* brightness, contrast, saturation: PIL's ImageEnhance, i.e. `Image.blend`
  with a black image, a grey image of the luma mean rounded half up, or the
  luma image: floor(clip(a + f * (x - a), 0, 255)) in float32, as PIL's C code;
* luma (saturation, contrast's mean, grayscale): PIL's fixed point
  (R*19595 + G*38470 + B*7471 + 0x8000) >> 16;
* hue: OpenCV's 8-bit RGB->HSV_FULL (its integer tables), the integer shift
  mod 256, then HSV_FULL->RGB as IPP computes it (x86 builds of OpenCV): the
  exact value V * (1 - S/255 * ...) with the hue read as H * 6/255 sectors,
  rounded to nearest, in integer arithmetic;
* blur: OpenCV's bit-exact 8-bit Gaussian: kernel size cvRound(6 sigma + 1) | 1,
  taps in 1/256 (rounded with OpenCV's error diffusion, centre = the rest of
  256), a row pass and a column pass summed exactly, rounded half up at the
  end, borders replicated. Per-image kernels of the largest size (13 taps at
  sigma < 2), zero outside each image's own size.

What differs from the host, by rounding only: IPP's float HSV->RGB misrounds
92 of the 2^24 HSV colours (~220 RGB colours through the round trip) by one
level, which later blends can grow to ~3 (the device value is the exact one);
the kernel taps come from a float32 exp (OpenCV: softdouble), so a tap whose
exact value sits at a rounding boundary can move by 1/256 (~1 sigma in 20,000);
XLA may fuse a blend into one FMA (PIL rounds twice). Over 256 random 64x64
views on this machine 1.6e-6 of the values differed, by at most 3 levels;
tests/test_augment.py holds the bounds. Where OpenCV runs without IPP (ARM
builds), its own HSV->RGB reads the hue as H * 6/256 and the host's hue op
differs from this one by up to several levels.

Everything is per-image elementwise work, a per-image mean and short shifted
sums along H and W, so it runs as it is on a batch sharded over the mesh's
'data' axis (no collectives). The four jitter slots run as a `lax.scan` (one
compiled slot instead of four: half the compile time, same result); in each,
every image selects its own op with `jnp.where`, so every slot computes both
the blend and the hue shift for the whole batch. The arithmetic is int32 on
three channel planes (exact, and XLA:CPU is ~1.6x slower on interleaved
channels). Cost: on XLA:CPU these ops take several times what PIL/OpenCV take
on the host per 801x801 image, so a CPU-only run pays more than it did; on a
GPU they are a few memory-bound passes over the image (~0.2 GB of traffic per
801x801 view, an estimate, not a GPU measurement), small next to a
ResNet-50 pass (GPU step times: docs/RESULTS.md section 1d).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from uccl_jax.data import transforms

_INDEX = {name: i for i, name in enumerate(transforms.STRONG_PARAMS)}
_OP = {name: i for i, name in enumerate(transforms.JITTER_OPS)}

# OpenCV's RGB2HSV_b tables (hsv_shift 12, full-range hue), cvRound = round half to even.
_HSV_SHIFT = 12
_DIVISORS = np.arange(1, 256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _DIVISORS)]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((256 << _HSV_SHIFT) / (6.0 * _DIVISORS))]).astype(np.int32)

# The widest blur: cvRound(6 sigma + 1) | 1 taps at the largest sigma drawn.
MAX_BLUR_TAPS = int(np.rint(6 * transforms.BLUR_SIGMA_RANGE[1] + 1)) | 1
_RADIUS = MAX_BLUR_TAPS // 2


Planes = tuple[jax.Array, jax.Array, jax.Array]  # R, G, B: int32 [B,H,W] each


def _per_image(values: jax.Array) -> jax.Array:
  """[B] -> [B,1,1], to broadcast over a plane [B,H,W]."""
  return values[:, None, None]


def luma(r: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
  """int32 R, G, B -> int32 PIL 'L' (ITU-R 601-2 luma in 16-bit fixed point)."""
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _luma_mean(gray: jax.Array) -> jax.Array:
  """int32 [B,H,W] -> int32 [B]: int(mean + 0.5) as PIL's ImageEnhance.Contrast, exactly.

  Integer quotient and remainder instead of a float mean: exact as long as the
  sum fits int32 (up to ~8.4M pixels per image).
  """
  count = gray.shape[1] * gray.shape[2]
  total = jnp.sum(gray, axis=(1, 2), dtype=jnp.int32)
  return total // count + (2 * (total % count) >= count).astype(jnp.int32)


def _blend(degenerate: jax.Array, plane: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL's Image.blend(degenerate, plane, factor) on uint8 values (held in int32)."""
  a = degenerate.astype(jnp.float32)
  value = a + factor * (plane.astype(jnp.float32) - a)
  return jnp.floor(jnp.clip(value, 0.0, 255.0)).astype(jnp.int32)


def _shift_hue(r: jax.Array, g: jax.Array, b: jax.Array, shift: jax.Array) -> Planes:
  """RGB planes, int32 [B] -> RGB planes with the 8-bit full-range HSV hue shifted (mod 256)."""
  v = jnp.maximum(jnp.maximum(r, g), b)
  diff = v - jnp.minimum(jnp.minimum(r, g), b)
  s = (diff * jnp.asarray(_SDIV)[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
  h = jnp.where(v == r, g - b, jnp.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * jnp.asarray(_HDIV)[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
  h = jnp.where(h < 0, h + 256, h)  # in 0..255 from here on
  h = (h + _per_image(shift)) & 255
  # IPP's HSV->RGB: sector floor(6H/255) (6 is sector 0 again), fraction f = (6H mod 255)/255; the
  # candidate values times 255^2, rounded to nearest (never a tie: 255^2 is odd, no value is k + 1/2).
  sector = lax.div(6 * h, 255)
  frac = 6 * h - 255 * sector
  sector = jnp.where(sector == 6, 0, sector)
  full = 255 * 255
  scaled = (v * full, v * (255 - s) * 255, v * (full - s * frac), v * (full - s * (255 - frac)))
  t0, t1, t2, t3 = (lax.div(2 * t + full, 2 * full) for t in scaled)
  # OpenCV's sector_data: which candidate each of R, G, B takes in sectors 0..5.
  return (lax.select_n(sector, t0, t2, t1, t1, t3, t0),
          lax.select_n(sector, t3, t0, t0, t2, t1, t1),
          lax.select_n(sector, t1, t1, t3, t0, t0, t2))


def _jitter_slot(planes: Planes, op: jax.Array, brightness: jax.Array, contrast: jax.Array,
                 saturation: jax.Array, hue_shift: jax.Array) -> Planes:
  """One of ColorJitter's four slots: each image applies its own op (int32 [B], JITTER_OPS)."""
  gray = luma(*planes)
  op_ = _per_image(op)
  degenerate = jnp.where(op_ == _OP['brightness'], 0,
                         jnp.where(op_ == _OP['contrast'], _per_image(_luma_mean(gray)), gray))
  factor = _per_image(jnp.where(op == _OP['brightness'], brightness,
                                jnp.where(op == _OP['contrast'], contrast, saturation)))
  hued = _shift_hue(*planes, hue_shift)
  return tuple(jnp.where(op_ == _OP['hue'], shifted, _blend(degenerate, plane, factor))
               for plane, shifted in zip(planes, hued))


def blur_kernels(sigma: jax.Array) -> jax.Array:
  """float32 [B] -> int32 [B, MAX_BLUR_TAPS]: OpenCV's 8-bit Gaussian taps (sum 256), zero-padded.

  OpenCV (getGaussianKernelBitExact + getGaussianKernelFixedPoint_ED): size
  cvRound(6 sigma + 1) | 1; values exp(-d^2 / (2 sigma^2)) normalised by their
  sum; taps * 256 rounded from the outermost in, each carrying the previous
  rounding error; the centre takes what is left of 256. Here in float32.
  """
  sigma = sigma.astype(jnp.float32)
  size = jnp.minimum(jnp.round(sigma * 6 + 1).astype(jnp.int32) | 1, MAX_BLUR_TAPS)
  half = (size - 1) // 2
  scale = -0.125 / (sigma * sigma)
  distance = jnp.arange(_RADIUS, 0, -1, dtype=jnp.int32)  # outermost first, as OpenCV rounds
  values = jnp.where(distance[None] <= half[:, None],
                     jnp.exp((4 * distance * distance).astype(jnp.float32)[None] * scale[:, None]), 0.0)
  inverse_sum = 1.0 / (2 * jnp.sum(values, axis=1) + 1)
  error = jnp.zeros_like(sigma)
  taps = []
  for k in range(_RADIUS):
    adjusted = values[:, k] * inverse_sum * 256 + error
    tap = jnp.round(adjusted)
    error = adjusted - tap
    taps.append(tap.astype(jnp.int32))
  outer = jnp.stack(taps, axis=1)  # [B, R], outermost first
  centre = 256 - 2 * jnp.sum(outer, axis=1, keepdims=True)
  return jnp.concatenate([outer, centre, outer[:, ::-1]], axis=1)


def gaussian_blur(plane: jax.Array, kernels: jax.Array) -> jax.Array:
  """int32 [B,H,W], int32 [B,K] taps in 1/256 -> int32 blurred, OpenCV's 8-bit fixed point.

  Rows then columns, replicated borders; every partial sum is an integer below
  255 * 2^16, so int32 arithmetic reproduces OpenCV's result exactly.
  """
  height, width = plane.shape[1], plane.shape[2]
  radius = kernels.shape[1] // 2
  taps = [_per_image(kernels[:, k]) for k in range(kernels.shape[1])]
  padded = jnp.pad(plane, ((0, 0), (0, 0), (radius, radius)), mode='edge')
  rows = sum(tap * padded[:, :, k:k + width] for k, tap in enumerate(taps))
  padded = jnp.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode='edge')
  columns = sum(tap * padded[:, k:k + height] for k, tap in enumerate(taps))
  return (columns + (1 << 15)) >> 16


def strong_views(images: jax.Array, params: jax.Array) -> jax.Array:
  """The strong views of a batch: uint8 (or 0..255 float) [B,H,W,3], float32 [B,P] -> float32 [B,H,W,3].

  `params` rows are `transforms.draw_strong_params` vectors. The result holds
  integers 0..255, the host's uint8 strong view up to the rounding noted in the
  module docstring. Jit-able, any B/H/W, per-image work only.
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    images = jnp.clip(jnp.round(images), 0, 255)
  images = images.astype(jnp.int32)
  original: Planes = (images[..., 0], images[..., 1], images[..., 2])
  params = params.astype(jnp.float32)

  def param(name: str) -> jax.Array:
    return params[:, _INDEX[name]]

  def select(name: str, on: Planes, off: Planes) -> Planes:
    flag = _per_image(param(name) > 0.5)
    return tuple(jnp.where(flag, a, b) for a, b in zip(on, off))

  def slot(planes: Planes, op: jax.Array) -> tuple[Planes, None]:
    return _jitter_slot(planes, op, param('brightness'), param('contrast'), param('saturation'),
                        jnp.round(param('hue_shift')).astype(jnp.int32)), None

  # The four slots in order, as a scan: one compiled slot instead of four (compile time).
  orders = jnp.round(params[:, [_INDEX[f'order{k}'] for k in range(4)]].T).astype(jnp.int32)
  jittered, _ = lax.scan(slot, original, orders)
  planes = select('jitter', jittered, original)
  gray = luma(*planes)
  planes = select('grayscale', (gray, gray, gray), planes)
  kernels = blur_kernels(jnp.where(param('blur') > 0.5, param('sigma'), 1.0))  # 1: any valid sigma
  planes = select('blur', tuple(gaussian_blur(plane, kernels) for plane in planes), planes)
  return jnp.stack(planes, axis=-1).astype(jnp.float32)
