"""Folders built once per machine: the demo datasets and the demo's pretrained backbone.

Why one place: generating a dataset or pretraining a backbone takes from
seconds to minutes, so both are cached under `default_cache_dir()`, keyed by
the settings that determine their content. Both must survive being cut off
(Ctrl-C, a full disk, two processes racing): a folder is built in a temporary
sibling and renamed into place only when complete, so a folder at the final
path is always whole, and a folder built with other settings is never reused
(its description file says what it holds).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any


class CacheError(Exception):
  """A cached folder that cannot be used as asked; the message names the folder and the way out."""


def default_cache_dir() -> pathlib.Path:
  """$UCCL_JAX_CACHE, else $XDG_CACHE_HOME/uccl_jax, else ~/.cache/uccl_jax."""
  if os.environ.get('UCCL_JAX_CACHE'):
    return pathlib.Path(os.environ['UCCL_JAX_CACHE'])
  return pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache') / 'uccl_jax'


def settings_key(settings: Mapping[str, Any]) -> str:
  """A short stable name for `settings` (JSON-able values): the first 12 hex digits of a SHA-256."""
  text = json.dumps(settings, sort_keys=True, separators=(',', ':'), default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _normalized(value: Any) -> Any:
  """JSON's view of a value (tuples become lists), for comparing with what a file holds."""
  return json.loads(json.dumps(value, default=list))


def ensure_folder(root: str | os.PathLike[str], wanted: Mapping[str, Any], info_name: str,
                  build: Callable[[pathlib.Path], None], what: str,
                  error: type[Exception] = CacheError) -> pathlib.Path:
  """`root`, built by `build(staging_folder)` unless a complete copy with `wanted` settings is there.

  `build` must write `info_name` (JSON) into the folder it is given, holding at
  least the `wanted` keys and values; it runs in a temporary sibling of `root`
  that is renamed to `root` when it returns, and removed when it raises.
  An existing `root` whose `info_name` is missing, unreadable or disagrees
  with `wanted` is left alone: `error` (the caller's exception type, CacheError
  by default) naming it (`what` says what it is).
  """
  root = pathlib.Path(root).expanduser()
  if root.exists():
    try:
      _check_existing(root, wanted, info_name, what)
    except CacheError as problem:
      raise error(str(problem)) from None
    return root
  root.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=root.parent, prefix=f'.{root.name}.partial-'))
  try:
    build(staging)
    if not (staging / info_name).is_file():
      raise RuntimeError(f'building {what} wrote no {info_name}')  # a bug in `build`
    try:
      os.rename(staging, root)
    except OSError:
      if not (root / info_name).exists():  # lost a race only if the winner finished
        raise
      shutil.rmtree(staging, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return root


def _check_existing(root: pathlib.Path, wanted: Mapping[str, Any], info_name: str, what: str) -> None:
  try:
    found = json.loads((root / info_name).read_text())
  except (OSError, ValueError):
    raise CacheError(f'{root}: exists but is not {what} (no readable {info_name}); choose another '
                     'folder') from None
  if not isinstance(found, dict):
    raise CacheError(f'{root / info_name}: not a JSON object; choose another folder')
  mismatched = _differences(found, _normalized(dict(wanted)))
  if mismatched:
    shown = '; '.join(f'{key}: {was!r} there, {want!r} wanted' for key, was, want in mismatched[:4])
    more = f' and {len(mismatched) - 4} more' if len(mismatched) > 4 else ''
    raise CacheError(f'{root / info_name}: {what} made with other settings ({shown}{more}); '
                     'remove the folder or choose another')


def _differences(found: Any, wanted: Any, prefix: str = '') -> list[tuple[str, Any, Any]]:
  """(dotted key, found value, wanted value) for every leaf of `wanted` that `found` does not match."""
  if isinstance(wanted, dict):
    found = found if isinstance(found, dict) else {}
    return [difference for key, value in wanted.items()
            for difference in _differences(found.get(key), value, f'{prefix}{key}.')]
  return [] if found == wanted else [(prefix.rstrip('.'), found, wanted)]
