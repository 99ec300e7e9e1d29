"""`python -m uccl_jax.convert SOURCE.pth --out=DIR`: layouts, the converted folder, errors, model.pretrained.

State dicts are random-weight torch tensors in UniMatch's / torchvision's key
layouts built by tests/torch_reference.py (independently of the JAX side);
the converted networks are compared with its PyTorch forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from uccl_jax import convert
from uccl_jax import models
from uccl_jax.models import resnet
import torch_reference

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Bottleneck [3, 4, 6, 3] (resnet50), deep stem, width 8, head 16, reduce 3, 5 classes.
ARCH = torch_reference.Arch()


def _tiny_deeplab(num_classes: int = 5, **overrides) -> models.DeepLabV3Plus:
  settings = dict(num_classes=num_classes, backbone='resnet50', width=8, head_channels=16) | overrides
  return models.DeepLabV3Plus(**settings)


def _images(shape=(1, 37, 43, 3), seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _save_unimatch_checkpoint(path, state) -> None:
  """UniMatch's latest.pth: {'model': DDP state dict ('module.' keys), 'optimizer', 'epoch', ...}."""
  torch.save({'model': {f'module.{key}': value for key, value in state.items()},
              'epoch': 7, 'previous_best': 55.0}, path)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'uccl_jax.convert', *args], capture_output=True,
                        text=True, env=env, timeout=300, check=False)


def test_cli_converts_a_unimatch_checkpoint_whose_predictions_equal_the_reference(tmp_path):
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=0)
  source = tmp_path / 'latest.pth'
  _save_unimatch_checkpoint(source, state)
  out = tmp_path / 'converted'

  result = _run_cli(str(source), f'--out={out}', '--num_classes=5')
  assert result.returncode == 0, result.stderr
  assert 'DeepLabV3Plus, resnet50 (width 8, deep stem), head 16, 5 classes' in result.stdout

  info = json.loads((out / convert.CONVERTED_INFO).read_text())
  assert info['kind'] == 'deeplab'
  assert info['architecture'] == {'kind': 'deeplab', 'backbone': 'resnet50', 'width': 8, 'stem': 'deep',
                                  'head_channels': 16, 'num_classes': 5}
  assert info['classes']['num_classes'] == 5
  assert info['source']['path'] == str(source)
  assert info['source']['sha256'] == hashlib.sha256(source.read_bytes()).hexdigest()
  assert info['num_parameters'] == sum(v.numel() for k, v in state.items()
                                       if not k.endswith(('running_mean', 'running_var', 'tracked')))

  model = _tiny_deeplab()
  variables, where = convert.load_model_variables(out, model)
  assert str(source) in where
  images = _images()
  got = model.apply(variables, images, train=False)
  expected = torch_reference.deeplab_forward(state, images, ARCH)
  for key in ('logits', 'features'):
    assert torch_reference.relative_error(got[key], expected[key]) < 1e-4, key
  np.testing.assert_array_equal(np.argmax(got['logits'], -1), np.argmax(expected['logits'], -1))

  # Errors from the real command: one line, no traceback, exit status 1, nothing written.
  bad = _run_cli(str(source), f'--out={tmp_path / "other"}', '--num_classes=21')
  assert bad.returncode == 1
  assert bad.stderr.strip().count('\n') == 0 and 'Traceback' not in bad.stderr
  assert 'class-count mismatch: the checkpoint has 5 classes' in bad.stderr
  assert not (tmp_path / 'other').exists()


def test_backbone_files_deep_and_torchvision_stems(tmp_path, capsys):
  """UniMatch's pretrained/resnet50.pth and torchvision's resnet18 (7x7 stem; fc.* dropped with a note)."""
  deep_state = torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=1)
  torch.save(deep_state, tmp_path / 'resnet50.pth')
  assert convert.main([str(tmp_path / 'resnet50.pth'), f'--out={tmp_path / "r50"}']) == 0
  info = convert.read_converted_info(tmp_path / 'r50')
  assert info['kind'] == 'backbone' and info['classes'] is None and info['dropped_keys'] == []
  assert info['architecture']['stem'] == 'deep' and info['architecture']['backbone'] == 'resnet50'

  tv_arch = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2), stem='standard', width=8)
  tv_state = torch_reference.random_state_dict(torch_reference.backbone_shapes(tv_arch), seed=2)
  tv_state |= {'fc.weight': torch.ones(10, 64), 'fc.bias': torch.zeros(10)}
  torch.save(tv_state, tmp_path / 'resnet18-tv.pth')
  capsys.readouterr()
  assert convert.main([str(tmp_path / 'resnet18-tv.pth'), f'--out={tmp_path / "r18"}']) == 0
  captured = capsys.readouterr()
  assert 'note: dropped the ImageNet classifier (fc.bias, fc.weight)' in captured.err
  info = convert.read_converted_info(tmp_path / 'r18')
  assert info['architecture'] == {'kind': 'backbone', 'backbone': 'resnet18', 'width': 8, 'stem': 'standard',
                                  'head_channels': None, 'num_classes': None}
  assert info['dropped_keys'] == ['fc.bias', 'fc.weight']

  # The stored backbone is the 'backbone' subtree of a DeepLab with the 7x7 stem; its features
  # equal torchvision-style ResNet outputs computed by the reference.
  variables, _ = convert.read_converted(tmp_path / 'r18')
  assert set(variables['params']) == {'backbone'} and set(variables['batch_stats']) == {'backbone'}
  backbone = resnet.build_resnet('resnet18', width=8, stem='standard')
  images = _images((1, 45, 39, 3), seed=3)
  outputs = backbone.apply({c: t['backbone'] for c, t in variables.items()}, images, train=False)
  for got_c, expected_c in zip(outputs, torch_reference.backbone_forward(tv_state, images, tv_arch)):
    assert torch_reference.relative_error(got_c, expected_c) < 1e-4


def test_model_pretrained_takes_the_converted_folder_and_the_pth_alike(tmp_path):
  """load_pretrained_variables (what train.py's model.pretrained should call) on both forms."""
  state = torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=4)
  state |= {'fc.weight': torch.ones(3, 256), 'fc.bias': torch.zeros(3)}  # an ImageNet head
  torch.save(state, tmp_path / 'resnet50.pth')
  assert convert.main([str(tmp_path / 'resnet50.pth'), f'--out={tmp_path / "r50"}']) == 0
  model = _tiny_deeplab()
  from_folder = convert.load_pretrained_variables(tmp_path / 'r50', model)
  from_file = convert.load_pretrained_variables(tmp_path / 'resnet50.pth', model)
  assert jax.tree.structure(from_folder) == jax.tree.structure(from_file)
  for a, b in zip(jax.tree.leaves(from_folder), jax.tree.leaves(from_file)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(from_folder['params']['backbone']['layer1_0']['conv1']['kernel'],
                                state['layer1.0.conv1.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(from_folder['batch_stats']['backbone']['bn1']['var'],
                                state['bn1.running_var'].numpy())

  # A converted backbone for another config names the field to change.
  with pytest.raises(convert.ConversionError, match=r"config.model.stem is 'standard', set it to 'deep'"):
    convert.load_pretrained_variables(tmp_path / 'r50', _tiny_deeplab(stem='standard'))
  with pytest.raises(convert.ConversionError, match=r'config.model.width is 16, set it to 8'):
    convert.load_pretrained_variables(tmp_path / 'r50', _tiny_deeplab(width=16))


def _expect_one_line_error(capsys, argv, *fragments) -> str:
  assert convert.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  for fragment in fragments:
    assert fragment in err, err
  return err


def test_errors_are_one_line_and_leave_out_untouched(tmp_path, capsys):
  out = tmp_path / 'out'
  torch.save([torch.ones(2)], tmp_path / 'list.pth')
  _expect_one_line_error(capsys, [str(tmp_path / 'list.pth'), f'--out={out}'], 'not a state dict (holds a list)')
  torch.save({'epoch': 3, 'previous_best': 1.0}, tmp_path / 'meta.pth')
  _expect_one_line_error(capsys, [str(tmp_path / 'meta.pth'), f'--out={out}'], 'not a state dict (no tensors')
  torch.save({'features.0.weight': torch.ones(4, 3, 3, 3)}, tmp_path / 'vgg.pth')
  _expect_one_line_error(capsys, [str(tmp_path / 'vgg.pth'), f'--out={out}'], 'unknown architecture: no ResNet stem')
  odd = torch_reference.random_state_dict(
      torch_reference.backbone_shapes(torch_reference.Arch(layers=(3, 4, 5, 3))), seed=5)
  torch.save(odd, tmp_path / 'odd.pth')
  _expect_one_line_error(capsys, [str(tmp_path / 'odd.pth'), f'--out={out}'],
                         'unknown architecture: bottleneck blocks per stage [3, 4, 5, 3]')
  _expect_one_line_error(capsys, [str(tmp_path / 'missing.pth'), f'--out={out}'], 'no such file')
  assert not out.exists()

  # Strictness: a missing, an extra and a mis-shaped key are all named.
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=6)
  del state['backbone.layer2.1.bn2.running_mean']
  state['head.extra.weight'] = torch.ones(2)
  state['fuse.0.weight'] = torch.ones(16, 19, 1, 1)
  _save_unimatch_checkpoint(tmp_path / 'broken.pth', state)
  _expect_one_line_error(capsys, [str(tmp_path / 'broken.pth'), f'--out={out}'],
                         '1 missing: backbone.layer2.1.bn2.running_mean', '1 unexpected: head.extra.weight',
                         '1 mis-shaped: fuse.0.weight (16, 19, 1, 1) (model needs (16, 19, 3, 3))')
  assert not out.exists()

  # An existing output is never replaced without --overwrite.
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  good = torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=7)
  torch.save(good, tmp_path / 'good.pth')
  _expect_one_line_error(capsys, [str(tmp_path / 'good.pth'), f'--out={out}'], 'already exists and is not empty')
  assert (out / 'keep.txt').read_text() == 'mine'
  assert convert.main([str(tmp_path / 'good.pth'), f'--out={out}', '--overwrite']) == 0
  assert convert.is_converted(out) and not (out / 'keep.txt').exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []  # no temporary folders left


def test_converted_whole_model_is_checked_against_the_config(tmp_path):
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=8)
  _save_unimatch_checkpoint(tmp_path / 'best.pth', state)
  assert convert.main([str(tmp_path / 'best.pth'), f'--out={tmp_path / "c"}']) == 0
  with pytest.raises(convert.ConversionError,
                     match='class-count mismatch: the weights have 5 classes, data.num_classes is 19'):
    convert.load_model_variables(tmp_path / 'c', _tiny_deeplab(num_classes=19))
  with pytest.raises(convert.ConversionError, match='config.model.head_channels is 32, set it to 16'):
    convert.load_model_variables(tmp_path / 'c', _tiny_deeplab(head_channels=32))
  # The .pth itself is accepted where a whole model is needed, with the same checks.
  with pytest.raises(convert.ConversionError, match='class-count mismatch'):
    convert.load_model_variables(tmp_path / 'best.pth', _tiny_deeplab(num_classes=19))
  from_pth, _ = convert.load_model_variables(tmp_path / 'best.pth', _tiny_deeplab())
  from_folder, _ = convert.load_model_variables(tmp_path / 'c', _tiny_deeplab())
  for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(from_folder)):
    np.testing.assert_array_equal(a, b)
  # A backbone folder is refused for evaluation/prediction.
  torch.save(torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=9),
             tmp_path / 'r50.pth')
  assert convert.main([str(tmp_path / 'r50.pth'), f'--out={tmp_path / "b"}']) == 0
  with pytest.raises(convert.ConversionError, match='holds a backbone only'):
    convert.load_model_variables(tmp_path / 'b', _tiny_deeplab())


def test_main_eval_of_a_converted_checkpoint_matches_a_torch_reference_miou(tmp_path, capsys):
  """`--mode=eval --checkpoint=DIR` on a converted whole model: mIoU from the PyTorch forward."""
  from uccl_jax import train  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from uccl_jax.data import val_input  # pylint: disable=g-import-not-at-top
  from uccl_jax.config import base_config  # pylint: disable=g-import-not-at-top
  num_classes = 7
  arch = torch_reference.Arch(num_classes=num_classes)
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(arch), seed=3)
  source = tmp_path / 'best.pth'
  _save_unimatch_checkpoint(source, state)
  out = tmp_path / 'converted'
  assert _run_cli(str(source), f'--out={out}', f'--num_classes={num_classes}').returncode == 0

  root = synthetic.ensure_dataset(tmp_path / 'data', seed=0, num_train=4, num_labeled=2, num_val=2,
                                  size=(32, 64))
  config = base_config()
  config.data.name, config.data.root, config.data.num_classes = 'synthetic', str(root), num_classes
  config.data.labeled_split, config.data.unlabeled_split = 'splits/labeled.txt', 'splits/unlabeled.txt'
  config.data.val_split, config.data.crop_size, config.data.workers = 'splits/val.txt', 33, 0
  config.model.backbone, config.model.width, config.model.head_channels = 'resnet50', 8, 16
  config.eval.mode = 'original'
  result = train.evaluate_checkpoint(config, str(tmp_path / 'no_run'), str(out))
  assert capsys.readouterr().out.strip().splitlines()[-1] == f'mIoU: {result.miou:.2f}'

  # Reference: the PyTorch forward on the same normalised val images, IoU counted in NumPy.
  intersection, union = np.zeros(num_classes), np.zeros(num_classes)
  for record in val_input.make_val_dataset(config):  # uint8: normalised here as the device does
    logits = torch_reference.deeplab_forward(state, transforms.normalize(record['image'])[None],
                                             arch)['logits']
    predicted, mask = np.argmax(np.asarray(logits)[0], -1), record['mask']
    valid = mask != 255
    for c in range(num_classes):
      intersection[c] += np.sum((predicted == c) & (mask == c) & valid)
      union[c] += np.sum(((predicted == c) | (mask == c)) & valid)
  expected = np.mean(intersection / (union + 1e-10)) * 100
  assert result.miou == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------
# The command line itself, run as a person runs it (a subprocess).

# ResNet-18 (basic blocks), deep stem, width 4, head 8, 7 classes: the smallest whole model.
SMALL_ARCH = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2), width=4, head_channels=8,
                                  reduce_channels=1, num_classes=7)


@pytest.mark.parametrize('flag', ['--help', '-h', '--helpfull'])
def test_help_exits_0_and_prints_the_examples_with_their_line_breaks(flag):
  result = _run_cli(flag)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  examples = lines[lines.index('examples:') + 1:][:3]
  assert examples == ['  python -m uccl_jax.convert pretrained/resnet50.pth --out=weights/resnet50',
                      '  python -m uccl_jax.convert best.pth --out=weights/unimatch_cs --num_classes=19',
                      '  python -m uccl_jax.convert --to_torch=runs/voc_183 --out=voc_183.pth']
  for name in ('--out', '--to_torch', '--num_classes', '--dataset', '--step', '--[no]overwrite'):
    assert any(line.startswith(f'  {name}:') for line in lines), name


def test_dashed_flags_of_the_argparse_release_work_with_one_deprecation_line(tmp_path):
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(SMALL_ARCH), seed=11)
  torch.save(state, tmp_path / 'best.pth')
  converted = _run_cli(str(tmp_path / 'best.pth'), f'--out={tmp_path / "c"}', '--num-classes=7')
  assert converted.returncode == 0, converted.stderr
  assert converted.stderr.splitlines() == ['warning: --num-classes is deprecated; use --num_classes']
  # The value is applied, not dropped: a wrong class count is still caught.
  wrong = _run_cli(str(tmp_path / 'best.pth'), f'--out={tmp_path / "d"}', '--num-classes=21')
  assert wrong.returncode == 1
  assert wrong.stderr.splitlines()[0] == 'warning: --num-classes is deprecated; use --num_classes'
  assert 'class-count mismatch' in wrong.stderr and '--num_classes=21' in wrong.stderr
  # --to-torch with its value as the next argument, as argparse took it.
  exported = _run_cli('--to-torch', str(tmp_path / 'c'), f'--out={tmp_path / "back.pth"}')
  assert exported.returncode == 0, exported.stderr
  assert exported.stderr.splitlines() == ['warning: --to-torch is deprecated; use --to_torch']
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert all(torch.equal(back[key], value) for key, value in state.items()
             if not key.endswith('num_batches_tracked'))


def _truncated_checkpoint(tmp_path) -> str:
  torch.save({'conv1.weight': torch.ones(8, 3, 7, 7)}, tmp_path / 'whole.pth')
  data = (tmp_path / 'whole.pth').read_bytes()
  (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
  return str(tmp_path / 'cut.pth')


@pytest.mark.parametrize('make_input, fragment', [
    (lambda tmp_path: str(tmp_path / 'notes.txt'), 'not a PyTorch checkpoint (torch.load failed: '),
    (_truncated_checkpoint, 'a damaged or truncated PyTorch checkpoint'),
    (lambda tmp_path: str(tmp_path / 'absent.pth'), 'no such file'),
])
def test_a_bad_input_file_is_one_line_naming_it_without_torch_advice(tmp_path, make_input, fragment):
  (tmp_path / 'notes.txt').write_text('these are notes, not weights\n')
  source = make_input(tmp_path)
  result = _run_cli(source, f'--out={tmp_path / "out"}')
  assert result.returncode == 1
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {source}: '), result.stderr
  assert fragment in lines[0]
  assert 'weights_only' not in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'out').exists()


def _without_root_override() -> list[str]:
  """A command prefix under which permission bits hold, also for root (CI runs as root)."""
  if os.geteuid() != 0:
    return []
  if shutil.which('setpriv') is None:
    pytest.skip('running as root without setpriv: a read-only folder cannot be made')
  return ['setpriv', '--bounding-set=-dac_override,-dac_read_search']


def test_out_in_a_read_only_folder_is_one_line_and_writes_nothing(tmp_path):
  torch.save(torch_reference.random_state_dict(torch_reference.backbone_shapes(SMALL_ARCH), seed=12),
             tmp_path / 'r18.pth')
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  read_only.chmod(0o555)
  prefix = _without_root_override()
  probe = subprocess.run([*prefix, sys.executable, '-c', f'open({str(read_only / "probe")!r}, "w")'],
                         capture_output=True, check=False)
  if probe.returncode == 0:
    read_only.chmod(0o755)
    pytest.skip('this file system lets the test write into a folder without write permission')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  for out in (read_only / 'r18', read_only / 'new' / 'deeper' / 'r18'):
    result = subprocess.run([*prefix, sys.executable, '-m', 'uccl_jax.convert', str(tmp_path / 'r18.pth'),
                             f'--out={out}'], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: --out={out}: cannot write'), result.stderr
    assert 'Permission denied' in lines[0] and 'Traceback' not in result.stderr
    assert os.listdir(read_only) == []
  read_only.chmod(0o755)
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []


def test_out_naming_an_existing_file_or_a_new_nested_folder(tmp_path, capsys, monkeypatch):
  torch.save(torch_reference.random_state_dict(torch_reference.backbone_shapes(SMALL_ARCH), seed=13),
             tmp_path / 'r18.pth')
  (tmp_path / 'taken').write_text('mine')
  _expect_one_line_error(capsys, [str(tmp_path / 'r18.pth'), f'--out={tmp_path / "taken"}'],
                         f'--out={tmp_path / "taken"}: is a file, not a folder')
  assert (tmp_path / 'taken').read_text() == 'mine'
  # Folders above --out are created; a failure afterwards removes them again (no half-made tree).
  nested = tmp_path / 'a' / 'b' / 'r18'
  assert convert.main([str(tmp_path / 'r18.pth'), f'--out={nested}']) == 0
  assert convert.is_converted(nested)
  capsys.readouterr()

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(convert.converted.json, 'dump', disk_full)  # fails after the weights are written
  _expect_one_line_error(capsys, [str(tmp_path / 'r18.pth'), f'--out={tmp_path / "x" / "y" / "r18"}'],
                         'cannot write', 'No space left on device')
  assert not (tmp_path / 'x').exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []
