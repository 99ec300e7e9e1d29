"""The embedded demo: UCCL end to end on the generated street-scene dataset, on a laptop CPU.

Run (the first run generates the demo dataset and the source domain into ~/.cache/uccl_jax
and pretrains the backbone there, once per machine; then it trains 576 steps and evaluates
three times; times and mIoU measured so far: README.md's quick start and docs/RESULTS.md section 2):
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo
Evaluate its best checkpoint again:
  python -m uccl_jax.main --config=configs/synthetic.py --workdir=runs/demo --mode=eval
The word after ':' picks the method, so the three rows of a comparison are one word apart:
  --config=configs/synthetic.py:supervised | :unimatch | :uccl (default)

The dataset (uccl_jax/data/synthetic.py): 7 classes told apart by shape,
texture and context, 16 labeled + 384 unlabeled train images and 64 val images
of 128 x 256, in the Cityscapes folder layout with UniMatch split files. The
network is the real DeepLabv3+ design shrunk to fit the budget: a ResNet-18
with base width 16, deep stem, ASPP/decoder width 64. Everything else is the
UCCL recipe: weak/strong views, CutMix, feature perturbation, SBU and CKR with
the paper's weights, SGD with the poly schedule, each val image evaluated whole.

The footing (`model.pretrained = 'synthetic:source'`): as the paper starts from
an ImageNet ResNet-50, the demo starts from a backbone pretrained on a generated
source domain of generic shapes (discs, rings, stars, ...) with other layouts and
palettes (uccl_jax/pretrain.py, uccl_jax/data/synthetic_source.py): it teaches
edges, outlines and textures, not the demo's objects, as ImageNet does not
teach Cityscapes' classes. `--config.model.pretrained=none` trains from random
weights (docs/RESULTS.md compares both).

The budget and why:
- Equal steps for every method: 576 optimizer steps with 4 labeled images each.
  An epoch is a pass over the 384 unlabeled images (96 steps); the supervised
  variant has no unlabeled list, so its epochs are passes over the 16 labeled
  images (4 steps) and it trains 144 of them. All three evaluate at steps 192,
  384 and 576 (every 2 epochs); the reported figure is the last.
- 576 steps because labels must be able to matter: the unlabeled images can at
  best add what their labels would. At 192 steps supervised-only with all 400
  train images labeled ended level with 16 labeled ones (on every footing but
  from scratch); by ~600 steps, on this source and dataset, all labels are
  clearly ahead of 16 (docs/RESULTS.md 2c-2: the label-headroom runs), and the
  first run still fits the README's time budget on 2 cores.
- Persons and poles are drawn larger than in the dataset's version 1, which
  no run learned at any budget (uccl_jax/data/synthetic.py).
- Crop 97 and widths 16/64 are kept from the from-scratch demo: a network that
  trains a step in a fraction of a second on 2 cores.
- Thresholds 0.95, as the Pascal recipe (`unsup.conf_thresh` for the UniMatch
  pseudo-label losses, `sbu.threshold` for SBU's uncertain pixels; see
  configs/cityscapes.py for why they are separate fields); a lower threshold was
  not better (docs/RESULTS.md 2c).
- BN running statistics as released (`unsup.bn_stats_from_strong=True`);
  False was no better on this footing (docs/RESULTS.md 2c-2).
What it shows (docs/RESULTS.md section 2): on this footing labels matter (all
400 labeled images end well above 16 at 576 steps) and UCCL and UniMatch end
ahead of supervised-only at 576 steps on every seed, but by less than the
issue's 5 points (+1.6 on average); run longer (768 steps) supervised-only catches up and
passes UCCL, so the lead is UCCL getting there sooner, not a higher end point
(2c-2). `python -m uccl_jax.benchmark teacher` shows what the pseudo-labels
train on for any run.
"""

from __future__ import annotations

import ml_collections

from uccl_jax.config import base_config
from uccl_jax.data import synthetic

METHODS = ('uccl', 'unimatch', 'supervised')
BATCH_SIZE = 4
EPOCHS = 6
EVAL_EVERY_EPOCHS = 2
# The generated dataset's defaults (data.root ''): 16 labeled of 400 train images.
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
  config.train.epochs = EPOCHS  # one epoch = one pass over the 384 unlabeled images: 96 steps
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
    # No unlabeled list, so an epoch is a pass over the 16 labeled images (4 steps): as many
    # epochs as make the semi-supervised runs' steps, evaluated at the same steps.
    labeled_steps = _NUM_LABELED // BATCH_SIZE
    unlabeled_steps = (_NUM_TRAIN - _NUM_LABELED) // BATCH_SIZE
    config.train.epochs = EPOCHS * unlabeled_steps // labeled_steps
    config.eval.every_epochs = EVAL_EVERY_EPOCHS * unlabeled_steps // labeled_steps
  return config
