"""What a run tells its user: metrics.jsonl, TensorBoard scalars, console progress, the config.

One `RunReporter` per run, alive on every process; only process 0 writes or
prints, the others get no-ops, so the training loop calls it unconditionally.

The run folder, written by process 0:
- `metrics.jsonl`: one JSON object per line, flushed per record. Records carry
  `kind`: 'train' (step, the step's metrics `step.METRICS`, step_time, epoch),
  'eval' (step, miou, iou_per_class {class: IoU}, eval_seconds, ...), 'resume'
  (the step a resumed run restarted from). Non-finite numbers are written as
  the strings 'nan', 'inf', '-inf' (strict JSON; `float()` reads them back). A
  run starting at step N (its checkpoint's; 0 without one) first drops the
  records of steps after N, which it recomputes, rewriting the file atomically,
  so the file holds each step once, in order, as one uninterrupted run would
  have written it (`read_metrics` still reads files of older versions that
  appended duplicates).
- `tensorboard/`: event files (tensorboardX; no TensorFlow), scalars `train/<key>`,
  `eval/mIoU`, `eval/IoU/<class>` (spaces as '_'). A run starting at step N
  over earlier events writes into the same folder with `purge_step=N + 1`:
  TensorBoard shows one run whose steps after N are the new ones
  (`read_tensorboard_scalars` applies the same rule).
- `config.json`: the resolved config, written once; a resume with a different
  config keeps the first and writes `config.step_<N>.json` beside it (a run
  starting over at step 0 replaces it).
- Console: a tqdm bar with steps, rate, an ETA that includes the evaluations
  still to come (timed from those done so far) and the losses of the last
  logging step, on a terminal; one plain line per logging step when stdout or
  stderr is not a terminal (CI, SLURM log files). `legend()` says what the
  short names mean.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from uccl_jax import step as step_lib

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
TENSORBOARD_DIR = 'tensorboard'

# Fields every training record must carry: the step's metrics (step.METRICS, the one list of
# them) and the loop's step_time; the loop may add more.
TRAIN_KEYS = step_lib.METRIC_NAMES + ('step_time',)
# Shown in the console summary, in this order, with these short names.
_SUMMARY_KEYS = tuple((name, short) for name, short, _ in step_lib.METRICS)


def legend() -> str:
  """What the console's short names mean (printed at the start of a run, and in the README)."""
  width = max(len(short) for _, short, _ in step_lib.METRICS)
  lines = [f'  {short:<{width}} = {meaning} [{name}]' for name, short, meaning in step_lib.METRICS]
  return 'the progress line shows (metrics.jsonl names in brackets):\n' + '\n'.join(lines)


class ReportingError(ValueError):
  """Bad reporting input (missing metric, unreadable metrics.jsonl line): one clear line."""


def _json_value(value: Any) -> Any:
  """Plain JSON value of a metric: Python numbers, non-finite floats as strings, containers too."""
  if isinstance(value, Mapping):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if isinstance(value, (str, bool)) or value is None:
    return value
  array = np.asarray(value)  # jax.Array, NumPy scalar or 0-d array
  if array.ndim:
    return [_json_value(v) for v in array.tolist()]
  if np.issubdtype(array.dtype, np.integer):
    return int(array)
  if np.issubdtype(array.dtype, np.bool_):
    return bool(array)
  number = float(array)
  if math.isfinite(number):
    return number
  return 'nan' if math.isnan(number) else ('inf' if number > 0 else '-inf')


def _import_tensorboardx():
  """tensorboardX, imported without letting it import torch.

  tensorboardX imports torch at import time when it is installed (a slow import
  that takes much memory, for tensor types we never pass); this project runs without
  PyTorch, so torch is hidden for the duration of the import unless something
  already imported it.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


def _format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _default_is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _on_terminal() -> bool:
  """A bar only when both streams are terminals: a bar in a file is carriage-return soup."""
  return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def truncate_metrics(path: str | os.PathLike[str], step: int) -> int:
  """Drops the records of steps after `step` from metrics.jsonl (atomically); returns how many.

  A line cut off by a crash at the end of the file goes too; any other line is
  kept as it is. Nothing is rewritten when nothing is dropped.
  """
  path = pathlib.Path(path)
  try:
    lines = path.read_bytes().split(b'\n')
  except FileNotFoundError:
    return 0
  while lines and not lines[-1].strip():
    lines.pop()
  kept, dropped = [], 0
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      if index == len(lines) - 1:  # cut off mid-write by a crash
        dropped += 1
        continue
      record = None
    if isinstance(record, dict) and isinstance(record.get('step'), int) and record['step'] > step:
      dropped += 1
      continue
    kept.append(line + b'\n')
  if dropped:
    temporary = path.with_name(path.name + '.tmp')
    temporary.write_bytes(b''.join(kept))
    os.replace(temporary, path)
  return dropped


class _Bar:
  """A tqdm bar whose ETA is the reporter's (steps and the evaluations still to come)."""

  def __new__(cls, eta: Callable[[int], str], **kwargs: Any):
    import tqdm  # pylint: disable=g-import-not-at-top

    class Bar(tqdm.tqdm):

      @property
      def format_dict(self):
        values = super().format_dict
        values['eta_all'] = eta(int(values['n']))
        return values

    return Bar(bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {eta_all}, '
                          '{rate_fmt}{postfix}]', **kwargs)


class RunReporter:
  """metrics.jsonl + TensorBoard + console for one run; a no-op except on the main process.

  Use as a context manager (or call `close`). `start_step` is the step the run
  starts from: 0 for a fresh run, the restored checkpoint's step on resume.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, total_steps: int, start_step: int = 0,
               is_main: bool | None = None, tensorboard: bool = True, console: str = 'auto'):
    """`console`: 'auto' (bar on a terminal, lines otherwise), 'bar', 'lines' or 'off'."""
    if console not in ('auto', 'bar', 'lines', 'off'):
      raise ReportingError(f"console must be 'auto', 'bar', 'lines' or 'off'; got {console!r}")
    self.workdir = pathlib.Path(workdir)
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.is_main = _default_is_main() if is_main is None else bool(is_main)
    self.dropped_records = 0  # records of steps after start_step dropped from metrics.jsonl
    self._file = None
    self._writer = None
    self._bar = None
    self._console = 'off'
    self._first_log: tuple[int, float] | None = None  # (step, time) of the first train record
    self._eval_steps: list[int] = []  # steps this run evaluates at (`schedule_evaluations`)
    self._evaluated: set[int] = set()
    self._eval_seconds: list[float] = []  # durations of this process's evaluations so far
    if not self.is_main:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = self.workdir / METRICS_FILE
    self.dropped_records = truncate_metrics(metrics_path, self.start_step)
    self._file = self._open_metrics(metrics_path)
    if self.start_step > 0:
      self._write({'kind': 'resume', 'step': self.start_step, 'time': time.time()})
    if tensorboard:
      tensorboardx = _import_tensorboardx()
      logdir = self.workdir / TENSORBOARD_DIR
      earlier = logdir.is_dir() and any(logdir.glob('events.out.tfevents.*'))
      # tensorboardX names its file by the second and opens it with 'wb': a restart within the
      # same second would overwrite the earlier events without the suffix.
      self._writer = tensorboardx.SummaryWriter(
          logdir=str(logdir), flush_secs=30, filename_suffix=f'.{os.getpid()}.{time.time_ns()}',
          purge_step=self.start_step + 1 if self.start_step > 0 or earlier else None)
    if console == 'auto':
      console = 'bar' if _on_terminal() else 'lines'
    self._console = console
    if console == 'bar':
      self._bar = _Bar(self.eta, total=self.total_steps, initial=self.start_step, unit='step',
                       dynamic_ncols=True, smoothing=0.05, file=sys.stderr)

  @staticmethod
  def _open_metrics(path: pathlib.Path):
    """Opens for append; a line cut off by a crash is closed so the next record stays parseable."""
    file = open(path, 'a+b')  # pylint: disable=consider-using-with
    if file.tell() > 0:
      file.seek(-1, os.SEEK_END)
      if file.read(1) != b'\n':
        file.write(b'\n')
        file.flush()
    return file

  def _write(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(_json_value(record), allow_nan=False) + '\n'
    self._file.write(line.encode('utf-8'))
    self._file.flush()

  def message(self, text: str) -> None:
    """Prints a console line (main process only) without breaking the progress bar."""
    if not self.is_main:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def write_config(self, config: Any) -> pathlib.Path | None:
    """Writes the resolved config once; returns the file written (None if nothing was written)."""
    if not self.is_main:
      return None
    if hasattr(config, 'to_json_best_effort'):
      text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
      text = json.dumps(_json_value(config), indent=2, sort_keys=True)
    text += '\n'
    path = self.workdir / CONFIG_FILE
    if path.exists() and self.start_step > 0:  # at step 0 the earlier attempt's is replaced
      if path.read_text() == text:
        return None
      path = self.workdir / f'config.step_{self.start_step}.json'
      self.message(f'config differs from {CONFIG_FILE} of this run; kept it, wrote {path.name}')
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)  # never a half-written config
    return path

  def schedule_evaluations(self, steps: Any) -> None:
    """The steps this run evaluates at, for the ETA (the loop calls it once)."""
    self._eval_steps = sorted(int(step) for step in steps)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` (cheap; call every step if you like)."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends a training record, writes its scalars, updates the console summary."""
    if not self.is_main:
      return
    missing = [key for key in TRAIN_KEYS if key not in metrics]
    if missing:
      raise ReportingError(f'training metrics at step {step} lack {", ".join(missing)} '
                           f'(metrics.jsonl requires {", ".join(TRAIN_KEYS)})')
    values = {key: _json_value(value) for key, value in metrics.items() if key != 'step'}
    now = time.time()
    self._write({'kind': 'train', 'step': int(step), 'time': now, **values})
    if self._writer is not None:
      for key, value in values.items():
        number = _scalar(value)
        if number is not None:
          self._writer.add_scalar(tensorboard_tag(f'train/{key}'), number, int(step))
    summary = ' '.join(f'{short} {_short_number(values[key])}'
                       for key, short in _SUMMARY_KEYS if key in values)
    if self._first_log is None:
      self._first_log = (int(step), now)
    if self._bar is not None:
      self.advance(step)
      self._bar.set_postfix_str(summary, refresh=True)
    elif self._console == 'lines':
      self.message(f'step {step}/{self.total_steps} | {summary} | '
                   f'{_short_number(values["step_time"])} s/step | ETA {self.eta(step, now)}')

  def eta(self, step: int, now: float | None = None) -> str:
    """Time left: the steps at the pace since this process's first record (compile and
    evaluations excluded) plus the evaluations still to come at the mean duration of those
    done so far ('+N eval' while none has been timed)."""
    if self._first_log is None:
      return '?'
    now = time.time() if now is None else now
    first_step, first_time = self._first_log
    if step <= first_step:
      return '?'
    training = max(now - first_time - sum(self._eval_seconds), 0.0)
    seconds = training / (step - first_step) * max(self.total_steps - step, 0)
    pending = sum(1 for s in self._eval_steps if s >= step and s not in self._evaluated)
    if pending and not self._eval_seconds:
      return f'{_format_duration(seconds)} +{pending} eval'
    if self._eval_seconds:
      seconds += pending * sum(self._eval_seconds) / len(self._eval_seconds)
    return _format_duration(seconds)

  def log_eval(self, step: int, miou: float, iou_per_class: Mapping[str, float], *,
               table: str | None = None, seconds: float | None = None, **extra: Any) -> None:
    """Appends an evaluation record (IoUs in percent) and prints `table` (or the mIoU line).

    `seconds`: how long the evaluation took (recorded as eval_seconds; the ETA uses it).
    """
    if not self.is_main:
      return
    self._evaluated.add(int(step))
    if seconds is not None:
      self._eval_seconds.append(float(seconds))
      extra = {**extra, 'eval_seconds': float(seconds)}
    per_class = {str(name): _json_value(iou) for name, iou in iou_per_class.items()}
    self._write({'kind': 'eval', 'step': int(step), 'time': time.time(),
                 'miou': _json_value(miou), 'iou_per_class': per_class,
                 **{key: _json_value(value) for key, value in extra.items()}})
    if self._writer is not None:
      self._writer.add_scalar('eval/mIoU', float(miou), int(step))
      for name, iou in per_class.items():
        number = _scalar(iou)
        if number is not None:
          self._writer.add_scalar(tensorboard_tag(f'eval/IoU/{name}'), number, int(step))
      self._writer.flush()
    self.message(f'evaluation at step {step}:\n{table}' if table else
                 f'evaluation at step {step}: mIoU: {float(miou):.2f}')

  @contextlib.contextmanager
  def eval_progress(self, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A `progress(images_done)` callback for `evaluate.evaluate`: a transient bar on a terminal.

    `total` is this process's number of validation images, if known. Off the
    main process, and without a terminal bar, the callback does nothing.
    """
    if self._bar is None:
      yield lambda images_done: None
      return
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total, unit='img', desc='eval', leave=False, dynamic_ncols=True,
                    file=sys.stderr)
    try:
      yield lambda images_done: bar.update(images_done - bar.n)
    finally:
      bar.close()

  def close(self) -> None:
    """Flushes and closes everything; safe to call twice."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> RunReporter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _scalar(value: Any) -> float | None:
  """A record value as a TensorBoard scalar, None if it is not a number."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    return None
  if isinstance(value, str):
    return float(value) if value in ('nan', 'inf', '-inf') else None
  return float(value)


def _short_number(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def tensorboard_tag(name: str) -> str:
  """TensorBoard tags use [A-Za-z0-9_./-]; other characters ('traffic light') become '_'."""
  return ''.join(c if c.isascii() and (c.isalnum() or c in '_./-') else '_' for c in name)


def read_metrics(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
  """The records of metrics.jsonl as one uninterrupted run would have written them.

  A 'resume' record at step S drops the earlier 'train'/'eval' records with step
  > S (the resumed run recomputes those steps). A line cut off by a crash (the
  last line, or the one before a 'resume' record) is skipped; any other line
  that is not a JSON object is an error naming the file and line.
  """
  lines = pathlib.Path(path).read_text(encoding='utf-8').split('\n')
  records: list[dict[str, Any]] = []
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError('not an object')
    except ValueError as error:
      following = next((l for l in lines[index + 1:] if l.strip()), None)
      cut_off = following is None or _is_resume(following)
      if cut_off:
        continue
      raise ReportingError(f'{path}:{index + 1}: not a JSON object ({error})') from None
    if record.get('kind') == 'resume':
      records = [r for r in records if r.get('kind') not in ('train', 'eval')
                 or r.get('step', 0) <= record['step']]
    records.append(record)
  return [r for r in records if kind is None or r.get('kind') == kind]


def _is_resume(line: str) -> bool:
  with contextlib.suppress(ValueError):
    record = json.loads(line)
    return isinstance(record, dict) and record.get('kind') == 'resume'
  return False


def _events(logdir: str | os.PathLike[str]) -> Iterator[Any]:
  """Every event of the event files under `logdir`, file by file in the order they were started.

  A small reader of the TFRecord framing (length, crc, payload, crc) with
  tensorboardX's protobuf classes, so runs can be inspected and tested without
  TensorFlow or the tensorboard package.
  """
  event_pb2 = _import_tensorboardx().proto.event_pb2
  files = []
  for event_file in sorted(pathlib.Path(logdir).rglob('events.out.tfevents.*')):
    data, events = event_file.read_bytes(), []
    offset = 0
    while offset + 12 <= len(data):
      length = int.from_bytes(data[offset:offset + 8], 'little')
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      if len(payload) < length:
        break  # cut off mid-record
      events.append(event_pb2.Event.FromString(payload))
    files.append(events)
  # In the order the writers started (file names hold whole seconds only).
  for events in sorted(files, key=lambda events: events[0].wall_time if events else 0.0):
    yield from events


def iter_tensorboard_scalars(logdir: str | os.PathLike[str]) -> Iterator[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in the event files under `logdir`, as written."""
  for event in _events(logdir):
    for value in event.summary.value:
      if value.HasField('simple_value'):
        yield value.tag, int(event.step), float(value.simple_value)


def read_tensorboard_scalars(logdir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] as TensorBoard shows the run: a session start at step S (what
  `purge_step=S` writes) drops the points of steps >= S written before it."""
  session_start = _import_tensorboardx().proto.event_pb2.SessionLog.START
  curves: dict[str, list[tuple[int, float]]] = {}
  for event in _events(logdir):
    if event.HasField('session_log') and event.session_log.status == session_start:
      curves = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in curves.items()}
    for value in event.summary.value:
      if value.HasField('simple_value'):
        curves.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return curves
