"""Input pipeline throughput at the Cityscapes setting (1024x2048 PNGs, 801 crops).

`python -m uccl_jax.benchmark pipeline [--source-size 1024x2048] [--crop 801]
[--workers 2] [--batches 4] [--batch-size 2] [--images 8]`

Two figures, so a user can size `data.workers` against the GPU step time:
* per worker: unlabeled samples per second of one process (PNG decode + weak
  view + two strong views + boxes + normalisation), split into decode and views;
* the whole pipeline (`make_train_iterator` with N workers): batches per second
  and unlabeled samples per second (each step has 2 unlabeled samples per batch
  entry: the unlabeled and the mixing stream, plus one labeled sample).

The images are generated into a temporary Cityscapes-layout folder: smooth
scenes with noise, so PNG decoding costs about what real photos cost.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from uccl_jax import config as config_lib
from uccl_jax.data import pipeline
from uccl_jax.data import transforms


def _parse_size(text: str) -> tuple[int, int]:
  try:
    height, width = (int(part) for part in text.lower().split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'--source-size must look like 1024x2048, not {text!r}') from None
  if height <= 0 or width <= 0:
    raise argparse.ArgumentTypeError(f'--source-size must be positive, not {text!r}')
  return height, width


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A smooth random scene with noise (image) and a blocky train-id mask of the same size."""
  height, width = size
  low = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.int16)
  image = np.clip(image + rng.integers(-6, 7, image.shape, dtype=np.int16), 0, 255).astype(np.uint8)
  mask_low = rng.integers(0, 19, (8, 16), dtype=np.uint8)
  mask = np.asarray(Image.fromarray(mask_low).resize((width, height), Image.NEAREST))
  return image, mask


def write_dataset(root: pathlib.Path, size: tuple[int, int], num_images: int, num_labeled: int) -> list[str]:
  """Writes a Cityscapes-layout folder and its split files; returns [labeled, unlabeled, val] split paths."""
  rng = np.random.default_rng(0)
  lines = []
  for index in range(num_images):
    stem = f'bench_{index:06d}_000019'
    image_rel = f'leftImg8bit/train/bench/{stem}_leftImg8bit.png'
    mask_rel = f'gtFine/train/bench/{stem}_gtFine_labelTrainIds.png'
    for rel in (image_rel, mask_rel):
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
    image, mask = _scene(rng, size)
    Image.fromarray(image).save(root / image_rel)
    Image.fromarray(mask).save(root / mask_rel)
    lines.append(f'{image_rel} {mask_rel}\n')
  splits = []
  for name, chosen in (('labeled', lines[:num_labeled]), ('unlabeled', lines[num_labeled:]),
                       ('val', lines[:1])):
    path = root / f'{name}.txt'
    path.write_text(''.join(chosen))
    splits.append(str(path))
  return splits


def _config(root: pathlib.Path, splits: list[str], crop: int, workers: int, batch_size: int):
  config = config_lib.base_config()
  config.data.name = 'cityscapes'
  config.data.root = str(root)
  config.data.labeled_split, config.data.unlabeled_split, config.data.val_split = splits
  config.data.num_classes = 19
  config.data.crop_size = crop
  config.data.workers = workers
  config.train.batch_size = batch_size
  return config


def measure_one_worker(config, num_samples: int) -> dict[str, float]:
  """Seconds per unlabeled sample in this process (medians): decode, views, their sum, and CPU time.

  The CPU time (process_time) is what one worker costs on an idle core; wall
  time includes waiting for a busy machine's cores.
  """
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.make_source(config, 'unlabeled')
  decode, views, cpu = [], [], []
  for index in range(num_samples):
    start, start_cpu = time.perf_counter(), time.process_time()
    record = source[index % len(source)]
    middle = time.perf_counter()
    transforms.unlabeled_views(record, config.data.crop_size, np.random.default_rng(index))
    end = time.perf_counter()
    cpu.append(time.process_time() - start_cpu)
    decode.append(middle - start)
    views.append(end - middle)
  return {'decode_s': statistics.median(decode), 'views_s': statistics.median(views),
          'sample_s': statistics.median(d + v for d, v in zip(decode, views)),
          'cpu_s': statistics.median(cpu)}


def measure_pipeline(config, num_batches: int) -> dict[str, float]:
  """Batches per second of make_train_iterator after its first batch (worker start-up excluded)."""
  iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  try:
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    elapsed = time.perf_counter() - start
  finally:
    iterator.close()
  batches_per_s = num_batches / elapsed
  return {'batches_per_s': batches_per_s,
          'unlabeled_per_s': batches_per_s * 2 * config.train.batch_size}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m uccl_jax.benchmark pipeline', description=__doc__.split('\n')[0])
  parser.add_argument('--source-size', type=_parse_size, default=(1024, 2048), help='HxW of the generated images')
  parser.add_argument('--crop', type=int, default=801)
  parser.add_argument('--workers', type=int, default=2, help='grain worker processes of the full pipeline')
  parser.add_argument('--batches', type=int, default=4, help='batches timed after the first')
  parser.add_argument('--batch-size', type=int, default=2, help='global batch per stream')
  parser.add_argument('--images', type=int, default=8, help='images generated (2 labeled, rest unlabeled)')
  parser.add_argument('--samples', type=int, default=6, help='unlabeled samples timed in one process')
  args = parser.parse_args(argv[1:])
  if args.images < 2 + args.batch_size:
    parser.error(f'--images must be at least 2 + --batch-size ({2 + args.batch_size})')
  height, width = args.source_size
  with tempfile.TemporaryDirectory(prefix='uccl_pipeline_bench_') as folder:
    root = pathlib.Path(folder)
    start = time.perf_counter()
    splits = write_dataset(root, args.source_size, args.images, num_labeled=2)
    print(f'wrote {args.images} {height}x{width} PNG pairs in {time.perf_counter() - start:.1f} s')
    config = _config(root, splits, args.crop, args.workers, args.batch_size)
    one = measure_one_worker(config, args.samples)
    print(f'one worker, {height}x{width} -> crop {args.crop}: decode {one["decode_s"] * 1e3:.0f} ms + '
          f'views {one["views_s"] * 1e3:.0f} ms = {one["sample_s"] * 1e3:.0f} ms per unlabeled sample '
          f'(wall) -> {1 / one["sample_s"]:.2f} unlabeled samples/s per worker; CPU {one["cpu_s"] * 1e3:.0f} ms '
          f'-> {1 / one["cpu_s"]:.2f}/s per worker on an idle core (medians of {args.samples})')
    full = measure_pipeline(config, args.batches)
    print(f'pipeline, {args.workers} workers, batch {args.batch_size} per stream: '
          f'{full["batches_per_s"]:.2f} batches/s = {full["unlabeled_per_s"]:.2f} unlabeled samples/s '
          f'(+ {full["batches_per_s"] * args.batch_size:.2f} labeled/s; {args.batches} batches after the first)')
  return 0


if __name__ == '__main__':
  sys.exit(main(['pipeline'] + sys.argv[1:]))
