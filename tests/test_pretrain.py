"""Pretraining the demo backbone on the source domain (uccl_jax/pretrain.py), and its cache."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from uccl_jax import convert
from uccl_jax import pretrain
from uccl_jax import train
from uccl_jax.data import synthetic_source
from uccl_jax.models import deeplab

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = pretrain.default_config  # before any test patches it


def tiny_config(root: pathlib.Path):
  """The default pretraining config shrunk to seconds: width 4, 33-pixel crops, 4 steps."""
  config = DEFAULT_CONFIG()
  config.data.root = str(root)
  config.data.crop_size = 33
  config.model.width = 4
  config.model.head_channels = 8
  config.train.batch_size = 4
  config.train.epochs = 4
  config.train.log_every_steps = 1
  config.eval.every_epochs = 2
  return config


@pytest.fixture(scope='module')
def source_root(tmp_path_factory) -> pathlib.Path:
  return synthetic_source.generate(tmp_path_factory.mktemp('source') / 'data', seed=0, num_train=4,
                                   num_val=2, size=(40, 48))


@pytest.fixture(scope='module')
def pretrained(source_root, tmp_path_factory) -> pathlib.Path:
  return pretrain.ensure_backbone(tiny_config(source_root), tmp_path_factory.mktemp('pre') / 'out',
                                  say=lambda message: None)


def test_writes_a_backbone_folder_that_model_pretrained_loads_strictly(pretrained):
  info = json.loads((pretrained / convert.CONVERTED_INFO).read_text())
  assert info['kind'] == convert.KIND_BACKBONE and info['architecture']['width'] == 4
  # The demo's network (7 classes, not the source's 8): the backbone fills it, every key checked.
  demo_model = deeplab.DeepLabV3Plus(num_classes=7, backbone='resnet18', width=4, head_channels=8, stem='deep')
  variables = convert.load_pretrained_variables(pretrained, demo_model)
  assert set(variables['params']) == {'backbone'} and set(variables['batch_stats']) == {'backbone'}
  with pytest.raises(convert.ConversionError, match='width'):
    convert.load_pretrained_variables(pretrained, deeplab.DeepLabV3Plus(
        num_classes=7, backbone='resnet18', width=8, head_channels=8, stem='deep'))
  summary = json.loads((pretrained.parent / pretrain.INFO_FILE).read_text())
  assert summary['steps'] == 4 and 0 <= summary['source_val_miou'] <= 100
  assert (pretrained.parent / pretrain.RUN_DIR / 'metrics.jsonl').is_file()


def test_a_second_call_reuses_the_folder_and_other_settings_are_refused(pretrained, source_root,
                                                                       monkeypatch):
  stamp = (pretrained / convert.CONVERTED_INFO).stat().st_mtime_ns
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a, **k: pytest.fail('pretrained twice'))
  assert pretrain.ensure_backbone(tiny_config(source_root), pretrained.parent) == pretrained
  assert (pretrained / convert.CONVERTED_INFO).stat().st_mtime_ns == stamp
  other = tiny_config(source_root)
  other.train.lr = 0.5
  with pytest.raises(pretrain.PretrainError, match='other settings'):
    pretrain.ensure_backbone(other, pretrained.parent)


def test_demo_value_pretrains_once_into_the_cache_with_the_demo_network(pretrained, tmp_path, monkeypatch):
  """'synthetic:source' builds the cache folder of the demo network's pretraining config, once.

  The build itself is the fixture's (tested above); here it is replaced by a copy of its result.
  """
  monkeypatch.setenv('UCCL_JAX_CACHE', str(tmp_path / 'cache'))
  import ml_collections  # pylint: disable=g-import-not-at-top
  demo = ml_collections.ConfigDict({'model': {'pretrained': 'synthetic:source', 'backbone': 'resnet18',
                                              'width': 4, 'head_channels': 8, 'stem': 'deep',
                                              'output_stride': 16, 'dilations': (6, 12, 18)}})
  built = []

  def copy_build(folder, config, settings, say):
    assert (config.model.width, config.model.head_channels) == (demo.model.width, 8)  # the demo's network
    assert config.method == 'supervised' and config.data.name == 'synthetic_source'
    built.append(folder)
    shutil.copytree(pretrained, folder / pretrain.BACKBONE_DIR)
    (folder / pretrain.INFO_FILE).write_text(json.dumps(settings))
  monkeypatch.setattr(pretrain, '_build', copy_build)
  first = train.pretrained_path(demo)
  assert pathlib.Path(first).parent.parent == tmp_path / 'cache' and len(built) == 1
  assert train.pretrained_path(demo) == first and len(built) == 1  # cached: no second pretraining
  train.check_pretrained(demo)
  assert 'strict load passed' in train.describe_backbone(demo)
  assert [p.name for p in (tmp_path / 'cache').iterdir() if p.name.startswith('.')] == []
  demo.model.width = 8  # another network: another folder
  assert train.pretrained_path(demo) != first and len(built) == 2


def test_a_new_source_generator_version_is_a_new_backbone_folder(monkeypatch):
  """The generated source's version is part of the key: a changed generator never reuses old weights."""
  config = DEFAULT_CONFIG()
  before = pretrain.default_folder(config)
  assert pretrain.settings_of(config)['source_version'] == synthetic_source.version()
  monkeypatch.setattr(synthetic_source, 'VERSION', synthetic_source.VERSION + 1)
  assert pretrain.default_folder(config) != before
  monkeypatch.undo()
  assert pretrain.default_folder(config) == before
  # The source draws with the demo's drawing functions: their version is part of the key too.
  monkeypatch.setattr(synthetic_source.synthetic, 'VERSION', synthetic_source.synthetic.VERSION + 1)
  assert pretrain.default_folder(config) != before
  config.data.root = '/data/my_source'  # a folder of the user's: its contents are theirs to version
  assert 'source_version' not in pretrain.settings_of(config)


def test_command_line_bad_out_is_one_line(tmp_path):
  (tmp_path / 'a_file').write_text('mine')
  proc = subprocess.run([sys.executable, '-m', 'uccl_jax.pretrain', '--config=configs/synthetic_pretrain.py',
                         f'--out={tmp_path / "a_file"}'], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'a_file' in errors[0], proc.stderr
  assert (tmp_path / 'a_file').read_text() == 'mine'
