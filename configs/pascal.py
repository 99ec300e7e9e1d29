"""Pascal VOC 2012 (+SBD) with UniMatch's split lists: the paper's VOC recipe (UCCL Table I).

Run (one 4-GPU node; one GPU works too, add `--config.train.grad_accum=...` to match its memory):
  python -m uccl_jax.main --config=configs/pascal.py:183 --workdir=runs/pascal_183 \
      --config.data.root=/path/to/VOC2012
  sbatch --nodes=1 launch/slurm.sh --config=configs/pascal.py:732 --workdir=runs/pascal_732
Evaluate the best checkpoint of a run:
  python -m uccl_jax.main --config=configs/pascal.py:183 --workdir=runs/pascal_183 --mode=eval
The word after ':' picks the labeled split (92, 183, 366, 732, 1464; default 1464);
the split lists are UniMatch's (splits/pascal/<split>/{labeled,unlabeled}.txt, val.txt).

Recipe: crop 321, global batch 8 per stream, 80 epochs, SGD lr 0.001 with the
head at 10x (lr_multi 10.0), cross-entropy on the labeled images, ResNet-50
(deep stem, output stride 16), each validation image evaluated whole at its own
size ('original').

Thresholds: UniMatch's VOC recipe uses 0.95 for its pseudo-label losses
(`unsup.conf_thresh`), and UCCL's tau (`sbu.threshold`, the pixels SBU trains
are those with weak confidence <= tau) is 0.95 as well; they are separate fields
so an ablation can move one without the other.
"""

from __future__ import annotations

import ml_collections

from uccl_jax.config import base_config

SPLITS = ('92', '183', '366', '732', '1464')


def get_config(split: str = '1464') -> ml_collections.ConfigDict:
  if split not in SPLITS:
    raise ValueError(f'configs/pascal.py: unknown split {split!r}; choose one of {", ".join(SPLITS)}')
  config = base_config()
  config.method = 'uccl'
  config.data.name = 'pascal'
  config.data.root = 'data/pascal'
  config.data.labeled_split = f'splits/pascal/{split}/labeled.txt'
  config.data.unlabeled_split = f'splits/pascal/{split}/unlabeled.txt'
  config.data.val_split = 'splits/pascal/val.txt'
  config.data.crop_size = 321
  config.data.num_classes = 21
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
  return config
