"""Writing `--out` all or nothing, for the converted folder and the exported .pth alike.

Why: a conversion that fails halfway (a full disk, a folder it may not write,
Ctrl-C) must not leave a half-written folder that a later run would take for
weights, nor destroy the previous output. Everything is written into a hidden
temporary sibling of `--out` and renamed into place only when complete;
folders created above `--out` for it are removed again when it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
import shutil
import tempfile

from uccl_jax.convert.errors import ConversionError

_WAY_OUT_EXISTS = 'remove it or pass --overwrite'


def check_out_folder(out: str, overwrite: bool) -> None:
  """Raises ConversionError when the folder `out` cannot be (re)placed; cheap, so run it first."""
  if os.path.isfile(out):
    raise ConversionError(f'--out={out}: is a file, not a folder (name a new folder)')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ConversionError(f'--out={out}: already exists and is not empty ({_WAY_OUT_EXISTS})')


def check_out_file(out: str, overwrite: bool) -> None:
  """Raises ConversionError when the file `out` cannot be (re)placed; cheap, so run it first."""
  if os.path.isdir(out):
    raise ConversionError(f'--out={out}: is a folder, not a .pth file (name a file)')
  if os.path.exists(out) and not overwrite:
    raise ConversionError(f'--out={out}: already exists ({_WAY_OUT_EXISTS})')


def _missing_folders(folder: str) -> list[str]:
  """`folder` and those of its ancestors that do not exist yet, deepest first."""
  missing = []
  while folder and not os.path.exists(folder) and os.path.dirname(folder) != folder:
    missing.append(folder)
    folder = os.path.dirname(folder)
  return missing


def _replace_folder(temporary: str, out: str, overwrite: bool) -> None:
  """Moves the finished `temporary` folder to `out`; an old `out` is removed only after that."""
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  if not os.path.exists(out):
    os.rename(temporary, out)
    return
  if not overwrite:
    raise ConversionError(f'--out={out}: already exists and is not empty ({_WAY_OUT_EXISTS})')
  old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-', dir=os.path.dirname(out))
  os.rmdir(old)
  os.rename(out, old)
  os.rename(temporary, out)
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(out: str, *, is_folder: bool, overwrite: bool) -> Iterator[str]:
  """Yields a temporary sibling of `out` (a folder or an empty file) to write into.

  When the block ends normally the temporary takes the place of `out` (an
  existing `out` is replaced only with `overwrite`). When it fails, the
  temporary and any folder created above `out` are removed, and an OSError
  (no permission, read-only file system, disk full) becomes one
  ConversionError naming --out.
  """
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  created = _missing_folders(parent)
  temporary = None
  try:
    os.makedirs(parent, exist_ok=True)
    prefix = f'.{os.path.basename(out)}.tmp-'
    if is_folder:
      temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
    else:
      handle, temporary = tempfile.mkstemp(prefix=prefix, dir=parent)
      os.close(handle)
    yield temporary
    if is_folder:
      _replace_folder(temporary, out, overwrite)
    else:
      os.replace(temporary, out)
  except OSError as error:
    where = error.filename or parent
    raise ConversionError(f'--out={out}: cannot write {where} ({error.strerror or error}); '
                          'choose a folder you can write to') from None
  finally:
    if temporary is not None and os.path.isdir(temporary):
      shutil.rmtree(temporary, ignore_errors=True)
    elif temporary is not None and os.path.lexists(temporary):
      os.remove(temporary)
    if not os.path.exists(out):
      for folder in created:
        with contextlib.suppress(OSError):
          os.rmdir(folder)
