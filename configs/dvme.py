r"""DVME (Truong et al. 2021): an attention fusion of several frozen pretrained encoders.

Launch (two of this project's own pretraining runs as encoders, on the demo data):
  python main.py --config=configs/simclr.py:demo --workdir=/tmp/simclr_demo
  python main.py --config=configs/swav.py:demo --workdir=/tmp/swav_demo
  python main.py --config=configs/dvme.py:demo --workdir=/tmp/dvme_demo \
      --config.dvme.encoders=simclr=/tmp/simclr_demo,swav=/tmp/swav_demo
A linear probe on ONE encoder's cached features, the same protocol (DVME with one encoder and
no attention is a linear head: tests/test_dvme_model.py):
  python main.py --config=configs/dvme.py:demo,probe --workdir=/tmp/probe_simclr \
      --config.dvme.encoders=simclr=/tmp/simclr_demo
Converted releases work the same (`python -m medssl_jax.convert`, then name=folder).

Fields (dvme.*): encoders 'name=checkpoint[,name=checkpoint...]' (each network's variant and
input normalisation come from its checkpoint; features per DINO's protocol: ResNet pooled,
ViT CLS of the last 4 blocks), token_dim / out_dim 512 (the paper's), num_heads, mlp_ratio,
attention (False: no block; tokens go straight to the fusion projection), dropout, cache_dir
(features; default WORKDIR/features, share it between runs to compute each encoder once),
finetune_encoders (True: the encoders are fine-tuned end to end through DVME on images, with
the fine-tune augmentations; results are then a fine-tune, not a linear evaluation).
Our reading of the paper where it is silent: ONE pre-norm block, 8 heads, MLP ratio 4, GELU,
no activation between the fusion projection and the linear head, Adam, encoders frozen.
Variants: demo | probe (one encoder, no attention) | chexpert | derm | pcam | dr.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _demo(c):
    common.finetune_demo(c)
    c.batch_size = 64
    c.num_steps = 600
    c.optim.base_learning_rate = 0.001
    c.eval_every_steps = 100


def _probe(c):
    c.dvme.attention = False
    c.init_name = ""  # results' init: probe(<encoder>)


def get_config(arg: str | None = None):
    c = common.supervised_config("dvme")
    c.method = "dvme"
    c.init_name = ""  # '' = dvme(<encoders joined by +>), or probe(<encoder>) for a probe
    c.dvme = ml_collections.ConfigDict()
    c.dvme.encoders = ""
    c.dvme.token_dim = 512
    c.dvme.out_dim = 512
    c.dvme.num_heads = 8
    c.dvme.mlp_ratio = 4.0
    c.dvme.attention = True
    c.dvme.dropout = 0.0
    c.dvme.cache_dir = ""
    c.dvme.finetune_encoders = False  # True: encoders fine-tuned end to end through DVME
    c.optim.name = "adam"
    c.optim.base_learning_rate = 0.001
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.0
    c.augment.crop = True  # used only with finetune_encoders (cached features see no augmentation)
    c.augment.flip = True
    c.batch_size = 256
    c.num_epochs = 30.0
    common.apply_args(
        c,
        arg,
        {
            "demo": _demo,
            "probe": _probe,
            "chexpert": common.finetune_chexpert,
            "derm": common.finetune_derm,
            "pcam": common.finetune_pcam,
            "dr": common.finetune_dr,
        },
    )
    return c
