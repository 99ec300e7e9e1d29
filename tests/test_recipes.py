"""The paper's recipes as released (issue 12): OHEM per GPU in the step, the mixing stream,
the ImageNet backbone as part of the recipe, and the config variants of docs/RECIPES.md.

The loss-level OHEM checks (groups against the release's per-GPU OHEM, float64) are in
test_losses.py; here the step's OHEM is checked to be the same on any device count and
grad_accum.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from uccl_jax import config as config_lib
from uccl_jax import inputs
from uccl_jax import losses
from uccl_jax import losses_reference as reference
from uccl_jax import parallel
from uccl_jax import step
from uccl_jax import train
from uccl_jax.data import pipeline
from uccl_jax.data import transforms

from test_main import cli_env  # pylint: disable=g-bad-import-order
from test_step import NUM_CLASSES, init_state, make_batch, make_config, rel_close, run_steps  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_config_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f'recipe_{name}', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


# ---------------------------------------------------------------------------
# OHEM groups in the step


class PlainSegmenter(nn.Module):
  """A segmenter without BatchNorm, so an image's logits do not depend on the batch it is in
  (grad_accum and sharding then leave the logits alone and only the loss's grouping can differ).
  The step threads a 'batch_stats' collection, so it has one, unused."""

  @nn.compact
  def __call__(self, images, train=False, feature_perturbation=False):
    del train, feature_perturbation
    self.variable('batch_stats', 'unused', lambda: jnp.zeros((), jnp.float32))
    hidden = nn.tanh(nn.Conv(8, (3, 3), padding=1, name='backbone')(images))
    return {'logits': 4.0 * nn.Conv(NUM_CLASSES, (1, 1), name='classifier')(hidden)}


def _ohem_config(grad_accum: int, **train_fields) -> ml_collections.ConfigDict:
  fields = dict(labeled_loss='ohem', ohem_thresh=0.35, ohem_min_kept=600,
                ohem_images_per_group=2, batch_size=8, grad_accum=grad_accum, lr=1.0,
                lr_multi=1.0, weight_decay=0.0)
  fields.update(train_fields)
  return make_config('supervised', **fields)


def test_step_ohem_is_the_same_on_any_device_count_and_grad_accum():
  """4 devices, 2 devices x grad_accum 2 and 1 device x grad_accum 4 give the same loss and
  gradient: the mean over the four 2-image groups of the release's per-GPU OHEM."""
  batch = {'labeled': make_batch(seed=3, batch=8)['labeled']}
  batch['labeled']['mask'][4:6, :, :29] = 255  # group 2: fewer valid pixels than min_kept
  model = PlainSegmenter()
  _, state0 = init_state(_ohem_config(1), model)
  images = inputs.normalize(jnp.asarray(batch['labeled']['image']))
  logits = np.asarray(model.apply({'params': state0.params, 'batch_stats': state0.batch_stats},
                                  images)['logits'], np.float64)
  mask = batch['labeled']['mask'].astype(np.int64)
  expected = reference.ohem_cross_entropy(logits, mask, thresh=0.35, min_kept=600,
                                          images_per_group=2)
  # The old row-strided micro-batches would have grouped rows (0, 4), (1, 5), ... on one device
  # with grad_accum 4: a different loss, so the comparison below can tell them apart.
  strided = np.concatenate([[j, j + 4] for j in range(4)])
  assert abs(reference.ohem_cross_entropy(logits[strided], mask[strided], thresh=0.35,
                                          min_kept=600, images_per_group=2)
             - expected) > 1e-3 * expected

  deltas, loss = {}, {}
  for num_devices, grad_accum in ((4, 1), (2, 2), (1, 4)):
    state, history = run_steps(_ohem_config(grad_accum), [batch], jax.devices()[:num_devices],
                               model)
    loss[num_devices] = history[0]['loss']
    deltas[num_devices] = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b),
                                       state.params, state0.params)
  for num_devices in (4, 2, 1):
    assert abs(loss[num_devices] - expected) <= 1e-5 * expected, (num_devices, loss, expected)
  for num_devices in (2, 1):
    for a, b in zip(jax.tree.leaves(deltas[num_devices]), jax.tree.leaves(deltas[4])):
      assert np.max(np.abs(b)) > 0
      assert rel_close(a, b, 1e-4), num_devices


def test_ohem_groups_sort_on_their_own_device():
  """With whole groups on each of 4 devices, the compiled loss and gradient gather nothing (only
  scalar sums cross devices); one group over the whole batch has to gather it."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  sharding = NamedSharding(parallel.make_mesh(jax.devices()[:4]), PartitionSpec('data'))
  logits = jax.ShapeDtypeStruct((8, 9, 9, 3), jnp.float32, sharding=sharding)
  labels = jax.ShapeDtypeStruct((8, 9, 9), jnp.int32, sharding=sharding)

  def compiled(group):
    loss = lambda x, y: losses.ohem_cross_entropy(x, y, min_kept=50, images_per_group=group)
    return jax.jit(jax.value_and_grad(loss)).lower(logits, labels).compile().as_text()

  assert 'all-gather' not in compiled(2)
  assert 'all-gather' in compiled(None)


def test_split_micro_batches_keeps_ohem_groups_whole():
  rows = np.arange(8)
  batch = {'labeled': {'mask': rows}, 'unlabeled': {'weak': rows}}
  micro = jax.tree.map(np.asarray, step._split_micro_batches(batch, 2, None, labeled_block=2))  # pylint: disable=protected-access
  np.testing.assert_array_equal(micro['labeled']['mask'], [[0, 1, 4, 5], [2, 3, 6, 7]])
  np.testing.assert_array_equal(micro['unlabeled']['weak'], [[0, 2, 4, 6], [1, 3, 5, 7]])


@pytest.mark.parametrize('fields, message', [
    (dict(ohem_images_per_group=3), r'train\.ohem_images_per_group=3: each micro-batch'),
    (dict(ohem_images_per_group=2, grad_accum=8), r'train\.ohem_images_per_group=2: each micro'),
    (dict(ohem_images_per_group=0, grad_accum=2), r'train\.ohem_images_per_group=0 mines the whole'),
    (dict(ohem_images_per_group=-1), r'train\.ohem_images_per_group=-1 must be an integer >= 0'),
])
def test_bad_ohem_groups_name_the_field(fields, message):
  config = _ohem_config(**{'grad_accum': 1, **fields})
  with pytest.raises(step.StepConfigError, match=message):
    step.check_config(config)
  with pytest.raises(train.RunError, match=message):
    train.check_config(config)


# ---------------------------------------------------------------------------
# The mixing stream


class _CountingSource:
  """Records with distinct random images; remembers which indices were decoded."""

  def __init__(self, count: int, *, masks: bool = False):
    rng = np.random.default_rng(5)
    self.records = [{'image': rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
                     'name': f'r{i}'} for i in range(count)]
    if masks:
      for record in self.records:
        record['mask'] = rng.integers(0, 3, (30, 40), dtype=np.uint8)
    self.reads: list[int] = []

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    self.reads.append(int(index))
    return self.records[int(index)]


def _without_boxes(views):
  return {k: v for k, v in views.items() if k not in ('box1', 'box2')}


def _assert_views_equal(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_mix_images_same_is_another_crop_of_the_same_record_decoded_once():
  labeled, unlabeled = _CountingSource(3, masks=True), _CountingSource(12)
  makers = {mode: pipeline.make_batch_maker(labeled, unlabeled, crop_size=17, global_batch=4,
                                            seed=1, process_index=1, process_count=2,
                                            mix_images=mode)
            for mode in ('other', 'same')}
  crop_differs = 0
  for index in range(6):  # three steps of this process's 2 slots, across an epoch boundary
    same, other = makers['same'], makers['other']
    position = same.position(index)
    record = same.unlabeled_order.record_index(position)
    mix_rng = pipeline.augment_rng(1, pipeline.STREAM_MIX, position)
    unlabeled.reads.clear()
    sample = same.sample(index)
    assert unlabeled.reads == [record]  # one decode serves both views
    expected_mix = transforms.unlabeled_views(unlabeled.records[record], 17, mix_rng)
    _assert_views_equal(sample['mix'], _without_boxes(expected_mix))
    # The unlabeled view is untouched by the option; 'other' reads the mix stream's own record
    # with the same augmentation generator.
    other_sample = other.sample(index)
    _assert_views_equal(sample['unlabeled'], other_sample['unlabeled'])
    other_record = other.mix_order.record_index(position)
    expected_other = transforms.unlabeled_views(
        unlabeled.records[other_record], 17, pipeline.augment_rng(1, pipeline.STREAM_MIX, position))
    _assert_views_equal(other_sample['mix'], _without_boxes(expected_other))
    crop_differs += not np.array_equal(sample['mix']['weak'], sample['unlabeled']['weak'])
  assert crop_differs == 6  # its own augmentation draw: another crop, not a copy
  with pytest.raises(pipeline.PipelineError, match=r"data\.mix_images='itself'"):
    pipeline.make_batch_maker(labeled, unlabeled, crop_size=17, global_batch=4, seed=1,
                              mix_images='itself')


def test_unimatch_zips_one_loader_with_itself_so_each_image_meets_itself():
  """What 'same' reproduces: UniMatch/UCCL zip(loader_u, loader_u) over a DistributedSampler,
  whose shuffle is seeded by seed + epoch, so both iterations list the same images in the
  same order (a plain RandomSampler would not)."""
  torch = pytest.importorskip('torch')
  from torch.utils.data import DataLoader  # pylint: disable=g-import-not-at-top
  from torch.utils.data import DistributedSampler  # pylint: disable=g-import-not-at-top
  data = list(range(24))
  for rank in range(2):
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True)
    loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    sampler.set_epoch(3)
    pairs = [(a.tolist(), b.tolist()) for a, b in zip(loader, loader)]
    assert len(pairs) == 3 and all(a == b for a, b in pairs)
    order = sum((a for a, _ in pairs), [])
    assert order != sorted(order)  # shuffled
  torch.manual_seed(0)
  plain = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
  assert any(a.tolist() != b.tolist() for a, b in zip(plain, plain))


# ---------------------------------------------------------------------------
# Recipes and their variants


def test_recipe_defaults_and_variants():
  base = config_lib.base_config()
  assert base.model.pretrained == '' and base.data.mix_images == 'other'
  cityscapes = _load_config_file('cityscapes')
  assert cityscapes.model.pretrained == 'pretrained/resnet50.pth'
  assert (cityscapes.data.crop_size, cityscapes.sbu.threshold, cityscapes.data.mix_images,
          cityscapes.train.ohem_images_per_group, cityscapes.sbu.variant,
          cityscapes.data.vflip_prob) == (801, 0.95, 'other', 2, 'reference', 0.0)
  release = _load_config_file('cityscapes', '1_8,release')
  assert release.data.labeled_split == 'splits/cityscapes/1_8/labeled.txt'
  assert (release.data.crop_size, release.sbu.threshold, release.unsup.conf_thresh,
          release.data.mix_images, release.unsup.anchors) == (612, 0.0, 0.0, 'same', 'passes')
  assert _load_config_file('cityscapes', 'release,1_8').to_dict() == release.to_dict()
  paper = _load_config_file('cityscapes', 'paper')
  assert (paper.data.labeled_split, paper.data.crop_size, paper.sbu.variant,
          paper.data.vflip_prob) == ('splits/cityscapes/1_16/labeled.txt', 801, 'paper', 0.5)
  # Besides the documented fields, a variant changes nothing.
  changed = {k for k, v in _flat(release).items() if _flat(cityscapes)[k] != v}
  assert changed == {'data.crop_size', 'sbu.threshold', 'data.mix_images', 'data.labeled_split',
                     'data.unlabeled_split'}
  pascal = _load_config_file('pascal')
  assert pascal.model.pretrained == 'pretrained/resnet50.pth'
  pascal_release = _load_config_file('pascal', '92,release')
  assert {k for k, v in _flat(pascal_release).items() if _flat(pascal)[k] != v} == {
      'data.mix_images', 'data.labeled_split', 'data.unlabeled_split'}
  for name, arg, message in (('cityscapes', '1_3', 'unknown split or variant'),
                             ('pascal', '183,relase', "unknown split or variant 'relase'"),
                             ('pascal', '183,92', 'two splits'),
                             ('cityscapes', 'release,paper', 'not both')):
    with pytest.raises(ValueError, match=message):
      _load_config_file(name, arg)


def _flat(config: ml_collections.ConfigDict) -> dict[str, object]:
  return {f'{section}.{field}': value for section, fields in config.to_dict().items()
          if isinstance(fields, dict) for field, value in fields.items()}


def test_backbone_line_names_the_file_and_its_hash(tmp_path):
  config = config_lib.base_config()
  for value in ('', 'none', 'None'):
    config.model.pretrained = value
    assert train.pretrained_path(config) is None
    train.check_pretrained(config)
    assert 'random initialisation, on purpose' in train.describe_backbone(config)
  weights = tmp_path / 'resnet50.pth'
  weights.write_bytes(b'not really weights')
  config.model.pretrained = str(weights)
  line = train.describe_backbone(config)
  assert hashlib.sha256(b'not really weights').hexdigest()[:12] in line and str(weights) in line
  folder = tmp_path / 'converted'
  (folder / 'sub').mkdir(parents=True)
  (folder / 'sub' / 'a').write_bytes(b'1')
  config.model.pretrained = str(folder)
  first = train.describe_backbone(config)
  (folder / 'sub' / 'a').write_bytes(b'2')
  assert train.describe_backbone(config) != first  # the folder's contents are hashed


def test_recipe_without_its_backbone_stops_before_writing_anything(tmp_path):
  """`python -m uccl_jax.main --config=configs/cityscapes.py` where pretrained/resnet50.pth is
  missing: one line naming model.pretrained, the path and the remedies; the run folder stays
  empty."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  proc = subprocess.run(
      [sys.executable, '-m', 'uccl_jax.main', f'--config={REPO}/configs/cityscapes.py:1_16',
       f'--workdir={workdir}'], cwd=tmp_path, env=cli_env(1), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr
  line = errors[0]
  assert line.startswith("error: model.pretrained='pretrained/resnet50.pth': no such file")
  for part in (str(tmp_path / 'pretrained' / 'resnet50.pth'), "UniMatch's README",
               'python -m uccl_jax.convert', '--config.model.pretrained=none'):
    assert part in line, part
  assert list(workdir.iterdir()) == []
