"""PyTorch state-dict keys <-> Flax variables, and the strict check that every weight fits.

The Flax modules are named after the PyTorch state-dict keys with '.' replaced
by '_' (see uccl_jax/models), so every variable has exactly one torch key:

  params      .../<module>/kernel  <- <module>.weight  (conv: OIHW -> HWIO)
  params      .../<module>/bias    <- <module>.bias
  params      .../<bn>/scale       <- <bn>.weight
  batch_stats .../<bn>/mean, var   <- <bn>.running_mean, <bn>.running_var

Why strict: the PyTorch code loads with load_state_dict(strict=False), which
silently keeps random weights for every key it does not find. Here a
conversion either fills every parameter and statistic from a key of the right
shape and uses every key (num_batches_tracked aside), or raises one
ConversionError listing all that is missing, unexpected and mis-shaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uccl_jax.convert.errors import ConversionError
from uccl_jax.models.deeplab import DeepLabV3Plus
from uccl_jax.models.resnet import ResNet

# Shown in error messages; long lists are cut after this many names per kind.
MAX_LISTED = 20
# Spatial size used to trace the model's variable shapes (they do not depend on it).
_TRACE_IMAGE_SIZE = 64
# DistributedDataParallel's prefix on every key of a model trained on several GPUs.
_DDP_PREFIX = 'module.'

_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}

VariablePath = tuple[str, ...]


def torch_key(path: VariablePath, collection: str) -> str:
  """The PyTorch state-dict key of the Flax variable at `path` in `collection`."""
  *modules, leaf = path
  torch_leaf = _LEAF_TO_TORCH.get((collection, leaf))
  if torch_leaf is None:
    raise ConversionError(f'no PyTorch name for variable {collection}/{"/".join(path)}')
  return '.'.join([module.replace('_', '.') for module in modules] + [torch_leaf])


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Takes the 'model' entry of a training checkpoint and drops DistributedDataParallel's 'module.'."""
  if 'model' in state_dict and isinstance(state_dict['model'], Mapping):
    state_dict = state_dict['model']
  unwrapped = {}
  for key, value in state_dict.items():
    key = str(key)
    if key.startswith(_DDP_PREFIX):
      key = key[len(_DDP_PREFIX):]
    unwrapped[key] = value
  return unwrapped


def expected_variables(model: nn.Module) -> dict[str, Any]:
  """Variable shapes of `model` via jax.eval_shape: no real initialisation, any model size."""
  images = jnp.zeros((1, _TRACE_IMAGE_SIZE, _TRACE_IMAGE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))


def flatten(tree: Mapping[str, Any], prefix: VariablePath = ()) -> dict[VariablePath, Any]:
  """{path tuple: leaf} of a nested dict of variables."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[VariablePath, Any]) -> dict[str, Any]:
  """The nested dict of a {path tuple: leaf} mapping (the inverse of flatten)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def format_list(title: str, items: list[str]) -> str:
  """'3 missing: a, b, c', cut after MAX_LISTED names so an error stays one readable line."""
  shown = ', '.join(items[:MAX_LISTED])
  more = f' ... and {len(items) - MAX_LISTED} more' if len(items) > MAX_LISTED else ''
  return f'{len(items)} {title}: {shown}{more}'


def _mismatch_error(head: str, missing: list[str], unexpected: list[str],
                    misshaped: list[str]) -> ConversionError | None:
  """One error listing every missing, unexpected and mis-shaped name, or None when all fit."""
  if not (missing or unexpected or misshaped):
    return None
  parts = [head]
  for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
    if items:
      parts.append(format_list(title, items))
  return ConversionError('; '.join(parts))


def variables_from_torch(state_dict: Mapping[str, Any], model: nn.Module, *,
                         ignore_prefixes: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
  """Flax variables {'params', 'batch_stats'} of `model` from a PyTorch state dict of NumPy arrays.

  Accepted layouts:
    * a whole UniMatch/UCCL DeepLabV3Plus state dict (`backbone.conv1.0.weight`,
      `head.b0.0.weight`, `reduce.0.weight`, `classifier.bias`, ...), keys
      optionally prefixed with `module.`, optionally nested under 'model'
      (their latest.pth / best.pth): returns all variables of `model`;
    * a backbone-only ResNet state dict (`conv1.0.weight`, `bn1.weight`,
      `layer1.0.conv1.weight`, ..., UniMatch's pretrained/resnet50.pth): for a
      DeepLabV3Plus returns only the 'backbone' subtree of both collections;
      merge it into freshly initialised variables with merge_variables. For a
      ResNet model it returns all of its variables.

  Args:
    state_dict: key -> array (torch tensors converted with load_torch_file).
    model: the Flax module the weights are for (its shapes are traced with
      jax.eval_shape, so the full-size network costs nothing to describe).
    ignore_prefixes: keys starting with any of these are dropped before the
      strict check (e.g. ('fc.',) for a classification checkpoint's head).

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 NumPy arrays.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  if not isinstance(model, (DeepLabV3Plus, ResNet)):
    raise ConversionError(f'variables_from_torch: unsupported model type {type(model).__name__}')
  state = unwrap_state_dict(state_dict)
  ignore_prefixes = tuple(ignore_prefixes)
  state = {key: value for key, value in state.items()
           if not key.endswith('num_batches_tracked') and not key.startswith(ignore_prefixes)}
  if not state:
    raise ConversionError('variables_from_torch: the state dict has no weights')

  expected = expected_variables(model)
  # Which subtree of `model` the state dict describes, and the key prefix that selects it.
  backbone_only = isinstance(model, DeepLabV3Plus) and not any(k.startswith('backbone.') for k in state)
  subtree: VariablePath = ('backbone',) if backbone_only else ()

  targets: dict[str, tuple[str, VariablePath, tuple[int, ...]]] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in flatten(expected.get(collection, {})).items():
      if path[:len(subtree)] != subtree:
        continue
      key = torch_key(path[len(subtree):], collection)
      targets[key] = (collection, path, tuple(leaf.shape))

  missing = sorted(key for key in targets if key not in state)
  unexpected = sorted(key for key in state if key not in targets)
  misshaped = []
  flat_out: dict[str, dict[VariablePath, np.ndarray]] = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, shape) in targets.items():
    if key not in state:
      continue
    value = state[key]
    if not isinstance(value, (np.ndarray, np.generic)):
      misshaped.append(f'{key} (not an array: {type(value).__name__})')
      continue
    array = np.asarray(value)
    if path[-1] == 'kernel' and array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.shape != shape:
      torch_shape = tuple(np.shape(value))
      want = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == 'kernel' and len(shape) == 4 else shape
      misshaped.append(f'{key} {torch_shape} (model needs {want})')
      continue
    flat_out[collection][path] = np.ascontiguousarray(array, dtype=np.float32)

  kind = 'backbone-only' if backbone_only else 'full-model'
  error = _mismatch_error(f'state dict ({kind} layout, {len(state)} keys) does not fit the model',
                          missing, unexpected, sorted(misshaped))
  if error:
    raise error
  return {collection: unflatten(flat) for collection, flat in flat_out.items()}


def merge_variables(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
  """`base` variables with every leaf present in `update` replaced; shapes must match.

  Used to put a converted backbone into freshly initialised DeepLab variables:
  merge_variables(model.init(key, images), variables_from_torch(backbone_dict, model)).
  """
  flat_base = {(collection,) + path: leaf for collection, tree in base.items()
               for path, leaf in flatten(tree).items()}
  flat_update = {(collection,) + path: leaf for collection, tree in update.items()
                 for path, leaf in flatten(tree).items()}
  problems = []
  for path, leaf in flat_update.items():
    if path not in flat_base:
      problems.append(f'{"/".join(path)} (not in the model)')
    elif tuple(np.shape(leaf)) != tuple(np.shape(flat_base[path])):
      problems.append(f'{"/".join(path)} {tuple(np.shape(leaf))} '
                      f'(model has {tuple(np.shape(flat_base[path]))})')
  if problems:
    raise ConversionError('merge_variables: ' + format_list('variables do not fit', problems))
  merged = dict(flat_base)
  merged.update(flat_update)
  return unflatten(merged)


def check_variables(variables: Mapping[str, Any], model: nn.Module, source: str,
                    subtree: VariablePath = ()) -> None:
  """Raises ConversionError unless `variables` has exactly `model`'s variables (under `subtree`).

  For weights already in Flax form (a converted folder, a run's checkpoint),
  which variables_from_torch never saw. A different classifier size is
  reported as a class-count mismatch, naming the config field, since that is
  what it almost always is.
  """
  expected = expected_variables(model)
  want: dict[VariablePath, tuple[int, ...]] = {}
  have: dict[VariablePath, tuple[int, ...]] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in flatten(expected.get(collection, {})).items():
      if path[:len(subtree)] == subtree:
        want[(collection,) + path] = tuple(leaf.shape)
    for path, leaf in flatten(variables.get(collection, {})).items():
      have[(collection,) + path] = tuple(np.shape(leaf))
  classifier = ('params', 'classifier', 'kernel')
  if (isinstance(model, DeepLabV3Plus) and classifier in want and classifier in have
      and want[classifier][:-1] == have[classifier][:-1] and want[classifier] != have[classifier]):
    raise ConversionError(f'{source}: class-count mismatch: the weights have {have[classifier][-1]} '
                          f'classes, data.num_classes is {want[classifier][-1]}')
  error = _mismatch_error(
      f'{source}: the weights do not fit the model of the config',
      sorted('/'.join(p) for p in want if p not in have),
      sorted('/'.join(p) for p in have if p not in want),
      sorted(f'{"/".join(p)} {have[p]} (model needs {shape})' for p, shape in want.items()
             if p in have and have[p] != shape))
  if error:
    raise error
