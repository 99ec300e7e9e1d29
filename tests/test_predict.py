"""`python -m uccl_jax.predict`: files, sizes, palettes, and predictions equal to a PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from uccl_jax import convert
from uccl_jax import evaluate
from uccl_jax import models
from uccl_jax import predict
from uccl_jax.config import base_config
from uccl_jax.data import classes
import torch_reference

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The synthetic demo network shrunk: ResNet-18, deep stem, width 4, head 8 (reduce 1), 7 classes.
ARCH = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2), width=4, head_channels=8,
                            reduce_channels=1, num_classes=7)
CONFIG_FLAGS = ('--config=configs/synthetic.py', '--config.model.width=4', '--config.model.head_channels=8')
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _model() -> models.DeepLabV3Plus:
  return models.DeepLabV3Plus(num_classes=7, backbone='resnet18', width=4, head_channels=8)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """(torch state dict, converted folder) of a random-weight UniMatch checkpoint."""
  folder = tmp_path_factory.mktemp('weights')
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=0)
  torch.save({'model': state}, folder / 'best.pth')
  assert convert.main([str(folder / 'best.pth'), f'--out={folder / "converted"}']) == 0
  return state, str(folder / 'converted')


def _write_images(folder) -> dict[str, np.ndarray]:
  """Five RGB images of two sizes (one in a sub-folder, one a greyscale PNG); name -> pixels."""
  rng = np.random.default_rng(0)
  images = {}
  for name, (h, w) in (('a', (40, 56)), ('sub/b', (33, 45)), ('c', (40, 56)), ('d', (33, 45)),
                       ('e', (40, 56))):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = folder / f'{name}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == 'e':
      pixels = np.repeat(pixels[..., :1], 3, axis=-1)
      Image.fromarray(pixels[..., 0], mode='L').save(path)
    else:
      Image.fromarray(pixels).save(path)
    images[name] = pixels
  (folder / 'notes.txt').write_text('not an image')
  return images


def _reference_probs(state, pixels: np.ndarray) -> np.ndarray:
  """Softmax of the PyTorch reference network on the ImageNet-normalised image, [H, W, C] float64."""
  normalised = ((pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)[None]
  logits = torch_reference.deeplab_forward(state, normalised, ARCH)['logits'][0].astype(np.float64)
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def _block_means_error(image: np.ndarray, expected: np.ndarray, block: int = 8) -> float:
  h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
  means = lambda x: x[:h, :w].reshape(h // block, block, w // block, block, 3).mean(axis=(1, 3))
  return float(np.abs(means(image) - means(expected)).mean())


def _assert_labels_match(labels: np.ndarray, probs: np.ndarray) -> None:
  """Labels equal the reference argmax wherever the top two classes are not a float tie."""
  top2 = np.sort(probs, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-4
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(labels[clear], np.argmax(probs, -1)[clear])


def test_cli_writes_palette_masks_overlays_and_confidence(tmp_path, weights):
  state, converted = weights
  images = _write_images(tmp_path / 'images')
  out = tmp_path / 'out'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-m', 'uccl_jax.predict', *CONFIG_FLAGS, f'--checkpoint={converted}',
       f'--images={tmp_path / "images"}', f'--out={out}', '--save_probs'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  assert 'Traceback' not in result.stderr and 'warning' not in result.stderr
  assert 'read only' not in result.stderr  # orbax's log lines stay off the console
  assert 'predicting 5 images' in result.stderr and '2 devices' in result.stderr
  assert '5/5' in result.stderr  # the progress bar's last state

  table = classes.synthetic()
  for name, pixels in images.items():
    mask = Image.open(out / 'masks' / f'{name}.png')
    assert mask.mode == 'P' and mask.size == (pixels.shape[1], pixels.shape[0])
    palette = np.array(mask.getpalette()[:3 * table.num_classes]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, np.array(table.colors))
    labels = np.asarray(mask)
    probs = _reference_probs(state, pixels)
    _assert_labels_match(labels, probs)

    overlay = Image.open(out / 'overlays' / f'{name}.jpg')
    assert overlay.format == 'JPEG' and overlay.mode == 'RGB' and overlay.size == mask.size
    expected_overlay = 0.5 * pixels + 0.5 * np.array(table.colors)[labels]
    # JPEG keeps the mean colour of every 8x8 block (noise images lose their fine detail).
    assert _block_means_error(np.asarray(overlay, np.float64), expected_overlay) < 3

    confidence = np.load(out / 'confidence' / f'{name}.npy')
    assert confidence.dtype == np.float16 and confidence.shape == labels.shape
    np.testing.assert_allclose(confidence, probs.max(-1), atol=2e-3)
    grey = Image.open(out / 'confidence' / f'{name}.png')
    assert grey.mode == 'L' and grey.size == mask.size
    assert np.abs(np.asarray(grey, np.float64) - probs.max(-1) * 255).max() <= 1.0
  assert not (out / 'masks' / 'notes.png').exists()


def test_sliding_window_matches_the_evaluation_protocol_and_a_reference(weights):
  state, converted = weights
  model = _model()
  variables, _ = convert.load_model_variables(converted, model)
  predictor = predict.Predictor(model, variables)
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (3, 28, 35, 3), dtype=np.uint8)  # 3 images on 4 devices: padded
  normalised = ((pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  crop = 21
  labels, confidence = predictor(normalised, mode='sliding_window', crop_size=crop)
  assert labels.shape == confidence.shape == (3, 28, 35)

  # Exactly the labels evaluation scores.
  eval_labels = evaluate.predict_labels(evaluate.make_predict_fn(model, variables), normalised,
                                        mode='sliding_window', crop_size=crop)
  np.testing.assert_array_equal(labels, eval_labels)

  # Independent reference: PyTorch softmax per window, summed, divided by the windows covering a pixel.
  for b in range(3):
    total = np.zeros((28, 35, 7))
    coverage = np.zeros((28, 35, 1))
    for row, col, h, w in evaluate.sliding_window_tiles(28, 35, crop):
      total[row:row + h, col:col + w] += _reference_probs(state, pixels[b, row:row + h, col:col + w])
      coverage[row:row + h, col:col + w] += 1
    mean = total / coverage
    _assert_labels_match(labels[b], mean)
    np.testing.assert_allclose(confidence[b], mean.max(-1), atol=1e-4)


def test_palettes_of_the_real_datasets():
  """Hand-checked colours: Cityscapes road/sky, VOC aeroplane/person; custom datasets get VOC's map."""
  config = base_config()
  config.data.name, config.data.num_classes = 'cityscapes', 19
  palette = predict.class_palette(config)
  assert palette.shape == (256, 3)
  assert tuple(palette[0]) == (128, 64, 128) and tuple(palette[10]) == (70, 130, 180)
  config.data.name, config.data.num_classes = 'pascal', 21
  palette = predict.class_palette(config)
  assert tuple(palette[1]) == (128, 0, 0) and tuple(palette[15]) == (192, 128, 128)
  config.data.num_classes = 5  # a custom class count: the VOC map, distinct colours
  palette = predict.class_palette(config)
  assert len({tuple(c) for c in palette[:5]}) == 5 and tuple(palette[2]) == (0, 128, 0)


def test_batches_group_images_of_one_size():
  sizes = [(4, 5), (3, 3), (4, 5), (4, 5), (3, 3), (4, 5), (4, 5)]
  assert predict.same_size_batches(sizes, 2) == [[0, 2], [3, 5], [6], [1, 4]]


def _one_line_error(capsys, *flags: str) -> str:
  assert predict.main(list(flags)) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


def _one_black_image(folder):
  """`folder` with one black 20 x 24 PNG, x.png, in it."""
  folder.mkdir()
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / 'x.png')
  return folder


def test_errors_are_one_line_and_existing_outputs_are_kept(tmp_path, weights, capsys):
  _, converted = weights
  images = _one_black_image(tmp_path / 'images')
  out = tmp_path / 'out'
  base = (*CONFIG_FLAGS, f'--images={images}', f'--out={out}')
  cwd = os.getcwd()
  os.chdir(REPO)  # the config path is relative to the repository
  try:
    assert 'exactly one of --workdir' in _one_line_error(capsys, *base)
    assert 'no images found' in _one_line_error(
        capsys, *CONFIG_FLAGS, f'--checkpoint={converted}', f'--images={tmp_path / "none"}/*.png',
        f'--out={out}')
    assert 'class-count mismatch' in _one_line_error(capsys, *base, f'--checkpoint={converted}',
                                                     '--config.data.num_classes=5')
    assert 'config.model.width is 8, set it to 4' in _one_line_error(
        capsys, *base, f'--checkpoint={converted}', '--config.model.width=8')
    assert '--mode=center' in _one_line_error(capsys, *base, f'--checkpoint={converted}', '--mode=center')
    assert 'no such config field' in _one_line_error(capsys, *base, f'--checkpoint={converted}',
                                                     '--config.model.nope=1')
    assert 'no such file or folder' in _one_line_error(capsys, *base, f'--checkpoint={tmp_path / "no"}')
    (images / 'broken.png').write_bytes(b'not a png')
    assert 'broken.png: not a readable image' in _one_line_error(capsys, *base, f'--checkpoint={converted}')
    assert not out.exists()  # nothing written before the inputs were checked
    (images / 'broken.png').unlink()
    (out / 'masks').mkdir(parents=True)
    (out / 'masks' / 'x.png').write_bytes(b'earlier result')
    assert 'output files exist already' in _one_line_error(capsys, *base, f'--checkpoint={converted}')
    assert (out / 'masks' / 'x.png').read_bytes() == b'earlier result'
  finally:
    os.chdir(cwd)


def _in_repo(function):
  """Runs `function()` with the repository as the working directory (the config paths are relative)."""
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    return function()
  finally:
    os.chdir(cwd)


def test_every_image_is_decoded_before_the_first_write(tmp_path, weights, capsys):
  """A truncated PNG sorted after good images: one line naming it, and no output at all."""
  _, converted = weights
  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(3)
  for name in ('a', 'b', 'c'):
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images / f'{name}.png')
  data = (images / 'b.png').read_bytes()
  (images / 'b.png').write_bytes(data[:len(data) // 2])  # the header is intact, the pixels are not
  with Image.open(images / 'b.png') as header_only:
    assert header_only.size == (32, 24)  # a header check alone would pass it
  out = tmp_path / 'out'
  err = _in_repo(lambda: _one_line_error(capsys, *CONFIG_FLAGS, f'--checkpoint={converted}',
                                         f'--images={images}', f'--out={out}', '--save_probs'))
  assert err.startswith(f'error: {images / "b.png"}: not a readable image ('), err
  assert not out.exists()


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, weights, capsys):
  _, converted = weights
  images = _one_black_image(tmp_path / 'images')
  afile = tmp_path / 'afile'
  afile.write_bytes(b'keep')
  locked = '/sys' if os.geteuid() == 0 else str(tmp_path / 'locked')
  if locked != '/sys':
    os.mkdir(locked, 0o555)
  base = (*CONFIG_FLAGS, f'--checkpoint={converted}', f'--images={images}')
  err = _in_repo(lambda: _one_line_error(capsys, *base, f'--out={afile}'))
  assert err == f'error: --out={afile}: is a file, not a folder; choose another --out\n'
  err = _in_repo(lambda: _one_line_error(capsys, *base, f'--out={locked}/predictions'))
  assert err.startswith(f'error: --out={locked}/predictions: cannot write in {locked} (')
  assert afile.read_bytes() == b'keep' and not os.path.exists(f'{locked}/predictions')


def test_old_dashed_spelling_warns_once_and_help_exits_zero(tmp_path, weights, capsys):
  _, converted = weights
  status = _in_repo(lambda: predict.main([*CONFIG_FLAGS, f'--checkpoint={converted}',
                                          f'--images={tmp_path / "none"}', f'--out={tmp_path / "o"}',
                                          '--save-probs']))
  assert status == 1
  assert capsys.readouterr().err.splitlines() == [
      'warning: --save-probs is deprecated; use --save_probs',
      f'error: --images={tmp_path / "none"}: no images found (extensions: '
      f'{" ".join(predict.IMAGE_EXTENSIONS)})']
  for flag in ('--help', '-h', '--helpfull'):
    assert predict.main([flag]) == 0
    out = capsys.readouterr().out
    assert "--workdir=runs/demo \\\n      --images='photos/*.png'" in out
    assert '--save_probs' in out and '--log_level' in out
