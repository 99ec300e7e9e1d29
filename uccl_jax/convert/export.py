"""Flax variables -> a PyTorch .pth in UniMatch's layout (`python -m uccl_jax.convert --to_torch`).

Why: a model trained here should be usable by the PyTorch world it came from:
UniMatch's DeepLabV3Plus loads the exported file with
`model.load_state_dict(torch.load(FILE))`, and an exported backbone has the
layout of UniMatch's pretrained/resnet*.pth.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import numpy as np

from uccl_jax.convert import architecture as architecture_lib
from uccl_jax.convert import output
from uccl_jax.convert import torch_files
from uccl_jax.convert.keys import flatten
from uccl_jax.convert.keys import torch_key
from uccl_jax.convert.weights import read_any_variables


def torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The PyTorch state dict (NumPy values) of Flax variables: the inverse of variables_from_torch.

  Kernels go back to OIHW; every BatchNorm gets `num_batches_tracked` = 0
  (PyTorch reads it only when momentum is None, which UniMatch never sets).
  """
  state: dict[str, np.ndarray] = {}
  bn_prefixes = set()
  for collection in ('params', 'batch_stats'):
    for path, leaf in flatten(variables.get(collection, {})).items():
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


def export_torch(source: str | os.PathLike[str], out: str | os.PathLike[str], *, which: str = 'best',
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes the weights of a run or converted folder as a UniMatch-layout .pth (atomically).

  A whole model gives `backbone.*`, `head.*`, `reduce.*`, `fuse.*`,
  `classifier.*` keys (DeepLabV3Plus.load_state_dict); a converted backbone
  gives the backbone-only layout of UniMatch's pretrained/resnet*.pth.
  Returns {'source', 'keys', 'architecture'}.
  """
  torch_files.check_torch_available('writing .pth files')
  out = os.path.abspath(os.fspath(out))
  output.check_out_file(out, overwrite)
  variables, kind, where = read_any_variables(source, which)
  if kind == architecture_lib.KIND_BACKBONE:
    variables = {collection: tree['backbone'] for collection, tree in variables.items()}
  state = torch_state_dict(variables)
  architecture = architecture_lib.detect_architecture(state, where)  # a layout PyTorch code can build
  with output.atomic_output(out, is_folder=False, overwrite=overwrite) as temporary:
    torch_files.save_torch_file(state, temporary)
  return {'source': where, 'keys': len(state), 'architecture': architecture}
