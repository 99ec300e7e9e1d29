"""The configuration schema: every field the code reads, with its default.

Dataset configs under `configs/` start from `base_config()` and override what
their recipe changes, so a field that exists anywhere exists everywhere and
`--config.a.b=value` overrides are type-checked by ml_collections against these
defaults. Fields are grouped by the part of the system that reads them.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the defaults shared by every recipe (Pascal-like values)."""
  config = ml_collections.ConfigDict()

  # 'supervised' (labeled images only) | 'unimatch' (no SBU/CKR) | 'uccl'.
  config.method = 'uccl'

  config.model = ml_collections.ConfigDict()
  config.model.backbone = 'resnet50'  # resnet18 | resnet34 | resnet50 | resnet101
  config.model.width = 64  # backbone base width; 64 is the real network, smaller for demos/tests
  config.model.head_channels = 256  # ASPP/decoder width; 256 is the real network
  config.model.stem = 'deep'  # 'deep' (UniMatch's 3x conv3x3) | 'standard' (torchvision 7x7)
  config.model.output_stride = 16
  config.model.dilations = (6, 12, 18)
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPUs (params, BN stats, losses stay float32)
  config.model.pretrained = ''  # path to a backbone .pth or converted checkpoint; '' = random init

  config.data = ml_collections.ConfigDict()
  # 'cityscapes' | 'pascal' | 'synthetic' (folder layout and class names; 'synthetic' is the
  # generated demo dataset in the Cityscapes layout, see uccl_jax/data/synthetic.py).
  config.data.name = 'pascal'
  config.data.source = 'folder'  # 'folder' (split files under data.root) | 'tfds'
  # Dataset root. '' with name 'synthetic': the demo dataset, generated into the cache on first use.
  config.data.root = ''
  # UniMatch-format lists, 'image_path mask_path' per line, paths relative to data.root. A split path
  # is used as given when absolute, else relative to the current directory when that file exists,
  # else relative to data.root.
  config.data.labeled_split = ''
  config.data.unlabeled_split = ''
  config.data.val_split = ''
  # No labeled/unlabeled split files: draw the labeled images from the full train list with
  # split_seed, num_labeled of them (or labeled_fraction of the list when num_labeled is 0), and
  # write both lists into <workdir>/splits/ so the run can be repeated.
  config.data.num_labeled = 0
  config.data.labeled_fraction = 0.0
  config.data.split_seed = 0
  config.data.tfds_name = 'cityscapes/semantic_segmentation'  # with data.source = 'tfds'
  config.data.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS's default, ~/tensorflow_datasets)
  config.data.synthetic_seed = 0  # the demo dataset's generation seed (name 'synthetic', root '')
  config.data.crop_size = 321
  config.data.num_classes = 21
  config.data.ignore_index = 255
  config.data.vflip_prob = 0.0  # the paper's text lists vertical flips; the released code has none
  config.data.workers = 4  # grain worker processes for decoding and augmentation (0 = in-process)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8  # global, per stream (labeled / unlabeled / mixing)
  config.train.epochs = 80  # one epoch = one pass over the unlabeled list
  config.train.max_steps = -1  # > 0 caps the run (smoke runs); the schedule still spans `epochs`
  config.train.log_every_steps = 20
  config.train.seed = 0
  config.train.lr = 0.001
  config.train.lr_multi = 10.0  # head (everything but the backbone) learns at lr * lr_multi
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-4
  config.train.grad_accum = 1
  config.train.labeled_loss = 'ce'  # 'ce' | 'ohem'
  config.train.ohem_thresh = 0.7
  config.train.ohem_min_kept = 200000

  config.unsup = ml_collections.ConfigDict()
  config.unsup.conf_thresh = 0.95  # pseudo-label confidence threshold of the UniMatch losses
  # Where SBU and CKR take the weak view of each CutMix-ed pair from (uccl_jax/step.py):
  # 'passes': two extra training-mode passes over the CutMix-ed weak images, as the released code
  #   does (+38% step FLOPs over UniMatch);
  # 'pasted': no extra pass: the unlabeled weak images' features and logits from the labeled+weak
  #   pass, with the teacher's (mixing batch) pasted in the CutMix box at feature resolution.
  config.unsup.anchors = 'passes'

  config.sbu = ml_collections.ConfigDict()
  config.sbu.enabled = True
  config.sbu.weight = 0.015  # alpha
  config.sbu.threshold = 0.95  # tau: pixels with conf <= tau are 'uncertain' and trained by SBU
  config.sbu.variant = 'reference'  # 'reference' (released code) | 'paper' (Eq. 7)

  config.ckr = ml_collections.ConfigDict()
  config.ckr.enabled = True
  config.ckr.weight = 0.02  # beta

  config.eval = ml_collections.ConfigDict()
  config.eval.mode = 'original'  # 'original' | 'center_crop' | 'sliding_window'
  config.eval.every_epochs = 1

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 2

  return config
