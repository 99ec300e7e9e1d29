"""`python -m uccl_jax.benchmark losses`: SBU + CKR, jitted, against the per-image per-class loops.

Times, on the same random inputs (Pascal setting at feature resolution by
default: B=4, 81x81, C=21, D=256):
  * jax: `losses.sbu_and_ckr_losses`, forward + backward (gradients into the
    strong logits, the strong features and the weak logits, as in training),
    jitted; median and minimum over --repeats calls after one compile call,
    each ended by block_until_ready;
  * numpy loops: `losses_reference.sbu_loss` + `ckr_loss` on NumPy arrays,
    forward only (the loop references compute values, not gradients), so the
    printed speed-up understates the forward+backward ratio;
  * torch loops (when torch is importable and --torch_loops): the same loop
    references on float32 torch tensors with autograd, forward + backward, the
    like-for-like comparison with the released PyTorch code's loops.
--compare_segment_ops also times CKR's D-dimensional class-feature sums
(forward + backward) as `jax.ops.segment_sum` with its generic gradient, as a
one-hot matmul and as what `uccl_jax.losses` uses (segment_sum forward, custom
gather backward).
Medians are noisy on a shared machine; the minimum is the steadier figure.
The step benchmark's loss figure (`measure_losses`) is the jax timing above at
the step's own feature size.

usage:
  python -m uccl_jax.benchmark losses [--batch=4] [--size=81] [--classes=21] [--channels=256]
      [--threshold=0.95] [--variant=reference] [--ignored_fraction=0.1] [--repeats=20]
      [--loop_repeats=3] [--[no]torch_loops] [--compare_segment_ops] [--seed=0]
      [--log_level=none]

examples:
  python -m uccl_jax.benchmark losses
  python -m uccl_jax.benchmark losses --size=201 --classes=19 --notorch_loops
  python -m uccl_jax.benchmark losses --compare_segment_ops --repeats=50

Exit status 0 on success, 2 with one line on stderr for a bad flag.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uccl_jax import cli
from uccl_jax import losses
from uccl_jax import losses_reference
from uccl_jax.benchmark import subcommand


@dataclasses.dataclass(frozen=True)
class Setting:
  """What the command times: the input shapes, the loss variant and how often (its flags)."""
  batch: int = 4
  size: int = 81  # feature map height = width
  classes: int = 21
  channels: int = 256
  threshold: float = 0.95  # SBU confidence threshold
  variant: str = 'reference'
  ignored_fraction: float = 0.1
  repeats: int = 20  # timed calls of the jitted loss
  loop_repeats: int = 3  # timed calls of the loops
  torch_loops: bool = True
  compare_segment_ops: bool = False
  seed: int = 0


def _define_flags() -> flags.FlagValues:
  """The flags (Setting's fields) on a private FlagValues, so that nothing global is defined."""
  values = flags.FlagValues()
  default = Setting()
  flags.DEFINE_integer('batch', default.batch, 'Images.', flag_values=values)
  flags.DEFINE_integer('size', default.size, 'Feature map height = width.', flag_values=values)
  flags.DEFINE_integer('classes', default.classes, 'Classes.', flag_values=values)
  flags.DEFINE_integer('channels', default.channels, 'Feature channels D.', flag_values=values)
  flags.DEFINE_float('threshold', default.threshold, 'SBU confidence threshold.', flag_values=values)
  flags.DEFINE_enum('variant', default.variant, losses.SBU_VARIANTS, 'SBU variant.',
                    flag_values=values)
  flags.DEFINE_float('ignored_fraction', default.ignored_fraction, 'Share of ignored pixels.',
                     flag_values=values)
  flags.DEFINE_integer('repeats', default.repeats, 'Timed calls of the jitted loss.',
                       flag_values=values)
  flags.DEFINE_integer('loop_repeats', default.loop_repeats, 'Timed calls of the loops.',
                       flag_values=values)
  flags.DEFINE_bool('torch_loops', default.torch_loops, 'Also time the loops on torch tensors, '
                    'forward + backward.', flag_values=values)
  flags.DEFINE_bool('compare_segment_ops', default.compare_segment_ops, "Also time CKR's class-"
                    'feature sums three ways.', flag_values=values)
  flags.DEFINE_integer('seed', default.seed, 'Seed of the random inputs.', flag_values=values)
  cli.define_log_level_flag(values)
  return values


def _parse(argv: Sequence[str]) -> tuple[Setting, str] | None:
  """The Setting and --log_level of `argv` (argv[0] is the benchmark name); None after --help.

  Raises:
    cli.CommandLineError: a bad flag or value (one line naming it).
  """
  values = _define_flags()
  if not subcommand.parse(argv, values, __doc__):
    return None
  subcommand.require_positive(values, 'batch', 'size', 'classes', 'channels', 'repeats',
                              'loop_repeats')
  if not 0 <= values.ignored_fraction < 1:
    raise cli.CommandLineError(f'--ignored_fraction={values.ignored_fraction}: must be in [0, 1)')
  setting = Setting(**{field.name: values[field.name].value
                       for field in dataclasses.fields(Setting)})
  return setting, values.log_level


def _inputs(args: Setting) -> dict[str, np.ndarray]:
  """Random logits/features; weak logits scaled so that conf spans both sides of 0.95."""
  rng = np.random.default_rng(args.seed)
  logits_shape = (args.batch, args.size, args.size, args.classes)
  features_shape = (args.batch, args.size, args.size, args.channels)
  weak_scale = rng.uniform(0.5, 6.0, size=(args.batch, args.size, args.size, 1))
  return {
      'weak_logits': (rng.normal(size=logits_shape) * weak_scale).astype(np.float32),
      'strong_logits': rng.normal(size=logits_shape).astype(np.float32),
      'weak_features': np.maximum(rng.normal(size=features_shape), 0.0).astype(np.float32),
      'strong_features': np.maximum(rng.normal(size=features_shape), 0.0).astype(np.float32),
      'ignore': rng.random(logits_shape[:3]) < args.ignored_fraction,
  }


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _describe(times: list[float]) -> str:
  return f'median {statistics.median(times) * 1e3:9.2f} ms   min {min(times) * 1e3:9.2f} ms'


def _jax_step(args: Setting,
              data: dict[str, np.ndarray]) -> tuple[Callable[[], Any], float, dict[str, float]]:
  """The jitted forward+backward, the total loss (for the cross-check), XLA's cost model."""

  def total_loss(weak_logits, strong_logits, weak_features, strong_features, ignore):
    sbu, ckr = losses.sbu_and_ckr_losses(weak_logits, strong_logits, weak_features,
                                         strong_features, ignore, threshold=args.threshold,
                                         variant=args.variant)
    return sbu + ckr

  step = jax.jit(jax.value_and_grad(total_loss, argnums=(0, 1, 3)))
  device_inputs = [jnp.asarray(data[k]) for k in ('weak_logits', 'strong_logits', 'weak_features',
                                                  'strong_features', 'ignore')]
  value, _ = jax.block_until_ready(step(*device_inputs))  # compile
  cost = step.lower(*device_inputs).compile().cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return lambda: jax.block_until_ready(step(*device_inputs)), float(value), cost


def time_jax_losses(*, batch: int, size: int, classes: int, channels: int,
                    threshold: float = 0.95, variant: str = 'reference',
                    repeats: int = 10) -> list[float]:
  """Seconds per jitted SBU + CKR forward+backward call on random inputs of this size.

  The same inputs and timed step as the command (one compile call first); the
  step benchmark uses it at its feature size.
  """
  args = Setting(batch=batch, size=size, classes=classes, channels=channels, threshold=threshold,
                 variant=variant, repeats=repeats)
  call, _, _ = _jax_step(args, _inputs(args))
  return _time(call, repeats)


def measure_losses(config: ml_collections.ConfigDict, repeats: int = 10) -> dict[str, Any]:
  """SBU + CKR forward+backward (jitted) at the step's feature size: the step benchmark's loss figure.

  Says how much of the uccl step the two losses are.
  """
  feature_size = -(-int(config.data.crop_size) // 4)  # deep stem + max pool: ceil(crop / 4)
  times = time_jax_losses(
      batch=int(config.train.batch_size), size=feature_size,
      classes=int(config.data.num_classes), channels=int(config.model.head_channels),
      threshold=float(config.sbu.threshold), variant=str(config.sbu.variant), repeats=repeats)
  return {'batch': int(config.train.batch_size), 'feature_size': feature_size,
          'classes': int(config.data.num_classes), 'channels': int(config.model.head_channels),
          'sbu_ckr_fwd_bwd_s': statistics.median(times), 'sbu_ckr_fwd_bwd_min_s': min(times)}



def _read_features_once(data: dict[str, np.ndarray]) -> tuple[Callable[[], Any], int]:
  """A memory-traffic yardstick: one jitted pass reading both feature tensors."""
  weak, strong = jnp.asarray(data['weak_features']), jnp.asarray(data['strong_features'])
  read = jax.jit(lambda a, b: jnp.sum(a * b))
  jax.block_until_ready(read(weak, strong))
  return lambda: jax.block_until_ready(read(weak, strong)), weak.nbytes


def _numpy_loops(args: Setting, data: dict[str, np.ndarray]) -> float:
  sbu = losses_reference.sbu_loss(data['weak_logits'], data['strong_logits'],
                                  data['weak_features'], data['strong_features'], data['ignore'],
                                  threshold=args.threshold, variant=args.variant)
  ckr = losses_reference.ckr_loss(data['weak_logits'], data['weak_features'],
                                  data['strong_features'], data['ignore'])
  return float(sbu + ckr)


def _torch_loops(args: Setting, data: dict[str, np.ndarray]) -> Callable[[], Any]:
  import torch  # pylint: disable=g-import-not-at-top  # optional, benchmark only

  def run() -> None:
    tensors = {k: torch.from_numpy(v) for k, v in data.items()}
    for k in ('weak_logits', 'strong_logits', 'strong_features'):
      tensors[k].requires_grad_(True)
    sbu = losses_reference.sbu_loss(tensors['weak_logits'], tensors['strong_logits'],
                                    tensors['weak_features'], tensors['strong_features'],
                                    tensors['ignore'], threshold=args.threshold,
                                    variant=args.variant, backend='torch')
    ckr = losses_reference.ckr_loss(tensors['weak_logits'], tensors['weak_features'],
                                    tensors['strong_features'], tensors['ignore'],
                                    backend='torch')
    (sbu + ckr).backward()

  return run


def _compare_segment_ops(args: Setting, data: dict[str, np.ndarray]) -> None:
  """CKR's class features sum_p w_p F_p per (image, class), forward + backward, four ways."""
  batch, size, classes = args.batch, args.size, args.classes
  pixels = size * size
  features = jnp.asarray(data['strong_features'].reshape(batch, pixels, -1))
  labels = jnp.asarray(data['weak_logits'].reshape(batch, pixels, classes).argmax(-1))
  weights = jnp.asarray(np.random.default_rng(args.seed).random((batch, pixels),
                                                                 dtype=np.float32))
  segment_ids = (jnp.arange(batch)[:, None] * classes + labels).reshape(-1)
  flat = lambda x: x.reshape(batch * pixels, *x.shape[2:])

  def segment_sum(w, f):
    return jax.ops.segment_sum(flat(w)[:, None] * flat(f), segment_ids, batch * classes)

  def one_hot_matmul(w, f):
    one_hot = jnp.where(labels[..., None] == jnp.arange(classes), w[..., None], 0.0)
    return jnp.einsum('bpc,bpd->bcd', one_hot, f, precision=jax.lax.Precision.HIGHEST)

  def chosen(w, f):  # what uccl_jax.losses uses: segment_sum forward, custom gather backward
    return losses._weighted_class_sums(w, f, labels, classes)  # pylint: disable=protected-access

  for name, fn in (('jax.ops.segment_sum', segment_sum), ('one-hot matmul', one_hot_matmul),
                   ('custom (uccl_jax)', chosen)):
    step = jax.jit(jax.grad(lambda w, f, fn=fn: jnp.sum(fn(w, f) ** 2), argnums=(0, 1)))
    jax.block_until_ready(step(weights, features))
    times = _time(lambda: jax.block_until_ready(step(weights, features)), args.repeats)
    print(f'class features fwd+bwd, {name:20s} {_describe(times)}')


def _speed_up(loop_times: list[float], jax_times: list[float]) -> str:
  median = statistics.median(loop_times) / statistics.median(jax_times)
  return f'{median:6.1f}x (medians), {min(loop_times) / min(jax_times):6.1f}x (minima)'


def main(argv: Sequence[str]) -> int:
  """Runs the benchmark; argv[0] is the benchmark name (as dispatched by __main__)."""
  try:
    parsed = _parse(argv)
  except cli.CommandLineError as error:
    return subcommand.fail(error)
  if parsed is None:  # --help
    return 0
  args, log_level = parsed
  cli.setup_console(log_level)
  data = _inputs(args)
  print(f'SBU ({args.variant}) + CKR at B={args.batch}, {args.size}x{args.size}, '
        f'C={args.classes}, D={args.channels}, threshold={args.threshold}; '
        f'jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs visible)')

  # The loops run first: XLA's worker threads keep spinning for a while after a
  # JAX call and would steal the CPU from them.
  numpy_value = _numpy_loops(args, data)
  numpy_times = _time(lambda: _numpy_loops(args, data), args.loop_repeats)
  torch_times, torch_threads = None, 0
  if args.torch_loops:
    try:
      torch_call = _torch_loops(args, data)
    except ImportError:
      print('torch loops: skipped (torch is not installed)')
    else:
      import torch  # pylint: disable=g-import-not-at-top
      torch_call()  # warm-up
      torch_times = _time(torch_call, args.loop_repeats)
      torch_threads = torch.get_num_threads()

  jax_call, jax_value, cost = _jax_step(args, data)
  jax_times = _time(jax_call, args.repeats)
  read_call, feature_bytes = _read_features_once(data)
  read_times = _time(read_call, args.repeats)

  print(f'jax, jitted, forward+backward:     {_describe(jax_times)}   ({args.repeats} calls)')
  print(f'numpy loops, forward only:         {_describe(numpy_times)}   '
        f'({args.loop_repeats} calls)')
  if torch_times is not None:
    print(f'torch loops, forward+backward:     {_describe(torch_times)}   '
          f'({args.loop_repeats} calls, {torch_threads} threads)')
  print(f'speed-up over numpy loops (their forward only): {_speed_up(numpy_times, jax_times)}')
  if torch_times is not None:
    print(f'speed-up over torch loops (forward+backward):   {_speed_up(torch_times, jax_times)}')
  relative = abs(jax_value - numpy_value) / max(abs(numpy_value), 1e-12)
  print(f'loss: jax {jax_value:.7f}, numpy loops {numpy_value:.7f} (relative difference '
        f'{relative:.1e})')
  bytes_accessed = cost.get('bytes accessed', float('nan'))
  print(f'for scale: one jitted pass reading both feature tensors {_describe(read_times)}; '
        f'XLA\'s cost model of the jax step: {bytes_accessed / 1e6:.0f} MB accessed '
        f'(= {bytes_accessed / feature_bytes:.1f} feature tensors), '
        f'{cost.get("flops", float("nan")) / 1e6:.0f} MFLOP')

  if args.compare_segment_ops:
    _compare_segment_ops(args, data)
  return 0
