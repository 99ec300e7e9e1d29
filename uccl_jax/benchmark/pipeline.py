"""Host cost of the input pipeline per training step, at the Pascal and Cityscapes settings.

usage:
  python -m uccl_jax.benchmark pipeline [--settings=pascal,cityscapes] [--steps=4]
      [--step_times=0.1,0.25] [--workers=N] [--batch_size=8] [--source_size=HxW]
      [--crop=N] [--json=FILE] [--log_level=none]

examples:
  python -m uccl_jax.benchmark pipeline
  python -m uccl_jax.benchmark pipeline --settings=cityscapes --workers=4 --json=pipeline.json
  python -m uccl_jax.benchmark pipeline --settings=pascal --steps=1 --batch_size=2

What an accelerator needs from the host each step (DESIGN.md, "Feeding
accelerators"), measured on generated images of each dataset's size (the
figures: docs/RESULTS.md section 4a):
* bytes per step: the host batch `make_train_iterator` hands to the devices
  (global batch 8 per stream, one process);
* host core-seconds per step: process CPU time (all threads) of building the
  batches with `data.workers=0`, the first batch excluded; the same work
  spread over grain workers costs the same core-seconds, plus the copies
  between processes;
* host cores needed to keep up with a device step of T seconds: core-seconds
  per step / T (the default T of 0.1 s and 0.25 s stand for a fast multi-GPU
  node's Cityscapes UCCL step (an assumption, not a measurement)
  and the paper's Pascal step on its A6000s, 0.26 s);
* with `--workers=N`: the whole pipeline with N grain workers, batches/s.

Pascal: 375x500 JPEG images (VOC's size) -> crop 321. Cityscapes: 1024x2048
PNGs -> crop 801. The images are smooth scenes with noise, so decoding costs
about what real photographs cost.

The step benchmark's pipeline figure (`measure_pipeline_throughput`) comes
from here too: the same images and timing at a config's crop, batch and
workers.

Exit status 0 on success, 2 with one line on stderr for a bad flag.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import flags
import jax
import ml_collections
import numpy as np
from PIL import Image

from uccl_jax import cli
from uccl_jax import config as config_lib
from uccl_jax.benchmark import subcommand
from uccl_jax.data import pipeline
from uccl_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class Setting:
  """One dataset's input shape: source image size and format, crop, global batch per stream."""
  name: str
  source_size: tuple[int, int]
  image_format: str
  crop_size: int
  batch_size: int = 8


SETTINGS = {'pascal': Setting('pascal', (375, 500), 'jpg', 321),
            'cityscapes': Setting('cityscapes', (1024, 2048), 'png', 801)}
# Typical source image sizes per dataset, for the step benchmark's pipeline figure (Pascal VOC
# images are about 500x375; Cityscapes 2048x1024; the demo dataset 256x128).
SOURCE_SIZES = {**{name: setting.source_size for name, setting in SETTINGS.items()},
                'synthetic': (128, 256)}


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A smooth random scene with noise (image) and a blocky train-id mask of the same size."""
  height, width = size
  low = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.int16)
  image = np.clip(image + rng.integers(-6, 7, image.shape, dtype=np.int16), 0, 255).astype(np.uint8)
  mask_low = rng.integers(0, 19, (8, 16), dtype=np.uint8)
  mask = np.asarray(Image.fromarray(mask_low).resize((width, height), Image.NEAREST))
  return image, mask


def write_dataset(root: pathlib.Path, size: tuple[int, int], num_images: int, num_labeled: int,
                  image_format: str = 'png') -> list[str]:
  """Writes a Cityscapes-layout folder and its split files; returns [labeled, unlabeled, val] split paths."""
  rng = np.random.default_rng(0)
  lines = []
  for index in range(num_images):
    stem = f'bench_{index:06d}_000019'
    image_rel = f'leftImg8bit/train/bench/{stem}_leftImg8bit.{image_format}'
    mask_rel = f'gtFine/train/bench/{stem}_gtFine_labelTrainIds.png'
    for rel in (image_rel, mask_rel):
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
    image, mask = _scene(rng, size)
    Image.fromarray(image).save(root / image_rel, **({'quality': 90} if image_format == 'jpg' else {}))
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


def measure_host_cost(config, num_steps: int) -> dict[str, float]:
  """Bytes, core-seconds and wall seconds per step of the in-process pipeline (first batch excluded)."""
  in_process = config.copy_and_resolve_references()
  in_process.data.workers = 0
  iterator = pipeline.make_train_iterator(in_process, process_index=0, process_count=1)
  try:
    batch = next(iterator)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(num_steps):
      next(iterator)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
  finally:
    iterator.close()
  return {'bytes_per_step': int(sum(x.nbytes for x in jax.tree.leaves(batch))),
          'core_s_per_step': cpu / num_steps, 'wall_s_per_step': wall / num_steps}


def measure_pipeline_throughput(config: ml_collections.ConfigDict,
                                source_size: tuple[int, int] | None = None, *,
                                batches: int = 3, samples: int = 4) -> dict[str, Any]:
  """The input pipeline at the config's crop, batch and workers, on generated PNGs.

  The same images and timing as the command; source images default to the
  dataset's typical size (SOURCE_SIZES). What the step benchmark reports beside
  the step time: whether the host keeps up at the step's own setting.
  """
  if source_size is None:
    crop = int(config.data.crop_size)
    source_size = SOURCE_SIZES.get(config.data.name, (crop, crop))
  batch_size = int(config.train.batch_size)
  with tempfile.TemporaryDirectory(prefix='uccl_step_bench_pipeline_') as folder:
    root = pathlib.Path(folder)
    splits = write_dataset(root, source_size, 2 + 2 * batch_size, num_labeled=2)
    data_config = copy.deepcopy(config)
    with data_config.unlocked():
      # write_dataset writes the Cityscapes layout with train ids 0..18.
      data_config.data.name = 'cityscapes'
      data_config.data.source = 'folder'
      data_config.data.root = str(root)
      data_config.data.labeled_split, data_config.data.unlabeled_split, data_config.data.val_split = splits
      data_config.data.num_classes = 19
    one = measure_one_worker(data_config, samples)
    full = measure_pipeline(data_config, batches)
  return {'source_size': list(source_size),
          'workers': pipeline.resolve_workers(int(config.data.workers)),
          'batch_size': batch_size, 'crop_size': int(config.data.crop_size),
          'batches_per_s': full['batches_per_s'], 'unlabeled_per_s': full['unlabeled_per_s'],
          'one_worker_sample_s': one['sample_s'], 'one_worker_cpu_s': one['cpu_s']}


def run_setting(setting: Setting, *, steps: int, workers: int | None,
                step_times: list[float]) -> dict[str, Any]:
  """All figures of one setting, on images generated into a temporary folder."""
  with tempfile.TemporaryDirectory(prefix='uccl_pipeline_bench_') as folder:
    root = pathlib.Path(folder)
    # Enough images that no step reads one twice: labeled + unlabeled + mixing per step.
    count = 3 * setting.batch_size
    splits = write_dataset(root, setting.source_size, count, num_labeled=setting.batch_size,
                           image_format=setting.image_format)
    config = _config(root, splits, setting.crop_size, workers or 0, setting.batch_size)
    report = {'setting': setting.name, 'source_size': list(setting.source_size),
              'image_format': setting.image_format, 'crop_size': setting.crop_size,
              'batch_size': setting.batch_size, 'steps': steps}
    report.update(measure_host_cost(config, steps))
    report['cores_needed'] = {f'{t:g}': report['core_s_per_step'] / t for t in step_times}
    if workers:
      report['workers'] = workers
      report['batches_per_s'] = measure_pipeline(config, steps)['batches_per_s']
  return report


def format_report(rows: list[dict[str, Any]]) -> str:
  step_times = list(rows[0]['cores_needed']) if rows else []
  header = (f'{"setting":<11}{"source":>16}{"crop":>6}{"batch":>6}{"MiB/step":>10}'
            f'{"core-s/step":>13}{"wall s/step":>13}'
            + ''.join(f'{"cores @" + t + " s":>15}' for t in step_times))
  lines = [header]
  for r in rows:
    source = f'{r["source_size"][0]}x{r["source_size"][1]} {r["image_format"]}'
    lines.append(f'{r["setting"]:<11}{source:>16}{r["crop_size"]:>6}{r["batch_size"]:>6}'
                 f'{r["bytes_per_step"] / 2**20:>10.1f}{r["core_s_per_step"]:>13.3f}'
                 f'{r["wall_s_per_step"]:>13.3f}'
                 + ''.join(f'{r["cores_needed"][t]:>15.1f}' for t in step_times))
  for r in rows:
    if 'batches_per_s' in r:
      lines.append(f'{r["setting"]}: {r["workers"]} grain workers: {r["batches_per_s"]:.2f} batches/s')
  lines.append('core-s/step: host CPU time of building one step\'s batches in-process (data.workers=0); '
               'cores @T s: host cores needed to keep up with a device step of T seconds.')
  return '\n'.join(lines)


def _define_flags() -> flags.FlagValues:
  """The flags on a private FlagValues, so that importing or running this defines nothing global."""
  values = flags.FlagValues()
  flags.DEFINE_list('settings', list(SETTINGS), f'Settings to measure, from {", ".join(SETTINGS)}.',
                    flag_values=values)
  flags.DEFINE_integer('steps', 4, 'Steps timed after the first.', flag_values=values)
  flags.DEFINE_list('step_times', ['0.1', '0.25'], 'Device step times (s) to size the host for.',
                    flag_values=values)
  flags.DEFINE_integer('workers', 0, 'Also time the whole pipeline with this many grain workers.',
                       flag_values=values)
  flags.DEFINE_integer('batch_size', 8, 'Global batch per stream.', flag_values=values)
  flags.DEFINE_string('source_size', '', "HxW of the generated images (default: each setting's).",
                      flag_values=values)
  flags.DEFINE_integer('crop', 0, "Crop size (0: each setting's).", flag_values=values)
  flags.DEFINE_string('json', '', 'Also write the figures to this file.', flag_values=values)
  cli.define_log_level_flag(values)
  return values


def _settings(values: flags.FlagValues) -> tuple[list[Setting], list[float]]:
  """The settings and step times the flags ask for; CommandLineError (one line) for a bad value."""
  names = [name.strip() for name in values.settings if name.strip()]
  unknown = [name for name in names if name not in SETTINGS]
  if unknown or not names:
    raise cli.CommandLineError(f'--settings: unknown {", ".join(unknown) or "(none given)"}; '
                               f'choose from {", ".join(SETTINGS)}')
  try:
    step_times = [float(t) for t in values.step_times]
  except ValueError:
    raise cli.CommandLineError(f'--step_times={",".join(values.step_times)}: expected '
                               'comma-separated seconds like 0.1,0.25') from None
  if not step_times or any(t <= 0 for t in step_times):
    raise cli.CommandLineError(f'--step_times={",".join(values.step_times)}: must be positive')
  subcommand.require_positive(values, 'steps', 'batch_size')
  for name in ('workers', 'crop'):
    if values[name].value < 0:
      raise cli.CommandLineError(f'--{name}={values[name].value}: must be >= 0')
  settings = []
  for name in names:
    setting = dataclasses.replace(SETTINGS[name], batch_size=values.batch_size)
    if values.source_size:
      setting = dataclasses.replace(
          setting, source_size=subcommand.parse_size(values.source_size, '--source_size'))
    if values.crop:
      setting = dataclasses.replace(setting, crop_size=values.crop)
    settings.append(setting)
  return settings, step_times


def main(argv: list[str]) -> int:
  """argv[0] is the benchmark name (as dispatched by __main__); returns the exit status."""
  values = _define_flags()
  try:
    if not subcommand.parse(argv, values, __doc__):
      return 0  # --help
    settings, step_times = _settings(values)
    if values.json:  # a path that cannot be written fails now, not after the timing
      if os.path.isdir(values.json):
        raise cli.CommandLineError(f'--json={values.json}: is a folder; give a file name')
      cli.check_output_dir(os.path.dirname(os.path.abspath(values.json)), '--json')
  except cli.CommandLineError as error:
    return subcommand.fail(error)
  cli.setup_console(values.log_level)
  rows = []
  for setting in settings:
    print(f'{setting.name}: generating {3 * setting.batch_size} images and timing {values.steps} '
          'steps ...', flush=True)
    rows.append(run_setting(setting, steps=values.steps, workers=values.workers or None,
                            step_times=step_times))
  print(format_report(rows))
  if values.json:
    path = pathlib.Path(values.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main(['pipeline'] + sys.argv[1:]))
