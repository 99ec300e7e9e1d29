"""Pascal VOC 2012 (+SBD) with UniMatch's split lists: the paper's VOC recipe (UCCL Table I).

Run (one 4-GPU node; one GPU works too, add `--config.train.grad_accum=...` to match its memory,
or `--config.model.remat=True`; XLA's estimates for all 8 images per stream on one device, with and
without remat: README, "Memory per GPU", and docs/RESULTS.md section 1f):
  python -m uccl_jax.main --config=configs/pascal.py:183 --workdir=runs/pascal_183 \
      --config.data.root=/path/to/VOC2012
  sbatch --nodes=1 launch/slurm.sh --config=configs/pascal.py:732 --workdir=runs/pascal_732
Evaluate the best checkpoint of a run:
  python -m uccl_jax.main --config=configs/pascal.py:183 --workdir=runs/pascal_183 --mode=eval
The words after ':' (comma-separated) pick the labeled split (92, 183, 366, 732, 1464;
default 1464) and optionally a variant; the split lists are UniMatch's
(splits/pascal/<split>/{labeled,unlabeled}.txt, val.txt).

The ImageNet backbone is part of the recipe, as in configs/cityscapes.py:
`model.pretrained = 'pretrained/resnet50.pth'` (a run without it stops before
writing anything; `--config.model.pretrained=none` trains from scratch on purpose).

Recipe (the default): crop 321, global batch 8 per stream (the release: 4 per GPU
x 2 GPUs), 80 epochs, SGD lr 0.001 with the head at 10x (lr_multi 10.0),
cross-entropy on the labeled images, ResNet-50 (deep stem, output stride 16), each
validation image evaluated whole at its own size ('original'), each unlabeled
image mixed with an independent one (`data.mix_images = 'other'`).

Thresholds: UniMatch's VOC recipe uses 0.95 for its pseudo-label losses
(`unsup.conf_thresh`), and UCCL's tau (`sbu.threshold`, the pixels SBU trains
are those with weak confidence <= tau) is 0.95 as well; they are separate fields
so an ablation can move one without the other.

Variants (docs/RECIPES.md has the full table of release / paper / project):
  :1464,release  the released code's settings: each image mixed with another crop
                 of itself (`data.mix_images = 'same'`), 7-pass anchors, no
                 vertical flips, SBU over the whole image; on VOC the release's
                 crop and thresholds equal the default's.
  :1464,paper    the paper's text where it differs from the release: SBU as Eq. 7
                 (`sbu.variant = 'paper'`), vertical flips (p 0.5; the paper gives
                 no probability).
"""

from __future__ import annotations

import ml_collections

from uccl_jax.config import base_config
from uccl_jax.config import apply_recipe_variants, parse_recipe_arg

SPLITS = ('92', '183', '366', '732', '1464')


def get_config(arg: str = '1464') -> ml_collections.ConfigDict:
  split, variants = parse_recipe_arg(arg, config_file='configs/pascal.py', splits=SPLITS,
                                     default_split='1464')
  config = base_config()
  config.method = 'uccl'
  config.model.pretrained = 'pretrained/resnet50.pth'  # relative to the working directory
  config.data.name = 'pascal'
  config.data.root = 'data/pascal'
  config.data.labeled_split = f'splits/pascal/{split}/labeled.txt'
  config.data.unlabeled_split = f'splits/pascal/{split}/unlabeled.txt'
  config.data.val_split = 'splits/pascal/val.txt'
  config.data.crop_size = 321
  config.data.num_classes = 21
  config.data.mix_images = 'other'
  config.model.backbone = 'resnet50'
  config.train.batch_size = 8
  config.train.epochs = 80
  config.train.lr = 0.001
  config.train.lr_multi = 10.0
  config.train.labeled_loss = 'ce'
  config.unsup.conf_thresh = 0.95
  config.sbu.threshold = 0.95
  config.eval.mode = 'original'
  config.eval.every_epochs = 1
  config.checkpoint.every_steps = 1000
  apply_recipe_variants(config, variants)
  return config
