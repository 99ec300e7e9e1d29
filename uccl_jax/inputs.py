"""The train batch: what the host ships for one step, and what the step makes of it on the device.

The host sends bytes and numbers, never anything it can describe more briefly
(DESIGN.md, "Feeding accelerators"): at the Cityscapes setting a small fraction
of what dense float32 views took (both figures: docs/RESULTS.md section 4a).
Per process, leading axis B = train.batch_size / process count,
S = data.crop_size, P = the length of `transforms.STRONG_PARAMS`:

  labeled    image uint8 [B,S,S,3]; mask uint8 [B,S,S] (255 = ignore)
  unlabeled  weak uint8 [B,S,S,3]; strong1, strong2 float32 [B,P] (photometric
             parameters of the two strong views, drawn on the host in
             UniMatch's order); valid int32 [B,4] (the non-padded region);
             box1, box2 int32 [B,4] (CutMix boxes)
  mix        weak, strong1, strong2, valid (its CutMix boxes are never read,
             so they are drawn, to keep the random stream, but not sent)

Boxes are (top, left, height, width) in crop pixels; a box of height 0 is "no
box". `expand` (inside the jitted step) turns this into what the losses read:
normalised float32 images, int32 label masks, the two strong views (photometric
ops on the device, `uccl_jax.augment`), boolean ignore masks (True at padding)
and boolean CutMix maps.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uccl_jax import augment
from uccl_jax.data import transforms




def host_batch_spec(crop_size: int, batch_size: int, *,
                    with_unlabeled: bool = True) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """Shapes and dtypes of one host batch (the contract above), e.g. for random benchmark inputs."""
  s, b = int(crop_size), int(batch_size)
  num_params = len(transforms.STRONG_PARAMS)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct((b,) + shape, np.dtype(dtype))

  batch = {'labeled': {'image': spec((s, s, 3), np.uint8), 'mask': spec((s, s), np.uint8)}}
  if with_unlabeled:
    views = {'weak': spec((s, s, 3), np.uint8), 'strong1': spec((num_params,), np.float32),
             'strong2': spec((num_params,), np.float32), 'valid': spec((4,), np.int32)}
    batch['unlabeled'] = dict(views, box1=spec((4,), np.int32), box2=spec((4,), np.int32))
    batch['mix'] = views
  return batch


def normalize(images: jax.Array) -> jax.Array:
  """Pixel values 0..255 (uint8, or float holding integers) [..., 3] -> ImageNet-normalised float32.

  A look-up in the host's table (`transforms.NORMALIZE_TABLE`: torchvision's
  ToTensor + Normalize in float64, rounded once), so the device gives the
  host's values bit for bit, where `(x / 255 - mean) / std` in float32 differs
  in the last bit for more than half of the 768 (value, channel) pairs.
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    images = jnp.clip(jnp.round(images), 0, 255)
  index = images.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
  return jnp.take(jnp.asarray(transforms.NORMALIZE_TABLE.reshape(-1)), index)


def box_mask(boxes: jax.Array, size: int) -> jax.Array:
  """bool [B,S,S]: True inside each (top, left, height, width) box of int32 [B,4]."""
  index = jnp.arange(size, dtype=jnp.int32)
  top, left, height, width = (boxes[:, k, None] for k in range(4))
  rows = (index >= top) & (index < top + height)  # [B,S]
  cols = (index >= left) & (index < left + width)
  return rows[:, :, None] & cols[:, None, :]


def _expand_views(views: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  size = views['weak'].shape[1]
  out = {'weak': normalize(views['weak']),
         'strong1': normalize(augment.strong_views(views['weak'], views['strong1'])),
         'strong2': normalize(augment.strong_views(views['weak'], views['strong2'])),
         'ignore': jnp.logical_not(box_mask(views['valid'], size))}
  for name in ('box1', 'box2'):
    if name in views:
      out[name] = box_mask(views[name], size)
  return out


def expand(batch: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
  """The host batch -> dense arrays for the step (traceable; runs inside the jitted step).

  labeled: image f32 [B,S,S,3] normalised, mask int32 [B,S,S]; unlabeled/mix:
  weak, strong1, strong2 f32 [B,S,S,3] normalised, ignore bool [B,S,S] (True
  at padding), and for unlabeled box1, box2 bool [B,S,S] (True inside).
  """
  out: dict[str, Any] = {'labeled': {'image': normalize(batch['labeled']['image']),
                                     'mask': batch['labeled']['mask'].astype(jnp.int32)}}
  for stream in ('unlabeled', 'mix'):
    if stream in batch:
      out[stream] = _expand_views(batch[stream])
  return out
