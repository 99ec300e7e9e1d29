"""Variables for a model from any place weights live: a .pth, a converted folder, a run's checkpoint.

Why one module: training (`model.pretrained`), evaluation (`--checkpoint`),
prediction and export each accept several kinds of source, and each source is
checked strictly against the network of the config, with the same messages
naming the config field to change. The lookup of a run's checkpoint
(`find_run_checkpoint`) lives here once for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any, TYPE_CHECKING

import flax.linen as nn
import jax
import numpy as np

from uccl_jax.convert import architecture as architecture_lib
from uccl_jax.convert import converted
from uccl_jax.convert import torch_files
from uccl_jax.convert.errors import ConversionError
from uccl_jax.convert.keys import check_variables
from uccl_jax.convert.keys import variables_from_torch

if TYPE_CHECKING:
  from uccl_jax import checkpoint as checkpoint_lib

Variables = dict[str, Any]


def find_run_checkpoint(folder: str | os.PathLike[str],
                        which: str = 'best') -> tuple[checkpoint_lib.RunCheckpoints, int]:
  """The checkpoints of a run (read-only) and the step that `folder` and `which` name.

  `folder` is a run folder, its checkpoints folder or one step folder (as
  `--checkpoint` of uccl_jax.main takes); `which` is 'best', 'latest' or a
  step number, ignored for a step folder.

  Raises:
    checkpoint_lib.CheckpointError: no such folder, no checkpoint in it, or no such step.
  """
  # Imported here: orbax's checkpoint manager is needed only when a run is read.
  from uccl_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  directory, fixed_step = checkpoint_lib.locate(folder)
  checkpoints = checkpoint_lib.RunCheckpoints(directory, read_only=True)
  step = checkpoints.resolve(fixed_step if fixed_step is not None else which)
  return checkpoints, step


def read_run_variables(path: str | os.PathLike[str], which: str = 'best') -> tuple[Variables, str]:
  """{'params', 'batch_stats'} (NumPy) of a run's checkpoint, and a description of where from.

  `path` and `which` as find_run_checkpoint takes them. Needs no model,
  optimizer or device layout.
  """
  from uccl_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  try:
    checkpoints, step = find_run_checkpoint(path, which)
    directory = os.fspath(checkpoints.directory)
    state = checkpoint_lib.read_arrays(directory, step)
  except checkpoint_lib.CheckpointError as error:
    raise ConversionError(str(error)) from None
  where = os.path.join(directory, str(step))
  if not isinstance(state, Mapping) or 'params' not in state or 'batch_stats' not in state:
    raise ConversionError(f'{where}: the saved state has no params/batch_stats')
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return jax.tree.map(np.asarray, variables), where


def read_any_variables(path: str | os.PathLike[str], which: str = 'best') -> tuple[Variables, str, str]:
  """(variables, kind, description) of a converted folder or a run's checkpoint, with no model."""
  path = os.fspath(path)
  if converted.is_converted(path):
    variables, info = converted.read_converted(path)
    return variables, info['kind'], converted.converted_source(path, info)
  if not os.path.exists(path):
    raise ConversionError(f'{path}: no such folder')
  variables, where = read_run_variables(path, which)
  return variables, architecture_lib.KIND_DEEPLAB, where


def load_pretrained_variables(path: str | os.PathLike[str], model: nn.Module) -> Variables:
  """What `model.pretrained` names, as variables for merge_variables (strict).

  `path` is a .pth (UniMatch deep-stem backbone, torchvision ResNet with its
  `fc.*` ignored, or a whole UniMatch/UCCL checkpoint) or a converted folder.
  A backbone gives {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}};
  a whole model gives all of `model`'s variables.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    variables, info = converted.read_converted(path)
    architecture = architecture_lib.Architecture.from_json(info['architecture'], path)
    architecture_lib.check_architecture(architecture, model, path)
    backbone_only = info['kind'] == architecture_lib.KIND_BACKBONE
    check_variables(variables, model, path, subtree=('backbone',) if backbone_only else ())
    return variables
  state = torch_files.state_dict_of(torch_files.load_torch_file(path), path)
  ignored = () if architecture_lib.is_whole_model(state) else (architecture_lib.CLASSIFIER_PREFIX,)
  return variables_from_torch(state, model, ignore_prefixes=ignored)


def load_model_variables(path: str | os.PathLike[str], model: nn.Module,
                         which: str = 'best') -> tuple[Variables, str]:
  """All variables of `model` from a converted whole-model folder, a .pth, or a run's checkpoint.

  Returns (NumPy variables, a description of the source). Every source is
  checked strictly against `model` (the config's network); `which` picks the
  checkpoint of a run ('best', 'latest' or a step).
  """
  path = os.fspath(path)
  if converted.is_converted(path):
    variables, info = converted.read_converted(path)
    architecture = architecture_lib.Architecture.from_json(info['architecture'], path)
    if info['kind'] != architecture_lib.KIND_DEEPLAB:
      raise ConversionError(f'{path} holds a backbone only (it is for model.pretrained); '
                            'evaluation and prediction need a whole-model checkpoint')
    architecture_lib.check_architecture(architecture, model, path)
    check_variables(variables, model, path)
    return variables, converted.converted_source(path, info)
  if os.path.isfile(path):
    state = torch_files.state_dict_of(torch_files.load_torch_file(path), path)
    if not architecture_lib.is_whole_model(state):
      raise ConversionError(f'{path} holds a backbone only; evaluation and prediction need a whole '
                            'DeepLabV3Plus checkpoint')
    architecture = architecture_lib.detect_architecture(state, path)
    if architecture.num_classes != getattr(model, 'num_classes', None):
      raise ConversionError(f'{path}: class-count mismatch: the weights have '
                            f'{architecture.num_classes} classes, data.num_classes is '
                            f'{getattr(model, "num_classes", None)}')
    architecture_lib.check_architecture(architecture, model, path)
    return variables_from_torch(state, model), path
  if not os.path.exists(path):
    raise ConversionError(f'{path}: no such file or folder')
  variables, where = read_run_variables(path, which)
  check_variables(variables, model, where)
  return variables, where
