"""Pretrains the demo's backbone on the generated source domain: the demo's ImageNet.

Why: the paper fine-tunes an ImageNet ResNet-50, and semi-supervised learning
needs a teacher that is right often enough to be confident; from scratch on 16
labeled images it is not (docs/RESULTS.md). The demo cannot download ImageNet,
so its backbone is trained here, supervised, on a generated source domain of
other classes, layouts and palettes (uccl_jax/data/synthetic_source.py), and
handed to the demo the way an ImageNet backbone is: a converted backbone folder
(converted.json + orbax variables, what `python -m uccl_jax.convert` writes for
`resnet50.pth`), loaded strictly through `model.pretrained`. The segmentation
head trained here is dropped, as ImageNet's classifier is.

It is made once per machine: the folder lives in the cache
(uccl_jax/cache.py), keyed by the pretraining config, built atomically.
`model.pretrained = 'synthetic:source'` (configs/synthetic.py's default) asks
for it: the first run pretrains (the console says so), later runs reuse it.
The pretraining network is the demo config's `model` fields, so a demo run
with another width gets a backbone of that width.

  python -m uccl_jax.pretrain --config=configs/synthetic_pretrain.py [--out=DIR]
      DIR (default: the cache folder the demo uses) gets backbone/ (the folder
      `--config.model.pretrained=DIR/backbone` takes), run/ (the pretraining run:
      config.json, metrics.jsonl, checkpoints) and pretrain.json (settings, source
      val mIoU, minutes). A DIR made with the same settings is reused as it is.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from uccl_jax import cache
from uccl_jax.config import base_config
from uccl_jax.data import synthetic_source

VERSION = 1  # bump when pretraining's code changes what it produces, so cached backbones are not reused
INFO_FILE = 'pretrain.json'
BACKBONE_DIR = 'backbone'
RUN_DIR = 'run'
# The demo config's model fields the pretraining network copies (the backbone must fit the demo).
MODEL_FIELDS = ('backbone', 'width', 'head_channels', 'stem', 'output_stride', 'dilations')


class PretrainError(Exception):
  """A pretraining that cannot run as asked (one line, names the cause)."""


def default_config() -> ml_collections.ConfigDict:
  """Supervised training of the demo network on the source domain (every image labeled).

  Budget: 1536 steps of batch 8 (24 passes over the 512 source images), a few
  minutes on a 2-core CPU. Length and rate were chosen by the demo runs in
  docs/RESULTS.md section 2c on the first source (version 2): longer pretraining
  raised the source val mIoU and, with it, the demo's supervised baseline; they
  were kept for the later sources (2c-2, 2c-3). Learning rate: the whole network learns
  from scratch here, so backbone and head share one rate (lr_multi 1), as an
  ImageNet training would.
  """
  config = base_config()
  config.method = 'supervised'
  config.data.name = 'synthetic_source'
  config.data.root = ''  # '' = the generated source dataset in the cache (made on first use)
  config.data.labeled_split = 'splits/labeled.txt'
  config.data.unlabeled_split = ''
  config.data.val_split = 'splits/val.txt'
  config.data.num_classes = 8
  config.data.crop_size = 97
  config.data.workers = 0
  config.data.synthetic_seed = 0  # the source dataset's generation seed
  config.model.backbone = 'resnet18'
  config.model.width = 16
  config.model.head_channels = 64
  config.model.stem = 'deep'
  config.model.pretrained = ''
  config.train.batch_size = 8
  config.train.epochs = 24
  config.train.lr = 0.05
  config.train.lr_multi = 1.0
  config.train.log_every_steps = 16
  config.eval.mode = 'original'
  config.eval.every_epochs = 8
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 1
  return config


# Fields that do not change the weights a pretraining produces.
_NOT_IN_KEY = ('checkpoint', 'eval', 'parallel', 'train.log_every_steps', 'data.workers')


def settings_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What determines the backbone: this module's version, the config's differences from
  `base_config()` (so a field added to the schema later, at its default, keeps cached backbones)
  and, for the generated source, the generator's version.
  """
  def flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    items = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        items.update(flat(value, f'{prefix}{key}.'))
      else:
        items[f'{prefix}{key}'] = value
    return items
  def as_json(c: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(c.to_json_best_effort(sort_keys=True))
  base = flat(as_json(base_config()))
  changed = {key: value for key, value in flat(as_json(config)).items()
             if base.get(key, object()) != value
             and not any(key == skip or key.startswith(skip + '.') for skip in _NOT_IN_KEY)}
  settings = {'version': VERSION, 'config': changed}
  if config.data.name == 'synthetic_source' and not config.data.root:
    # The generated source's own version: a changed generator makes other images, so other weights.
    settings['source_version'] = synthetic_source.version()
  return settings


def for_demo(demo_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The default pretraining config with the demo's network (`MODEL_FIELDS` of its `model`)."""
  config = default_config()
  for name in MODEL_FIELDS:
    config.model[name] = demo_config.model[name]
  return config


def default_folder(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The cache folder of the backbone `config` pretrains."""
  return cache.default_cache_dir() / f'backbone-synthetic-source-{cache.settings_key(settings_of(config))}'


def _build(folder: pathlib.Path, config: ml_collections.ConfigDict, settings: dict[str, Any],
           say) -> None:
  """Generates the source data if needed, trains on it, writes backbone/ and pretrain.json."""
  # Imported here: `--help` and the cache lookup stay fast, and train imports this module.
  import jax  # pylint: disable=g-import-not-at-top
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import synthetic_source  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(config.to_dict())
  started = time.perf_counter()
  if not config.data.root:
    config.data.root = str(synthetic_source.ensure_dataset(seed=int(config.data.synthetic_seed)))
  generated = time.perf_counter()
  say(f'pretraining the backbone on the source domain {config.data.root} (once per machine; '
      f'{folder})')
  result = train.train_and_evaluate(config, str(folder / RUN_DIR))
  if result.preempted:
    raise KeyboardInterrupt  # the run saved its checkpoint; the unfinished folder is not kept
  variables, _ = convert.read_run_variables(str(folder / RUN_DIR), 'latest')
  backbone = {collection: {'backbone': tree['backbone']} for collection, tree in variables.items()}
  model = train.build_model(config)
  architecture = convert.Architecture(kind=convert.KIND_BACKBONE, backbone=model.backbone,
                                      width=model.width, stem=model.stem)
  convert.write_converted(folder / BACKBONE_DIR, backbone, {
      'format': convert.CONVERTED_FORMAT,
      'kind': convert.KIND_BACKBONE,
      'architecture': architecture.to_json(),
      'classes': None,
      'source': {'path': str(folder / RUN_DIR), 'pretraining': 'uccl_jax.pretrain',
                 'data_root': config.data.root},
      'dropped_keys': [],
      'num_parameters': int(sum(x.size for x in jax.tree.leaves(backbone['params']))),
  })
  info = {**settings, 'source_val_miou': result.miou,
          'steps': result.step, 'source_generation_s': round(generated - started, 1),
          'pretraining_s': round(time.perf_counter() - generated, 1)}
  (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + '\n')


def ensure_backbone(config: ml_collections.ConfigDict, folder: str | os.PathLike[str] | None = None,
                    say=None) -> pathlib.Path:
  """The converted backbone folder `config` pretrains, made on first use; its path.

  Raises PretrainError when `folder` holds something else.
  """
  say = say or (lambda message: print(message, flush=True))
  folder = default_folder(config) if folder is None else pathlib.Path(folder).expanduser().absolute()
  settings = settings_of(config)
  built = cache.ensure_folder(folder, settings, INFO_FILE,
                              lambda staging: _build(staging, config, settings, say),
                              'a pretrained backbone', error=PretrainError)
  return built / BACKBONE_DIR


_FLAGS: dict[str, Any] = {}  # the command line's flag holders, defined by run() only


def main(argv: Sequence[str]) -> None:
  """`python -m uccl_jax.pretrain --config=configs/synthetic_pretrain.py [--out=DIR]`."""
  from uccl_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
  if _FLAGS['config'].value is None:
    cli.fail('--config is required (e.g. --config=configs/synthetic_pretrain.py)', 2)
  cli.setup_console(_FLAGS['log_level'].value)
  out = _FLAGS['out'].value
  try:
    if out:
      cli.check_output_dir(out, '--out')
  except cli.CommandLineError as error:
    cli.fail(str(error), 2)
  from uccl_jax import parallel  # pylint: disable=g-import-not-at-top
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  try:
    folder = ensure_backbone(_FLAGS['config'].value, out or None)
  except (PretrainError, train.RunError, sources.DataError, pipeline.PipelineError,
          parallel.BatchSizeError) as error:
    cli.fail(cli.error_line(error))
  except OSError as error:
    cli.fail(cli.os_error_line(error))
  info = json.loads((folder.parent / INFO_FILE).read_text())
  print(f'backbone: {folder} (source val mIoU {info["source_val_miou"]:.2f} after {info["steps"]} '
        f'steps); train with --config.model.pretrained={folder}', flush=True)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser with one-line errors; --help prints this module's docstring and exits 0."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from uccl_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.parse_command_line(argv, flags.FLAGS, _FLAGS['config'], __doc__)


def run() -> None:
  """The command line. Its flags are defined here, not at import: `train` imports this module
  inside `python -m uccl_jax.main`, whose own --config would clash."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from uccl_jax import cli  # pylint: disable=g-import-not-at-top
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Pretraining config (configs/synthetic_pretrain.py).', lock_config=True)
  _FLAGS['out'] = flags.DEFINE_string(
      'out', '', 'Folder to make or reuse (default: the cache folder the demo uses).')
  _FLAGS['log_level'] = cli.define_log_level_flag()
  flags.declare_key_flag('log_level')
  cli.run_app(main, _parse_flags)


if __name__ == '__main__':
  run()
