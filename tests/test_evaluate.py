"""Evaluation protocols and mIoU against NumPy references written from UniMatch's evaluate()."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uccl_jax import evaluate as ev
from uccl_jax.data import transforms

NUM_CLASSES = 5
RNG = np.random.default_rng(0)
# Parameters of a fake network whose output depends on where the window is:
# per-pixel colour map + the window's mean colour + the position inside the
# window. With it, a window placed or cut differently changes the labels.
PIXEL_MAP = RNG.normal(size=(3, NUM_CLASSES))
CONTEXT_MAP = RNG.normal(size=(3, NUM_CLASSES)) * 3.0
ROW_BIAS = RNG.normal(size=NUM_CLASSES)
COL_BIAS = RNG.normal(size=NUM_CLASSES)


def fake_logits_jax(params, images):
  pixel_map, context_map, row_bias, col_bias = params
  _, h, w, _ = images.shape
  rows = (jnp.arange(h, dtype=jnp.float32) / h)[None, :, None, None]
  cols = (jnp.arange(w, dtype=jnp.float32) / w)[None, None, :, None]
  context = jnp.mean(images, axis=(1, 2)) @ context_map
  return images @ pixel_map + context[:, None, None, :] + rows * row_bias + cols * col_bias


FAKE_PARAMS = tuple(np.asarray(p, np.float32) for p in (PIXEL_MAP, CONTEXT_MAP, ROW_BIAS, COL_BIAS))
FAKE_PREDICT = jax.tree_util.Partial(fake_logits_jax, FAKE_PARAMS)


def fake_logits_numpy(images):
  """Same fake network in float64 NumPy, one window [N, h, w, 3] at a time."""
  _, h, w, _ = images.shape
  rows = (np.arange(h) / h)[None, :, None, None]
  cols = (np.arange(w) / w)[None, None, :, None]
  context = images.mean(axis=(1, 2)) @ CONTEXT_MAP
  return images @ PIXEL_MAP + context[:, None, None, :] + rows * ROW_BIAS + cols * COL_BIAS


def softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def unimatch_windows(h, w, grid):
  """UniMatch's loop, written out: the slices it feeds to the model."""
  out = []
  row = 0
  while row < h:
    col = 0
    while col < w:
      out.append((slice(row, min(h, row + grid)), slice(col, min(w, col + grid))))
      col += int(grid * 2 / 3)
    row += int(grid * 2 / 3)
  return out


def reference_scores(images, mode, crop):
  """Class scores [B, h, w, C] whose argmax is UniMatch's prediction (NumPy, float64)."""
  if mode == 'sliding_window':
    b, h, w, _ = images.shape
    final = np.zeros((b, h, w, NUM_CLASSES))
    for rows, cols in unimatch_windows(h, w, crop):
      final[:, rows, cols] += softmax(fake_logits_numpy(images[:, rows, cols]))
    return final
  if mode == 'center_crop':
    h, w = images.shape[1:3]
    start_h, start_w = (h - crop) // 2, (w - crop) // 2
    images = images[:, start_h:start_h + crop, start_w:start_w + crop]
  return fake_logits_numpy(images)


def assert_labels_match(labels, scores):
  """Labels equal the reference argmax wherever the reference is not a near tie (float32 vs 64)."""
  top2 = np.sort(scores, axis=-1)[..., -2:]
  decided = (top2[..., 1] - top2[..., 0]) > 1e-4
  assert labels.shape == scores.shape[:-1]
  assert decided.mean() > 0.99
  np.testing.assert_array_equal(labels[decided], scores.argmax(-1)[decided])


def make_images(count, h, w, seed):
  return np.random.default_rng(seed).normal(size=(count, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize('h,w,grid', [(1024, 2048, 801), (37, 53, 16), (16, 16, 16), (10, 40, 16),
                                      (49, 49, 24), (5, 7, 2)])
def test_sliding_window_tiles_are_unimatch_loop(h, w, grid):
  expected = [(r.start, c.start, r.stop - r.start, c.stop - c.start)
              for r, c in unimatch_windows(h, w, grid)]
  assert ev.sliding_window_tiles(h, w, grid) == expected
  covered = np.zeros((h, w), bool)
  for row, col, th, tw in expected:
    covered[row:row + th, col:col + tw] = True
  assert covered.all()


def test_sliding_window_cityscapes_geometry():
  # 1024x2048 with 801 windows, stride 534: rows 0, 534; cols 0, 534, 1068, 1602, border cut.
  tiles = ev.sliding_window_tiles(1024, 2048, 801)
  assert ev.sliding_window_stride(801) == 534
  assert len(tiles) == 8
  assert tiles[3] == (0, 1602, 801, 446)
  assert tiles[7] == (534, 1602, 490, 446)


@pytest.mark.parametrize('mode,crop', [('original', 16), ('center_crop', 12),
                                       ('sliding_window', 16), ('sliding_window', 9)])
def test_protocols_match_numpy_reference(mode, crop):
  images = make_images(3, 29, 41, seed=1)
  labels = ev.predict_labels(FAKE_PREDICT, images, mode=mode, crop_size=crop)
  assert_labels_match(labels, reference_scores(images.astype(np.float64), mode, crop))


def test_sliding_window_batches_equal_window_shapes():
  seen = []

  def recording_predict(images):
    seen.append(tuple(images.shape))  # at trace time: one entry per network call
    return fake_logits_jax(FAKE_PARAMS, images)

  images = make_images(2, 29, 41, seed=2)
  devices = jax.local_devices()[:2]
  labels = ev.predict_labels(recording_predict, images, mode='sliding_window', crop_size=16,
                             devices=devices)
  assert_labels_match(labels, reference_scores(images.astype(np.float64), 'sliding_window', 16))
  # stride 10: rows 0,10,20 (heights 16,16,9), cols 0,10,20,30,40 (widths 16,16,16,11,1).
  shapes = {}
  for rows, cols in unimatch_windows(29, 41, 16):
    key = (rows.stop - rows.start, cols.stop - cols.start)
    shapes[key] = shapes.get(key, 0) + 1
  assert sorted(seen) == sorted((2 * n, h, w, 3) for (h, w), n in shapes.items())


def test_sliding_window_differs_from_whole_image():
  # The fake network is context dependent: the protocol matters, so the test above can fail.
  images = make_images(1, 29, 41, seed=3)
  whole = ev.predict_labels(FAKE_PREDICT, images, mode='original', crop_size=16)
  windows = ev.predict_labels(FAKE_PREDICT, images, mode='sliding_window', crop_size=16)
  assert (whole != windows).mean() > 0.05


def test_center_crop_box():
  assert ev.center_crop_box(29, 41, 12) == (8, 14, 12, 12)
  assert ev.center_crop_box(10, 41, 12) == (0, 14, 10, 12)  # short axis kept whole


def test_counts_hand_checked():
  # Classes 0..3; 255 ignored. Hand counts below.
  mask = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 255],
                   [255, 2, 2, 2]])
  pred = np.array([[0, 1, 1, 1],
                   [0, 2, 0, 3],
                   [3, 2, 2, 1]])
  counts = ev.intersection_union_counts(pred, mask, 4)
  # class 0: pred {(0,0),(1,0),(1,2)}, label {(0,0),(0,1),(1,0)} -> I 2, U 4
  # class 1: pred {(0,1),(0,2),(0,3),(2,3)}, label {(0,2),(0,3)} -> I 2, U 4
  # class 2: pred {(1,1),(2,1),(2,2)}, label {(1,1),(1,2),(2,1),(2,2),(2,3)} -> I 3, U 5
  # class 3: pred only at ignored pixels -> I 0, U 0
  np.testing.assert_array_equal(counts, [[2, 2, 3, 0], [4, 4, 5, 0], [3, 2, 5, 0]])
  result = ev.EvalResult.from_counts(counts, num_images=1)
  np.testing.assert_allclose(result.iou_per_class, [50.0, 50.0, 60.0, 0.0], atol=1e-6)
  # UniMatch: mean over all classes, the absent one counting 0.
  assert result.miou == pytest.approx((50 + 50 + 60 + 0) / 4)
  np.testing.assert_array_equal(result.present, [True, True, True, False])
  assert result.pixel_accuracy == pytest.approx(100 * 7 / 10)


def test_ignored_pixels_never_count():
  mask = np.full((6, 7), 255)
  mask[:3] = np.arange(7)[None] % 3
  pred = np.random.default_rng(4).integers(0, 3, size=(6, 7))
  other = pred.copy()
  other[3:] = (pred[3:] + 1) % 3
  np.testing.assert_array_equal(ev.intersection_union_counts(pred, mask, 3),
                                ev.intersection_union_counts(other, mask, 3))
  np.testing.assert_array_equal(ev.intersection_union_counts(pred, mask, 3),
                                ev.intersection_union_counts(pred[:3], mask[:3], 3))


def test_bad_mask_label_names_the_image():
  with pytest.raises(ev.EvalError, match=r"'frankfurt_1'.*label 7"):
    ev.intersection_union_counts(np.zeros((2, 2)), np.array([[0, 7], [1, 255]]), 5,
                                 name='frankfurt_1')
  with pytest.raises(ev.EvalError, match=r"'img3'.*class 6, outside \[0, 5\)"):
    ev.intersection_union_counts(np.array([[0, 6]]), np.array([[0, 1]]), 5, name='img3')


def make_dataset(seed):
  rng = np.random.default_rng(seed)
  records = []
  for i, (h, w) in enumerate([(20, 30), (20, 30), (20, 30), (25, 18), (20, 30), (20, 30)]):
    mask = rng.integers(0, NUM_CLASSES, size=(h, w)).astype(np.int32)
    mask[rng.random((h, w)) < 0.2] = 255
    records.append({'image': rng.normal(size=(h, w, 3)).astype(np.float32), 'mask': mask,
                    'name': f'img{i}'})
  return records


@pytest.mark.parametrize('mode', ['original', 'center_crop', 'sliding_window'])
def test_evaluate_matches_per_image_reference(mode):
  records = make_dataset(5)
  crop = 14
  result = ev.evaluate(FAKE_PREDICT, iter(records), num_classes=NUM_CLASSES, mode=mode,
                       crop_size=crop)
  expected = np.zeros((3, NUM_CLASSES), np.int64)
  for record in records:
    scores = reference_scores(record['image'][None].astype(np.float64), mode, crop)[0]
    mask = record['mask']
    if mode == 'center_crop':
      h, w = mask.shape
      mask = mask[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop]
    valid = mask != 255
    pred, label = scores.argmax(-1)[valid], mask[valid]
    for c in range(NUM_CLASSES):
      inter = np.sum((pred == c) & (label == c))
      expected[:, c] += [inter, np.sum(pred == c) + np.sum(label == c) - inter, np.sum(label == c)]
  # Near ties could flip a pixel between float32 and float64; the fake network has none here.
  np.testing.assert_array_equal(np.stack([result.intersection, result.union, result.target]),
                                expected)
  assert result.num_images == len(records)
  assert result.miou == pytest.approx(np.mean(expected[0] / (expected[1] + 1e-10) * 100))


def test_two_processes_sum_to_one_process():
  records = make_dataset(6)
  kwargs = dict(num_classes=NUM_CLASSES, mode='sliding_window', crop_size=14)
  shard0 = ev.evaluate_local_counts(FAKE_PREDICT, records[0::2], **kwargs)
  shard1 = ev.evaluate_local_counts(FAKE_PREDICT, records[1::2], **kwargs)
  whole = ev.evaluate_local_counts(FAKE_PREDICT, records, images_per_device=2, **kwargs)
  np.testing.assert_array_equal(shard0[0] + shard1[0], whole[0])
  assert shard0[1] + shard1[1] == whole[1] == len(records)
  # One process: the cross-process sum is the identity.
  counts, num_images = ev.sum_counts_over_processes(whole[0], whole[1])
  np.testing.assert_array_equal(counts, whole[0])
  assert num_images == len(records)


def test_progress_reports_images_done():
  done = []
  ev.evaluate(FAKE_PREDICT, make_dataset(7), num_classes=NUM_CLASSES, mode='original',
              crop_size=14, progress=done.append)
  # Shapes A A A B A A on 4 devices: the fourth A fills a batch (4 images), then the
  # leftovers leave at the end, oldest shape first: B (5), A (6).
  assert done == [4, 5, 6]


def label_logits(images):
  """A 'network' that predicts the class index stored in channel 0 of float images."""
  return jax.nn.one_hot(images[..., 0].astype(jnp.int32), NUM_CLASSES)


LABEL_PREDICT = jax.tree_util.Partial(label_logits)


def numpy_counts(pred, mask, num_classes, ignore=255):
  """Independent reference: per class, boolean maps of the non-ignored pixels."""
  valid = mask != ignore
  out = np.zeros((3, num_classes), np.int64)
  for c in range(num_classes):
    predicted, labelled = (pred == c) & valid, (mask == c) & valid
    out[:, c] = [np.sum(predicted & labelled), np.sum(predicted | labelled), np.sum(labelled)]
  return out


def labelled_records(shapes, seed):
  """Records whose image carries its prediction in channel 0; masks uint8 with ~30% ignored."""
  rng = np.random.default_rng(seed)
  records, expected = [], np.zeros((3, NUM_CLASSES), np.int64)
  for i, (h, w) in enumerate(shapes):
    pred = rng.integers(0, NUM_CLASSES, (h, w))
    mask = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.3] = 255
    image = np.zeros((h, w, 3), np.float32)
    image[..., 0] = pred
    records.append({'image': image, 'mask': mask, 'name': f'odd{i}'})
    expected += numpy_counts(pred, mask, NUM_CLASSES)
    np.testing.assert_array_equal(ev.intersection_union_counts(pred, mask, NUM_CLASSES),
                                  numpy_counts(pred, mask, NUM_CLASSES))  # the host twin agrees
  return records, expected


def test_device_counts_equal_numpy_counts_with_ignore_and_odd_sizes():
  records, expected = labelled_records([(13, 29), (7, 5), (13, 29), (1, 1), (7, 5), (13, 29),
                                        (31, 3)], seed=11)
  counts, num_images = ev.evaluate_local_counts(LABEL_PREDICT, records, num_classes=NUM_CLASSES,
                                                mode='original', crop_size=4)
  np.testing.assert_array_equal(counts, expected)
  assert num_images == len(records)
  # The traceable counter itself, on one batch with an all-ignored filler image.
  pred = np.stack([r['image'][..., 0] for r in records if r['mask'].shape == (13, 29)])
  masks = np.stack([r['mask'] for r in records if r['mask'].shape == (13, 29)]
                   + [np.full((13, 29), 255, np.uint8)])
  pred = np.concatenate([pred, np.zeros_like(pred[:1])]).astype(np.int32)
  counts, bad = jax.jit(functools.partial(ev.device_counts, num_classes=NUM_CLASSES))(pred, masks)
  for b in range(4):
    np.testing.assert_array_equal(counts[b], numpy_counts(pred[b], masks[b], NUM_CLASSES))
  assert not np.asarray(bad).any()


def test_device_counters_carry_past_int32():
  # Counters hold high * 2**30 + low per device; start one just below 2**31 - 1 (int32's
  # limit) and add an image: the total must come back exact, beyond int32, in int64.
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:2]), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  counters = ev._zero_counters(2, NUM_CLASSES)
  counters['high'][0] = 1
  counters['low'][0] = (1 << 30) - 10  # (2**31 - 10) pixels counted already, every entry
  pred = np.ones((2, 7, 5), np.float32)[..., None].repeat(3, axis=-1)
  masks = np.ones((2, 7, 5), np.uint8)
  out = ev._evaluate_batch(LABEL_PREDICT, jax.device_put(counters, sharding),
                           *jax.device_put((pred, masks, np.arange(2, dtype=np.int32)), sharding),
                           window=None, num_classes=NUM_CLASSES, ignore_index=255,
                           sharding=sharding)
  counts = ev._read_counters(out, ['a', 'b'], 255)
  expected = np.full((3, NUM_CLASSES), 2**31 - 10, np.int64)  # device 0's start
  expected[:, 1] += 2 * 35  # both images: 35 pixels of class 1, predicted 1
  assert expected.max() > np.iinfo(np.int32).max
  np.testing.assert_array_equal(counts, expected)


def test_lone_images_are_not_evaluated_twice_and_shapes_are_grouped():
  seen = []

  def recording_predict(images):  # what each slot of each batch holds, at run time
    jax.debug.callback(lambda s: seen.append(np.asarray(s)),
                       jnp.sum(jnp.abs(images), axis=(1, 2, 3)))
    return fake_logits_jax(FAKE_PARAMS, images)

  rng = np.random.default_rng(13)
  # Shapes alternate A B A B A B A B A: on 4 devices, batches A A A A | B B B B | A + 3 fillers.
  records = [{'image': rng.normal(size=(9, 11) if i % 2 else (10, 12)).astype(np.float32)[..., None]
                       .repeat(3, axis=-1),
              'mask': rng.integers(0, NUM_CLASSES, (9, 11) if i % 2 else (10, 12)).astype(np.uint8),
              'name': f'img{i}'} for i in range(9)]
  done = []
  counts, _ = ev.evaluate_local_counts(recording_predict, records, num_classes=NUM_CLASSES,
                                       mode='original', crop_size=4, progress=done.append)
  assert done == [4, 8, 9]
  assert [int(np.sum(slots != 0)) for slots in seen] == [4, 4, 1]  # fillers are zeros, not copies
  one_device, _ = ev.evaluate_local_counts(FAKE_PREDICT, records, num_classes=NUM_CLASSES,
                                           mode='original', crop_size=4,
                                           devices=jax.local_devices()[:1])
  np.testing.assert_array_equal(counts, one_device)


def test_no_device_to_host_reads_until_the_end(cpu_transfer_guard):
  # Implicit reads (float(x), .item(), ...) raise under this guard (emulated on CPU by the
  # conftest fixture); the one explicit jax.device_get at the end runs under 'allow'.
  del cpu_transfer_guard
  with jax.transfer_guard_device_to_host('disallow'):
    result = ev.evaluate(FAKE_PREDICT, make_dataset(14), num_classes=NUM_CLASSES,
                         mode='sliding_window', crop_size=14)
  assert result.num_images == 6


def test_bad_labels_found_on_the_device_name_the_image():
  records = make_dataset(15)
  records[3]['mask'][0, 0] = 7
  with pytest.raises(ev.EvalError, match=r"'img3' has label 7.*\(1 images like it\)"):
    ev.evaluate(FAKE_PREDICT, records, num_classes=NUM_CLASSES, mode='original', crop_size=14)
  with pytest.raises(ev.EvalError, match='the model has 5 outputs but data.num_classes is 4'):
    ev.evaluate(FAKE_PREDICT, make_dataset(15), num_classes=4, mode='original', crop_size=14)


def test_device_normalisation_is_the_host_normalisation_bit_for_bit():
  values = np.arange(256, dtype=np.uint8)
  pixels = np.stack([values, np.roll(values, 85), np.roll(values, 170)], axis=-1).reshape(16, 16, 3)
  device = np.asarray(jax.jit(ev.normalize_on_device)(pixels))
  np.testing.assert_array_equal(device, transforms.normalize(pixels))
  float64 = (pixels / 255.0 - transforms.IMAGENET_MEAN.astype(np.float64)) / transforms.IMAGENET_STD
  np.testing.assert_array_equal(device, float64.astype(np.float32))


class TinySegmenter(nn.Module):
  """Stands in for DeepLabV3Plus: same apply contract, BN that must run in inference mode."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(4, (3, 3))(images)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return {'logits': nn.Conv(NUM_CLASSES, (1, 1))(nn.relu(x))}


def test_make_predict_fn_inference_mode_and_no_recompile():
  model = TinySegmenter()
  images = make_images(2, 12, 12, seed=8)
  variables = model.init(jax.random.key(0), images)
  stats = jax.tree_util.tree_map(lambda x: x + 0.5, variables['batch_stats'])
  variables = {'params': variables['params'], 'batch_stats': stats}
  expected = model.apply(variables, images, train=False)['logits'].argmax(-1)
  predict = ev.make_predict_fn(model, variables)
  np.testing.assert_array_equal(
      ev.predict_labels(predict, images, mode='original', crop_size=8), expected)
  # A fresh predict_fn with new variables (next epoch) reuses the compiled program.
  cache_size = ev._predict_labels_program._cache_size()
  new_params = jax.tree_util.tree_map(lambda x: x * 1.1, variables['params'])
  predict = ev.make_predict_fn(model, {'params': new_params, 'batch_stats': stats})
  expected = model.apply({'params': new_params, 'batch_stats': stats}, images,
                         train=False)['logits'].argmax(-1)
  np.testing.assert_array_equal(
      ev.predict_labels(predict, images, mode='original', crop_size=8), expected)
  assert ev._predict_labels_program._cache_size() == cache_size


def test_uint8_images_evaluate_as_their_host_normalised_floats_without_recompiling():
  model = TinySegmenter()
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  rng = np.random.default_rng(16)
  raw = [{'image': rng.integers(0, 256, (19, 23, 3), dtype=np.uint8),
          'mask': rng.integers(0, NUM_CLASSES, (19, 23)).astype(np.uint8), 'name': f'u{i}'}
         for i in range(5)]
  host = [dict(r, image=transforms.normalize(r['image'])) for r in raw]
  kwargs = dict(num_classes=NUM_CLASSES, mode='sliding_window', crop_size=9)
  on_device = ev.evaluate_local_counts(ev.make_predict_fn(model, variables), raw, **kwargs)
  on_host = ev.evaluate_local_counts(ev.make_predict_fn(model, variables), host, **kwargs)
  np.testing.assert_array_equal(on_device[0], on_host[0])
  # Next epoch: fresh predict_fn, new variables, same compiled evaluation program.
  cache_size = ev._evaluate_batch._cache_size()
  new = {'params': jax.tree_util.tree_map(lambda x: x * 0.9, variables['params']),
         'batch_stats': variables['batch_stats']}
  ev.evaluate_local_counts(ev.make_predict_fn(model, new), raw, **kwargs)
  assert ev._evaluate_batch._cache_size() == cache_size


def test_format_iou_table():
  counts = np.array([[2, 2, 3, 0], [4, 4, 5, 0], [3, 2, 5, 0]])
  table = ev.format_iou_table(ev.EvalResult.from_counts(counts, 1), ['road', 'car', 'sky', 'bus'])
  lines = table.splitlines()
  assert lines[-1] == 'mIoU: 40.00'
  assert any(line.split()[1:3] == ['sky', '60.00'] for line in lines)
  assert 'absent' in next(line for line in lines if ' bus ' in line)
  with pytest.raises(ev.EvalError, match='3 class names for 4 classes'):
    ev.format_iou_table(ev.EvalResult.from_counts(counts, 1), ['a', 'b', 'c'])


def test_bad_inputs_raise_clear_errors():
  images = make_images(1, 8, 8, seed=9)
  with pytest.raises(ev.EvalError, match='eval.mode must be one of'):
    ev.predict_labels(FAKE_PREDICT, images, mode='slide', crop_size=4)
  with pytest.raises(ev.EvalError, match='crop_size >= 2'):
    ev.predict_labels(FAKE_PREDICT, images, mode='sliding_window', crop_size=1)
  with pytest.raises(ev.EvalError, match='logits of shape'):
    ev.predict_labels(lambda x: x[:, ::2, ::2, :2], images, mode='original', crop_size=4)


_TWO_PROCESS_WORKER = '''
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
process_id, port, tests_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=process_id)
sys.path.insert(0, tests_dir)
import numpy as np
import test_evaluate as t
from uccl_jax import evaluate as ev
model = t.TinySegmenter()
variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
# As the train state holds them: global arrays replicated over both processes' devices.
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
variables = jax.device_put(variables, replicated)
assert not jax.tree_util.tree_leaves(variables)[0].is_fully_addressable
records = t.make_dataset(6)[process_id::2]
result = ev.evaluate(ev.make_predict_fn(model, variables), records, num_classes=t.NUM_CLASSES,
                     mode='original', crop_size=14)
print(json.dumps({'counts': np.stack([result.intersection, result.union, result.target]).tolist(),
                  'num_images': result.num_images}))
'''


def test_two_real_processes_sum_counts(tmp_path):
  """Two JAX processes (gloo), each on its own images and local devices, equal one process."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  tests_dir = pathlib.Path(__file__).parent
  workers = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_WORKER, str(i), str(port),
                               str(tests_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tests_dir.parent) for i in range(2)]
  outputs = []
  for worker in workers:
    try:
      out, err = worker.communicate(timeout=120)
    finally:
      worker.kill()  # only our own children, if still running
    assert worker.returncode == 0, err[-2000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))

  model = TinySegmenter()
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  expected = ev.evaluate(ev.make_predict_fn(model, variables), make_dataset(6),
                         num_classes=NUM_CLASSES, mode='original', crop_size=14)
  for output in outputs:
    np.testing.assert_array_equal(
        output['counts'], np.stack([expected.intersection, expected.union, expected.target]))
    assert output['num_images'] == 6
