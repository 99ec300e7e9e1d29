"""Reading and writing PyTorch .pth files; the only module that imports torch.

torch is imported inside the functions, so importing uccl_jax (training,
evaluation, prediction) never needs it: it is an optional extra, needed only
to read or write .pth files (pip install uccl_jax[torch]).

Files are read with torch.load(weights_only=True), which refuses arbitrary
pickled objects: a .pth from the internet could otherwise run code. A file
it refuses is reported without torch's advice to switch that protection off.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import os
from typing import Any

import numpy as np

from uccl_jax.convert.errors import ConversionError
from uccl_jax.convert.keys import format_list
from uccl_jax.convert.keys import unwrap_state_dict

# Wrapper entries of training checkpoints: UniMatch/UCCL save {'model': ...}, mmcv/Lightning {'state_dict': ...}.
_WRAPPER_KEYS = ('model', 'state_dict')
# The first bytes of what torch.save writes: a zip archive (PyTorch >= 1.6) or a pickle (older).
_TORCH_FILE_MAGIC = (b'PK\x03\x04', b'\x80')
_HOW_TO_SAVE = 'convert reads .pth/.pt files saved with torch.save'


def _import_torch(purpose: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ConversionError(f'{purpose} needs torch (pip install uccl_jax[torch])') from error
  return torch


def _torch_reason(error: BaseException) -> str:
  """The first sentence of why torch.load failed, without its advice to pass weights_only=False.

  torch's message for a file its safe loader refuses is a paragraph that
  starts with that advice; the reason proper follows 'WeightsUnpickler error:'.
  """
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  marker = 'WeightsUnpickler error:'
  reason = lines[0] if lines else ''
  for index, line in enumerate(lines):
    if marker in line:  # the reason follows the marker, on its line or the next
      after = [line.split(marker, 1)[1].strip(), *lines[index + 1:]]
      reason = next((text for text in after if text), '')
      break
  reason = reason.split('. ', 1)[0].rstrip('.')
  if not reason or 'weights_only' in reason:
    reason = ''
  name = type(error).__name__
  if isinstance(error, KeyError) or not reason:  # pickle's KeyError '101' says little on its own
    return f'{name}: {reason}' if reason else name
  return reason


def _looks_like_torch_file(path: str) -> bool:
  with open(path, 'rb') as file:
    head = file.read(4)
  return head.startswith(_TORCH_FILE_MAGIC)


def load_torch_file(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a .pth with torch.load(weights_only=True) and returns it with tensors as NumPy arrays.

  Nested dicts (e.g. {'model': state_dict, 'epoch': ...}) keep their
  structure; bfloat16/float16 tensors become float32.

  Raises:
    ConversionError: one line naming `path`: missing, unreadable, not a
      PyTorch file, damaged (e.g. truncated), or holding pickled objects.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  torch = _import_torch('reading .pth files')
  if os.path.getsize(path) == 0:
    raise ConversionError(f'{path}: an empty file, not a PyTorch checkpoint; {_HOW_TO_SAVE}')
  try:
    torch_like = _looks_like_torch_file(path)
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except OSError as error:
    raise ConversionError(f'{path}: cannot read it ({error.strerror or error})') from None
  except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
    reason = _torch_reason(error)
    if 'Unsupported global' in str(error):
      raise ConversionError(
          f'{path}: holds pickled Python objects besides tensors, which convert does not unpickle '
          f'(torch.load refused: {reason}); save the weights alone with '
          'torch.save(model.state_dict(), FILE)') from None
    if torch_like:
      raise ConversionError(f'{path}: a damaged or truncated PyTorch checkpoint (torch.load failed: '
                            f'{reason}); copy or download it again') from None
    raise ConversionError(f'{path}: not a PyTorch checkpoint (torch.load failed: {reason}); '
                          f'{_HOW_TO_SAVE}') from None

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


def save_torch_file(state: Mapping[str, np.ndarray], path: str) -> None:
  """torch.save of a state dict of NumPy arrays, as tensors (what load_state_dict takes)."""
  torch = _import_torch('writing .pth files')
  torch.save({key: torch.from_numpy(np.asarray(value)) for key, value in state.items()}, path)


def check_torch_available(purpose: str) -> None:
  """Raises ConversionError now, before any slow work, when torch is not installed."""
  _import_torch(purpose)


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
  state = {key: value for key, value in unwrap_state_dict(loaded).items()
           if not key.endswith('num_batches_tracked')}
  arrays = [key for key, value in state.items() if isinstance(value, (np.ndarray, np.generic))]
  if not arrays:
    listed = ', '.join(sorted(state)[:8]) or 'nothing'
    raise ConversionError(f'{source}: not a state dict (no tensors; top-level keys: {listed})')
  not_arrays = sorted(key for key in state if key not in set(arrays))
  if not_arrays:
    raise ConversionError(f'{source}: not a state dict: ' + format_list('entries are not tensors',
                                                                        not_arrays))
  return state


def file_sha256(path: str | os.PathLike[str]) -> str:
  """SHA-256 of a file, read in 1 MiB chunks (recorded so a converted folder names its exact source)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for chunk in iter(lambda: file.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
