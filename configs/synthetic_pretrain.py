"""Pretraining the demo's backbone on the generated source domain (the demo's ImageNet).

  python -m uccl_jax.pretrain --config=configs/synthetic_pretrain.py [--out=DIR]

The demo (configs/synthetic.py) does this by itself on first use, with these
settings and its own network: `model.pretrained = 'synthetic:source'`. The
settings and why they were chosen: uccl_jax/pretrain.py, `default_config`.
"""

from __future__ import annotations

import ml_collections

from uccl_jax import pretrain


def get_config() -> ml_collections.ConfigDict:
  return pretrain.default_config()
