"""Cityscapes with UniMatch's split lists: the paper's Cityscapes recipe (UCCL Table II).

Run (one 4-GPU node; `--config.train.grad_accum=4` with batch 8 follows it on one GPU). Memory:
`--config.model.remat=True` roughly halves XLA's estimate of the UCCL step per GPU; the estimates
and what to set per GPU size are in README, "Memory per GPU" (docs/RESULTS.md section 1f; XLA:CPU
estimates, not GPU figures):
  python -m uccl_jax.main --config=configs/cityscapes.py:1_16 --workdir=runs/cityscapes_1_16 \
      --config.data.root=/path/to/cityscapes
  sbatch --nodes=1 launch/slurm.sh --config=configs/cityscapes.py:1_8 --workdir=runs/cs_1_8
Evaluate the best checkpoint of a run:
  python -m uccl_jax.main --config=configs/cityscapes.py:1_16 --workdir=runs/cityscapes_1_16 --mode=eval
The words after ':' (comma-separated) pick the labeled split (1_16, 1_8, 1_4, 1_2; default
1_16) and optionally a variant; the split lists are UniMatch's
(splits/cityscapes/<split>/{labeled,unlabeled}.txt, val.txt).

The backbone is part of the recipe: `model.pretrained = 'pretrained/resnet50.pth'`
(UniMatch's ImageNet ResNet-50, the file the release always loads; the link is in
UniMatch's README; a folder from `python -m uccl_jax.convert` works too). A run
without it stops before writing anything; `--config.model.pretrained=none` trains
from random weights on purpose.

Recipe (the default): crop 801 (the paper), global batch 8 per stream (2 per GPU
x 4 GPUs), 240 epochs, SGD lr 0.005 with the head at the same lr (lr_multi 1.0),
OHEM on the labeled loss mined per 2 images as the release mines each GPU's batch
(keep pixels with p <= 0.7, at least 200000 per group; the loss does not depend on
the device count or grad_accum), ResNet-50 (deep stem, output stride 16),
sliding-window evaluation (window = crop, stride = 2/3 window), each unlabeled
image mixed with an independent one (`data.mix_images = 'other'`).

Thresholds. UniMatch's Cityscapes recipe trains its pseudo-label losses with a
confidence threshold of 0 (every pixel of the weak prediction is a target):
`unsup.conf_thresh = 0.0` keeps that. UCCL's paper has one threshold tau that
splits confident from uncertain pixels; the released code reuses the pseudo-label
threshold for it, so on Cityscapes (threshold 0) no pixel is ever 'uncertain'
and SBU trains nothing. Here the two are separate fields: `sbu.threshold = 0.95`
(the paper's tau, and UniMatch's Pascal threshold) makes SBU see the pixels with
weak confidence <= 0.95, while the UniMatch losses keep their recipe.

Variants (docs/RECIPES.md has the full table of release / paper / project):
  :1_16,release  the released code's settings: crop 612 (its config; evaluation
                 window 612 too), SBU's threshold = the pseudo-label threshold 0
                 (SBU never fires), each image mixed with another crop of itself
                 (`data.mix_images = 'same'`), 7-pass anchors. What the released
                 UCCL.py + configs/cityscapes.yaml would train.
  :1_16,paper    the paper's text where it differs from the release: crop 801,
                 tau 0.95, SBU as Eq. 7 (`sbu.variant = 'paper'`), vertical flips
                 (p 0.5; the paper gives no probability).
Table II's numbers come from the authors' runs; which of the two produced them
is not known (the release's crop 612 differs from the paper's 801), so both are
one word away.
"""

from __future__ import annotations

import ml_collections

from uccl_jax.config import base_config
from uccl_jax.config import apply_recipe_variants, parse_recipe_arg

SPLITS = ('1_16', '1_8', '1_4', '1_2')


def get_config(arg: str = '1_16') -> ml_collections.ConfigDict:
  split, variants = parse_recipe_arg(arg, config_file='configs/cityscapes.py', splits=SPLITS,
                                     default_split='1_16')
  config = base_config()
  config.method = 'uccl'
  config.model.pretrained = 'pretrained/resnet50.pth'  # relative to the working directory
  config.data.name = 'cityscapes'
  config.data.root = 'data/cityscapes'
  config.data.labeled_split = f'splits/cityscapes/{split}/labeled.txt'
  config.data.unlabeled_split = f'splits/cityscapes/{split}/unlabeled.txt'
  config.data.val_split = 'splits/cityscapes/val.txt'
  config.data.crop_size = 801
  config.data.num_classes = 19
  config.data.mix_images = 'other'
  config.model.backbone = 'resnet50'
  config.train.batch_size = 8
  config.train.epochs = 240
  config.train.lr = 0.005
  config.train.lr_multi = 1.0
  config.train.labeled_loss = 'ohem'
  config.train.ohem_thresh = 0.7
  config.train.ohem_min_kept = 200000
  config.train.ohem_images_per_group = 2  # the release's per-GPU batch (2 images x 4 GPUs)
  config.unsup.conf_thresh = 0.0  # UniMatch's Cityscapes recipe: every weak prediction is a target
  config.sbu.threshold = 0.95  # tau: kept apart from conf_thresh, else SBU's uncertain set is empty
  config.eval.mode = 'sliding_window'
  config.eval.every_epochs = 1  # as UniMatch (best-so-far tracking); raise it to save time
  config.checkpoint.every_steps = 1000
  if 'release' in variants:
    config.data.crop_size = 612  # UCCL's configs/cityscapes.yaml
  apply_recipe_variants(config, variants)
  return config
