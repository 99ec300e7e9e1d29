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
  # Rematerialise the backbone's stem and blocks and the decoder (jax.checkpoint): the backward
  # pass recomputes their activations instead of keeping them. Less memory per device for about
  # one more forward pass of compute; same variables, so checkpoints load either way.
  config.model.remat = False
  # ImageNet backbone: a UniMatch-format .pth (pretrained/resnet50.pth) or a folder converted by
  # `python -m uccl_jax.convert`, loaded strictly; '' or 'none' = random init on purpose. The
  # Pascal/Cityscapes recipes default to 'pretrained/resnet50.pth' (as the release) and stop before
  # writing anything when it is missing.
  config.model.pretrained = ''

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
  # Which image each unlabeled image is CutMix-ed with: 'other' = the mixing stream's own shuffle
  # (an independent image, UniMatch's intent); 'same' = the record the unlabeled stream reads at the
  # same position, with its own augmentation (another crop of itself: what UniMatch and the release
  # do, iterating one DistributedSampler-backed loader twice). docs/RECIPES.md.
  config.data.mix_images = 'other'
  # grain worker processes for decoding and augmentation: -1 = the CPUs this process may use
  # (os.sched_getaffinity) divided by the processes on this host, minus one for the loop;
  # 0 = all input work in the calling process. The value used is logged at the start.
  config.data.workers = -1

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
  config.train.ohem_min_kept = 200000  # per group
  # OHEM mines groups of this many consecutive images of the global batch separately (the mean of
  # the groups' losses): the release mines each GPU's 2 images. Device count and grad_accum do not
  # change the loss; 0 = the whole batch as one group (grad_accum 1 only).
  config.train.ohem_images_per_group = 2

  config.unsup = ml_collections.ConfigDict()
  config.unsup.conf_thresh = 0.95  # pseudo-label confidence threshold of the UniMatch losses
  # Where SBU and CKR take the weak view of each CutMix-ed pair from (uccl_jax/step.py):
  # 'passes': two extra training-mode passes over the CutMix-ed weak images, as the released code
  #   does (+38% step FLOPs over UniMatch);
  # 'pasted': no extra pass: the unlabeled weak images' features and logits from the labeled+weak
  #   pass, with the teacher's (mixing batch) pasted in the CutMix box at feature resolution.
  config.unsup.anchors = 'passes'
  # Whether the strong views' training pass updates the BN running statistics, as in the release
  # (True) or not (False: they follow the labeled + weak pass only, the images evaluation sees).
  # The strong views are colour-jittered, greyed, blurred and CutMix-ed, and the release's strong
  # pass is the last update of every step, so the statistics evaluation normalises with are partly
  # those of images it never sees (what that costs on the demo: docs/RESULTS.md section 2c-2).
  # Gradients and the pass's own normalisation are unchanged.
  config.unsup.bn_stats_from_strong = True

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

  config.parallel = ml_collections.ConfigDict()
  # The device mesh: its shape over all devices of all processes (-1: the rest) and its axis
  # names. The batch is split over 'data'; every other axis (size 1 by default, none today)
  # holds replicas, ready for a model-parallel axis without a rewrite of the step.
  config.parallel.mesh_shape = (-1,)
  config.parallel.mesh_axes = ('data',)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 2
  # Also save at the first logging step after this many minutes without a save, so a crash
  # loses at most about that much (0: only the step-based saves).
  config.checkpoint.every_minutes = 30.0

  return config


RECIPE_VARIANTS = ('release', 'paper')  # docs/RECIPES.md


def parse_recipe_arg(arg: str, *, config_file: str, splits: tuple[str, ...],
                     default_split: str) -> tuple[str, tuple[str, ...]]:
  """'SPLIT[,VARIANT...]' (the word after ':' in --config=FILE:ARG) -> (split, variants).

  Each comma-separated word is a split or a variant of RECIPE_VARIANTS, in any
  order; no split word means `default_split`. A word that is neither is a
  ValueError naming the choices.
  """
  split, variants = None, []
  for word in (w.strip() for w in str(arg).split(',')):
    if word in splits:
      if split is not None:
        raise ValueError(f'{config_file}: two splits, {split!r} and {word!r}; choose one')
      split = word
    elif word in RECIPE_VARIANTS and word not in variants:
      variants.append(word)
    elif word:
      raise ValueError(f'{config_file}: unknown split or variant {word!r}; splits: '
                       f'{", ".join(splits)}; variants: {", ".join(RECIPE_VARIANTS)} '
                       f'(e.g. :{splits[0]},release)')
  if 'release' in variants and 'paper' in variants:
    raise ValueError(f'{config_file}: choose one of the variants release and paper, not both')
  return split or default_split, tuple(variants)


def apply_recipe_variants(config: ml_collections.ConfigDict, variants: tuple[str, ...]) -> None:
  """Sets the fields the 'release' / 'paper' variants change on every dataset (docs/RECIPES.md).

  'release': the released code's behaviour (SBU threshold = the pseudo-label
  threshold, SBU over the whole image, each image mixed with another crop of
  itself, no vertical flips, the extra weak passes); 'paper': Eq. 7 and
  vertical flips (p 0.5). Dataset configs add what differs per dataset.
  """
  if 'release' in variants:
    config.sbu.threshold = config.unsup.conf_thresh  # the release reuses conf_thresh for SBU
    config.sbu.variant = 'reference'
    config.data.mix_images = 'same'
    config.data.vflip_prob = 0.0
    config.unsup.anchors = 'passes'
    config.unsup.bn_stats_from_strong = True
  if 'paper' in variants:
    config.sbu.variant = 'paper'
    config.data.vflip_prob = 0.5
