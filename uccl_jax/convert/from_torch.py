"""A .pth file -> a converted folder (`python -m uccl_jax.convert SOURCE.pth --out=DIR`).

Why convert once rather than read the .pth at every run: the folder needs no
torch, records what the weights are and where they came from, and has been
checked strictly against the network its architecture describes, so a run
that takes it fails (or not) before it trains.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import sys
from typing import Any

import jax
import numpy as np

from uccl_jax.convert import architecture as architecture_lib
from uccl_jax.convert import converted
from uccl_jax.convert import output
from uccl_jax.convert import torch_files
from uccl_jax.convert.errors import ConversionError
from uccl_jax.convert.keys import variables_from_torch

# Class tables named by the class count alone, for the JSON description (the paper's two datasets).
_DATASET_BY_CLASS_COUNT = {19: 'cityscapes', 21: 'pascal'}


def _class_description(num_classes: int | None, dataset: str | None) -> dict[str, Any] | None:
  """{'num_classes', 'dataset', 'names', 'inferred_from_class_count'} for the JSON (None for a backbone)."""
  from uccl_jax.data import classes  # pylint: disable=g-import-not-at-top
  if num_classes is None:
    if dataset:
      raise ConversionError(f'--dataset={dataset}: a backbone-only file has no classes')
    return None
  inferred = not dataset
  name = dataset or _DATASET_BY_CLASS_COUNT.get(num_classes)
  names = None
  if name:
    try:
      table = classes.for_dataset(name)
    except ValueError as error:
      raise ConversionError(f'--dataset: {error}') from None
    if table.num_classes != num_classes:
      raise ConversionError(f'class-count mismatch: --dataset={name} has {table.num_classes} classes, '
                            f'the checkpoint {num_classes}')
    names = list(table.names)
  return {'num_classes': num_classes, 'dataset': name, 'names': names,
          'inferred_from_class_count': bool(name) and inferred}


def _print_note(message: str) -> None:
  print(message, file=sys.stderr)


def convert_torch_file(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       num_classes: int | None = None, dataset: str | None = None,
                       overwrite: bool = False,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Converts a UniMatch/UCCL/torchvision .pth into a converted folder; returns its description.

  Backbone-only files (deep or 7x7 stem) are stored as the 'backbone' subtree of
  a DeepLabV3Plus, ready for merge_variables; their classification head
  (`fc.*`) is dropped with a note. Whole DeepLabV3Plus checkpoints are stored
  whole. `num_classes`, when given, must equal the checkpoint's class count.
  `log` receives the notes (default: stderr).
  """
  log = log or _print_note
  source = os.fspath(source)
  out = os.path.abspath(os.fspath(out))
  output.check_out_folder(out, overwrite)  # before the (slow) reading, and again when moving into place
  state = torch_files.state_dict_of(torch_files.load_torch_file(source), source)
  dropped = []
  if not architecture_lib.is_whole_model(state):
    dropped = sorted(key for key in state if key.startswith(architecture_lib.CLASSIFIER_PREFIX))
    state = {key: value for key, value in state.items() if key not in set(dropped)}
  architecture = architecture_lib.detect_architecture(state, source)
  if num_classes is not None:
    if architecture.kind == architecture_lib.KIND_BACKBONE:
      log(f'note: --num_classes={num_classes} ignored: {source} holds a backbone only')
    elif num_classes != architecture.num_classes:
      raise ConversionError(f'{source}: class-count mismatch: the checkpoint has '
                            f'{architecture.num_classes} classes (classifier.weight), '
                            f'--num_classes={num_classes}')
  try:
    variables = variables_from_torch(state, architecture.build())
  except ConversionError as error:
    raise ConversionError(f'{source}: {architecture.describe()}: {error}') from None
  if architecture.kind == architecture_lib.KIND_BACKBONE:
    variables = {collection: {'backbone': tree} for collection, tree in variables.items()}
  if dropped:
    log(f'note: dropped the ImageNet classifier ({", ".join(dropped)}): not part of the segmentation '
        'network')
  info = {
      'format': converted.CONVERTED_FORMAT,
      'kind': architecture.kind,
      'architecture': architecture.to_json(),
      'classes': _class_description(architecture.num_classes, dataset),
      'source': {'path': os.path.abspath(source), 'sha256': torch_files.file_sha256(source),
                 'bytes': os.path.getsize(source)},
      'dropped_keys': dropped,
      'num_parameters': int(sum(np.size(x) for x in jax.tree.leaves(variables['params']))),
  }
  converted.write_converted(out, variables, info, overwrite=overwrite)
  return info
