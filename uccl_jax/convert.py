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

Command line (one line on stderr and exit status 1 for any bad input):
  python -m uccl_jax.convert SOURCE.pth --out=DIR [--num-classes=N] [--dataset=NAME]
      A converted folder: DIR/variables (orbax) + DIR/converted.json (architecture,
      classes, source file and its SHA-256). A backbone folder is what
      `model.pretrained` takes; a whole-model folder is what `--checkpoint=DIR`
      of `uccl_jax.main --mode=eval` and `uccl_jax.predict` take.
  python -m uccl_jax.convert --to-torch RUN_OR_CKPT --out=FILE.pth [--step=best|latest|N]
      A PyTorch state dict in UniMatch's DeepLabV3Plus layout (load it with
      `model.load_state_dict(torch.load(FILE))`), from a run folder, a
      checkpoints/step folder or a converted folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uccl_jax.models import resnet as resnet_lib
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


# ----------------------------------------------------------------------------
# What a PyTorch state dict holds.

# Wrapper entries of training checkpoints: UniMatch/UCCL save {'model': ...}, mmcv/Lightning {'state_dict': ...}.
_WRAPPER_KEYS = ('model', 'state_dict')
# A classification head in ImageNet backbone files (torchvision, mmcv): not part of the segmentation network.
_CLASSIFIER_PREFIX = 'fc.'
# Class tables named by the class count alone, for the JSON description (the paper's two datasets).
_DATASET_BY_CLASS_COUNT = {19: 'cityscapes', 21: 'pascal'}

CONVERTED_INFO = 'converted.json'
CONVERTED_VARIABLES = 'variables'
CONVERTED_FORMAT = 'uccl_jax.converted/1'
KIND_DEEPLAB = 'deeplab'  # a whole DeepLabV3Plus: backbone, ASPP head, decoder, classifier
KIND_BACKBONE = 'backbone'  # a ResNet alone (ImageNet weights)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The network a state dict describes, read from its keys and shapes alone.

  Hyper-parameters that leave no trace in the weights (output stride, ASPP
  dilations) are not part of it: they come from the config that uses them.
  """
  kind: str  # KIND_DEEPLAB | KIND_BACKBONE
  backbone: str  # resnet18 | resnet34 | resnet50 | resnet101
  width: int
  stem: str  # 'deep' | 'standard'
  head_channels: int | None = None  # KIND_DEEPLAB only
  num_classes: int | None = None  # KIND_DEEPLAB only

  def build(self) -> nn.Module:
    """The Flax module these weights fill: a DeepLabV3Plus or a bare ResNet."""
    if self.kind == KIND_DEEPLAB:
      return DeepLabV3Plus(num_classes=int(self.num_classes), backbone=self.backbone, width=self.width,
                           head_channels=int(self.head_channels), stem=self.stem)
    return resnet_lib.build_resnet(self.backbone, width=self.width, stem=self.stem)

  def describe(self) -> str:
    text = f'{self.backbone} (width {self.width}, {self.stem} stem)'
    if self.kind == KIND_DEEPLAB:
      text = f'DeepLabV3Plus, {text}, head {self.head_channels}, {self.num_classes} classes'
    else:
      text = f'backbone only: {text}'
    return text

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: Mapping[str, Any], where: str) -> Architecture:
    try:
      return cls(**{field.name: value[field.name] for field in dataclasses.fields(cls)})
    except (KeyError, TypeError) as error:
      raise ConversionError(f'{where}: "architecture" is incomplete ({error})') from None


def state_dict_of(loaded: Any, source: str = 'state dict') -> dict[str, Any]:
  """The flat key -> array dict inside what torch.load returned, without num_batches_tracked.

  Unwraps {'model': ...} / {'state_dict': ...} and DistributedDataParallel's
  'module.' prefix. Raises ConversionError (naming `source`) for anything that
  is not a mapping of names to tensors, e.g. a pickled list or an optimizer state.
  """
  if not isinstance(loaded, Mapping):
    raise ConversionError(f'{source}: not a state dict (holds a {type(loaded).__name__})')
  for wrapper in _WRAPPER_KEYS:
    if wrapper in loaded and isinstance(loaded[wrapper], Mapping):
      loaded = loaded[wrapper]
      break
  state = {key: value for key, value in _unwrap(loaded).items()
           if not key.endswith('num_batches_tracked')}
  arrays = [key for key, value in state.items() if isinstance(value, (np.ndarray, np.generic))]
  if not arrays:
    listed = ', '.join(sorted(state)[:8]) or 'nothing'
    raise ConversionError(f'{source}: not a state dict (no tensors; top-level keys: {listed})')
  not_arrays = sorted(key for key in state if key not in set(arrays))
  if not_arrays:
    raise ConversionError(f'{source}: not a state dict: ' + _format_list('entries are not tensors',
                                                                         not_arrays))
  return state


def _count_blocks(state: Mapping[str, Any], prefix: str, stage: int) -> int:
  indices = set()
  head = f'{prefix}layer{stage}.'
  for key in state:
    if key.startswith(head):
      index = key[len(head):].split('.', 1)[0]
      if index.isdigit():
        indices.add(int(index))
  return 1 + max(indices) if indices else 0


def detect_architecture(state: Mapping[str, Any], source: str = 'state dict') -> Architecture:
  """Which UniMatch/torchvision network `state` (from state_dict_of) is, or ConversionError.

  Only the layout is read here (stem, block type, blocks per stage, widths,
  class count); whether every tensor fits is variables_from_torch's strict check.
  """
  kind = KIND_DEEPLAB if any(key.startswith('backbone.') for key in state) else KIND_BACKBONE
  prefix = 'backbone.' if kind == KIND_DEEPLAB else ''

  def shape(key: str) -> tuple[int, ...] | None:
    return tuple(np.shape(state[key])) if key in state else None

  deep, standard = shape(f'{prefix}conv1.0.weight'), shape(f'{prefix}conv1.weight')
  if deep is not None and len(deep) == 4:
    stem, width = 'deep', deep[0]
  elif standard is not None and len(standard) == 4 and standard[2:] == (7, 7):
    stem, width = 'standard', standard[0]
  else:
    sample = ', '.join(sorted(state)[:4])
    raise ConversionError(
        f'{source}: unknown architecture: no ResNet stem ({prefix}conv1.0.weight for the deep stem, '
        f'{prefix}conv1.weight 7x7 for torchvision\'s); first keys: {sample}')
  block = 'bottleneck' if f'{prefix}layer1.0.conv3.weight' in state else 'basic'
  layers = tuple(_count_blocks(state, prefix, stage) for stage in (1, 2, 3, 4))
  names = [name for name, (arch_block, arch_layers) in resnet_lib.ARCHS.items()
           if arch_block == block and tuple(arch_layers) == layers]
  if not names:
    raise ConversionError(f'{source}: unknown architecture: {block} blocks per stage {list(layers)} '
                          f'is none of {", ".join(sorted(resnet_lib.ARCHS))}')
  if kind == KIND_BACKBONE:
    return Architecture(KIND_BACKBONE, names[0], int(width), stem)
  head, classifier = shape('head.b0.0.weight'), shape('classifier.weight')
  if head is None or classifier is None or len(head) != 4 or len(classifier) != 4:
    raise ConversionError(f'{source}: unknown architecture: backbone.* keys but no UniMatch '
                          'DeepLabV3Plus head (head.b0.0.weight, classifier.weight)')
  return Architecture(KIND_DEEPLAB, names[0], int(width), stem, head_channels=int(head[0]),
                      num_classes=int(classifier[0]))


def file_sha256(path: str | os.PathLike[str]) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for chunk in iter(lambda: file.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _class_description(num_classes: int | None, dataset: str | None) -> dict[str, Any] | None:
  """{'num_classes', 'dataset', 'names', 'inferred'} for the JSON (None for a backbone)."""
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


# ----------------------------------------------------------------------------
# Converted folders: DIR/variables (orbax) + DIR/converted.json.


def is_converted(path: str | os.PathLike[str]) -> bool:
  """True when `path` is a folder written by `python -m uccl_jax.convert`."""
  return os.path.isfile(os.path.join(os.fspath(path), CONVERTED_INFO))


def _replace_folder(temporary: str, out: str, overwrite: bool) -> None:
  """Moves the finished `temporary` folder to `out`; an old `out` is removed only after that."""
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  if not os.path.exists(out):
    os.rename(temporary, out)
    return
  if not overwrite:
    raise ConversionError(f'--out={out}: already exists and is not empty (remove it or pass --overwrite)')
  old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-', dir=os.path.dirname(out))
  os.rmdir(old)
  os.rename(out, old)
  os.rename(temporary, out)
  shutil.rmtree(old, ignore_errors=True)


def _check_out_folder(out: str, overwrite: bool) -> None:
  if os.path.isfile(out):
    raise ConversionError(f'--out={out}: is a file, not a folder')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ConversionError(f'--out={out}: already exists and is not empty (remove it or pass --overwrite)')


def write_converted(out: str | os.PathLike[str], variables: Mapping[str, Any], info: Mapping[str, Any],
                    *, overwrite: bool = False) -> str:
  """Writes a converted folder atomically: a failure leaves any previous `out` untouched.

  `variables` is {'params', 'batch_stats'} (NumPy); `info` the JSON description.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(os.fspath(out))
  _check_out_folder(out, overwrite)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables))
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(temporary, CONVERTED_VARIABLES), host)
    with open(os.path.join(temporary, CONVERTED_INFO), 'w') as file:
      json.dump(dict(info), file, indent=2)
      file.write('\n')
    _replace_folder(temporary, out, overwrite)
  finally:
    if os.path.isdir(temporary):
      shutil.rmtree(temporary, ignore_errors=True)
  return out


def read_converted_info(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The JSON description of a converted folder, checked for its format and architecture."""
  info_path = os.path.join(os.fspath(path), CONVERTED_INFO)
  try:
    with open(info_path) as file:
      info = json.load(file)
  except FileNotFoundError:
    raise ConversionError(f'{path}: not a converted folder (no {CONVERTED_INFO})') from None
  except (OSError, json.JSONDecodeError) as error:
    raise ConversionError(f'{info_path}: unreadable ({error})') from None
  if not isinstance(info, dict) or info.get('format') != CONVERTED_FORMAT:
    raise ConversionError(f'{info_path}: format is not {CONVERTED_FORMAT!r}')
  Architecture.from_json(info.get('architecture') or {}, info_path)
  return info


def read_converted(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables as NumPy {'params', 'batch_stats'}, JSON description) of a converted folder."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  info = read_converted_info(path)
  variables_path = os.path.join(os.path.abspath(os.fspath(path)), CONVERTED_VARIABLES)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(variables_path)
  except (OSError, ValueError, KeyError) as error:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ConversionError(f'{variables_path}: unreadable orbax checkpoint ({first_line[:200]})') from None
  return jax.tree.map(np.asarray, dict(variables)), info


# ----------------------------------------------------------------------------
# Conversion of a .pth file.


def convert_torch_file(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       num_classes: int | None = None, dataset: str | None = None,
                       overwrite: bool = False, log: Any = None) -> dict[str, Any]:
  """Converts a UniMatch/UCCL/torchvision .pth into a converted folder; returns its description.

  Backbone-only files (deep or 7x7 stem) are stored as the 'backbone' subtree of
  a DeepLabV3Plus, ready for merge_variables; their classification head
  (`fc.*`) is dropped with a note. Whole DeepLabV3Plus checkpoints are stored
  whole. `num_classes`, when given, must equal the checkpoint's class count.
  """
  log = log or (lambda message: print(message, file=sys.stderr))
  source = os.fspath(source)
  out = os.path.abspath(os.fspath(out))
  _check_out_folder(out, overwrite)  # before the (slow) reading, and again when moving into place
  state = state_dict_of(load_torch_file(source), source)
  dropped = []
  if not any(key.startswith('backbone.') for key in state):
    dropped = sorted(key for key in state if key.startswith(_CLASSIFIER_PREFIX))
    state = {key: value for key, value in state.items() if key not in set(dropped)}
  architecture = detect_architecture(state, source)
  if num_classes is not None:
    if architecture.kind == KIND_BACKBONE:
      log(f'note: --num-classes={num_classes} ignored: {source} holds a backbone only')
    elif num_classes != architecture.num_classes:
      raise ConversionError(f'{source}: class-count mismatch: the checkpoint has '
                            f'{architecture.num_classes} classes (classifier.weight), '
                            f'--num-classes={num_classes}')
  try:
    variables = variables_from_torch(state, architecture.build())
  except ConversionError as error:
    raise ConversionError(f'{source}: {architecture.describe()}: {error}') from None
  if architecture.kind == KIND_BACKBONE:
    variables = {collection: {'backbone': tree} for collection, tree in variables.items()}
  if dropped:
    log(f'note: dropped the ImageNet classifier ({", ".join(dropped)}): not part of the segmentation '
        'network')
  info = {
      'format': CONVERTED_FORMAT,
      'kind': architecture.kind,
      'architecture': architecture.to_json(),
      'classes': _class_description(architecture.num_classes, dataset),
      'source': {'path': os.path.abspath(source), 'sha256': file_sha256(source),
                 'bytes': os.path.getsize(source)},
      'dropped_keys': dropped,
      'num_parameters': int(sum(np.size(x) for x in jax.tree.leaves(variables['params']))),
  }
  write_converted(out, variables, info, overwrite=overwrite)
  return info


# ----------------------------------------------------------------------------
# Variables for a model, from any of the places weights live.


def check_variables(variables: Mapping[str, Any], model: nn.Module, source: str,
                    subtree: tuple[str, ...] = ()) -> None:
  """Raises ConversionError unless `variables` has exactly `model`'s variables (under `subtree`).

  A different classifier size is reported as a class-count mismatch, naming
  the config field, since that is what it almost always is.
  """
  expected = _expected_variables(model)
  want: dict[tuple[str, ...], tuple[int, ...]] = {}
  have: dict[tuple[str, ...], tuple[int, ...]] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(expected.get(collection, {})).items():
      if path[:len(subtree)] == subtree:
        want[(collection,) + path] = tuple(leaf.shape)
    for path, leaf in _flatten(variables.get(collection, {})).items():
      have[(collection,) + path] = tuple(np.shape(leaf))
  classifier = ('params', 'classifier', 'kernel')
  if (isinstance(model, DeepLabV3Plus) and classifier in want and classifier in have
      and want[classifier][:-1] == have[classifier][:-1] and want[classifier] != have[classifier]):
    raise ConversionError(f'{source}: class-count mismatch: the weights have {have[classifier][-1]} '
                          f'classes, data.num_classes is {want[classifier][-1]}')
  missing = sorted('/'.join(p) for p in want if p not in have)
  unexpected = sorted('/'.join(p) for p in have if p not in want)
  misshaped = sorted(f'{"/".join(p)} {have[p]} (model needs {shape})' for p, shape in want.items()
                     if p in have and have[p] != shape)
  if missing or unexpected or misshaped:
    parts = [f'{source}: the weights do not fit the model of the config']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
      if items:
        parts.append(_format_list(title, items))
    raise ConversionError('; '.join(parts))


def _check_architecture(architecture: Architecture, model: nn.Module, source: str) -> None:
  """Names the config.model field that disagrees with the architecture of the weights."""
  if isinstance(model, DeepLabV3Plus):
    fields = {'backbone': model.backbone, 'width': model.width, 'stem': model.stem}
    if architecture.kind == KIND_DEEPLAB:
      fields['head_channels'] = model.head_channels
  else:
    fields = {'width': model.width, 'stem': model.stem}
  for name, model_value in fields.items():
    value = getattr(architecture, name)
    if model_value != value:
      raise ConversionError(f'{source} holds {architecture.describe()}; config.model.{name} is '
                            f'{model_value!r}, set it to {value!r}')


def load_pretrained_variables(path: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
  """What `model.pretrained` names, as variables for merge_variables (strict).

  `path` is a .pth (UniMatch deep-stem backbone, torchvision ResNet with its
  `fc.*` ignored, or a whole UniMatch/UCCL checkpoint) or a converted folder.
  A backbone gives {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}};
  a whole model gives all of `model`'s variables.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    variables, info = read_converted(path)
    architecture = Architecture.from_json(info['architecture'], path)
    _check_architecture(architecture, model, path)
    check_variables(variables, model, path, subtree=('backbone',) if info['kind'] == KIND_BACKBONE else ())
    return variables
  state = state_dict_of(load_torch_file(path), path)
  backbone_only = not any(key.startswith('backbone.') for key in state)
  return variables_from_torch(state, model, ignore_prefixes=(_CLASSIFIER_PREFIX,) if backbone_only else ())


def read_run_variables(path: str | os.PathLike[str], which: str = 'best') -> tuple[dict[str, Any], str]:
  """{'params', 'batch_stats'} (NumPy) of a run's checkpoint, and a description of where from.

  `path` is a run folder, its checkpoints folder or one step folder (as
  `--checkpoint` of uccl_jax.main takes); `which` is 'best', 'latest' or a step
  (ignored for a step folder). Needs no model, optimizer or device layout.
  """
  from uccl_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  try:
    directory, fixed_step = checkpoint_lib.locate(path)
    step = checkpoint_lib.RunCheckpoints(directory, read_only=True).resolve(
        fixed_step if fixed_step is not None else which)
    state = checkpoint_lib.read_arrays(directory, step)
  except checkpoint_lib.CheckpointError as error:
    raise ConversionError(str(error)) from None
  if not isinstance(state, Mapping) or 'params' not in state or 'batch_stats' not in state:
    raise ConversionError(f'{directory}/{step}: the saved state has no params/batch_stats')
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return jax.tree.map(np.asarray, variables), os.path.join(directory, str(step))


def load_model_variables(path: str | os.PathLike[str], model: nn.Module,
                         which: str = 'best') -> tuple[dict[str, Any], str]:
  """All variables of `model` from a converted whole-model folder, a .pth, or a run's checkpoint.

  Returns (NumPy variables, a description of the source). Every source is
  checked strictly against `model` (the config's network).
  """
  path = os.fspath(path)
  if is_converted(path):
    variables, info = read_converted(path)
    architecture = Architecture.from_json(info['architecture'], path)
    if info['kind'] != KIND_DEEPLAB:
      raise ConversionError(f'{path} holds a backbone only (it is for model.pretrained); '
                            'evaluation and prediction need a whole-model checkpoint')
    _check_architecture(architecture, model, path)
    check_variables(variables, model, path)
    return variables, f'{path} (converted from {info["source"]["path"]})'
  if os.path.isfile(path):
    state = state_dict_of(load_torch_file(path), path)
    if not any(key.startswith('backbone.') for key in state):
      raise ConversionError(f'{path} holds a backbone only; evaluation and prediction need a whole '
                            'DeepLabV3Plus checkpoint')
    architecture = detect_architecture(state, path)
    if architecture.num_classes != getattr(model, 'num_classes', None):
      raise ConversionError(f'{path}: class-count mismatch: the weights have '
                            f'{architecture.num_classes} classes, data.num_classes is '
                            f'{getattr(model, "num_classes", None)}')
    _check_architecture(architecture, model, path)
    return variables_from_torch(state, model), path
  if not os.path.exists(path):
    raise ConversionError(f'{path}: no such file or folder')
  variables, where = read_run_variables(path, which)
  check_variables(variables, model, where)
  return variables, where


# ----------------------------------------------------------------------------
# Export: Flax variables -> PyTorch state dict.


def torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The PyTorch state dict (NumPy values) of Flax variables: the inverse of variables_from_torch.

  Kernels go back to OIHW; every BatchNorm gets `num_batches_tracked` = 0
  (PyTorch reads it only when momentum is None, which UniMatch never sets).
  """
  state: dict[str, np.ndarray] = {}
  bn_prefixes = set()
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables.get(collection, {})).items():
      key = torch_key(path, collection)
      array = np.asarray(leaf, np.float32)
      if path[-1] == 'kernel' and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
      state[key] = np.ascontiguousarray(array)
      if collection == 'batch_stats':
        bn_prefixes.add(key.rsplit('.', 1)[0])
  for prefix in sorted(bn_prefixes):
    state[f'{prefix}.num_batches_tracked'] = np.array(0, np.int64)
  return state


def read_any_variables(path: str | os.PathLike[str], which: str = 'best') -> tuple[dict[str, Any], str, str]:
  """(variables, kind, description) of a converted folder or a run's checkpoint, with no model."""
  path = os.fspath(path)
  if is_converted(path):
    variables, info = read_converted(path)
    return variables, info['kind'], f'{path} (converted from {info["source"]["path"]})'
  if not os.path.exists(path):
    raise ConversionError(f'{path}: no such folder')
  variables, where = read_run_variables(path, which)
  return variables, KIND_DEEPLAB, where


def export_torch(source: str | os.PathLike[str], out: str | os.PathLike[str], *, which: str = 'best',
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes the weights of a run or converted folder as a UniMatch-layout .pth (atomically).

  A whole model gives `backbone.*`, `head.*`, `reduce.*`, `fuse.*`,
  `classifier.*` keys (DeepLabV3Plus.load_state_dict); a converted backbone
  gives the backbone-only layout of UniMatch's pretrained/resnet*.pth.
  Returns {'source', 'keys', 'architecture'}.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ConversionError('writing .pth files needs torch (pip install uccl_jax[torch])') from error
  out = os.path.abspath(os.fspath(out))
  if os.path.isdir(out):
    raise ConversionError(f'--out={out}: is a folder, not a .pth file')
  if os.path.exists(out) and not overwrite:
    raise ConversionError(f'--out={out}: already exists (remove it or pass --overwrite)')
  variables, kind, where = read_any_variables(source, which)
  if kind == KIND_BACKBONE:
    variables = {collection: tree['backbone'] for collection, tree in variables.items()}
  state = torch_state_dict(variables)
  architecture = detect_architecture(state, where)  # the layout is one PyTorch code can build
  os.makedirs(os.path.dirname(out), exist_ok=True)
  handle, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=os.path.dirname(out))
  os.close(handle)
  try:
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, temporary)
    os.replace(temporary, out)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return {'source': where, 'keys': len(state), 'architecture': architecture}


# ----------------------------------------------------------------------------
# Command line.


class _ArgumentParser(argparse.ArgumentParser):
  """argparse that reports a usage problem as one line (and exit status 2)."""

  def error(self, message: str) -> None:  # type: ignore[override]
    print(f'error: {message} (see python -m uccl_jax.convert --help)', file=sys.stderr, flush=True)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  parser = _ArgumentParser(
      prog='python -m uccl_jax.convert',
      description='PyTorch .pth <-> uccl_jax weights. '
                  'SOURCE.pth --out=DIR converts a UniMatch/UCCL checkpoint or an ImageNet ResNet; '
                  '--to-torch RUN_OR_CKPT --out=FILE.pth exports to the UniMatch DeepLabV3Plus layout.')
  parser.add_argument('source', nargs='?', help='the .pth to convert')
  parser.add_argument('--to-torch', metavar='RUN_OR_CKPT',
                      help='export a run folder, checkpoints/step folder or converted folder to .pth')
  parser.add_argument('--out', required=True, help='output folder (conversion) or .pth file (export)')
  parser.add_argument('--num-classes', type=int, default=None,
                      help='expected class count of a whole-model checkpoint (checked)')
  parser.add_argument('--dataset', default=None,
                      help='class names for the description: cityscapes | pascal | synthetic')
  parser.add_argument('--step', default='best', help="with --to-torch: 'best', 'latest' or a step")
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; every expected failure is one line on stderr and exit status 1."""
  args = _parser().parse_args(argv)
  try:
    if args.to_torch:
      if args.source:
        raise ConversionError(f'give either SOURCE.pth or --to-torch, not both ({args.source})')
      result = export_torch(args.to_torch, args.out, which=args.step, overwrite=args.overwrite)
      print(f'wrote {args.out}: {result["keys"]} keys, {result["architecture"].describe()}, '
            f'from {result["source"]}')
      return 0
    if not args.source:
      raise ConversionError('nothing to do: give SOURCE.pth, or --to-torch RUN_OR_CKPT')
    info = convert_torch_file(args.source, args.out, num_classes=args.num_classes,
                              dataset=args.dataset, overwrite=args.overwrite)
    architecture = Architecture.from_json(info['architecture'], args.out)
    print(f'wrote {os.path.abspath(args.out)}: {architecture.describe()}, '
          f'{info["num_parameters"] / 1e6:.2f}M parameters, sha256 {info["source"]["sha256"][:12]}')
    return 0
  except ConversionError as error:
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr, flush=True)
    return 1


if __name__ == '__main__':
  sys.exit(main())
