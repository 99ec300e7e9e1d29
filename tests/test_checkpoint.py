"""uccl_jax.checkpoint: exact round trips, retention (newest k + best mIoU), step lookup, atomicity."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from uccl_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


class _State(struct.PyTreeNode):
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


_TX = optax.sgd(0.1, momentum=0.9)


def _replicated():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _state(seed: int) -> _State:
  rng = np.random.default_rng(seed)
  params = {'backbone': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
            'head': {'bias': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  tx = _TX
  opt_state = tx.init(params)
  # Non-zero momentum, so a restore that returned fresh zeros would be caught.
  opt_state = jax.tree.map(lambda x: x + 0.5, opt_state)
  state = _State(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state,
                 rng=jax.random.PRNGKey(seed), tx=tx)
  return jax.device_put(state, _replicated())


def _assert_same(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_data_state_and_shardings(tmp_path):
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt', keep=3)
  saved = {step: _state(step) for step in (2, 4)}
  manager.save(2, saved[2], {'next_index': 2, 'nested': [1, 2]})
  manager.save(4, saved[4], b'\x00raw-bytes\xff')
  manager.close()

  reader = checkpoint.RunCheckpoints(tmp_path / 'ckpt', read_only=True)
  target = jax.eval_shape(lambda: _state(0))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_replicated()),
                        target)
  for step, data_state in ((2, {'next_index': 2, 'nested': [1, 2]}), (4, b'\x00raw-bytes\xff')):
    restored, restored_data = reader.restore(step, target)
    _assert_same(restored, saved[step])
    assert restored_data == data_state
    assert restored.tx is target.tx  # static fields come from the target
    for leaf in jax.tree.leaves(restored):
      assert leaf.sharding.is_equivalent_to(_replicated(), leaf.ndim)
  restored, data = reader.restore(4, target, with_data=False)
  assert data is None


def test_typed_prng_keys_round_trip(tmp_path):
  tree = {'key': jax.random.key(7), 'x': jnp.arange(3.0)}
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt')
  manager.save(1, tree, {})
  manager.close()
  restored, _ = checkpoint.RunCheckpoints(tmp_path / 'ckpt', read_only=True).restore(1, tree)
  assert jax.dtypes.issubdtype(restored['key'].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored['key']), jax.random.key_data(tree['key']))


def test_keeps_newest_k_and_the_best_miou(tmp_path):
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt', keep=2)
  state = _state(0)
  mious = {2: 30.0, 4: 55.0, 6: 40.0, 8: None, 10: 45.0, 12: None}
  for step, miou in mious.items():
    manager.save(step, state, {}, miou=miou)
  manager.wait()
  # Newest two (10, 12) plus the best evaluated one (4, mIoU 55).
  assert manager.all_steps() == [4, 10, 12]
  assert manager.best_step() == 4
  assert manager.latest_step() == 12
  assert manager.miou(4) == 55.0 and manager.miou(12) is None
  assert not manager.save(12, state, {})  # an existing step is never overwritten
  manager.close()
  assert sorted(int(p.name) for p in (tmp_path / 'ckpt').iterdir() if p.name.isdigit()) == [4, 10, 12]


def test_resolve_and_locate(tmp_path):
  manager = checkpoint.RunCheckpoints(tmp_path / 'run' / 'checkpoints', keep=5)
  state = _state(0)
  manager.save(3, state, {})
  manager.save(6, state, {}, miou=20.0)
  manager.save(9, state, {})
  manager.close()
  reader = checkpoint.RunCheckpoints(tmp_path / 'run' / 'checkpoints', read_only=True)
  assert reader.resolve('best') == 6
  assert reader.resolve('latest') == 9
  assert reader.resolve('3') == 3 and reader.resolve(9) == 9
  with pytest.raises(checkpoint.CheckpointError, match=r'no checkpoint at step 4 \(saved steps: \[3, 6, 9\]\)'):
    reader.resolve('4')
  with pytest.raises(checkpoint.CheckpointError, match='expected'):
    reader.resolve('newest')
  ckpt_dir = str((tmp_path / 'run' / 'checkpoints').absolute())
  assert checkpoint.locate(tmp_path / 'run') == (ckpt_dir, None)
  assert checkpoint.locate(tmp_path / 'run' / 'checkpoints') == (ckpt_dir, None)
  assert checkpoint.locate(tmp_path / 'run' / 'checkpoints' / '6') == (ckpt_dir, 6)
  with pytest.raises(checkpoint.CheckpointError, match='no such folder'):
    checkpoint.locate(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='not a run folder'):
    checkpoint.locate(tmp_path / 'empty')


def test_best_falls_back_to_latest_without_evaluations(tmp_path):
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt')
  manager.save(1, _state(0), {})
  manager.save(2, _state(0), {})
  manager.wait()
  assert manager.best_step() is None
  assert manager.resolve('best') == 2
  manager.close()
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint folder'):
    checkpoint.RunCheckpoints(tmp_path / 'missing', read_only=True)


def test_restore_into_a_different_model_is_one_clear_error(tmp_path):
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt')
  manager.save(1, {'w': jnp.zeros((3,))}, {})
  manager.close()
  reader = checkpoint.RunCheckpoints(tmp_path / 'ckpt', read_only=True)
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore'):
    reader.restore(1, {'w': jnp.zeros((3,)), 'extra': jnp.zeros((2,))})


_CUT_OFF_SAVE = textwrap.dedent('''
    import os, sys
    import jax.numpy as jnp, numpy as np
    from uccl_jax import checkpoint
    manager = checkpoint.RunCheckpoints(sys.argv[1], keep=2)
    manager.save(1, {'w': jnp.full((4,), 1.0), 'big': jnp.zeros((16,))}, {'pos': 1})
    manager.wait()
    big = np.random.default_rng(0).normal(size=(48, 1024, 1024)).astype(np.float32)  # 192 MB
    manager.save(2, {'w': jnp.full((4,), 2.0), 'big': jnp.asarray(big[:, 0, :16].reshape(-1)[:16])}, {'pos': 2})
    manager.save(3, {'w': jnp.full((4,), 3.0), 'big': jnp.asarray(big)}, {'pos': 3})
    os._exit(0)  # the process dies while the asynchronous saves are in flight
''')


def test_a_cut_off_save_never_damages_the_previous_checkpoint(tmp_path):
  directory = tmp_path / 'ckpt'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  subprocess.run([sys.executable, '-c', _CUT_OFF_SAVE, str(directory)], cwd=REPO, env=env,
                 check=True, capture_output=True, timeout=300)
  leftovers = [p.name for p in directory.iterdir() if 'tmp' in p.name]
  assert leftovers, 'the save of step 3 finished before the kill; the test did not cut it off'
  reader = checkpoint.RunCheckpoints(directory, read_only=True)
  steps = reader.all_steps()
  assert 3 not in steps and 1 in steps
  for step in steps:  # whatever was committed restores intact
    restored, data = reader.restore(step, {'w': jnp.zeros((4,)), 'big': jnp.zeros((16,))})
    np.testing.assert_array_equal(np.asarray(restored['w']), np.full((4,), float(step)))
    assert data == {'pos': step}
  # The resumed run saves that step again, over the debris.
  writer = checkpoint.RunCheckpoints(directory, keep=2)
  writer.save(3, {'w': jnp.full((4,), 3.0), 'big': jnp.zeros((16,))}, {'pos': 3})
  writer.close()
  reader = checkpoint.RunCheckpoints(directory, read_only=True)
  assert 3 in reader.all_steps()
  restored, data = reader.restore(3, {'w': jnp.zeros((4,)), 'big': jnp.zeros((16,))})
  np.testing.assert_array_equal(np.asarray(restored['w']), np.full((4,), 3.0))
  assert data == {'pos': 3}
  assert not [p.name for p in directory.iterdir() if 'tmp' in p.name]


# ----------------------------------------------------------------------------
# Resume under another process count; checkpoints that do not fit or are damaged.


def test_data_state_restores_under_any_process_count_when_the_processes_agree(tmp_path):
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt')
  manager.save(2, {'w': jnp.zeros((3,))}, {'step': 2})
  manager.close()
  data_dir = tmp_path / 'ckpt' / '2' / checkpoint.DATA_ITEM
  # As two processes would have written it (this test runs one process).
  (data_dir / 'process_0-of-1.json').rename(data_dir / 'process_0-of-2.json')
  (data_dir / 'process_1-of-2.json').write_text((data_dir / 'process_0-of-2.json').read_text())
  reader = checkpoint.RunCheckpoints(tmp_path / 'ckpt', read_only=True)
  _, data_state = reader.restore(2, {'w': jnp.zeros((3,))})
  assert data_state == {'step': 2}
  (data_dir / 'process_1-of-2.json').write_text('{"kind": "json", "value": {"step": 3}}')
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'^{data_dir}: the processes saved different data-iterator states'):
    reader.restore(2, {'w': jnp.zeros((3,))})
  (data_dir / 'process_1-of-2.json').unlink()
  with pytest.raises(checkpoint.CheckpointError, match=rf'^{data_dir}: incomplete data-iterator'):
    reader.restore(2, {'w': jnp.zeros((3,))})


def test_config_whose_shape_fields_differ_from_the_run_is_named(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  manager = checkpoint.RunCheckpoints(tmp_path / 'run' / 'checkpoints')
  manager.save(96, {'w': jnp.zeros((3,))}, {'step': 96})
  manager.close()
  reader = checkpoint.RunCheckpoints(tmp_path / 'run' / 'checkpoints', read_only=True)
  config = ml_collections.ConfigDict({
      'model': {'backbone': 'resnet50', 'width': 16, 'head_channels': 64, 'stem': 'deep',
                'remat': False},
      'data': {'num_classes': 7}, 'train': {'lr': 0.01}})
  reader.check_config(96, config)  # no config.json: nothing to compare (the shapes still are)
  (tmp_path / 'run' / 'config.json').write_text(config.to_json())
  config.model.remat, config.train.lr = True, 0.1  # no shape changes
  reader.check_config(96, config)
  config.model.width, config.data.num_classes = 32, 19
  with pytest.raises(checkpoint.CheckpointError) as raised:
    reader.restore(96, {'w': jnp.zeros((3,))}, config=config)
  assert str(raised.value) == (
      f'{tmp_path}/run/checkpoints/96: saved with model.width=16, data.num_classes=7; the config '
      "says model.width=32, data.num_classes=19 (use the run's config, or another --workdir)")


def test_a_damaged_checkpoint_is_one_error_naming_its_folder_without_event_loop_noise(tmp_path,
                                                                                       capfd):
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  manager = checkpoint.RunCheckpoints(tmp_path / 'ckpt')
  state = {f'layer{i}': jnp.full((64, 64), float(i)) for i in range(16)}
  manager.save(5, state, {'step': 5})
  manager.close()
  files = [p for p in (tmp_path / 'ckpt' / '5' / 'state').rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as file:
    file.truncate(largest.stat().st_size // 2)
  reader = checkpoint.RunCheckpoints(tmp_path / 'ckpt')
  try:
    with pytest.raises(checkpoint.CheckpointError) as raised:
      reader.restore(5, state)
  finally:
    reader.close()
  text = str(raised.value)
  assert text.startswith(f'{tmp_path}/ckpt/5: cannot read this checkpoint (') and '\n' not in text
  assert 'TensorStore details' not in text and len(text) < 600, text
  # The reads still in flight report through sys.unraisablehook: those reports are dropped,
  # anything else passes on.
  seen = []
  hook = sys.unraisablehook
  previous, hook.previous = hook.previous, seen.append
  try:
    hook(types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'), object=None))
    other = types.SimpleNamespace(exc_value=ValueError('x'), object=None)
    hook(other)
  finally:
    hook.previous = previous
  assert seen == [other]
  time.sleep(0.5)
  assert 'Event loop is closed' not in capfd.readouterr().err
