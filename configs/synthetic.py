"""The embedded demo: UCCL end to end on the generated street-scene dataset, on a laptop CPU.

Run (the first run generates the demo dataset and the source domain into ~/.cache/uccl_jax
and pretrains the backbone there, once per machine; then it trains 594 steps and evaluates
three times; times and mIoU measured so far: README.md's quick start and docs/RESULTS.md section 2):
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo
Evaluate its best checkpoint again:
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo --mode=eval
The word after ':' picks the method, so the three rows of a comparison are one word apart:
  --config=configs/synthetic.py:supervised | :unimatch | :uccl (default)

The dataset (uccl_jax/data/synthetic.py): 7 classes told apart by shape,
texture and context, 4 labeled + 396 unlabeled train images and 64 val images
of 128 x 256, in the Cityscapes folder layout with UniMatch split files (the 4
labeled images drawn so that every class is labeled somewhere). The network is
the real DeepLabv3+ design shrunk to fit the budget: a ResNet-18 with base
width 16, deep stem, ASPP/decoder width 64. Everything else is the UCCL recipe:
weak/strong views, CutMix, feature perturbation, SBU and CKR with the paper's
weights, SGD with the poly schedule, each val image evaluated whole.

The footing (`model.pretrained = 'synthetic:source'`): as the paper starts from
an ImageNet ResNet-50, the demo starts from a backbone pretrained on a generated
source domain (uccl_jax/pretrain.py, uccl_jax/data/synthetic_source.py): the
same kinds of objects as the demo (facades, foliage, vehicles, figures, posts,
as ImageNet has cars and people) plus source-only ones, under the source's own
class names, floating on textured backdrops in turned palettes: no sky, no
ground, no street layout. `--config.model.pretrained=none` trains from random
weights (docs/RESULTS.md compares both).

The budget and why (docs/RESULTS.md 2a and 2c-3):
- 4 labeled images. Semi-supervised learning pays where labels are few for
  what the backbone already knows, as Pascal's 92 labels are for an ImageNet
  backbone. With 16 labeled images a backbone of this kind (the first footing,
  docs/RESULTS.md 2e) needed nothing more: 16 did as well as all 400 labeled,
  so the unlabeled images had nothing to add. With
  4, supervised-only falls far short of all labels, and the unlabeled images
  can close much of the gap. A backbone of generic shapes only (no objects;
  the source's version 4) learned persons, poles and cars barely with any
  number of labels, and gave the unlabeled images a teacher too weak to use.
- Equal steps for every method: 594 optimizer steps with 4 labeled images each.
  An epoch is a pass over the 396 unlabeled images (99 steps); the supervised
  variant has no unlabeled list, so its epochs are passes over the 4 labeled
  images (1 step) and it trains 594 of them. All three evaluate at steps 198,
  396 and 594 (every 2 epochs); the reported figure is the last.
- Crop 97 and widths 16/64: a network that trains a step in a fraction of a
  second on 2 cores, so the first run (with the one-time generation and
  pretraining) fits the README's 10 minutes.
- Thresholds 0.95, as the Pascal recipe (`unsup.conf_thresh` for the UniMatch
  pseudo-label losses, `sbu.threshold` for SBU's uncertain pixels; see
  configs/cityscapes.py for why they are separate fields).
- BN running statistics as released (`unsup.bn_stats_from_strong=True`).
What it shows: docs/RESULTS.md section 2a (three methods, five seeds).
`python -m uccl_jax.benchmark teacher` shows what the pseudo-labels train on
for any run.
"""

from __future__ import annotations

import ml_collections

from uccl_jax.config import base_config
from uccl_jax.data import synthetic

METHODS = ('uccl', 'unimatch', 'supervised')
BATCH_SIZE = 4
EPOCHS = 6
EVAL_EVERY_EPOCHS = 2
# The generated dataset's defaults (data.root ''): 4 labeled of 400 train images.
_NUM_TRAIN = synthetic.DEMO_NUM_TRAIN
_NUM_LABELED = synthetic.DEMO_NUM_LABELED


def get_config(method: str = 'uccl') -> ml_collections.ConfigDict:
  if method not in METHODS:
    raise ValueError(f'configs/synthetic.py: unknown method {method!r}; choose one of {", ".join(METHODS)}')
  config = base_config()
  config.method = method
  config.data.name = 'synthetic'
  config.data.root = ''  # '' = the generated dataset in the cache (made on first use)
  config.data.labeled_split = 'splits/labeled.txt'  # relative to the dataset root
  config.data.unlabeled_split = 'splits/unlabeled.txt'
  config.data.val_split = 'splits/val.txt'
  config.data.num_classes = 7
  config.data.crop_size = 97
  config.data.workers = 0  # 2 cores: decoding in-process leaves both to XLA
  config.model.backbone = 'resnet18'
  config.model.width = 16
  config.model.head_channels = 64
  config.model.stem = 'deep'
  config.model.output_stride = 16
  config.model.dilations = (6, 12, 18)
  # The backbone pretrained on the generated source domain (uccl_jax/pretrain.py), made once per
  # machine on first use; 'none' trains from random weights (docs/RESULTS.md compares the two).
  config.model.pretrained = 'synthetic:source'
  config.train.batch_size = BATCH_SIZE
  config.train.epochs = EPOCHS  # one epoch = one pass over the 396 unlabeled images: 99 steps
  config.train.lr = 0.01
  config.train.lr_multi = 10.0
  config.train.log_every_steps = 10
  config.train.labeled_loss = 'ce'
  config.unsup.conf_thresh = 0.95
  config.sbu.threshold = 0.95
  config.eval.mode = 'original'
  config.eval.every_epochs = EVAL_EVERY_EPOCHS
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  if method == 'supervised':
    # No unlabeled list, so an epoch is a pass over the 4 labeled images (1 step): as many
    # epochs as make the semi-supervised runs' steps, evaluated at the same steps.
    labeled_steps = _NUM_LABELED // BATCH_SIZE
    unlabeled_steps = (_NUM_TRAIN - _NUM_LABELED) // BATCH_SIZE
    config.train.epochs = EPOCHS * unlabeled_steps // labeled_steps
    config.eval.every_epochs = EVAL_EVERY_EPOCHS * unlabeled_steps // labeled_steps
  return config
