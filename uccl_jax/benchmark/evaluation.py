"""Evaluation throughput at the Cityscapes setting: `python -m uccl_jax.benchmark eval`.

  python -m uccl_jax.benchmark eval [--size 1024x2048] [--images 4] [--crop 801]
      [--mode sliding_window] [--backbone resnet18] [--width 16] [--head-channels 32]
      [--repeats 2] [--read-threads N]

Writes `--images` Cityscapes-size PNG pairs (smooth scenes with noise, so PNG
decoding costs about what real photos cost) into a temporary Cityscapes-layout
folder, evaluates a randomly initialised DeepLabv3+ on them with the whole
evaluation path the training loop uses (`val_input.make_val_iterator` ->
`evaluate.evaluate_model`: decoding, transfer, network, counts) and prints
images per second (the median of `--repeats` timed passes after one untimed
pass over the first image, which compiles) with the mIoU, so a change to the
evaluation path can be checked to leave the numbers alone. The default model
is small (ResNet-18 at width 16) so that it runs on a CPU in reasonable time;
the real network is `--backbone resnet50 --width 64 --head-channels 256`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from uccl_jax import config as config_lib
from uccl_jax import evaluate
from uccl_jax.benchmark import pipeline as pipeline_benchmark
from uccl_jax.data import val_input
from uccl_jax.models import deeplab

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


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m uccl_jax.benchmark eval',
                                   description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--size', type=pipeline_benchmark.parse_size, default=(1024, 2048),
                      help='HxW of the generated images')
  parser.add_argument('--images', type=int, default=4, help='val images generated and evaluated')
  parser.add_argument('--crop', type=int, default=801, help='data.crop_size (the window)')
  parser.add_argument('--mode', default='sliding_window', choices=evaluate.MODES)
  parser.add_argument('--backbone', default='resnet18')
  parser.add_argument('--width', type=int, default=16, help='backbone base width (64: real)')
  parser.add_argument('--head-channels', type=int, default=32, help='ASPP/decoder width (256: real)')
  parser.add_argument('--repeats', type=int, default=2, help='timed passes (the median is reported)')
  parser.add_argument('--read-threads', type=int, default=None,
                      help='threads decoding images ahead of the device (default: '
                      'val_input.default_read_threads())')
  args = parser.parse_args(argv[1:])
  if args.images < 1 or args.repeats < 1:
    parser.error('--images and --repeats must be positive')
  height, width = args.size
  with tempfile.TemporaryDirectory(prefix='uccl_eval_bench_') as folder:
    root = pathlib.Path(folder)
    # All images in the "labeled" list, which is then the val list.
    val_split = pipeline_benchmark.write_dataset(root, args.size, args.images,
                                                 num_labeled=args.images)[0]
    config = make_config(root, val_split, crop=args.crop, mode=args.mode, classes=CLASSES,
                         backbone=args.backbone, width=args.width,
                         head_channels=args.head_channels)
    figures = measure(config, repeats=args.repeats, read_threads=args.read_threads)
  result = figures['result']
  per_image = statistics.median(figures['seconds']) / figures['images']
  main_thread_ms = statistics.median(figures['main_thread_s']) / figures['images'] * 1e3
  print(f'{args.mode} (crop {args.crop}), {figures["images"]} images of {height}x{width}, '
        f'{args.backbone} width {args.width} head {args.head_channels}, {CLASSES} classes, '
        f'{jax.local_device_count()} {jax.default_backend()} device(s): '
        f'{figures["images_per_s"]:.3f} images/s ({per_image:.2f} s per image; passes '
        f'{", ".join(f"{s:.1f}" for s in figures["seconds"])} s); main thread '
        f'{main_thread_ms:.0f} ms CPU per image')
  print(f'mIoU {result.miou:.6f}, pixel accuracy {result.pixel_accuracy:.6f}, '
        f'intersection sum {int(result.intersection.sum())}, union sum {int(result.union.sum())}')
  return 0


if __name__ == '__main__':
  sys.exit(main(['eval'] + sys.argv[1:]))
