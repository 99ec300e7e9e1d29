r"""Colour masks, overlays and confidence maps for new images: `python -m uccl_jax.predict`.

  python -m uccl_jax.predict --config=configs/cityscapes.py (--workdir=RUN | --checkpoint=DIR) \
      --images=DIR_OR_GLOB --out=DIR [--mode=sliding_window|original] [--save_probs]

For every image (a folder is searched recursively; names keep their sub-folders):
  OUT/masks/<name>.png        predicted class per pixel, a palette PNG: the pixel values are the
                              class indices and the dataset's colour map is stored in the file,
                              so image viewers show colours and code reads classes directly
  OUT/overlays/<name>.jpg     the colours blended over the image
  OUT/confidence/<name>.png   with --save_probs: the softmax confidence (max class probability)
                              as 8-bit grey (255 = 1.0), and <name>.npy with it as float16;
                              dark regions are where the model is unsure, the pixels SBU trains

The weights come from `--workdir=RUN` (its best checkpoint, or `--step`), or
`--checkpoint=DIR`: a run/checkpoints/step folder, a folder written by
`python -m uccl_jax.convert`, or a whole-model UniMatch/UCCL .pth. They are
checked strictly against the config's network. Images of one size are batched
over all local devices (one XLA program per image size). 'sliding_window' is
the evaluation protocol of uccl_jax.evaluate (windows of data.crop_size,
probabilities summed), so the masks are exactly what evaluation scores.

Example (the demo run of the README):
  python -m uccl_jax.predict --config=configs/synthetic.py --workdir=runs/demo \
      --images='photos/*.png' --out=predictions --save_probs

Nothing already in OUT is overwritten unless --overwrite; every bad input
(config, weights, an --out that is a file or cannot be written, an image that
does not decode: every image is decoded once before the first write) is one
line on stderr, exit status 1, found before any file is written. Library logs
stay off the console unless --log_level asks for them. The dashed spelling
--save-probs of earlier releases still works, with a deprecation warning.
"""

from __future__ import annotations

import collections
from concurrent import futures
import functools
import glob
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from uccl_jax import cli
from uccl_jax import convert
from uccl_jax import evaluate
from uccl_jax.data import classes
from uccl_jax.data import transforms
from uccl_jax.models import deeplab

MODES = ('original', 'sliding_window')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
MASKS_DIR, OVERLAYS_DIR, CONFIDENCE_DIR = 'masks', 'overlays', 'confidence'
OVERLAY_ALPHA = 0.5  # weight of the class colours in the overlay
OVERLAY_JPEG_QUALITY = 90


class PredictError(Exception):
  """A bad input to the prediction command (names the flag, file or config field)."""


# ----------------------------------------------------------------------------
# Inputs.


def find_images(spec: str) -> list[tuple[str, str]]:
  """(path, output name without extension) of every image a folder or glob names, sorted.

  Names are relative to the folder (or to the glob's fixed leading folder) so
  that images of different sub-folders (Cityscapes' cities) never collide.
  """
  if os.path.isdir(spec):
    root = spec
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(spec) for name in names]
  else:
    paths = glob.glob(spec, recursive=True)
    fixed = spec.split('*', 1)[0].split('?', 1)[0].split('[', 1)[0]
    root = fixed if fixed.endswith(os.sep) else os.path.dirname(fixed)
  paths = sorted(p for p in paths if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise PredictError(f'--images={spec}: no images found (extensions: {" ".join(IMAGE_EXTENSIONS)})')
  items = [(path, os.path.splitext(os.path.relpath(path, root or '.'))[0]) for path in paths]
  seen: dict[str, str] = {}
  for path, name in items:
    if name in seen:
      raise PredictError(f'--images: {seen[name]} and {path} would both be written as {name!r}')
    seen[name] = path
  return items


def decoded_size(path: str) -> tuple[int, int]:
  """(height, width) after decoding every pixel: a truncated or corrupt file fails here, not mid-run."""
  try:
    with Image.open(path) as image:
      image.load()
      width, height = image.size
  except (OSError, SyntaxError, ValueError) as error:
    raise PredictError(f'{path}: not a readable image ({" ".join(str(error).split())})') from None
  return height, width


def decoded_sizes(paths: Sequence[str], threads: int | None = None) -> list[tuple[int, int]]:
  """decoded_size of every path (a thread pool: PIL's decoders release the GIL); the first bad file
  in list order raises PredictError."""
  workers = threads or min(16, 2 * (os.cpu_count() or 1))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(decoded_size, paths))


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] (greyscale, palette and alpha images converted like the pipeline does)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, SyntaxError, ValueError) as error:
    raise PredictError(f'{path}: not a readable image ({error})') from None


def class_palette(config: ml_collections.ConfigDict) -> np.ndarray:
  """uint8 [256, 3]: the dataset's colours (Cityscapes, VOC, synthetic), else the VOC colour map.

  The VOC map is the fallback for custom datasets because every index gets a
  distinct colour and VOC tools already show it.
  """
  num_classes = int(config.data.num_classes)
  try:
    table = classes.for_dataset(config.data.name)
  except ValueError:
    table = None
  if table is None or table.num_classes != num_classes:
    return classes.voc_colormap(256)
  return table.color_lookup()


# ----------------------------------------------------------------------------
# The network on a batch of equal-size images.


@functools.partial(jax.jit, static_argnames=('window',))
def _labels_and_confidence(predict_fn: jax.tree_util.Partial, images: jax.Array,
                           window: int | None) -> tuple[jax.Array, jax.Array]:
  """(i32 [B, H, W] labels, f32 [B, H, W] confidence) of normalised images f32 [B, H, W, 3].

  'sliding_window' (window = crop size) takes the argmax of evaluation's
  summed window softmaxes, so labels are exactly evaluation's; the confidence
  is that sum's maximum over the number of windows covering the pixel (the
  mean probability of the chosen class).
  """
  if window is None:
    probs = jax.nn.softmax(predict_fn(images).astype(jnp.float32), axis=-1)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)
  total, coverage = evaluate.sliding_window_probabilities(predict_fn, images, window)
  return jnp.argmax(total, axis=-1).astype(jnp.int32), jnp.max(total, axis=-1) / coverage


class Predictor:
  """The model with its variables replicated on this process's devices; batches split over them."""

  def __init__(self, model: deeplab.DeepLabV3Plus, variables: Mapping[str, Any], *,
               devices: Sequence[jax.Device] | None = None):
    self.mesh = jax.sharding.Mesh(np.array(list(devices or jax.local_devices())), ('batch',))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put({k: variables[k] for k in ('params', 'batch_stats')}, replicated)
    self.predict_fn = evaluate.make_predict_fn(model, variables)
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('batch'))

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  def __call__(self, images: np.ndarray, *, mode: str = 'original',
               crop_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels i32 [B, H, W], confidence f32 [B, H, W]) of normalised images f32 [B, H, W, 3]."""
    if mode not in MODES:
      raise PredictError(f'--mode={mode}: expected one of {", ".join(MODES)}')
    if mode == 'sliding_window' and crop_size < 2:
      raise PredictError(f'--mode=sliding_window needs data.crop_size >= 2, got {crop_size}')
    count = images.shape[0]
    padded = -count % self.num_devices
    if padded:  # copies of the last image, dropped again below
      images = np.concatenate([images, np.repeat(images[-1:], padded, axis=0)])
    labels, confidence = _labels_and_confidence(
        self.predict_fn, jax.device_put(np.asarray(images, np.float32), self._batch_sharding),
        window=crop_size if mode == 'sliding_window' else None)
    return np.asarray(labels)[:count], np.asarray(confidence)[:count]


# ----------------------------------------------------------------------------
# Outputs.


def save_mask(path: str, labels: np.ndarray, palette: np.ndarray) -> None:
  """A palette ('P') PNG: pixel values are class indices, `palette` [256, 3] is stored in it."""
  image = Image.fromarray(np.asarray(labels, np.uint8), mode='P')
  image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
  image.save(path)


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """uint8 [H, W, 3]: the class colours blended over the image with weight `alpha`."""
  colors = np.asarray(palette, np.float32)[np.asarray(labels, np.uint8)]
  blended = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * colors
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def output_paths(out: str, name: str, save_probs: bool) -> list[str]:
  paths = [os.path.join(out, MASKS_DIR, f'{name}.png'), os.path.join(out, OVERLAYS_DIR, f'{name}.jpg')]
  if save_probs:
    paths += [os.path.join(out, CONFIDENCE_DIR, f'{name}.png'),
              os.path.join(out, CONFIDENCE_DIR, f'{name}.npy')]
  return paths


def _write_outputs(out: str, name: str, image: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                   palette: np.ndarray, save_probs: bool) -> None:
  paths = output_paths(out, name, save_probs)
  for path in paths:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  save_mask(paths[0], labels, palette)
  Image.fromarray(overlay(image, labels, palette)).save(paths[1], quality=OVERLAY_JPEG_QUALITY)
  if save_probs:
    Image.fromarray(np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8), mode='L').save(paths[2])
    np.save(paths[3], confidence.astype(np.float16))


def same_size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
  """Indices grouped by image size (first-seen order), at most `batch_size` per group."""
  by_size: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
  for index, size in enumerate(sizes):
    by_size[size].append(index)
  return [indices[start:start + batch_size] for indices in by_size.values()
          for start in range(0, len(indices), batch_size)]


def check_inputs(images: Sequence[tuple[str, str]], out: str, *, save_probs: bool = False,
                 overwrite: bool = False) -> list[tuple[int, int]]:
  """(height, width) of every image, each decoded in full; PredictError for an image that does
  not decode (truncated, corrupt) or, without `overwrite`, for an output file that exists
  already. Writes nothing."""
  sizes = decoded_sizes([path for path, _ in images])
  if not overwrite:
    existing = [p for _, name in images for p in output_paths(out, name, save_probs) if os.path.exists(p)]
    if existing:
      raise PredictError(f'--out={out}: {len(existing)} output files exist already (e.g. {existing[0]}); '
                         'choose another --out or pass --overwrite')
  return sizes


def predict_images(predictor: Predictor, images: Sequence[tuple[str, str]], out: str, *,
                   palette: np.ndarray, mode: str = 'original', crop_size: int = 0,
                   save_probs: bool = False, batch_size: int | None = None, overwrite: bool = False,
                   sizes: Sequence[tuple[int, int]] | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
  """Writes masks/overlays (and confidence maps) of `images` [(path, name)] under `out`.

  Inputs are checked (check_inputs, unless their `sizes` are given because the
  caller did) before the first write, so an unreadable image or an existing
  output stops the run with nothing written. Returns the number of images
  done; `progress(n)` gets the number done after each batch.
  """
  if sizes is None:
    sizes = check_inputs(images, out, save_probs=save_probs, overwrite=overwrite)
  batch_size = batch_size or predictor.num_devices
  done = 0
  for indices in same_size_batches(sizes, batch_size):
    pixels = [read_image(images[i][0]) for i in indices]
    for i, image in zip(indices, pixels):
      if image.shape[:2] != sizes[i]:
        raise PredictError(f'{images[i][0]}: changed while predicting (size {image.shape[:2]}, '
                           f'was {sizes[i]})')
    labels, confidence = predictor(np.stack([transforms.normalize(image) for image in pixels]),
                                   mode=mode, crop_size=crop_size)
    for k, i in enumerate(indices):
      _write_outputs(out, images[i][1], pixels[k], labels[k], confidence[k], palette, save_probs)
    done += len(indices)
    if progress is not None:
      progress(done)
  return done


# ----------------------------------------------------------------------------
# Command line.


def _define_flags(values: flags.FlagValues, argv: Sequence[str]) -> dict[str, Any]:
  """The flags, on a private FlagValues (so importing this module defines nothing global).

  The `--config.a.b=...` overrides are read from `argv` (config_flags would
  read sys.argv otherwise, which is wrong when `main` is called with a list).
  """
  return {
      'config': cli.define_config_flag(
          values, argv, None, 'Config file (configs/*.py[:arg]); its model and data fields '
          'describe the network, the classes and the palette.'),
      'workdir': flags.DEFINE_string('workdir', None, 'Run folder: predict with its checkpoint.',
                                     flag_values=values),
      'checkpoint': flags.DEFINE_string(
          'checkpoint', None, 'Run/checkpoints/step folder, converted folder (uccl_jax.convert) or '
          'whole-model .pth.', flag_values=values),
      'step': flags.DEFINE_string('step', 'best', "Which checkpoint of a run: 'best', 'latest' or a "
                                  'step number.', flag_values=values),
      'images': flags.DEFINE_string('images', None, 'A folder (searched recursively) or a glob.',
                                    flag_values=values),
      'out': flags.DEFINE_string('out', None, 'Output folder.', flag_values=values),
      'mode': flags.DEFINE_string('mode', None, "'original' (whole image) or 'sliding_window' "
                                  '(windows of data.crop_size); default: eval.mode when it is one '
                                  "of them, else 'original'.", flag_values=values),
      'save_probs': flags.DEFINE_bool('save_probs', False, 'Also write the softmax confidence maps '
                                      '(--save-probs: the old spelling, deprecated).',
                                      flag_values=values),
      'batch_size': flags.DEFINE_integer('batch_size', None, 'Images per network call (default: the '
                                         'number of local devices).', flag_values=values),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'Replace outputs that exist already.',
                                     flag_values=values),
      'log_level': cli.define_log_level_flag(values),
  }


def _parse(argv: Sequence[str]) -> dict[str, Any]:
  """Flag values by name ({} after printing --help); PredictError (one line) for any problem."""
  values = flags.FlagValues()
  if cli.wants_help(argv):
    _define_flags(values, [argv[0]])  # the help needs the flags, not the overrides
    sys.stdout.write(cli.help_text(__doc__, values))
    return {}
  holders = _define_flags(values, argv)
  argv = cli.rewrite_dashed_flags(argv, values)
  try:
    rest = cli.parse_flags(values, argv, holders['config'])
  except cli.CommandLineError as error:
    raise PredictError(str(error)) from None
  if len(rest) > 1:
    raise PredictError(f'unexpected arguments: {" ".join(rest[1:])}')
  parsed = {name: holder.value for name, holder in holders.items()}
  if parsed['config'] is None:
    raise PredictError('--config is required (e.g. --config=configs/synthetic.py)')
  if bool(parsed['workdir']) == bool(parsed['checkpoint']):
    raise PredictError('give exactly one of --workdir=RUN and --checkpoint=DIR')
  for name in ('images', 'out'):
    if not parsed[name]:
      raise PredictError(f'--{name} is required')
  if parsed['batch_size'] is not None and parsed['batch_size'] < 1:
    raise PredictError(f'--batch_size={parsed["batch_size"]} must be positive')
  try:
    cli.check_output_dir(parsed['out'], '--out')
  except cli.CommandLineError as error:
    raise PredictError(str(error)) from None
  return parsed


def _progress_bar(total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=total, unit='image', desc='predict', file=sys.stderr, dynamic_ncols=True)

  def update(done: int) -> None:
    bar.update(done - bar.n)
  return update, bar.close


def run(argv: Sequence[str]) -> int:
  """The command: 0 on success, 1 (one line on stderr) for any expected failure."""
  try:
    parsed = _parse(argv)
    if not parsed:  # --help
      return 0
    cli.setup_console(parsed['log_level'])
    config = parsed['config']
    mode = parsed['mode'] or (config.eval.mode if config.eval.mode in MODES else 'original')
    if mode not in MODES:
      raise PredictError(f'--mode={mode}: expected one of {", ".join(MODES)}')
    try:
      model = deeplab.from_config(config.model, int(config.data.num_classes))
    except ValueError as error:
      raise PredictError(str(error)) from None
    images = find_images(parsed['images'])
    source = parsed['checkpoint'] or parsed['workdir']
    variables, where = convert.load_model_variables(source, model, which=parsed['step'])
    out = os.path.abspath(parsed['out'])
    sizes = check_inputs(images, out, save_probs=parsed['save_probs'], overwrite=parsed['overwrite'])
    predictor = Predictor(model, variables)
    print(f'predicting {len(images)} images with {where} ({mode}, {predictor.num_devices} devices)',
          file=sys.stderr, flush=True)
    update, close = _progress_bar(len(images))
    try:
      done = predict_images(predictor, images, out, palette=class_palette(config), mode=mode,
                            crop_size=int(config.data.crop_size), save_probs=parsed['save_probs'],
                            batch_size=parsed['batch_size'], sizes=sizes, progress=update)
    finally:
      close()
    print(f'wrote {done} masks to {os.path.join(out, MASKS_DIR)}',
          file=sys.stderr, flush=True)
    return 0
  except (PredictError, convert.ConversionError) as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr, flush=True)
    return 1
  except OSError as error:  # e.g. the disk filled up or --out was made read-only while writing
    print(f'error: {cli.os_error_line(error)} (check --out and the inputs)', file=sys.stderr,
          flush=True)
    return 1


def main(argv: Iterable[str] | None = None) -> int:
  """`run` on sys.argv (or `argv`); Ctrl-C ends as one line `interrupted`, status 130."""
  try:
    return run(['uccl_jax.predict', *(sys.argv[1:] if argv is None else list(argv))])
  except KeyboardInterrupt:
    return cli.interrupted()


if __name__ == '__main__':
  sys.exit(main())
