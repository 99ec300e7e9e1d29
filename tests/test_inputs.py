"""The host batch contract and its expansion on the device (uccl_jax.inputs).

References: the host pipeline's own renderings (`transforms.render_unlabeled_views`:
box maps drawn in NumPy, strong views through the host photometric ops) and
the host normalisation (`transforms.normalize`, a float64 lookup table).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from uccl_jax import inputs
from uccl_jax.data import pipeline
from uccl_jax.data import transforms

CROP = 24


class _Source:
  def __init__(self, count, *, labeled, seed):
    rng = np.random.default_rng(seed)
    self.records = []
    for _ in range(count):
      height, width = int(rng.integers(8, 30)), int(rng.integers(8, 30))
      record = {'image': rng.integers(0, 256, (height, width, 3), dtype=np.uint8)}
      if labeled:
        record['mask'] = rng.integers(0, 5, (height, width), dtype=np.uint8)
      self.records.append(record)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def _pipeline_batch(step=0, batch=4):
  maker = pipeline.make_batch_maker(_Source(5, labeled=True, seed=1), _Source(12, labeled=False, seed=2),
                                    crop_size=CROP, global_batch=batch, seed=3)
  return maker.batch(step)


def test_host_batch_spec_is_what_the_pipeline_yields():
  batch = _pipeline_batch()
  got = jax.tree.map(lambda x: (x.shape, x.dtype), batch)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), inputs.host_batch_spec(CROP, 4))
  assert got == want


def test_normalize_is_torchvision_in_float64_rounded_once_for_every_byte():
  values = np.arange(256, dtype=np.uint8)
  image = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1)[None]  # [1, 256, 3]
  want = ((image / 255.0 - transforms.IMAGENET_MEAN.astype(np.float64))
          / transforms.IMAGENET_STD.astype(np.float64)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(inputs.normalize)(image)), want)
  # The strong views arrive as float32 holding integers: the same values.
  np.testing.assert_array_equal(np.asarray(jax.jit(inputs.normalize)(image.astype(np.float32))), want)


def test_box_mask_matches_the_host_box_map():
  rng = np.random.default_rng(0)
  boxes = [transforms.draw_cutmix_box(CROP, rng, prob=1.0) for _ in range(20)]
  boxes += [np.zeros(4, np.int32), np.array([0, 0, CROP, CROP], np.int32),
            np.array([CROP - 1, 3, 1, CROP - 3], np.int32)]
  got = np.asarray(inputs.box_mask(np.stack(boxes), CROP))
  for box, mask in zip(boxes, got):
    np.testing.assert_array_equal(mask, transforms.box_map(box, CROP) == 1, err_msg=str(box))


@pytest.mark.parametrize('step', [0, 1, 2])
def test_expand_equals_the_host_rendering(step):
  """Every dense array the step reads, against the host's NumPy/PIL/OpenCV rendering of the same
  draws: exact for masks, boxes and the weak views; within rounding for the strong views."""
  batch = _pipeline_batch(step)
  dense = jax.tree.map(np.asarray, jax.jit(inputs.expand)(batch))
  np.testing.assert_array_equal(dense['labeled']['image'],
                                np.stack([transforms.normalize(x) for x in batch['labeled']['image']]))
  np.testing.assert_array_equal(dense['labeled']['mask'], batch['labeled']['mask'].astype(np.int32))
  assert dense['labeled']['mask'].dtype == np.int32
  std = transforms.IMAGENET_STD * 255.0
  for stream in ('unlabeled', 'mix'):
    for index in range(4):
      views = {key: value[index] for key, value in batch[stream].items()}
      if stream == 'mix':  # the mixing stream ships no boxes; render needs some
        views.update(box1=np.zeros(4, np.int32), box2=np.zeros(4, np.int32))
      host = transforms.render_unlabeled_views(views)
      np.testing.assert_array_equal(dense[stream]['ignore'][index], host['ignore'] == 255)
      np.testing.assert_array_equal(dense[stream]['weak'][index], transforms.normalize(host['weak']))
      for key in ('strong1', 'strong2'):
        grey_levels = np.abs(dense[stream][key][index] - transforms.normalize(host[key])) * std
        assert grey_levels.max() <= STRONG_MAX_LEVELS + 1e-3, (stream, index, key)
        assert grey_levels.mean() <= STRONG_MEAN_LEVELS, (stream, index, key)
      if stream == 'unlabeled':
        for key in ('box1', 'box2'):
          np.testing.assert_array_equal(dense[stream][key][index], host[key] == 1)
  assert set(dense['mix']) == {'weak', 'strong1', 'strong2', 'ignore'}


# The device photometric ops equal the host's up to rounding: at most ~3.4 grey levels by the
# argument in test_augment.py (observed: 3, on 1.6e-6 of the values).
STRONG_MAX_LEVELS = 4.0
STRONG_MEAN_LEVELS = 0.5
