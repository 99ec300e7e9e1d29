"""PyTorch .pth <-> uccl_jax weights.

usage:
  python -m uccl_jax.convert SOURCE.pth --out=DIR [--num_classes=N] [--dataset=NAME] [--overwrite]
      Converts a UniMatch/UCCL checkpoint (latest.pth, best.pth) or an ImageNet
      ResNet (UniMatch's pretrained/resnet50.pth, torchvision's) into a folder:
      DIR/variables (orbax) + DIR/converted.json (architecture, classes, source
      file and its SHA-256). A backbone folder is what `model.pretrained` takes;
      a whole-model folder is what `--checkpoint=DIR` of `uccl_jax.main
      --mode=eval` and `uccl_jax.predict` take.
  python -m uccl_jax.convert --to_torch=RUN_OR_CKPT --out=FILE.pth [--step=best|latest|N]
      Writes a PyTorch state dict in UniMatch's DeepLabV3Plus layout (load it
      with `model.load_state_dict(torch.load(FILE))`) from a run folder, a
      checkpoints/step folder or a converted folder.

examples:
  python -m uccl_jax.convert pretrained/resnet50.pth --out=weights/resnet50
  python -m uccl_jax.convert best.pth --out=weights/unimatch_cs --num_classes=19
  python -m uccl_jax.convert --to_torch=runs/voc_183 --out=voc_183.pth

Exit status 0 on success, 1 with one line on stderr for a bad input or
output, 2 for a bad command line. The dashed spellings of earlier releases
(--num-classes, --to-torch) still work for one release, with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys

from absl import flags

from uccl_jax import cli
from uccl_jax.convert.architecture import Architecture
from uccl_jax.convert.errors import ConversionError
from uccl_jax.convert.export import export_torch
from uccl_jax.convert.from_torch import convert_torch_file

PROGRAM = 'python -m uccl_jax.convert'


class UsageError(ValueError):
  """A command line that asks for nothing sensible (exit status 2)."""


def _define_flags() -> flags.FlagValues:
  """The flags on a private FlagValues, so that importing or calling this defines nothing global."""
  values = flags.FlagValues()
  flags.DEFINE_string('out', None, 'Output: a folder (conversion) or a .pth file (--to_torch).',
                      flag_values=values)
  flags.DEFINE_string('to_torch', None, 'Export this run folder, checkpoints/step folder or '
                      'converted folder to a .pth instead of converting SOURCE.pth.', flag_values=values)
  flags.DEFINE_integer('num_classes', None, 'Expected class count of a whole-model checkpoint '
                       '(checked against its classifier).', flag_values=values)
  flags.DEFINE_string('dataset', None, 'Class names recorded in converted.json: cityscapes | pascal | '
                      'synthetic (default: from the class count, 19 or 21).', flag_values=values)
  flags.DEFINE_string('step', 'best', "With --to_torch: 'best', 'latest' or a step number.",
                      flag_values=values)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.', flag_values=values)
  return values


def _parse(argv: Sequence[str], values: flags.FlagValues) -> str | None:
  """Parses `argv` (no program name) into `values`; returns SOURCE.pth or None."""
  try:
    # The argparse release spelled --num-classes, --to-torch: still accepted, with a warning.
    rest = values(cli.rewrite_dashed_flags([PROGRAM, *argv], values))
  except flags.Error as error:
    raise UsageError(cli.error_line(error)) from None
  sources = rest[1:]
  if len(sources) > 1:
    raise UsageError(f'give one SOURCE.pth, got {len(sources)}: {" ".join(sources)}')
  if not values.out:
    raise UsageError('--out is required (a folder for SOURCE.pth, a .pth file for --to_torch)')
  return sources[0] if sources else None


def _run(source: str | None, values: flags.FlagValues) -> None:
  """Converts or exports as the flags say; prints what was written."""
  if values.to_torch:
    if source:
      raise ConversionError(f'give either SOURCE.pth or --to_torch, not both ({source})')
    result = export_torch(values.to_torch, values.out, which=values.step, overwrite=values.overwrite)
    print(f'wrote {values.out}: {result["keys"]} keys, {result["architecture"].describe()}, '
          f'from {result["source"]}')
    return
  if not source:
    raise ConversionError('nothing to do: give SOURCE.pth, or --to_torch=RUN_OR_CKPT')
  info = convert_torch_file(source, values.out, num_classes=values.num_classes,
                            dataset=values.dataset, overwrite=values.overwrite)
  architecture = Architecture.from_json(info['architecture'], values.out)
  print(f'wrote {os.path.abspath(values.out)}: {architecture.describe()}, '
        f'{info["num_parameters"] / 1e6:.2f}M parameters, sha256 {info["source"]["sha256"][:12]}')


def main(argv: Sequence[str] | None = None) -> int:
  """The command (`argv` without the program name); returns the exit status.

  Every expected failure is one line on stderr: status 1 for inputs and
  outputs (ConversionError), 2 for the command line itself. Anything else is a
  bug and keeps its traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  values = _define_flags()
  help_flag = cli.wants_help([PROGRAM, *argv])
  if help_flag:  # the docstring as written: absl's own help would run the examples together
    print(cli.help_text(__doc__, values, full=help_flag == '--helpfull', module=__name__), end='')
    return 0
  try:
    source = _parse(argv, values)
    _run(source, values)
  except UsageError as error:
    print(f'error: {error} (see {PROGRAM} --help)', file=sys.stderr, flush=True)
    return 2
  except ConversionError as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr, flush=True)
    return 1
  return 0
