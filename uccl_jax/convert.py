"""PyTorch weights -> Flax variables for the UniMatch/UCCL network, strictly.

The Flax modules are named after the PyTorch state-dict keys with '.' replaced
by '_' (see uccl_jax/models), so every variable has exactly one torch key:

  params     .../<module>/kernel  <- <module>.weight  (conv: OIHW -> HWIO)
  params     .../<module>/bias    <- <module>.bias
  params     .../<bn>/scale       <- <bn>.weight
  batch_stats .../<bn>/mean, var  <- <bn>.running_mean, <bn>.running_var

Unlike the PyTorch code's load_state_dict(strict=False), a conversion either
fills every parameter and statistic from a key of the right shape and uses
every key (num_batches_tracked aside), or raises one ConversionError listing
all that is missing, unexpected and mis-shaped.

Typical use:
  state = load_torch_file('best.pth')                 # whole UniMatch/UCCL checkpoint
  variables = variables_from_torch(state, model)      # {'params', 'batch_stats'}

  state = load_torch_file('pretrained/resnet50.pth')  # backbone only
  variables = merge_variables(model.init(key, images), variables_from_torch(state, model))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uccl_jax.models.deeplab import DeepLabV3Plus
from uccl_jax.models.resnet import ResNet

# Shown in error messages; long lists are cut after this many names per kind.
_MAX_LISTED = 20
# Spatial size used to trace the model's variable shapes (they do not depend on it).
_TRACE_IMAGE_SIZE = 64

_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


class ConversionError(ValueError):
  """A state dict that does not fit the model, or a file that is not a weights-only .pth."""


def load_torch_file(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a .pth with torch.load(weights_only=True) and returns it with tensors as NumPy arrays.

  weights_only refuses arbitrary pickled objects (a .pth from the internet can
  otherwise run code). Nested dicts (e.g. {'model': state_dict, 'epoch': ...})
  keep their structure; bfloat16/float16 tensors become float32. torch is
  imported here only, so the package itself never needs it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ConversionError(f'{path}: reading .pth files needs torch (pip install uccl_jax[torch])') from error
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ConversionError(f'{path}: not a readable weights-only PyTorch file ({first_line})') from error

  def to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()
      return value.numpy()
    if isinstance(value, Mapping):
      return {key: to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
      return type(value)(to_numpy(item) for item in value)
    return value

  return to_numpy(loaded)


def torch_key(path: tuple[str, ...], collection: str) -> str:
  """The PyTorch state-dict key of the Flax variable at `path` in `collection`."""
  *modules, leaf = path
  torch_leaf = _LEAF_TO_TORCH.get((collection, leaf))
  if torch_leaf is None:
    raise ConversionError(f'no PyTorch name for variable {collection}/{"/".join(path)}')
  return '.'.join([module.replace('_', '.') for module in modules] + [torch_leaf])


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Takes the 'model' entry of a training checkpoint and drops DistributedDataParallel's 'module.'."""
  if 'model' in state_dict and isinstance(state_dict['model'], Mapping):
    state_dict = state_dict['model']
  unwrapped = {}
  for key, value in state_dict.items():
    key = str(key)
    if key.startswith('module.'):
      key = key[len('module.'):]
    unwrapped[key] = value
  return unwrapped


def _expected_variables(model: nn.Module) -> dict[str, Any]:
  """Variable shapes of `model` via jax.eval_shape: no real initialisation, any model size."""
  images = jnp.zeros((1, _TRACE_IMAGE_SIZE, _TRACE_IMAGE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _format_list(title: str, items: list[str]) -> str:
  shown = ', '.join(items[:_MAX_LISTED])
  more = f' ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
  return f'{len(items)} {title}: {shown}{more}'


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
  state = _unwrap(state_dict)
  ignore_prefixes = tuple(ignore_prefixes)
  state = {key: value for key, value in state.items()
           if not key.endswith('num_batches_tracked') and not key.startswith(ignore_prefixes)}
  if not state:
    raise ConversionError('variables_from_torch: the state dict has no weights')

  expected = _expected_variables(model)
  # Which subtree of `model` the state dict describes, and the key prefix that selects it.
  backbone_only = isinstance(model, DeepLabV3Plus) and not any(k.startswith('backbone.') for k in state)
  subtree: tuple[str, ...] = ('backbone',) if backbone_only else ()

  targets: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(expected.get(collection, {})).items():
      if path[:len(subtree)] != subtree:
        continue
      key = torch_key(path[len(subtree):], collection)
      targets[key] = (collection, path, tuple(leaf.shape))

  missing = sorted(key for key in targets if key not in state)
  unexpected = sorted(key for key in state if key not in targets)
  misshaped = []
  flat_out: dict[str, dict[tuple[str, ...], np.ndarray]] = {'params': {}, 'batch_stats': {}}
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

  if missing or unexpected or misshaped:
    kind = 'backbone-only' if backbone_only else 'full-model'
    parts = [f'state dict ({kind} layout, {len(state)} keys) does not fit the model']
    if missing:
      parts.append(_format_list('missing', missing))
    if unexpected:
      parts.append(_format_list('unexpected', unexpected))
    if misshaped:
      parts.append(_format_list('mis-shaped', sorted(misshaped)))
    raise ConversionError('; '.join(parts))
  return {collection: _unflatten(flat) for collection, flat in flat_out.items()}


def merge_variables(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
  """`base` variables with every leaf present in `update` replaced; shapes must match.

  Used to put a converted backbone into freshly initialised DeepLab variables:
  merge_variables(model.init(key, images), variables_from_torch(backbone_dict, model)).
  """
  flat_base = {(collection,) + path: leaf for collection, tree in base.items()
               for path, leaf in _flatten(tree).items()}
  flat_update = {(collection,) + path: leaf for collection, tree in update.items()
                 for path, leaf in _flatten(tree).items()}
  problems = []
  for path, leaf in flat_update.items():
    if path not in flat_base:
      problems.append(f'{"/".join(path)} (not in the model)')
    elif tuple(np.shape(leaf)) != tuple(np.shape(flat_base[path])):
      problems.append(f'{"/".join(path)} {tuple(np.shape(leaf))} '
                      f'(model has {tuple(np.shape(flat_base[path]))})')
  if problems:
    raise ConversionError('merge_variables: ' + _format_list('variables do not fit', problems))
  merged = dict(flat_base)
  merged.update(flat_update)
  return _unflatten(merged)
