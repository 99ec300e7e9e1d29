"""The training loop: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint(...)`.

What a run does, in order:
1. Checks the config, the data lists and the batch size against the devices
   before anything is written, so a bad input leaves the run folder as it was.
2. Resumes from the newest checkpoint in `<workdir>/checkpoints` (train state,
   RNG, step and every process's data-iterator position); a fresh run
   initialises the model and, with `model.pretrained`, loads the ImageNet
   backbone strictly through `uccl_jax.convert`.
3. Runs the jitted step (state donated) on global batches built from each
   process's pipeline batches, logs every `train.log_every_steps`, saves every
   `checkpoint.every_steps`, at each epoch end and at the end, evaluates every
   `eval.every_epochs` epochs and at the end (the mIoU is attached to the
   checkpoint of that step, so 'best' can be restored later).
4. SIGTERM (preemption): finishes the current step, saves, exits cleanly.
   A NaN or Inf loss: stops with RunError naming the step and the loss terms;
   no checkpoint is written after it, so the last good one stays.

Resuming is exact: the step, the RNG key (folded with the step inside the
step function), and the data-iterator position are all in the checkpoint, so
a run stopped at step S and resumed computes the same steps S+1... as one that
never stopped. Logged training metrics are those of the logged step itself
(not window averages), so they too are identical; only `step_time` differs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from uccl_jax import checkpoint as checkpoint_lib
from uccl_jax import evaluate as evaluate_lib
from uccl_jax import parallel
from uccl_jax import reporting
from uccl_jax import step as step_lib
from uccl_jax.data import classes
from uccl_jax.data import pipeline
from uccl_jax.models import deeplab

CHECKPOINT_DIR = 'checkpoints'


class RunError(Exception):
  """A run that cannot start or must stop (bad config value, non-finite loss): one line."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """How long the run is, derived from the config and the dataset size."""
  steps_per_epoch: int
  schedule_steps: int  # length of the poly schedule: epochs * steps_per_epoch
  last_step: int  # where this invocation stops: schedule_steps, or train.max_steps if smaller
  with_unlabeled: bool

  def epoch_of(self, step: int) -> int:
    """1-based epoch that `step` (number of updates done) ends or lies in."""
    return max(1, math.ceil(step / self.steps_per_epoch))

  def is_epoch_end(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: where it stopped and the last evaluation."""
  step: int
  miou: float | None
  preempted: bool = False


# ----------------------------------------------------------------------------
# Checks and set-up (nothing is written here).


def _positive(config: ml_collections.ConfigDict, name: str) -> int:
  section, field = name.split('.')
  value = config[section][field]
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise RunError(f'{name}={value!r} must be a positive integer')
  return value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects config values the loop cannot honour, naming the field."""
  if config.method not in step_lib.METHODS:
    raise RunError(f'method={config.method!r}: expected one of {", ".join(step_lib.METHODS)}')
  for name in ('train.epochs', 'train.batch_size', 'train.log_every_steps', 'train.grad_accum',
               'checkpoint.every_steps', 'checkpoint.keep', 'data.crop_size', 'data.num_classes'):
    _positive(config, name)
  if not isinstance(config.train.max_steps, int):
    raise RunError(f'train.max_steps={config.train.max_steps!r} must be an integer (<= 0: no cap)')
  if not isinstance(config.eval.every_epochs, int):
    raise RunError(f'eval.every_epochs={config.eval.every_epochs!r} must be an integer '
                   '(<= 0: evaluate at the end only)')
  if config.eval.mode not in evaluate_lib.MODES:
    raise RunError(f'eval.mode={config.eval.mode!r}: expected one of {", ".join(evaluate_lib.MODES)}')
  try:
    step_lib.check_config(config)
  except step_lib.StepConfigError as e:
    raise RunError(str(e)) from None


def make_plan(config: ml_collections.ConfigDict, workdir: str | None) -> RunPlan:
  """Steps per epoch from the data lists (reads them: DataError for a missing root or list)."""
  with_unlabeled = config.method != 'supervised'
  try:
    per_epoch = pipeline.steps_per_epoch(config, with_unlabeled=with_unlabeled, workdir=workdir)
  except pipeline.PipelineError as e:
    raise RunError(str(e)) from None
  schedule_steps = per_epoch * int(config.train.epochs)
  last_step = schedule_steps
  if config.train.max_steps > 0:
    last_step = min(schedule_steps, int(config.train.max_steps))
  return RunPlan(per_epoch, schedule_steps, last_step, with_unlabeled)


def build_model(config: ml_collections.ConfigDict) -> deeplab.DeepLabV3Plus:
  """The network of `config.model`; a bad field is a RunError naming it."""
  try:
    return deeplab.from_config(config.model, int(config.data.num_classes))
  except ValueError as e:
    raise RunError(str(e)) from None


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  mesh = parallel.make_mesh()
  parallel.check_batch_size(int(config.train.batch_size), mesh,
                            grad_accum=int(config.train.grad_accum))
  return mesh


def _state_factory(config, model, mesh, schedule_steps):
  crop = int(config.data.crop_size)

  def create(rng):
    return step_lib.create_train_state(config, model, rng, (crop, crop, 3),
                                       total_steps=schedule_steps, mesh=mesh)
  return create


def _abstract_state(config, model, mesh, schedule_steps) -> step_lib.TrainState:
  """The state's shapes, dtypes and shardings, computed without running the initializer."""
  create = _state_factory(config, model, mesh, schedule_steps)
  return jax.eval_shape(create, jax.random.PRNGKey(0))


def _replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host values (identical on every process) as global arrays replicated on the mesh."""
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def load_pretrained(config: ml_collections.ConfigDict, model: deeplab.DeepLabV3Plus,
                    state: step_lib.TrainState, mesh: jax.sharding.Mesh) -> step_lib.TrainState:
  """Puts the weights of `model.pretrained` (.pth or converted folder) into a fresh state, strictly.

  A UniMatch-format backbone file (`pretrained/resnet50.pth`) fills exactly the
  backbone; a whole-model UniMatch/UCCL checkpoint fills everything. Any
  missing, unexpected or mis-shaped key is an error (the PyTorch code's
  strict=False would silently train from random weights).
  """
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top  (imports torch lazily)
  path = config.model.pretrained
  try:
    loaded = convert.load_pretrained_variables(path, model)
    host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                        {'params': state.params, 'batch_stats': state.batch_stats})
    merged = convert.merge_variables(host, loaded)
  except convert.ConversionError as e:
    raise RunError(f'model.pretrained: {e}') from None
  counts = {c: len(jax.tree.leaves(v)) for c, v in loaded.items()}
  numbers = sum(int(np.size(x)) for x in jax.tree.leaves(loaded['params']))
  subtrees = sorted(loaded['params'].keys())
  logging.info('Loaded model.pretrained=%s: %d parameter arrays (%.2fM values) and %d BN statistics '
               'into %s', path, counts['params'], numbers / 1e6, counts.get('batch_stats', 0),
               ', '.join(subtrees))
  merged = _replicate(merged, mesh)
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'])


# ----------------------------------------------------------------------------
# Preemption.


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries (all processes agree on the step)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> _Preemption:
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
      self._previous = None
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True when any process got SIGTERM; a collective, every process calls it each step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


# ----------------------------------------------------------------------------
# The loop.


def _check_finite(step: int, metrics: Mapping[str, float]) -> None:
  order = ('loss', 'loss_x', 'loss_s', 'loss_fp', 'loss_sbu', 'loss_ckr')
  loss_names = [name for name in order if name in metrics]
  loss_names += sorted(n for n in metrics if n.startswith('loss') and n not in order)
  if all(math.isfinite(metrics[name]) for name in loss_names):
    return
  terms = ', '.join(f'{name}={metrics[name]:.6g}' for name in loss_names)
  raise RunError(f'non-finite loss at step {step}: {terms}; stopped without saving, the last '
                 'good checkpoint is kept')


def _class_names(config: ml_collections.ConfigDict) -> list[str]:
  num_classes = int(config.data.num_classes)
  try:
    names = list(classes.for_dataset(config.data.name).names)
  except Exception:  # noqa: BLE001 -- unknown dataset name: numbered classes
    names = []
  if len(names) != num_classes:
    names = [f'class {k}' for k in range(num_classes)]
  return names


def run_evaluation(config: ml_collections.ConfigDict, model: deeplab.DeepLabV3Plus,
                   state: step_lib.TrainState) -> evaluate_lib.EvalResult:
  """Evaluates `state` on this process's share of the val list; counts summed over processes."""
  dataset = pipeline.make_val_dataset(config)
  try:
    return evaluate_lib.evaluate_model(
        model, {'params': state.params, 'batch_stats': state.batch_stats}, dataset, config)
  except evaluate_lib.EvalError as e:
    raise RunError(str(e)) from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains (resuming from `workdir` when it holds checkpoints) and evaluates; see the module doc.

  SIGTERM is honoured from the start: one that arrives while the program
  compiles stops the run after its first step, with a checkpoint.
  """
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        preemption: _Preemption) -> TrainResult:
  check_config(config)
  workdir = os.path.abspath(workdir)
  plan = make_plan(config, workdir)
  mesh = _make_mesh(config)
  model = build_model(config)
  create_state = _state_factory(config, model, mesh, plan.schedule_steps)
  checkpoints_dir = os.path.join(workdir, CHECKPOINT_DIR)

  # Resume order: this run's newest checkpoint, else a fresh (optionally pretrained) state.
  # Reading happens before the manager that may write is created.
  latest = None
  if os.path.isdir(checkpoints_dir):
    latest = checkpoint_lib.RunCheckpoints(checkpoints_dir, read_only=True).latest_step()
  if latest is None and config.model.pretrained and not os.path.exists(config.model.pretrained):
    raise RunError(f'model.pretrained: {config.model.pretrained}: no such file or folder')
  train_step = step_lib.make_train_step(model, config, mesh)

  iterator = pipeline.make_train_iterator(config, workdir=workdir,
                                          with_unlabeled=plan.with_unlabeled)
  checkpoints = checkpoint_lib.RunCheckpoints(checkpoints_dir, keep=int(config.checkpoint.keep))
  try:
    if latest is not None:
      abstract = jax.eval_shape(create_state, jax.random.PRNGKey(0))
      state, data_state = checkpoints.restore(latest, abstract)
      iterator.set_state(data_state)
      logging.info('Resumed from %s at step %d', os.path.join(checkpoints_dir, str(latest)), latest)
    else:
      state = create_state(jax.random.PRNGKey(int(config.train.seed)))
      if config.model.pretrained:
        state = load_pretrained(config, model, state, mesh)
    start_step = int(jax.device_get(state.step))
    with reporting.RunReporter(workdir, total_steps=plan.last_step, start_step=start_step) as reporter:
      reporter.write_config(config)
      if start_step == 0:
        num_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
        reporter.message(
            f'{config.method}: {num_params / 1e6:.2f}M parameters, {plan.steps_per_epoch} steps per '
            f'epoch, {plan.schedule_steps} scheduled steps, running to step {plan.last_step} on '
            f'{jax.device_count()} devices ({jax.process_count()} processes)')
      else:
        reporter.message(f'resumed at step {start_step}, running to step {plan.last_step}')
      return run_loop(config, plan, model, mesh, train_step, state, iterator, checkpoints,
                      reporter, start_step, preemption)
  finally:
    checkpoints.close()
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


def run_loop(config: ml_collections.ConfigDict, plan: RunPlan, model: Any, mesh: jax.sharding.Mesh,
             train_step: Any, state: Any, iterator: Any, checkpoints: checkpoint_lib.RunCheckpoints,
             reporter: reporting.RunReporter, start_step: int,
             preemption: _Preemption) -> TrainResult:
  """Steps from `start_step` to `plan.last_step`: logs, saves, evaluates (see the module doc).

  `iterator` yields this process's batches and has get_state(); `train_step`
  maps (state, global batch) -> (state, metrics).
  """
  log_every = int(config.train.log_every_steps)
  save_every = int(config.checkpoint.every_steps)
  eval_every = int(config.eval.every_epochs)
  last_miou = None
  if start_step >= plan.last_step:
    reporter.message(f'nothing to train: the checkpoint is at step {start_step} and the run ends at '
                     f'step {plan.last_step} (raise train.max_steps or train.epochs to continue)')
    return TrainResult(start_step, checkpoints.miou(start_step))

  window_start, window_steps = time.perf_counter(), 0
  step = start_step
  while step < plan.last_step:
    batch = parallel.global_batch(next(iterator), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    window_steps += 1
    host_metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
    _check_finite(step, host_metrics)
    if step == start_step + 1:
      # The first step compiles the program: keep it out of step_time.
      reporter.message(f'step {step}: compiled and ran the first step in '
                       f'{time.perf_counter() - window_start:.1f} s')
      window_start, window_steps = time.perf_counter(), 0
    reporter.advance(step)

    if step % log_every == 0 or step == plan.last_step:
      now = time.perf_counter()
      host_metrics['step_time'] = (now - window_start) / window_steps if window_steps else float('nan')
      host_metrics['epoch'] = plan.epoch_of(step)
      reporter.log_train(step, host_metrics)
      window_start, window_steps = now, 0

    preempted = preemption.any_process()
    epoch_end = plan.is_epoch_end(step)
    final = step == plan.last_step
    evaluate_now = final or (epoch_end and eval_every > 0
                             and (step // plan.steps_per_epoch) % eval_every == 0)
    miou = None
    if evaluate_now and not preempted:
      result = run_evaluation(config, model, state)
      miou = last_miou = result.miou
      names = _class_names(config)
      reporter.log_eval(step, result.miou, dict(zip(names, result.iou_per_class.tolist())),
                        table=evaluate_lib.format_iou_table(result, names),
                        epoch=plan.epoch_of(step), num_images=result.num_images)
    if preempted or final or epoch_end or evaluate_now or step % save_every == 0:
      checkpoints.save(step, state, iterator.get_state(), miou=miou)
      window_start, window_steps = time.perf_counter(), 0
    if preempted:
      checkpoints.wait()
      reporter.message(f'SIGTERM: saved the checkpoint at step {step} and stopped; run the same '
                       'command again to resume')
      return TrainResult(step, last_miou, preempted=True)
  checkpoints.wait()
  return TrainResult(step, last_miou)


# ----------------------------------------------------------------------------
# Evaluation of a saved checkpoint.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str = 'best') -> evaluate_lib.EvalResult:
  """Restores a checkpoint and prints the per-class IoU table ending in `mIoU: xx.xx`.

  `checkpoint`: 'best' (highest logged val mIoU; the newest when no evaluation
  was logged), 'latest', a step number, or a folder (run folder, its
  checkpoints folder, or one step folder). Writes nothing.
  """
  check_config(config)
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top  (torch only for .pth)
  if convert.is_converted(checkpoint) or checkpoint.endswith('.pth'):
    return _evaluate_converted(config, checkpoint)
  which = checkpoint
  if checkpoint not in ('best', 'latest') and not checkpoint.isdigit():
    directory, fixed_step = checkpoint_lib.locate(checkpoint)
    which = 'best'  # a run or checkpoints folder without a step: its best checkpoint
  else:
    directory, fixed_step = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), None
    if not os.path.isdir(directory):
      raise checkpoint_lib.CheckpointError(f'{directory}: no checkpoint folder (train first, or '
                                           'pass --checkpoint=FOLDER)')
  checkpoints = checkpoint_lib.RunCheckpoints(directory, read_only=True)
  step = checkpoints.resolve(fixed_step if fixed_step is not None else which)
  mesh = parallel.make_mesh()
  model = build_model(config)
  # The schedule length is not part of the saved arrays: any value restores the same state.
  abstract = _abstract_state(config, model, mesh, schedule_steps=1)
  state, _ = checkpoints.restore(step, abstract, with_data=False)
  logging.info('Restored %s at step %d', directory, step)
  result = run_evaluation(config, model, state)
  names = _class_names(config)
  if jax.process_index() == 0:
    logged = checkpoints.miou(step)
    note = '' if logged is None else f' (logged during training: {logged:.2f})'
    print(f'checkpoint {os.path.join(directory, str(step))}, eval.mode={config.eval.mode}{note}')
    print(evaluate_lib.format_iou_table(result, names), flush=True)
  return result


def _evaluate_converted(config: ml_collections.ConfigDict, path: str) -> evaluate_lib.EvalResult:
  """Evaluates weights from `python -m uccl_jax.convert` (a folder) or a whole-model .pth."""
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  try:
    variables, where = convert.load_model_variables(path, model)
    result = evaluate_lib.evaluate_model(model, variables, pipeline.make_val_dataset(config), config)
  except (convert.ConversionError, evaluate_lib.EvalError) as e:
    raise RunError(str(e)) from None
  if jax.process_index() == 0:
    print(f'weights {where}, eval.mode={config.eval.mode}')
    print(evaluate_lib.format_iou_table(result, _class_names(config)), flush=True)
  return result
