r"""How good are a run's pseudo-labels? `python -m uccl_jax.benchmark teacher`.

Why: UniMatch's unlabeled losses, which UCCL keeps (beside SBU, which trains
the uncertain pixels), learn from an unlabeled image only at the pixels whose
weak-view confidence (the largest softmax probability) reaches the threshold
(`unsup.conf_thresh`, 0.95 in the demo); the argmax there is the pseudo-label.
If those confident pixels are mostly one easy class (sky, road), the unlabeled
losses add little over the labeled one; if many of them are wrong, they teach
errors. Whether either happens decides whether the unlabeled images can help,
and the training logs only show how many pixels pass (`mask_ratio`), not which
classes they are or whether they are right. This command measures that on data
whose unlabeled images do have masks (the generated demo writes a mask on
every line of splits/unlabeled.txt).

  python -m uccl_jax.benchmark teacher --config=configs/synthetic.py:uccl --workdir=runs/demo \
      [--checkpoint=best|latest|STEP] [--split=splits/unlabeled.txt] [--threshold=0.95] \
      [--out=teacher.json [--overwrite]] [--config.data.root=...]

Example (the demo run of the README, its best checkpoint, the demo's unlabeled list):
  python -m uccl_jax.benchmark teacher --config=configs/synthetic.py --workdir=runs/demo

The checkpoint is restored as `python -m uccl_jax.main --mode=eval` restores it
(the config must describe the run's network). Every image of the split list
(lines 'image_path mask_path', relative to data.root; the generated dataset when
data.root is '') is predicted whole, at its own size, with inference-mode
BatchNorm, as evaluation predicts. Training predicts the weak view of a crop
with batch statistics instead, so these figures describe the checkpoint as a
teacher, not the pseudo-labels of one particular training step. Pixels whose mask is
255 count nowhere. Printed (percentages) and, with --out, written as JSON
(fractions of 1, with the two confusion matrices of integer counts they come from):
  confident share       confident pixels (max probability >= --threshold) / valid pixels
  confident accuracy    confident pixels whose argmax is the mask's class / confident pixels
  pixel accuracy        the same over every valid pixel
and per class c:
  gt share              pixels of class c / valid pixels
  confident recall      confident pixels predicted c that are c / pixels that are c
  confident precision   confident pixels predicted c that are c / confident pixels predicted c
  share of confident    confident pixels predicted c / confident pixels (the pseudo-labels' mix)

Every bad input (a flag, the config, a missing run folder or checkpoint, a split
line without a mask path, an image or mask that does not decode, an --out that
exists without --overwrite) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uccl_jax import checkpoint as checkpoint_lib
from uccl_jax import cli
from uccl_jax import evaluate
from uccl_jax import step as step_lib
from uccl_jax import train
from uccl_jax.data import sources

ERROR_STATUS = 1
CHECKPOINT_CHOICES = "'best', 'latest' or a step number"


class TeacherError(ValueError):
  """A bad input to the teacher benchmark (one line naming the flag, file or line)."""


@dataclasses.dataclass(frozen=True)
class Options:
  """The parsed command line."""
  config: ml_collections.ConfigDict
  workdir: str
  checkpoint: str
  split: str
  threshold: float
  out: str | None
  overwrite: bool
  log_level: str


# ----------------------------------------------------------------------------
# Command line.


def _define_flags(values: flags.FlagValues, argv: Sequence[str]) -> flags.FlagHolder:
  """The flags on a private FlagValues; returns the --config holder (overrides read from `argv`)."""
  flags.DEFINE_string('workdir', None, 'Run folder whose checkpoint is measured.', flag_values=values)
  flags.DEFINE_string('checkpoint', 'best', f'Which checkpoint of the run: {CHECKPOINT_CHOICES}.',
                      flag_values=values)
  flags.DEFINE_string('split', None, "Split list of 'image_path mask_path' lines (relative paths: "
                      'the current directory, else data.root); default: data.unlabeled_split.',
                      flag_values=values)
  flags.DEFINE_float('threshold', 0.95, 'Confidence threshold, in (0, 1] (unsup.conf_thresh of the '
                     'recipes: 0.95).', flag_values=values)
  flags.DEFINE_string('out', None, 'Also write the figures to this JSON file.', flag_values=values)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out file.', flag_values=values)
  cli.define_log_level_flag(values)
  return cli.define_config_flag(values, argv, None, 'Config file of the run (configs/*.py[:arg]).')


def _check_out(path: str, overwrite: bool) -> None:
  """TeacherError unless --out can be written (before any work is done)."""
  if os.path.isdir(path):
    raise TeacherError(f'--out={path}: is a folder; give a file name')
  if os.path.exists(path) and not overwrite:
    raise TeacherError(f'--out={path}: exists already; pass --overwrite to replace it')
  try:
    cli.check_output_dir(os.path.dirname(os.path.abspath(path)), '--out')
  except cli.CommandLineError as error:
    raise TeacherError(str(error)) from None


def parse(argv: Sequence[str]) -> Options | None:
  """argv[0] is the benchmark's name. None after printing --help.

  Raises:
    TeacherError: any flag or config problem (one line naming it).
  """
  values = flags.FlagValues()
  if cli.wants_help(argv):
    _define_flags(values, [argv[0]])
    sys.stdout.write(cli.help_text(__doc__, values, full=cli.wants_help(argv) == '--helpfull'))
    return None
  config = _define_flags(values, argv)
  try:
    rest = cli.parse_flags(values, cli.rewrite_dashed_flags(argv, values), config)
  except cli.CommandLineError as error:
    raise TeacherError(str(error)) from None
  if len(rest) > 1:
    raise TeacherError(f'unexpected arguments: {" ".join(rest[1:])} (flags are --name=value)')
  if config.value is None:
    raise TeacherError('--config is required (e.g. --config=configs/synthetic.py)')
  if not values.workdir:
    raise TeacherError('--workdir is required: the run folder whose checkpoint is measured')
  if values.checkpoint not in ('best', 'latest') and not values.checkpoint.isdigit():
    raise TeacherError(f'--checkpoint={values.checkpoint}: expected {CHECKPOINT_CHOICES}')
  if not 0.0 < values.threshold <= 1.0:  # also rejects nan
    raise TeacherError(f'--threshold={values.threshold}: must lie in (0, 1]')
  if values.out:
    _check_out(values.out, values.overwrite)
  split = values.split or str(config.value.data.unlabeled_split)
  if not split:
    raise TeacherError('--split is required: data.unlabeled_split is empty in this config')
  return Options(config=config.value, workdir=values.workdir, checkpoint=values.checkpoint,
                 split=split, threshold=float(values.threshold), out=values.out or None,
                 overwrite=values.overwrite, log_level=values.log_level)


# ----------------------------------------------------------------------------
# Inputs: the split list and the checkpoint.


def open_split(config: ml_collections.ConfigDict, split: str) -> Any:
  """The records (image and mask) of every line of `split`, as a sources.FolderSource.

  Raises:
    TeacherError: no split file, a line without a mask path (naming file and line).
    sources.DataError: no dataset folder, an unreadable split file, or a listed
      file that does not exist (naming file and line).
  """
  if config.data.source != 'folder':
    raise TeacherError(f'data.source={config.data.source!r}: the teacher benchmark reads folder '
                       'datasets (split lists) only')
  root = sources.dataset_root(config)
  path = sources.resolve_split_path(split, root)
  if not path.is_file():
    raise TeacherError(f'--split={split}: split file not found (looked in the current directory '
                       f'and in data.root {root})')
  entries = sources.read_split_file(path)
  for entry in entries:
    if entry.mask is None:
      raise TeacherError(f'{path}:{entry.line}: no mask path; every line must be '
                         '"image_path mask_path" (the pseudo-labels are scored against the masks)')
  source = sources.FolderSource(root, entries, num_classes=int(config.data.num_classes),
                                read_masks=True, split_file=str(path),
                                map_label_ids=config.data.name == 'cityscapes')
  sources.check_files_exist([source])
  return source


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      which: str) -> tuple[Any, dict[str, Any], str]:
  """(model, {'params', 'batch_stats'} on one device, step folder) of a run's checkpoint.

  Restores as `train.evaluate_checkpoint` does, onto the config's network.
  """
  folder = os.path.abspath(workdir)
  if not os.path.isdir(folder):
    raise TeacherError(f'--workdir={workdir}: no such folder')
  if not os.path.isdir(os.path.join(folder, train.CHECKPOINT_DIR)):
    raise TeacherError(f'--workdir={workdir}: no {train.CHECKPOINT_DIR} folder in it (not a '
                       'trained run)')
  train.check_config(config)
  model, state, checkpoints, step = train.restore_run_checkpoint(config, folder, which)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  # One device predicts: the replicated copy on every device would only repeat the work.
  variables = jax.device_put(variables, jax.local_devices()[0])
  return model, variables, os.path.join(os.fspath(checkpoints.directory), str(step))


# ----------------------------------------------------------------------------
# Prediction and counts.


@jax.jit
def _teacher_maps(predict_fn: jax.tree_util.Partial, images: jax.Array,
                  threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(i32 [B, H, W] argmax, bool [B, H, W] confidence >= threshold) of uint8 images [B, H, W, 3]."""
  logits = predict_fn(evaluate.normalize_on_device(images))
  # The training step's own definition of confidence and pseudo-label.
  confidence, labels = step_lib._confidence_and_label(logits)  # pylint: disable=protected-access
  return labels, confidence >= threshold


def make_teacher(model: Any, variables: dict[str, Any],
                 threshold: float) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """uint8 image [H, W, 3] -> (argmax i32 [H, W], confident bool [H, W]); one program per size."""
  predict_fn = evaluate.make_predict_fn(model, variables)
  device = jax.local_devices()[0]
  limit = jax.device_put(jnp.float32(threshold), device)

  def teacher(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, confident = _teacher_maps(predict_fn, jax.device_put(image[None], device), limit)
    return np.asarray(labels[0]), np.asarray(confident[0])
  return teacher


def image_counts(mask: np.ndarray, labels: np.ndarray, confident: np.ndarray,
                 num_classes: int, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
  """Two int64 [K, K] confusion matrices (rows: mask class, columns: argmax) of one image:
  over every valid pixel, and over the confident valid pixels."""
  valid = mask != ignore_index
  index = mask[valid].astype(np.int64) * num_classes + labels[valid]
  size = num_classes * num_classes
  every = np.bincount(index, minlength=size)
  sure = np.bincount(index[confident[valid]], minlength=size)
  return every.reshape(num_classes, num_classes), sure.reshape(num_classes, num_classes)


@dataclasses.dataclass
class Counts:
  """Confusion matrices summed over images (int64 [K, K]; rows: mask class, columns: argmax)."""
  every: np.ndarray
  confident: np.ndarray
  images: int = 0

  @classmethod
  def zeros(cls, num_classes: int) -> Counts:
    shape = (num_classes, num_classes)
    return cls(np.zeros(shape, np.int64), np.zeros(shape, np.int64))


def measure(source: Any, teacher: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
            num_classes: int) -> Counts:
  """Counts of every record of `source` (decoding errors: sources.DataError naming file and line)."""
  counts = Counts.zeros(num_classes)
  for index in range(len(source)):
    record = source[index]
    labels, confident = teacher(record['image'])
    every, sure = image_counts(record['mask'], labels, confident, num_classes)
    counts.every += every
    counts.confident += sure
    counts.images += 1
  return counts


# ----------------------------------------------------------------------------
# Figures and report.


def _ratio(numerator: int, denominator: int) -> float | None:
  return None if denominator == 0 else float(numerator) / float(denominator)


def _class_figures(counts: Counts, names: Sequence[str]) -> list[dict[str, Any]]:
  every, sure = counts.every, counts.confident
  gt, correct, predicted = every.sum(axis=1), np.diagonal(sure), sure.sum(axis=0)
  return [{'index': k, 'class': name,
           'gt_share': _ratio(gt[k], every.sum()),
           'confident_recall': _ratio(correct[k], gt[k]),
           'confident_precision': _ratio(correct[k], predicted[k]),
           'confident_share': _ratio(predicted[k], sure.sum())}
          for k, name in enumerate(names)]


def figures(counts: Counts, names: Sequence[str], *, threshold: float,
            checkpoint: str, split: str) -> dict[str, Any]:
  """The report as a JSON-ready dict: fractions of 1 (None where nothing was counted) and counts."""
  valid, confident = int(counts.every.sum()), int(counts.confident.sum())
  return {
      'checkpoint': checkpoint, 'split': split, 'threshold': threshold, 'images': counts.images,
      'valid_pixels': valid, 'confident_pixels': confident,
      'confident_share': _ratio(confident, valid),
      'confident_accuracy': _ratio(int(np.trace(counts.confident)), confident),
      'pixel_accuracy': _ratio(int(np.trace(counts.every)), valid),
      'per_class': _class_figures(counts, names),
      'confusion': {'every': counts.every.tolist(), 'confident': counts.confident.tolist()},
  }


def _percent(value: float | None) -> str:
  return '-' if value is None else f'{100.0 * value:.2f}%'


def format_report(report: dict[str, Any]) -> str:
  """The figures as a readable table (percentages; '-' where the denominator is 0)."""
  lines = [f'checkpoint {report["checkpoint"]}, {report["images"]} images of {report["split"]}, '
           f'threshold {report["threshold"]:g}',
           f'valid pixels {report["valid_pixels"]}: confident {_percent(report["confident_share"])}'
           f', accuracy on confident {_percent(report["confident_accuracy"])}, overall pixel '
           f'accuracy {_percent(report["pixel_accuracy"])}']
  width = max([len('class')] + [len(row['class']) for row in report['per_class']])
  columns = (('gt share', 'gt_share'), ('conf. recall', 'confident_recall'),
             ('conf. precision', 'confident_precision'), ('share of confident', 'confident_share'))
  lines.append(f'{"#":>3}  {"class":<{width}}' + ''.join(f'  {title:>{len(title)}}'
                                                          for title, _ in columns))
  for row in report['per_class']:
    lines.append(f'{row["index"]:>3}  {row["class"]:<{width}}' + ''.join(
        f'  {_percent(row[key]):>{len(title)}}' for title, key in columns))
  return '\n'.join(lines)


def write_json(path: str, report: dict[str, Any]) -> None:
  """Writes `report` to `path` whole or not at all (a temporary file renamed into place)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = f'{path}.partial'
  with open(partial, 'w', encoding='utf-8') as file:
    file.write(json.dumps(report, indent=1, allow_nan=False) + '\n')
  os.replace(partial, path)


# ----------------------------------------------------------------------------


def run(options: Options) -> dict[str, Any]:
  """Measures the checkpoint that `options` names; prints the table; returns the figures."""
  config = options.config
  num_classes = int(config.data.num_classes)
  source = open_split(config, options.split)
  model, variables, where = restore_variables(config, options.workdir, options.checkpoint)
  counts = measure(source, make_teacher(model, variables, options.threshold), num_classes)
  report = figures(counts, train._class_names(config), threshold=options.threshold,  # pylint: disable=protected-access
                   checkpoint=where, split=source.split_file)
  print(format_report(report), flush=True)
  if options.out:
    write_json(options.out, report)
    print(f'wrote {options.out}', flush=True)
  return report


EXPECTED_ERRORS = (TeacherError, train.RunError, checkpoint_lib.CheckpointError, sources.DataError)


def main(argv: Sequence[str]) -> int:
  """argv[0] is the benchmark name (as dispatched by __main__); returns the exit status."""
  try:
    options = parse(list(argv))
    if options is None:
      return 0  # --help
    cli.setup_console(options.log_level)
    run(options)
  except EXPECTED_ERRORS as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr, flush=True)
    return ERROR_STATUS
  except OSError as error:  # e.g. --out's folder removed or filled up while measuring
    print(f'error: {cli.os_error_line(error)}', file=sys.stderr, flush=True)
    return ERROR_STATUS
  except KeyboardInterrupt:
    return cli.interrupted()
  return 0


if __name__ == '__main__':
  sys.exit(main(['teacher'] + sys.argv[1:]))
