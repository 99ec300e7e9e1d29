"""The training loop: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint(...)`.

What a run does, in order:
1. Checks the config, the batch size against the devices, that every image
   and mask the data lists name exists, and on resume that the config fits the
   checkpoint (shape fields, then the saved arrays' shapes), before anything is
   written, so a bad input leaves the run folder as it was.
2. Resumes from the newest checkpoint in `<workdir>/checkpoints` (train state,
   RNG, step and the data-iterator position, under any process count); a fresh
   run initialises the model and, with `model.pretrained`, loads the ImageNet
   backbone strictly through `uccl_jax.convert`. The first console line says
   which, the next ones what the progress line's loss names mean; the records
   of steps after the starting step are dropped from metrics.jsonl (they are
   recomputed), so each step is written once.
3. Runs the jitted step (state donated) on global batches built from each
   process's pipeline batches and prefetched to the devices two deep, logs
   every `train.log_every_steps`, saves every `checkpoint.every_steps`, at each
   epoch end (unless epochs are shorter than `train.log_every_steps`: a few
   labeled images and no unlabeled list make every step an epoch end, and a
   save per step would cost more than the step), at the end and at the first
   logging step after `checkpoint.every_minutes` without a save (process 0's
   clock decides for all), evaluates every `eval.every_epochs` epochs and at the end (the mIoU is
   attached to the checkpoint of that step, so 'best' can be restored later).
4. SIGTERM (preemption) or Ctrl-C: finishes the current step, saves, exits cleanly (a
   second Ctrl-C stops at once). One
   process notices at once; several processes agree at the next logging,
   saving or evaluation step (at most `train.log_every_steps` steps later,
   with no collective in between).
   A NaN or Inf loss: stops with RunError naming the first such step and its
   loss terms. It is noticed at the next logging step or before the next
   checkpoint or evaluation, whichever comes first (at most
   `train.log_every_steps` steps late); nothing is saved after it, so the
   last good checkpoint stays.

The host never waits for the device between those steps (DESIGN.md, "Feeding
accelerators"): metrics stay on the device and are read at logging steps, the
finite-loss check runs on the device, and the per-step part of the loop runs
under `jax.transfer_guard_device_to_host(STEP_TRANSFER_GUARD)`, so an implicit
device-to-host copy there is an error rather than a silent stall.

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
import jax.numpy as jnp
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
# The device-to-host transfer guard of the per-step part of the loop: implicit copies (float(x),
# np.asarray(x) of a device array) raise. Tests tighten it to 'disallow_explicit'.
STEP_TRANSFER_GUARD = 'disallow'
# The model.pretrained value of the demo's backbone, pretrained on the generated source domain on
# first use (uccl_jax/pretrain.py).
GENERATED_BACKBONE = 'synthetic:source'
# The clock of checkpoint.every_minutes (tests replace it).
_clock = time.monotonic


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

  def eval_steps(self, eval_every: int, start_step: int = 0) -> list[int]:
    """The steps after `start_step` that evaluate: every `eval_every` epochs and the last."""
    steps = {self.last_step} if self.last_step > start_step else set()
    if eval_every > 0:
      every = eval_every * self.steps_per_epoch
      steps.update(range(every, self.last_step + 1, every))
    return sorted(step for step in steps if step > start_step)


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
  """Rejects config values the loop cannot honour, naming the field.

  The method and the step's fields are checked by `step.check_config`, the
  batch's split over processes and devices by `parallel.check_batch_size`
  (`_make_mesh`), each in that one place.
  """
  try:
    step_lib.check_config(config)
  except step_lib.StepConfigError as e:
    raise RunError(str(e)) from None
  for name in ('train.epochs', 'train.batch_size', 'train.log_every_steps', 'train.grad_accum',
               'checkpoint.every_steps', 'checkpoint.keep', 'data.crop_size', 'data.num_classes'):
    _positive(config, name)
  minutes = config.checkpoint.every_minutes
  if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
    raise RunError(f'checkpoint.every_minutes={minutes!r} must be a number >= 0 (0: no timed saves)')
  if not isinstance(config.train.max_steps, int):
    raise RunError(f'train.max_steps={config.train.max_steps!r} must be an integer (<= 0: no cap)')
  if not isinstance(config.eval.every_epochs, int):
    raise RunError(f'eval.every_epochs={config.eval.every_epochs!r} must be an integer '
                   '(<= 0: evaluate at the end only)')
  if config.eval.mode not in evaluate_lib.MODES:
    raise RunError(f'eval.mode={config.eval.mode!r}: expected one of {", ".join(evaluate_lib.MODES)}')
  if config.data.mix_images not in pipeline.MIX_IMAGES:
    raise RunError(f'data.mix_images={config.data.mix_images!r}: expected one of '
                   f'{", ".join(pipeline.MIX_IMAGES)}')


def open_train_sources(config: ml_collections.ConfigDict,
                       workdir: str | None) -> pipeline.TrainSources:
  """The run's train lists, opened once (DataError for a missing root or list)."""
  return pipeline.load_train_sources(config, workdir=workdir,
                                     with_unlabeled=config.method != 'supervised')


def make_plan(config: ml_collections.ConfigDict,
              train_sources: pipeline.TrainSources) -> RunPlan:
  """Steps per epoch from the opened data lists, and where this invocation stops."""
  with_unlabeled = train_sources.unlabeled is not None
  try:
    per_epoch = train_sources.steps_per_epoch(int(config.train.batch_size))
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


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of `config.parallel`; a shape that does not fit the devices is a RunError."""
  try:
    return parallel.mesh_from_config(config)
  except parallel.MeshShapeError as e:
    raise RunError(str(e)) from None


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  mesh = make_mesh(config)
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
  """The state's shapes, dtypes and shardings (replicated on `mesh`), computed without running
  the initializer. The shardings are the restore target's: a checkpoint written under another
  process or device count restores onto this mesh."""
  create = _state_factory(config, model, mesh, schedule_steps)
  replicated = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      jax.eval_shape(create, jax.random.PRNGKey(0)))


def _replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host values (identical on every process) as global arrays replicated on the mesh."""
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def pretrained_path(config: ml_collections.ConfigDict) -> str | None:
  """model.pretrained, or None for random weights on purpose ('' or 'none').

  'synthetic:source' (the demo's default) is the backbone pretrained on the
  generated source domain for this config's network, made on first use
  (uccl_jax/pretrain.py).
  """
  value = str(config.model.pretrained).strip()
  if value.lower() in ('', 'none'):
    return None
  if value == GENERATED_BACKBONE:
    from uccl_jax import pretrain  # pylint: disable=g-import-not-at-top  (it trains through this module)
    try:
      return str(pretrain.ensure_backbone(pretrain.for_demo(config)))
    except pretrain.PretrainError as e:
      raise RunError(f'model.pretrained={value!r}: {e}') from None
  return value


def check_pretrained(config: ml_collections.ConfigDict) -> None:
  """A fresh run's backbone must exist: one line naming the field, the path and the remedies."""
  path = pretrained_path(config)
  if path is not None and not os.path.exists(path):
    raise RunError(
        f'model.pretrained={path!r}: no such file or folder ({os.path.abspath(path)}); the recipe '
        "starts from UniMatch's ImageNet ResNet-50: download resnet50.pth from the link in "
        "UniMatch's README (github.com/LiheYoung/UniMatch, 'Pretrained Backbone') into "
        'pretrained/ (or turn it into a folder with `python -m uccl_jax.convert '
        'pretrained/resnet50.pth --out=DIR` and point model.pretrained there), or train from '
        'scratch on purpose with --config.model.pretrained=none')


def _sha256(path: str) -> str:
  """SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  if os.path.isdir(path):
    files = sorted(os.path.relpath(os.path.join(root, name), path)
                   for root, _, names in os.walk(path) for name in names)
  else:
    files = ['']
  for name in files:
    if name:
      digest.update(name.encode() + b'\0')
    with open(os.path.join(path, name) if name else path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        digest.update(chunk)
  return digest.hexdigest()


def describe_backbone(config: ml_collections.ConfigDict) -> str:
  """The run's first line about its weights: the backbone loaded, or random init on purpose."""
  path = pretrained_path(config)
  if path is None:
    return (f'backbone: random initialisation, on purpose (model.pretrained='
            f'{config.model.pretrained!r})')
  return (f'backbone: {path} (sha256 {_sha256(path)[:12]}), strict load passed: every key and '
          'shape matched')


def load_pretrained(config: ml_collections.ConfigDict, model: deeplab.DeepLabV3Plus,
                    state: step_lib.TrainState, mesh: jax.sharding.Mesh) -> step_lib.TrainState:
  """Puts the weights of `model.pretrained` (.pth or converted folder) into a fresh state, strictly.

  A UniMatch-format backbone file (`pretrained/resnet50.pth`) fills exactly the
  backbone; a whole-model UniMatch/UCCL checkpoint fills everything. Any
  missing, unexpected or mis-shaped key is an error (the PyTorch code's
  strict=False would silently train from random weights).
  """
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top  (imports torch lazily)
  path = pretrained_path(config)
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
  logging.debug('Loaded model.pretrained=%s: %d parameter arrays (%.2fM values) and %d BN statistics '
                'into %s', path, counts['params'], numbers / 1e6, counts.get('batch_stats', 0),
                ', '.join(subtrees))
  merged = _replicate(merged, mesh)
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'])


# ----------------------------------------------------------------------------
# Preemption.


class _Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag checked at step boundaries.

  Either signal finishes the current step, saves and exits cleanly; a second
  Ctrl-C stops at once (KeyboardInterrupt). One process reads its flag every
  step (no cost). Several processes must stop at the same step, which takes a
  collective: they agree only at sync points the loop already has (logging,
  saving, evaluating), so no step pays for it.
  """

  def __init__(self):
    self.requested = False
    self.signal_name = ''
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _Preemption:
    def handler(signum, frame):
      del frame
      if signum == signal.SIGINT and self.requested:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
      self.requested = True
      self.signal_name = self.signal_name or signal.Signals(signum).name
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
        pass
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def decide(self, at_sync_point: bool, save_due: bool = False) -> tuple[bool, bool]:
    """(stop here, save here for checkpoint.every_minutes), the same in every process.

    Stop: any process got SIGTERM and, with several processes, this is a sync
    point. Timed save: only at sync points; `save_due` is this process's clock's
    verdict, and with several processes process 0's verdict counts for all.
    With several processes one collective carries both flags; every process
    calls it at the same steps with the same `at_sync_point`.
    """
    if jax.process_count() == 1:
      return self.requested, at_sync_point and save_due
    if not at_sync_point:
      return False, False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    with jax.transfer_guard_device_to_host('allow'):
      flags = np.asarray(multihost_utils.process_allgather(
          np.array([self.requested, save_due], np.int32))).reshape(-1, 2)
    return bool(np.any(flags[:, 0])), bool(flags[0, 1])


# ----------------------------------------------------------------------------
# The loop.


@jax.jit
def _watch_losses(record: dict[str, Any], losses: dict[str, jax.Array]) -> dict[str, Any]:
  """One step of the device-side finite-loss watch: counts steps, keeps the first bad step's losses."""
  step = record['step'] + 1
  finite = jnp.all(jnp.stack([jnp.isfinite(value) for value in losses.values()]))
  first_bad = record['ok'] & jnp.logical_not(finite)
  return {'step': step, 'ok': record['ok'] & finite,
          'bad_step': jnp.where(first_bad, step, record['bad_step']),
          'bad_losses': {name: jnp.where(first_bad, losses[name], record['bad_losses'][name])
                         for name in losses}}


class FiniteWatch:
  """Whether every loss since the start was finite, kept on the device (no per-step host read).

  `update(metrics)` after each step only dispatches a tiny program; `check()`
  reads the record (a device-to-host copy: the loop calls it at logging,
  saving and evaluation steps) and raises RunError naming the first step whose
  loss terms were not all finite.
  """

  def __init__(self, start_step: int, mesh: jax.sharding.Mesh):
    self._loss_names = step_lib.LOSS_NAMES
    self._record = _replicate({'step': np.int32(start_step), 'ok': np.bool_(True),
                               'bad_step': np.int32(-1),
                               'bad_losses': {n: np.float32(0) for n in self._loss_names}}, mesh)

  def update(self, metrics: Mapping[str, jax.Array]) -> None:
    self._record = _watch_losses(self._record, {n: metrics[n] for n in self._loss_names})

  def check(self) -> None:
    record = jax.device_get(self._record)
    if bool(record['ok']):
      return
    terms = ', '.join(f'{name}={float(record["bad_losses"][name]):.6g}' for name in self._loss_names)
    raise RunError(f'non-finite loss at step {int(record["bad_step"])}: {terms}; stopped without '
                   'saving, the last good checkpoint is kept')


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
  from uccl_jax.data import val_input  # pylint: disable=g-import-not-at-top
  dataset = val_input.make_val_iterator(config)  # uint8, decoded ahead in threads
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
  checkpoints_dir = os.path.join(workdir, CHECKPOINT_DIR)
  # Resume order: this run's newest checkpoint, else a fresh (optionally pretrained) state.
  # Everything is checked before anything is written to the run folder: the config, the
  # backbone of a fresh run, the batch against the devices, every file the data lists name, and
  # a resumed run's config against its checkpoint.
  reader, latest = None, None
  # Process 0's view: it creates the folder below, maybe before a slower process looks.
  if parallel.agree_with_process_zero(os.path.isdir(checkpoints_dir)):
    reader = checkpoint_lib.RunCheckpoints(checkpoints_dir, read_only=True)
    latest = reader.latest_step()
  generated_backbone = str(config.model.pretrained).strip() == GENERATED_BACKBONE
  if latest is None and not generated_backbone:
    check_pretrained(config)
  mesh = _make_mesh(config)
  train_sources = open_train_sources(config, workdir)
  check_data_files(config, train_sources)
  if latest is None and generated_backbone:  # after the cheap checks: it may pretrain for minutes
    check_pretrained(config)
  plan = make_plan(config, train_sources)
  model = build_model(config)
  create_state = _state_factory(config, model, mesh, plan.schedule_steps)
  train_step = step_lib.make_train_step(model, config, mesh)
  abstract = None
  if latest is not None:  # the config's shape fields, then the arrays' shapes (no array read)
    abstract = _abstract_state(config, model, mesh, plan.schedule_steps)
    reader.check_config(latest, config)
    reader.check_shapes(latest, abstract)

  iterator = pipeline.make_train_iterator(config, workdir=workdir,
                                          with_unlabeled=plan.with_unlabeled,
                                          train_sources=train_sources)
  input_line = (f'input: {iterator.workers} grain worker processes (data.workers='
                f'{config.data.workers}; {pipeline.available_cpus()} CPUs available to this process)')
  checkpoints = None
  try:
    checkpoints = checkpoint_lib.RunCheckpoints(checkpoints_dir, keep=int(config.checkpoint.keep))
    if latest is not None:
      state, data_state = checkpoints.restore(latest, abstract, config=config)
      iterator.set_state(data_state)
    else:
      state = create_state(jax.random.PRNGKey(int(config.train.seed)))
      if pretrained_path(config) is not None:
        state = load_pretrained(config, model, state, mesh)
    start_step = int(jax.device_get(state.step))
    with reporting.RunReporter(workdir, total_steps=plan.last_step, start_step=start_step) as reporter:
      reporter.message(_found_line(checkpoints_dir, start_step, reporter.dropped_records))
      reporter.message(reporting.legend())
      reporter.write_config(config)
      reporter.message(input_line)
      if start_step == 0:
        reporter.message(describe_backbone(config))
        num_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
        reporter.message(
            f'{config.method}: {num_params / 1e6:.2f}M parameters, {plan.steps_per_epoch} steps per '
            f'epoch, {plan.schedule_steps} scheduled steps, running to step {plan.last_step} on '
            f'{jax.device_count()} devices ({jax.process_count()} processes)')
      else:
        reporter.message(f'resumed at step {start_step}, running to step {plan.last_step} on '
                         f'{jax.device_count()} devices ({jax.process_count()} processes)')
      return run_loop(config, plan, model, mesh, train_step, state, iterator, checkpoints,
                      reporter, start_step, preemption)
  finally:
    if checkpoints is not None:
      checkpoints.close()
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


def _found_line(checkpoints_dir: str, start_step: int, dropped: int) -> str:
  """The run's first line: what the run folder held, and what became of an earlier attempt's rows."""
  metrics = os.path.join(os.path.dirname(checkpoints_dir), reporting.METRICS_FILE)
  if start_step > 0:
    line = f'resuming from step {start_step} (checkpoints in {checkpoints_dir})'
    if dropped:
      line += (f'; dropped {dropped} records of later steps from {metrics}: they are '
               'recomputed')
    return line
  line = f'no checkpoint in {checkpoints_dir}: starting at step 0'
  if dropped:
    line += (f'; {metrics} held {dropped} records of an earlier attempt that stopped before its '
             'first save: dropped, starting over')
  return line


def check_data_files(config: ml_collections.ConfigDict, train_sources: pipeline.TrainSources) -> None:
  """Every image and mask the labeled, unlabeled and val lists name exists (DataError otherwise).

  A listing per folder, no decoding: a file missing from the last line of a list
  is reported before the program compiles, with the split file and line.
  """
  from uccl_jax.data import sources  # pylint: disable=g-import-not-at-top
  listed = [train_sources.labeled, train_sources.unlabeled]
  if config.data.source == 'folder':  # TFDS records are not files
    listed.append(sources.make_source(config, 'val'))
  sources.check_files_exist(listed)


def run_loop(config: ml_collections.ConfigDict, plan: RunPlan, model: Any, mesh: jax.sharding.Mesh,
             train_step: Any, state: Any, iterator: Any, checkpoints: checkpoint_lib.RunCheckpoints,
             reporter: reporting.RunReporter, start_step: int,
             preemption: _Preemption) -> TrainResult:
  """Steps from `start_step` to `plan.last_step`: logs, saves, evaluates (see the module doc).

  `iterator` yields this process's host batches, starting at `start_step` (its
  state is {'step': n}, what the checkpoints store); `train_step` maps (state,
  global batch) -> (state, metrics).
  """
  log_every = int(config.train.log_every_steps)
  save_every = int(config.checkpoint.every_steps)
  save_seconds = float(config.checkpoint.every_minutes) * 60.0
  eval_steps = set(plan.eval_steps(int(config.eval.every_epochs), start_step))
  reporter.schedule_evaluations(eval_steps)
  last_miou = None
  if start_step >= plan.last_step:
    reporter.message(f'nothing to train: the checkpoint is at step {start_step} and the run ends at '
                     f'step {plan.last_step} (raise train.max_steps or train.epochs to continue)')
    return TrainResult(start_step, checkpoints.miou(start_step))

  device_batches = parallel.prefetch_to_device(iterator, mesh, depth=2)
  watch = FiniteWatch(start_step, mesh)
  window_start, window_steps = time.perf_counter(), 0
  last_save = _clock()  # the restored checkpoint (or the start) is the last save
  step = start_step
  with jax.transfer_guard_device_to_host(STEP_TRANSFER_GUARD):
    while step < plan.last_step:
      state, metrics = train_step(state, next(device_batches))
      watch.update(metrics)
      step += 1
      window_steps += 1
      if step == start_step + 1:
        # The first step compiles the program: keep it out of step_time.
        jax.block_until_ready(metrics)
        reporter.message(f'step {step}: compiled and ran the first step in '
                         f'{time.perf_counter() - window_start:.1f} s')
        window_start, window_steps = time.perf_counter(), 0
      reporter.advance(step)

      # Everything below happens on the same steps in every process.
      final = step == plan.last_step
      log_now = step % log_every == 0 or final
      evaluate_now = step in eval_steps
      save_now = (final or evaluate_now or step % save_every == 0
                  or (plan.is_epoch_end(step) and plan.steps_per_epoch >= log_every))
      # checkpoint.every_minutes: judged at logging steps only (process 0's clock with several).
      save_due = log_now and save_seconds > 0 and _clock() - last_save >= save_seconds
      preempted, timed_save = preemption.decide(log_now or save_now, save_due)
      save_now = save_now or timed_save
      if not (log_now or save_now or preempted):
        continue
      with jax.transfer_guard_device_to_host('allow'):
        watch.check()  # before anything is logged, evaluated or saved
        if log_now:
          host_metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
          now = time.perf_counter()
          host_metrics['step_time'] = ((now - window_start) / window_steps if window_steps
                                       else float('nan'))
          host_metrics['epoch'] = plan.epoch_of(step)
          reporter.log_train(step, host_metrics)
          window_start, window_steps = now, 0
        miou = None
        if evaluate_now and not preempted:
          began = time.perf_counter()
          result = run_evaluation(config, model, state)
          miou = last_miou = result.miou
          names = _class_names(config)
          reporter.log_eval(step, result.miou, dict(zip(names, result.iou_per_class.tolist())),
                            table=evaluate_lib.format_iou_table(result, names),
                            seconds=time.perf_counter() - began,
                            epoch=plan.epoch_of(step), num_images=result.num_images)
        if save_now or preempted:
          # The data position is the step: step s consumed batches 0 .. s-1 (the prefetched
          # batches beyond it are rebuilt on resume).
          checkpoints.save(step, state, {'step': step}, miou=miou)
          last_save = _clock()
        if evaluate_now or save_now:
          window_start, window_steps = time.perf_counter(), 0
        if preempted:
          checkpoints.wait()
          reporter.message(f'{preemption.signal_name or "SIGTERM"}: saved the checkpoint at step '
                           f'{step} and stopped; run the same command again to resume')
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
  if checkpoint in ('best', 'latest') or checkpoint.isdigit():
    folder, which = os.path.abspath(workdir), checkpoint  # a checkpoint of this run
    if not os.path.isdir(os.path.join(folder, CHECKPOINT_DIR)):
      raise checkpoint_lib.CheckpointError(f'{os.path.join(folder, CHECKPOINT_DIR)}: no checkpoint '
                                           'folder (train first, or pass --checkpoint=FOLDER)')
  else:
    folder, which = checkpoint, 'best'  # a run or checkpoints folder without a step: its best
  model, state, checkpoints, step = restore_run_checkpoint(config, folder, which)
  directory = os.fspath(checkpoints.directory)
  logging.debug('Restored %s at step %d', directory, step)
  result = run_evaluation(config, model, state)
  names = _class_names(config)
  if jax.process_index() == 0:
    logged = checkpoints.miou(step)
    note = '' if logged is None else f' (logged during training: {logged:.2f})'
    print(f'checkpoint {os.path.join(directory, str(step))}, eval.mode={config.eval.mode}{note}')
    print(evaluate_lib.format_iou_table(result, names), flush=True)
  return result


def restore_run_checkpoint(config: ml_collections.ConfigDict, folder: str, which: str
                           ) -> tuple[deeplab.DeepLabV3Plus, step_lib.TrainState, Any, int]:
  """(model, state, the run's checkpoint manager, step) of checkpoint `which` ('best', 'latest'
  or a step) under `folder` (a run, its checkpoints folder or a step folder), on the config's
  network and mesh: what evaluation and the pseudo-label benchmark restore."""
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top  (torch only for .pth)
  checkpoints, step = convert.find_run_checkpoint(folder, which)
  mesh = make_mesh(config)
  model = build_model(config)
  # The schedule length is not part of the saved arrays: any value restores the same state.
  abstract = _abstract_state(config, model, mesh, schedule_steps=1)
  state, _ = checkpoints.restore(step, abstract, with_data=False, config=config)
  return model, state, checkpoints, step


def _evaluate_converted(config: ml_collections.ConfigDict, path: str) -> evaluate_lib.EvalResult:
  """Evaluates weights from `python -m uccl_jax.convert` (a folder) or a whole-model .pth."""
  from uccl_jax import convert  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  try:
    variables, where = convert.load_model_variables(path, model)
    from uccl_jax.data import val_input  # pylint: disable=g-import-not-at-top
    result = evaluate_lib.evaluate_model(model, variables, val_input.make_val_iterator(config),
                                         config)
  except (convert.ConversionError, evaluate_lib.EvalError) as e:
    raise RunError(str(e)) from None
  if jax.process_index() == 0:
    print(f'weights {where}, eval.mode={config.eval.mode}')
    print(evaluate_lib.format_iou_table(result, _class_names(config)), flush=True)
  return result
