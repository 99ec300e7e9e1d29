"""Cityscapes with UniMatch's split lists: the paper's Cityscapes recipe.

Run: python -m uccl_jax.main --config=configs/cityscapes.py:1_16 --workdir=runs/cityscapes_1_16 \
         --config.data.root=/path/to/cityscapes
The word after ':' picks the labeled split (1_16, 1_8, 1_4, 1_2; default 1_16).
"""

from uccl_jax.config import base_config

SPLITS = ('1_16', '1_8', '1_4', '1_2')


def get_config(split: str = '1_16'):
  if split not in SPLITS:
    raise ValueError(f'configs/cityscapes.py: unknown split {split!r}; choose one of {", ".join(SPLITS)}')
  config = base_config()
  config.data.name = 'cityscapes'
  config.data.root = 'data/cityscapes'
  config.data.labeled_split = f'splits/cityscapes/{split}/labeled.txt'
  config.data.unlabeled_split = f'splits/cityscapes/{split}/unlabeled.txt'
  config.data.val_split = 'splits/cityscapes/val.txt'
  config.data.crop_size = 801
  config.data.num_classes = 19
  config.train.epochs = 240
  config.train.lr = 0.005
  config.train.lr_multi = 1.0
  config.train.labeled_loss = 'ohem'
  config.eval.mode = 'sliding_window'
  return config
