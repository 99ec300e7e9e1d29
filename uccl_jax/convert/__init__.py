"""PyTorch weights <-> Flax variables for the UniMatch/UCCL network, strictly.

Why a package of its own: the project trains from PyTorch's ImageNet
backbones, evaluates UniMatch/UCCL checkpoints and hands its own models back
to PyTorch, and each of these must fail loudly when a weight does not fit
rather than keep random values as the PyTorch code's strict=False does.

  keys.py          PyTorch key <-> Flax variable; the strict fit check
  torch_files.py   reading/writing .pth (the only module that imports torch)
  architecture.py  which network a state dict is, from its keys and shapes
  converted.py     the converted folder: DIR/variables + DIR/converted.json
  from_torch.py    a .pth -> a converted folder
  weights.py       variables for a model from a .pth, converted folder or run
  export.py        variables -> a UniMatch-layout .pth
  output.py        writing --out all or nothing
  command_line.py  `python -m uccl_jax.convert`

Typical use:
  state = load_torch_file('best.pth')                 # whole UniMatch/UCCL checkpoint
  variables = variables_from_torch(state, model)      # {'params', 'batch_stats'}

  state = load_torch_file('pretrained/resnet50.pth')  # backbone only
  variables = merge_variables(model.init(key, images), variables_from_torch(state, model))

  variables, where = load_model_variables(path, model)  # .pth, converted folder or run folder

Importing this package needs neither torch nor TensorFlow.
"""

from uccl_jax.convert.architecture import Architecture
from uccl_jax.convert.architecture import check_architecture
from uccl_jax.convert.architecture import detect_architecture
from uccl_jax.convert.architecture import KIND_BACKBONE
from uccl_jax.convert.architecture import KIND_DEEPLAB
from uccl_jax.convert.command_line import main
from uccl_jax.convert.converted import CONVERTED_FORMAT
from uccl_jax.convert.converted import CONVERTED_INFO
from uccl_jax.convert.converted import CONVERTED_VARIABLES
from uccl_jax.convert.converted import is_converted
from uccl_jax.convert.converted import read_converted
from uccl_jax.convert.converted import read_converted_info
from uccl_jax.convert.converted import write_converted
from uccl_jax.convert.errors import ConversionError
from uccl_jax.convert.export import export_torch
from uccl_jax.convert.export import torch_state_dict
from uccl_jax.convert.from_torch import convert_torch_file
from uccl_jax.convert.keys import check_variables
from uccl_jax.convert.keys import flatten
from uccl_jax.convert.keys import merge_variables
from uccl_jax.convert.keys import torch_key
from uccl_jax.convert.keys import unflatten
from uccl_jax.convert.keys import variables_from_torch
from uccl_jax.convert.torch_files import file_sha256
from uccl_jax.convert.torch_files import load_torch_file
from uccl_jax.convert.torch_files import state_dict_of
from uccl_jax.convert.weights import find_run_checkpoint
from uccl_jax.convert.weights import load_model_variables
from uccl_jax.convert.weights import load_pretrained_variables
from uccl_jax.convert.weights import read_any_variables
from uccl_jax.convert.weights import read_run_variables

# The package's public names (the imports above exist to re-export them).
__all__ = [
    'Architecture',
    'check_architecture',
    'detect_architecture',
    'KIND_BACKBONE',
    'KIND_DEEPLAB',
    'main',
    'CONVERTED_FORMAT',
    'CONVERTED_INFO',
    'CONVERTED_VARIABLES',
    'is_converted',
    'read_converted',
    'read_converted_info',
    'write_converted',
    'ConversionError',
    'export_torch',
    'torch_state_dict',
    'convert_torch_file',
    'check_variables',
    'flatten',
    'merge_variables',
    'torch_key',
    'unflatten',
    'variables_from_torch',
    'file_sha256',
    'load_torch_file',
    'state_dict_of',
    'find_run_checkpoint',
    'load_model_variables',
    'load_pretrained_variables',
    'read_any_variables',
    'read_run_variables',
]

# The name tests/test_models.py and tests/test_remat.py use for keys.flatten.
_flatten = flatten
