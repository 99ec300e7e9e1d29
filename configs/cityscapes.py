"""Cityscapes with UniMatch's split lists: the paper's Cityscapes recipe (UCCL Table I/II).

Run (one 4-GPU node; `--config.train.grad_accum=4` with batch 8 follows it on one GPU):
  python -m uccl_jax.main --config=configs/cityscapes.py:1_16 --workdir=runs/cityscapes_1_16 \
      --config.data.root=/path/to/cityscapes
  sbatch --nodes=1 launch/slurm.sh --config=configs/cityscapes.py:1_8 --workdir=runs/cs_1_8
Evaluate the best checkpoint of a run:
  python -m uccl_jax.main --config=configs/cityscapes.py:1_16 --workdir=runs/cityscapes_1_16 --mode=eval
The word after ':' picks the labeled split (1_16, 1_8, 1_4, 1_2; default 1_16); the
split lists are UniMatch's (splits/cityscapes/<split>/{labeled,unlabeled}.txt, val.txt).

Recipe: crop 801, global batch 8 per stream (2 per GPU x 4 GPUs), 240 epochs,
SGD lr 0.005 with the head at the same lr (lr_multi 1.0), OHEM on the labeled
loss (keep pixels with p < 0.7, at least 200000), ResNet-50 (deep stem, output
stride 16), sliding-window evaluation (window = crop, stride = 2/3 window).

Thresholds. UniMatch's Cityscapes recipe trains its pseudo-label losses with a
confidence threshold of 0 (every pixel of the weak prediction is a target):
`unsup.conf_thresh = 0.0` keeps that. UCCL's paper has one threshold tau that
splits confident from uncertain pixels; the released code reuses the pseudo-label
threshold for it, so on Cityscapes (threshold 0) no pixel is ever 'uncertain'
and SBU trains nothing. Here the two are separate fields: `sbu.threshold = 0.95`
(the paper's tau, and UniMatch's Pascal threshold) makes SBU see the pixels with
weak confidence <= 0.95, while the UniMatch losses keep their recipe.
"""

from __future__ import annotations

import ml_collections

from uccl_jax.config import base_config

SPLITS = ('1_16', '1_8', '1_4', '1_2')


def get_config(split: str = '1_16') -> ml_collections.ConfigDict:
  if split not in SPLITS:
    raise ValueError(f'configs/cityscapes.py: unknown split {split!r}; choose one of {", ".join(SPLITS)}')
  config = base_config()
  config.method = 'uccl'
  config.data.name = 'cityscapes'
  config.data.root = 'data/cityscapes'
  config.data.labeled_split = f'splits/cityscapes/{split}/labeled.txt'
  config.data.unlabeled_split = f'splits/cityscapes/{split}/unlabeled.txt'
  config.data.val_split = 'splits/cityscapes/val.txt'
  config.data.crop_size = 801
  config.data.num_classes = 19
  config.model.backbone = 'resnet50'
  config.train.batch_size = 8
  config.train.epochs = 240
  config.train.lr = 0.005
  config.train.lr_multi = 1.0
  config.train.labeled_loss = 'ohem'
  config.train.ohem_thresh = 0.7
  config.train.ohem_min_kept = 200000
  config.unsup.conf_thresh = 0.0  # UniMatch's Cityscapes recipe: every weak prediction is a target
  config.sbu.threshold = 0.95  # tau: kept apart from conf_thresh, else SBU's uncertain set is empty
  config.eval.mode = 'sliding_window'
  config.eval.every_epochs = 1  # as UniMatch (best-so-far tracking); raise it to save time
  config.checkpoint.every_steps = 1000
  return config
