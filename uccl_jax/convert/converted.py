"""The converted folder: DIR/variables (orbax) + DIR/converted.json (what the weights are).

Why a folder and not a .npz: orbax is how the project stores every array, so
training, evaluation and prediction read converted weights with the code
that reads their own checkpoints; the JSON beside them records the
architecture (checked against the config before any array is compared), the
classes, and the source file with its SHA-256, so a result can be traced back
to the exact .pth it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

import jax
import numpy as np

from uccl_jax.convert import output
from uccl_jax.convert.architecture import Architecture
from uccl_jax.convert.errors import ConversionError

CONVERTED_INFO = 'converted.json'
CONVERTED_VARIABLES = 'variables'
CONVERTED_FORMAT = 'uccl_jax.converted/1'


def is_converted(path: str | os.PathLike[str]) -> bool:
  """True when `path` is a folder written by `python -m uccl_jax.convert`."""
  return os.path.isfile(os.path.join(os.fspath(path), CONVERTED_INFO))


def write_converted(out: str | os.PathLike[str], variables: Mapping[str, Any], info: Mapping[str, Any],
                    *, overwrite: bool = False) -> str:
  """Writes a converted folder atomically: a failure leaves any previous `out` untouched.

  `variables` is {'params', 'batch_stats'} (NumPy); `info` the JSON description.
  Returns the absolute path written.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(os.fspath(out))
  output.check_out_folder(out, overwrite)
  with output.atomic_output(out, is_folder=True, overwrite=overwrite) as temporary:
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables))
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(temporary, CONVERTED_VARIABLES), host)
    with open(os.path.join(temporary, CONVERTED_INFO), 'w') as file:
      json.dump(dict(info), file, indent=2)
      file.write('\n')
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


def converted_source(path: str, info: Mapping[str, Any]) -> str:
  """How a converted folder is named in messages: the folder and the .pth it came from."""
  return f'{path} (converted from {info["source"]["path"]})'
