"""Random inputs of a config's shapes for the step benchmark: a host batch and a train state.

Why random: the benchmark times the step at a recipe's setting (crop,
batch, classes, network) on any machine, with no dataset (configs/pascal.py
works on a machine without Pascal VOC); the values only need to exercise
every code path of the step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np

from uccl_jax import step as step_lib
from uccl_jax.data import transforms
from uccl_jax.models import deeplab


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, Any]:
  """A host batch in the pipeline's layout (`uccl_jax.inputs`) filled with random values.

  Images are random bytes, masks random classes with a few ignored pixels,
  the valid region cut short at the bottom in half the images (padding),
  strong-view parameters and CutMix boxes drawn by the pipeline's own
  functions. The values only matter to the extent that every code path is
  exercised.
  """
  rng = np.random.default_rng(seed)
  batch_size, size = int(config.train.batch_size), int(config.data.crop_size)
  num_classes, ignore_index = int(config.data.num_classes), int(config.data.ignore_index)

  def images():
    return rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)

  def unlabeled_views(with_boxes: bool):
    valid = np.tile(np.array([0, 0, size, size], np.int32), (batch_size, 1))
    valid[::2, 2] = size - max(1, size // 8)
    views = {'weak': images(), 'valid': valid}
    for name in ('strong1', 'strong2'):
      views[name] = np.stack([transforms.draw_strong_params(rng) for _ in range(batch_size)])
    if with_boxes:
      for name in ('box1', 'box2'):
        views[name] = np.stack([transforms.draw_cutmix_box(size, rng, prob=1.0)
                                for _ in range(batch_size)])
    return views

  mask = rng.integers(0, num_classes, (batch_size, size, size)).astype(np.uint8)
  mask[rng.random(mask.shape) < 0.02] = ignore_index
  return {'labeled': {'image': images(), 'mask': mask},
          'unlabeled': unlabeled_views(True), 'mix': unlabeled_views(False)}


def random_train_state(config: ml_collections.ConfigDict, model: deeplab.DeepLabV3Plus,
                       seed: int = 0, total_steps: int = 1000) -> step_lib.TrainState:
  """A TrainState with host (NumPy) arrays of the model's shapes, randomly filled.

  Why not `create_train_state`: running the initializer compiles another large
  program (minutes for ResNet-50 on a CPU); tracing it under jax.eval_shape
  takes seconds. Kernels get He-normal values (std sqrt(2 / fan_in), so
  activations keep their scale and no denormals slow a CPU down), BN scales 1
  and biases 0, running means 0 and variances 1, optimizer buffers 0.
  """
  crop = int(config.data.crop_size)
  abstract = jax.eval_shape(
      lambda key: step_lib.create_train_state(config, model, key, (crop, crop, 3),
                                              total_steps=total_steps),
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill_param(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape, dtype=np.float32) *
              np.float32(math.sqrt(2.0 / max(fan_in, 1)))).astype(leaf.dtype)
    if name == 'scale':
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  def fill_stat(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    return np.ones(leaf.shape, leaf.dtype) if name == 'var' else np.zeros(leaf.shape, leaf.dtype)

  zeros = lambda leaf: np.zeros(leaf.shape, leaf.dtype)
  return abstract.replace(
      step=np.zeros((), np.int32),
      params=jax.tree_util.tree_map_with_path(fill_param, abstract.params),
      batch_stats=jax.tree_util.tree_map_with_path(fill_stat, abstract.batch_stats),
      opt_state=jax.tree.map(zeros, abstract.opt_state),
      rng=np.asarray(jax.random.PRNGKey(seed)))  # raw uint32[2], as create_train_state keeps it



def random_state_and_batch(config: ml_collections.ConfigDict) -> tuple[step_lib.TrainState, dict[str, Any]]:
  """The host state and batch every timed program of one benchmark starts from (seed: train.seed).

  Sharing them is what makes results comparable: the methods see the same
  weights and images, and the scaling runs' first-step losses must agree.
  """
  model = deeplab.from_config(config.model, int(config.data.num_classes))
  seed = int(config.train.seed)
  return random_train_state(config, model, seed=seed), random_batch(config, seed=seed)
