"""`python -m uccl_jax.convert --to_torch`: UniMatch layout, exact round trips torch -> JAX -> torch -> JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from uccl_jax import checkpoint as checkpoint_lib
from uccl_jax import config as config_lib
from uccl_jax import convert
from uccl_jax import models
from uccl_jax import step as step_lib
import torch_reference

torch.set_num_threads(1)

# ResNet-18 (BasicBlocks), deep stem, width 4, head 8 (reduce 1), 7 classes: the demo network, shrunk.
ARCH = torch_reference.Arch(block='basic', layers=(2, 2, 2, 2), width=4, head_channels=8,
                            reduce_channels=1, num_classes=7)


def _model() -> models.DeepLabV3Plus:
  return models.DeepLabV3Plus(num_classes=7, backbone='resnet18', width=4, head_channels=8)


def _images(seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, 35, 41, 3)).astype(np.float32)


def _trained_run(tmp_path, variables) -> tuple[str, dict]:
  """A run folder whose checkpoint holds `variables` after one SGD step: a trained state.

  The state is the real TrainState of uccl_jax.step (optimizer of the base
  config), saved by RunCheckpoints at step 3 together with a data state,
  exactly the layout train.py writes.
  """
  config = config_lib.base_config()
  tx = step_lib.make_optimizer(config, total_steps=10)
  params = jax.tree.map(jnp.asarray, variables['params'])
  opt_state = tx.init(params)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  batch_stats = jax.tree.map(lambda x: jnp.asarray(x) * 1.5 + 0.25, variables['batch_stats'])
  state = step_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=params, batch_stats=batch_stats,
                              opt_state=opt_state, rng=jax.random.PRNGKey(0), tx=tx,
                              learning_rate_fn=step_lib.learning_rate_schedule(config, 10))
  run = tmp_path / 'run'
  checkpoints = checkpoint_lib.RunCheckpoints(run / 'checkpoints', async_save=False)
  checkpoints.save(3, state, {'position': 12}, miou=12.5)
  checkpoints.close()
  trained = jax.tree.map(np.asarray, {'params': params, 'batch_stats': batch_stats})
  return str(run), trained


def test_round_trip_torch_to_jax_to_torch_is_exact(tmp_path, capsys):
  state = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=0)
  torch.save({'model': {f'module.{k}': v for k, v in state.items()}}, tmp_path / 'best.pth')
  assert convert.main([str(tmp_path / 'best.pth'), f'--out={tmp_path / "jax"}']) == 0
  assert convert.main(['--to_torch', str(tmp_path / 'jax'), f'--out={tmp_path / "back.pth"}']) == 0
  assert 'wrote' in capsys.readouterr().out

  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert set(back) == set(state)  # UniMatch's layout, num_batches_tracked included
  for key, value in state.items():
    if key.endswith('num_batches_tracked'):
      assert back[key].dtype == torch.int64 and back[key].ndim == 0
      continue
    assert back[key].dtype == torch.float32 and back[key].shape == value.shape, key
    assert torch.equal(back[key], value), key


def test_trained_run_checkpoint_round_trips_through_torch_with_identical_outputs(tmp_path, capsys):
  start = torch_reference.random_state_dict(torch_reference.state_dict_shapes(ARCH), seed=2)
  model = _model()
  run, trained = _trained_run(tmp_path, convert.variables_from_torch(
      {k: v.numpy() for k, v in start.items()}, model))

  exported = tmp_path / 'exported.pth'
  assert convert.main(['--to_torch', run, f'--out={exported}']) == 0
  assert f'{run}/checkpoints/3' in capsys.readouterr().out
  torch_state = torch.load(exported, weights_only=True)
  # The tensors are the checkpoint's arrays, transposed to PyTorch's layout, bit for bit.
  np.testing.assert_array_equal(torch_state['backbone.conv1.0.weight'].numpy(),
                                trained['params']['backbone']['conv1_0']['kernel'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(torch_state['head.b4.gap.2.running_var'].numpy(),
                                trained['batch_stats']['head']['b4_gap_2']['var'])

  # PyTorch code reading the exported dict computes what the JAX model computes.
  images = _images()
  jax_outputs = model.apply(trained, images, train=False)
  reference = torch_reference.deeplab_forward(torch_state, images, ARCH)
  assert torch_reference.relative_error(jax_outputs['logits'], reference['logits']) < 1e-4

  # And back to JAX: identical variables, identical outputs.
  assert convert.main([str(exported), f'--out={tmp_path / "again"}', '--num_classes=7']) == 0
  again, _ = convert.load_model_variables(tmp_path / 'again', model)
  assert jax.tree.structure(again) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  again_outputs = model.apply(again, images, train=False)
  for key in ('logits', 'features'):
    np.testing.assert_array_equal(np.asarray(again_outputs[key]), np.asarray(jax_outputs[key]))

  # The run's weights are also read directly (what predict --workdir does), checked against the model.
  direct, where = convert.load_model_variables(run, model)
  assert where.endswith('checkpoints/3')
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(convert.ConversionError, match='class-count mismatch: the weights have 7 classes'):
    convert.load_model_variables(run, models.DeepLabV3Plus(num_classes=5, backbone='resnet18', width=4,
                                                           head_channels=8))


def test_backbone_export_has_unimatch_pretrained_layout(tmp_path):
  state = torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=3)
  torch.save(state | {'fc.weight': torch.ones(2, 32), 'fc.bias': torch.ones(2)}, tmp_path / 'r18.pth')
  assert convert.main([str(tmp_path / 'r18.pth'), f'--out={tmp_path / "r18"}']) == 0
  assert convert.main(['--to_torch', str(tmp_path / 'r18'), f'--out={tmp_path / "r18-back.pth"}']) == 0
  back = torch.load(tmp_path / 'r18-back.pth', weights_only=True)
  assert set(back) == set(state)  # no 'backbone.' prefix, the ImageNet fc stays dropped
  assert all(torch.equal(back[k], v) for k, v in state.items() if not k.endswith('num_batches_tracked'))


def test_export_errors_are_one_line_and_never_overwrite(tmp_path, capsys):
  existing = tmp_path / 'existing.pth'
  existing.write_bytes(b'keep me')
  state = torch_reference.random_state_dict(torch_reference.backbone_shapes(ARCH), seed=4)
  torch.save(state, tmp_path / 'r18.pth')
  assert convert.main([str(tmp_path / 'r18.pth'), f'--out={tmp_path / "r18"}']) == 0
  capsys.readouterr()
  for argv, fragment in (
      (['--to_torch', str(tmp_path / 'r18'), f'--out={existing}'], 'already exists'),
      (['--to_torch', str(tmp_path / 'nothing'), f'--out={tmp_path / "x.pth"}'], 'no such folder'),
      (['--to_torch', str(tmp_path), f'--out={tmp_path / "x.pth"}'], 'not a run folder'),
      (['--to_torch', str(tmp_path / 'r18'), str(tmp_path / 'r18.pth'), f'--out={tmp_path / "x.pth"}'],
       'not both'),
  ):
    assert convert.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and fragment in err, err
  assert existing.read_bytes() == b'keep me'
  assert not (tmp_path / 'x.pth').exists()
