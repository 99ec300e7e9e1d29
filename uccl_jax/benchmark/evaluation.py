"""Evaluation throughput at the Cityscapes setting: `python -m uccl_jax.benchmark eval`.

usage:
  python -m uccl_jax.benchmark eval [--size=1024x2048] [--images=4] [--crop=801]
      [--mode=sliding_window] [--backbone=resnet18] [--width=16] [--head_channels=32]
      [--repeats=2] [--read_threads=N] [--log_level=none]

examples:
  python -m uccl_jax.benchmark eval
  python -m uccl_jax.benchmark eval --backbone=resnet50 --width=64 --head_channels=256
  python -m uccl_jax.benchmark eval --size=20x36 --images=2 --repeats=1 --mode=original

Writes `--images` Cityscapes-size PNG pairs (smooth scenes with noise, so PNG
decoding costs about what real photos cost) into a temporary Cityscapes-layout
folder, evaluates a randomly initialised DeepLabv3+ on them with the whole
evaluation path the training loop uses (`val_input.make_val_iterator` ->
`evaluate.evaluate_model`: decoding, transfer, network, counts) and prints
images per second (the median of `--repeats` timed passes after one untimed
pass over the first image, which compiles) with the mIoU, so a change to the
evaluation path can be checked to leave the numbers alone. The default model
is small (ResNet-18 at width 16) so that it runs on a CPU in reasonable time;
the real network is `--backbone=resnet50 --width=64 --head_channels=256`.

Exit status 0 on success, 2 with one line on stderr for a bad flag. The dashed
spellings of earlier releases (--head-channels, --read-threads) still work for
one release, with a warning.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import flags
import jax
import numpy as np

from uccl_jax import cli
from uccl_jax import config as config_lib
from uccl_jax import evaluate
from uccl_jax.benchmark import pipeline as pipeline_benchmark
from uccl_jax.benchmark import subcommand
from uccl_jax.data import val_input
from uccl_jax.models import deeplab
from uccl_jax.models import resnet

CLASSES = 19  # the generated masks hold Cityscapes train ids


def make_config(root: pathlib.Path, val_split: str, *, crop: int, mode: str, classes: int,
                backbone: str, width: int, head_channels: int) -> Any:
  """The config of a Cityscapes-layout folder at `root` with the benchmark's model and protocol."""
  config = config_lib.base_config()
  config.data.name = 'cityscapes'
  config.data.root = str(root)
  config.data.val_split = val_split
  config.data.num_classes = classes
  config.data.crop_size = crop
  config.eval.mode = mode
  config.model.backbone = backbone
  config.model.width = width
  config.model.head_channels = head_channels
  return config


def measure(config: Any, *, repeats: int, read_threads: int | None = None) -> dict[str, Any]:
  """Times whole evaluation passes over the val list of `config` (after one compiling pass).

  Returns {'images', 'seconds' (wall time of each timed pass), 'main_thread_s'
  (CPU time of the calling thread in each pass: the host's serial work per
  pass, which a GPU would wait for; decoding threads not included),
  'images_per_s' (median), 'result' (the EvalResult of the last pass)}.
  """
  model = deeplab.from_config(config.model, int(config.data.num_classes))
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32), train=False)
  warmup = val_input.decode_ahead(val_input.make_val_dataset(config)[:1], read_threads=0)
  evaluate.evaluate_model(model, variables, warmup, config)  # compiles the program of this size
  seconds, main_thread = [], []
  result = None
  for _ in range(repeats):
    start, start_thread = time.perf_counter(), time.thread_time()
    result = evaluate.evaluate_model(
        model, variables, val_input.make_val_iterator(config, read_threads=read_threads), config)
    seconds.append(time.perf_counter() - start)
    main_thread.append(time.thread_time() - start_thread)
  return {'images': result.num_images, 'seconds': seconds, 'main_thread_s': main_thread,
          'images_per_s': result.num_images / statistics.median(seconds), 'result': result}


def _define_flags() -> flags.FlagValues:
  """The flags on a private FlagValues, so that importing or running this defines nothing global."""
  values = flags.FlagValues()
  flags.DEFINE_string('size', '1024x2048', 'HxW of the generated images.', flag_values=values)
  flags.DEFINE_integer('images', 4, 'Val images generated and evaluated.', flag_values=values)
  flags.DEFINE_integer('crop', 801, 'data.crop_size (the window).', flag_values=values)
  flags.DEFINE_enum('mode', 'sliding_window', evaluate.MODES, 'eval.mode: the evaluation protocol.',
                    flag_values=values)
  flags.DEFINE_enum('backbone', 'resnet18', sorted(resnet.ARCHS), 'model.backbone (resnet50: real).',
                    flag_values=values)
  flags.DEFINE_integer('width', 16, 'Backbone base width (64: real).', flag_values=values)
  flags.DEFINE_integer('head_channels', 32, 'ASPP/decoder width (256: real).', flag_values=values)
  flags.DEFINE_integer('repeats', 2, 'Timed passes (the median is reported).', flag_values=values)
  flags.DEFINE_integer('read_threads', None, 'Threads decoding images ahead of the device '
                       '(default: val_input.default_read_threads()).', flag_values=values)
  cli.define_log_level_flag(values)
  return values


def _check(values: flags.FlagValues) -> tuple[int, int]:
  """The image size; CommandLineError (one line naming the flag) for a value out of range."""
  size = subcommand.parse_size(values.size, '--size')
  subcommand.require_positive(values, 'images', 'repeats', 'crop', 'width', 'head_channels')
  if values.read_threads is not None and values.read_threads < 0:
    raise cli.CommandLineError(f'--read_threads={values.read_threads}: must be >= 0')
  return size


def main(argv: list[str]) -> int:
  """argv[0] is the benchmark name (as dispatched by __main__); returns the exit status."""
  values = _define_flags()
  try:
    if not subcommand.parse(argv, values, __doc__):
      return 0  # --help
    size = _check(values)
  except cli.CommandLineError as error:
    return subcommand.fail(error)
  cli.setup_console(values.log_level)
  height, width = size
  with tempfile.TemporaryDirectory(prefix='uccl_eval_bench_') as folder:
    root = pathlib.Path(folder)
    # All images in the "labeled" list, which is then the val list.
    val_split = pipeline_benchmark.write_dataset(root, size, values.images,
                                                 num_labeled=values.images)[0]
    config = make_config(root, val_split, crop=values.crop, mode=values.mode, classes=CLASSES,
                         backbone=values.backbone, width=values.width,
                         head_channels=values.head_channels)
    figures = measure(config, repeats=values.repeats, read_threads=values.read_threads)
  result = figures['result']
  per_image = statistics.median(figures['seconds']) / figures['images']
  main_thread_ms = statistics.median(figures['main_thread_s']) / figures['images'] * 1e3
  print(f'{values.mode} (crop {values.crop}), {figures["images"]} images of {height}x{width}, '
        f'{values.backbone} width {values.width} head {values.head_channels}, {CLASSES} classes, '
        f'{jax.local_device_count()} {jax.default_backend()} device(s): '
        f'{figures["images_per_s"]:.3f} images/s ({per_image:.2f} s per image; passes '
        f'{", ".join(f"{s:.1f}" for s in figures["seconds"])} s); main thread '
        f'{main_thread_ms:.0f} ms CPU per image')
  print(f'mIoU {result.miou:.6f}, pixel accuracy {result.pixel_accuracy:.6f}, '
        f'intersection sum {int(result.intersection.sum())}, union sum {int(result.union.sum())}')
  return 0


if __name__ == '__main__':
  sys.exit(main(['eval'] + sys.argv[1:]))
