"""Pascal VOC 2012 (+SBD) with UniMatch's split lists: the paper's VOC recipe.

Run: python -m uccl_jax.main --config=configs/pascal.py:183 --workdir=runs/pascal_183 \
         --config.data.root=/path/to/VOC2012 --config.data.labeled_split=splits/pascal/183/labeled.txt ...
The word after ':' picks the labeled split (92, 183, 366, 732, 1464; default 1464).
"""

from uccl_jax.config import base_config

SPLITS = ('92', '183', '366', '732', '1464')


def get_config(split: str = '1464'):
  if split not in SPLITS:
    raise ValueError(f'configs/pascal.py: unknown split {split!r}; choose one of {", ".join(SPLITS)}')
  config = base_config()
  config.data.name = 'pascal'
  config.data.root = 'data/pascal'
  config.data.labeled_split = f'splits/pascal/{split}/labeled.txt'
  config.data.unlabeled_split = f'splits/pascal/{split}/unlabeled.txt'
  config.data.val_split = 'splits/pascal/val.txt'
  config.data.crop_size = 321
  config.data.num_classes = 21
  config.train.epochs = 80
  config.train.lr = 0.001
  config.train.lr_multi = 10.0
  config.train.labeled_loss = 'ce'
  config.eval.mode = 'original'
  return config
