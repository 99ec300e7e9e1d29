"""Orbax checkpoints of a run: train state, per-process data-iterator state, best-by-mIoU.

A checkpoint is everything a resumed run needs to continue exactly as if it had
never stopped: the train state (params, batch_stats, opt_state, step, rng) and
each process's input-iterator state (which images come next, and the
augmentation RNG position). Saves are asynchronous (the loop keeps training
while the arrays are written) and atomic: orbax writes into a temporary folder
and renames it when complete, so a save cut off by a kill or a preemption never
damages the previous checkpoint; the leftover temporary folder is ignored (and
removed on the next start).

Retention: the newest `keep` checkpoints plus the one with the best validation
mIoU (the mIoU is attached to a checkpoint when an evaluation ran at its step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE_ITEM = 'state'
DATA_ITEM = 'data'
MIOU_KEY = 'miou'
# The config fields that decide the saved arrays' shapes (the optimizer's state follows the
# parameters; method, dtype, remat, output stride and dilations change no shape).
SHAPE_FIELDS = ('model.backbone', 'model.width', 'model.head_channels', 'model.stem',
                'data.num_classes')


class _DropUnevaluatedWarning(logging.Filter):
  """Hides orbax's warning for every checkpoint saved without an mIoU: most are, by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_DropUnevaluatedWarning())


class CheckpointError(Exception):
  """A checkpoint that was asked for does not exist or cannot be read (one line)."""


# ----------------------------------------------------------------------------
# Per-process data-iterator state.
#
# Every process reads its own share of the data, so every process has its own
# iterator state; orbax's JSON handler writes from the primary process only,
# hence this small handler that writes one file per process (as grain's own
# handler does, but from a state value captured at the save step rather than a
# live iterator that keeps moving while an async save is in flight).
# ----------------------------------------------------------------------------


def _encode_data_state(state: Any) -> dict[str, Any]:
  """Wraps an iterator state (bytes, str or a JSON-able value) into a JSON object."""
  if isinstance(state, bytes):
    return {'kind': 'bytes', 'value': state.decode('latin-1')}
  if isinstance(state, str):
    return {'kind': 'str', 'value': state}
  return {'kind': 'json', 'value': state}


def _decode_data_state(payload: dict[str, Any]) -> Any:
  kind, value = payload['kind'], payload['value']
  if kind == 'bytes':
    return value.encode('latin-1')
  return value


class DataStateHandler(ocp.CheckpointHandler):
  """Writes `process_<i>-of-<n>.json` holding this process's iterator state.

  Restore works under any process count: the training iterator's state is the
  step (`{'step': n}`, the same in every process; each process derives its own
  share of a step from it), so every process reads the saved files, checks that
  they all agree, and takes that state. Files that disagree (an iterator whose
  state is per process) are a CheckpointError naming the folder.
  """

  def save(self, directory: epath.Path, args: 'DataStateSave') -> None:
    index, count = jax.process_index(), jax.process_count()
    path = directory / f'process_{index}-of-{count}.json'
    path.write_text(json.dumps(_encode_data_state(args.state)))

  def restore(self, directory: epath.Path, args: 'DataStateRestore | None' = None) -> Any:
    del args
    files = sorted(directory.glob('process_*-of-*.json'))
    counts = {p.name.rsplit('-of-', 1)[1][:-len('.json')] for p in files}
    if not files or len(counts) != 1 or len(files) != int(counts.pop()):
      saved = sorted(p.name for p in directory.iterdir())
      raise CheckpointError(f'{directory}: incomplete data-iterator state (the checkpoint holds '
                            f'{saved}: one process_<i>-of-<n>.json per process expected)')
    states = {}
    for path in files:
      try:
        states[path.name] = _decode_data_state(json.loads(path.read_text()))
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{path}: unreadable data-iterator state ({e})') from None
    first = next(iter(states.values()))
    if any(state != first for state in states.values()):
      shown = ', '.join(f'{name}: {state!r}' for name, state in states.items())
      raise CheckpointError(f'{directory}: the processes saved different data-iterator states '
                            f'({shown[:300]}); resume with the process count that wrote them')
    return first

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------
# Typed PRNG keys are stored as their raw uint32 data (portable, and what every
# orbax version can write), and wrapped again on restore.
# ----------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree: Any) -> Any:
  def convert(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree.map(convert, tree)


def _data_to_keys(restored: Any, target: Any) -> Any:
  def convert(value, like):
    if _is_key(like):
      return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    return value
  return jax.tree.map(convert, restored, target)


def abstract_like(tree: Any) -> Any:
  """The restore target for `tree`: shapes, dtypes and shardings, no data."""
  def convert(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
  return jax.tree.map(convert, tree)


class RunCheckpoints:
  """The checkpoints of one run folder (`<workdir>/checkpoints`).

  Every process must call `save` and `restore` (orbax synchronises them; the
  primary process writes the replicated arrays, each process its own data
  state).
  """

  def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2,
               async_save: bool = True, read_only: bool = False):
    if keep < 1:
      raise CheckpointError(f'checkpoint.keep must be >= 1, got {keep}')
    self.directory = epath.Path(directory).absolute()
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f'{self.directory}: no checkpoint folder')
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[MIOU_KEY], reverse=False, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m[MIOU_KEY],
        best_mode='max',
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: DataStateHandler()})

  # -- queries ----------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest recorded mIoU, or None when no evaluated checkpoint exists."""
    with_metrics = [s for s in self.all_steps() if self._manager.metrics(s)]
    if not with_metrics:
      return None
    return self._manager.best_step()

  def miou(self, step: int) -> float | None:
    metrics = self._manager.metrics(step)
    return None if not metrics else float(metrics[MIOU_KEY])

  def resolve(self, which: str | int) -> int:
    """Maps 'best' | 'latest' | a step number to an existing step, or raises CheckpointError.

    'best' falls back to the latest checkpoint when no checkpoint carries an mIoU
    (a run that never evaluated).
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'{self.directory}: no checkpoint found')
    which = str(which)
    if which == 'latest':
      return steps[-1]
    if which == 'best':
      best = self.best_step()
      return steps[-1] if best is None else best
    try:
      step = int(which)
    except ValueError:
      raise CheckpointError(
          f"--checkpoint={which!r}: expected 'best', 'latest', a step number or a folder") from None
    if step not in steps:
      raise CheckpointError(f'{self.directory}: no checkpoint at step {step} (saved steps: {steps})')
    return step

  # -- save / restore -----------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Any, *, miou: float | None = None) -> bool:
    """Starts an asynchronous save of `state` and the iterator state at `step`.

    `data_state` must be captured at the same step as `state` (it is serialised
    right away). Returns False when a checkpoint at `step` already exists.
    """
    if step in self._manager.all_steps():
      return False
    metrics = None if miou is None else {MIOU_KEY: float(miou)}
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(_keys_to_data(state)),
            DATA_ITEM: DataStateSave(data_state),
        }),
        metrics=metrics, force=True)

  def restore(self, step: int, target: Any, *, with_data: bool = True,
              config: Any = None) -> tuple[Any, Any]:
    """Restores (state, data_state) at `step` onto the shardings of `target`.

    `target` is a state pytree (arrays or `jax.ShapeDtypeStruct`s carrying the
    shardings the restored arrays should have). `with_data=False` skips the
    iterator state (evaluation). With `config`, its SHAPE_FIELDS are first
    compared with the run's saved config.json (`check_config`).

    Every failure is one CheckpointError naming the step folder: a config or
    model whose array shapes differ from the saved ones (found from the
    checkpoint's metadata, before any array is read), a damaged or truncated
    checkpoint, an unreadable data state.
    """
    if step not in self._manager.all_steps():
      raise CheckpointError(f'{self.directory}: no checkpoint at step {step}')
    if config is not None:
      self.check_config(step, config)
    self.check_shapes(step, target)  # also quiets orbax's leftovers of a damaged array's reads
    abstract = _abstract_keys_to_data(abstract_like(target))
    # Leaves without a sharding in `target` would take the saved one, which does not exist
    # under another process or device count: they are replicated over every device instead.
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ('devices',)), jax.sharding.PartitionSpec())
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract, fallback_sharding=replicated)}
    if with_data:
      items[DATA_ITEM] = DataStateRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many kinds for a damaged file
      raise CheckpointError(
          f'{self.directory / str(step)}: cannot read this checkpoint ({_first_line(e)}); it is '
          'damaged or incomplete: move that folder away to resume from the one before') from e
    state = _data_to_keys(restored[STATE_ITEM], target)
    data_state = restored[DATA_ITEM] if with_data else None
    return state, data_state

  def saved_config(self) -> dict[str, Any] | None:
    """The run's config.json (beside the checkpoints folder), or None when there is none."""
    from uccl_jax import reporting  # pylint: disable=g-import-not-at-top
    path = self.directory.parent / reporting.CONFIG_FILE
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError):
      return None

  def check_config(self, step: int, config: Any) -> None:
    """CheckpointError naming the SHAPE_FIELDS where `config` differs from the run's config.json.

    Without a readable config.json nothing is checked here (the shapes still are,
    by `restore`).
    """
    saved = self.saved_config()
    if saved is None:
      return
    differ = []
    for name in SHAPE_FIELDS:
      section, field = name.split('.')
      if not isinstance(saved.get(section), dict) or field not in saved[section]:
        continue
      was = saved[section][field]
      now = json.loads(json.dumps(_plain(config[section][field])))
      if was != now:
        differ.append((name, was, now))
    if differ:
      before = ', '.join(f'{name}={was}' for name, was, _ in differ)
      after = ', '.join(f'{name}={now}' for name, _, now in differ)
      raise CheckpointError(f'{self.directory / str(step)}: saved with {before}; the config says '
                            f"{after} (use the run's config, or another --workdir)")

  def check_shapes(self, step: int, target: Any) -> None:
    """CheckpointError unless the saved arrays have `target`'s paths and shapes.

    Reads the checkpoint's metadata only, no array. `target`: as for `restore`.
    """
    where = self.directory / str(step)
    abstract = _abstract_keys_to_data(abstract_like(target))
    _quiet_orbax_leftovers()
    try:
      saved = _shapes(self._manager.item_metadata(step)[STATE_ITEM].tree)
    except Exception as e:  # noqa: BLE001 -- unreadable metadata: a damaged checkpoint
      raise CheckpointError(f'{where}: cannot read this checkpoint ({_first_line(e)}); it is damaged '
                            'or incomplete: move that folder away to resume from the one '
                            'before') from e
    wanted = _shapes(abstract)
    problems = [f'{key}: saved {saved[key]}, the model has {wanted[key]}'
                for key in wanted if key in saved and saved[key] != wanted[key]]
    problems += [f'{key}: not in the checkpoint' for key in wanted if key not in saved]
    problems += [f'{key}: in the checkpoint, not in the model' for key in saved if key not in wanted]
    if not problems:
      return
    fields = ''
    config = self.saved_config()
    if config is not None:
      values = [f'{name}={config[name.split(".")[0]][name.split(".")[1]]}' for name in SHAPE_FIELDS
                if name.split('.')[1] in config.get(name.split('.')[0], {})]
      fields = f'; the run was saved with {", ".join(values)}'
    raise CheckpointError(f'{where}: cannot restore into this model/optimizer: {len(problems)} '
                          f'arrays differ (first: {problems[0]}){fields}')

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(error: BaseException) -> str:
  """The gist of an orbax/tensorstore error: its first line, without the spec dumps."""
  text = str(error).strip()
  line = text.splitlines()[0] if text else type(error).__name__
  for noise in (' See full TensorStore details', ' [tensorstore_spec'):
    line = line.split(noise)[0]
  return line[:300]


def _plain(value: Any) -> Any:
  """A config value as JSON has it (tuples as lists, ConfigDicts as dicts)."""
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def _key_name(entry: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'params/backbone/conv1/kernel' -> shape, for the arrays (or their metadata) of `tree`."""
  return {'/'.join(_key_name(entry) for entry in path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _OrbaxLeftovers:
  """Drops the 'Event loop is closed' reports of reads still in flight when a restore fails.

  When one array of a checkpoint cannot be read, orbax closes its event loop
  while tensorstore's other reads are finishing; each then reports through
  `sys.unraisablehook` (a traceback on stderr, per array: hundreds of lines
  around the one error that matters). This hook, installed by `restore`, drops
  exactly those reports and passes everything else on.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    value = unraisable.exc_value
    name = getattr(unraisable.object, '__qualname__', '') or repr(unraisable.object)
    if ((isinstance(value, RuntimeError) and str(value) == 'Event loop is closed')
        or '_read_array_index_and_device_put' in name):
      return
    self.previous(unraisable)


def _quiet_orbax_leftovers() -> None:
  import sys  # pylint: disable=g-import-not-at-top
  if not isinstance(sys.unraisablehook, _OrbaxLeftovers):
    sys.unraisablehook = _OrbaxLeftovers(sys.unraisablehook)


def locate(path: str | os.PathLike[str]) -> tuple[str, int | None]:
  """Finds the checkpoint folder (and step) for `--checkpoint=DIR`.

  Accepts a run folder (holding `checkpoints/`), a checkpoints folder, or one
  step's folder (`.../checkpoints/1200`). Returns (checkpoints folder, step or
  None for 'best').
  """
  path = epath.Path(path).absolute()
  if not path.is_dir():
    raise CheckpointError(f'--checkpoint={path}: no such folder')
  if (path / 'checkpoints').is_dir():
    return str(path / 'checkpoints'), None
  if path.name.isdigit() and (path / STATE_ITEM).is_dir():
    return str(path.parent), int(path.name)
  if any(p.name.isdigit() for p in path.iterdir()):
    return str(path), None
  raise CheckpointError(f'--checkpoint={path}: not a run folder, checkpoints folder or step folder')


def read_arrays(directory: str | os.PathLike[str], step: int) -> dict[str, Any]:
  """The saved train state of `step` as nested dicts of NumPy arrays, on any device layout.

  For inspection and comparison (tests, tools): needs no model or target, and
  works whatever process/device count wrote the checkpoint.
  """
  path = epath.Path(directory).absolute() / str(step) / STATE_ITEM
  if not path.is_dir():
    raise CheckpointError(f'{path}: no saved state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
