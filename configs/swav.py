r"""SwAV (Caron et al. 2020): online Sinkhorn clustering with swapped prediction, multi-crop.

Launch:
  python main.py --config=configs/swav.py:demo --workdir=/tmp/swav_demo
  python main.py --config=configs/swav.py:demo,micle --workdir=/tmp/micle_swav_demo
  python main.py --config=configs/swav.py:r50_1x,chexpert --workdir=gs://BUCKET/swav_cxr \
      --config.data.manual_dir=/data/CheXpert-v1.0-small
Variants (comma-separated, applied in order):
  r50_1x | r50_4x | r152_2x | tiny     architecture
  chexpert   CheXpert view recipe (no blur, colour 0.5, rotation 45)
  micle      multi-instance pairing: global crops from two distinct images of one case
  demo       tiny ResNet on the built-in synthetic demo data (minutes on 2 CPU cores)
Default: SwAV's ImageNet recipe (ResNet-50, batch 4096, LARS 4.8 peak, 2x224 + 6x96 crops,
3000 prototypes, eps 0.05, 3 Sinkhorn iterations, temperature 0.1, prototypes frozen 1 epoch).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from medssl_jax.methods.swav import swav_defaults  # noqa: E402


def demo(c):
    """Tiny ResNet, 64 px global + 4 x 32 px local crops, 1200 steps (measured on the demo data,
    see the README: at 300 steps, or with SwAV's ImageNet crop areas, the loss stays at ln K;
    at 600 steps one seed of 3 stayed at random level; 1200 steps beat random clearly on
    validation in the 2 seeds measured so far).

    - 256 prototypes, at least the 128 embedding dimensions: with fewer, embeddings can sit
      where no prototype is and every prediction is uniform.
    - epsilon 0.03 and a 512-embedding queue from epoch 1: SwAV's small-batch settings.
    - Crop areas 0.4-1 (global) and 0.1-0.4 (local): a demo lesion covers a small part of
      the image, and with 0.14-1 / 0.05-0.14 most crop pairs share no lesion at all.
    """
    common.demo(c)
    common.multi_crop(c, num_local=4, local_size=32)
    c.crops.global_area = (0.4, 1.0)
    c.crops.local_area = (0.1, 0.4)
    c.num_steps = 1200
    c.swav.num_prototypes = 256
    c.swav.epsilon = 0.03
    c.swav.queue_length = 512
    c.swav.queue_start_epoch = 1.0
    c.swav.freeze_prototypes_epochs = 1.0  # ~23 steps of the demo's ~1,500 images


def get_config(arg: str | None = None):
    c = common.pretrain_config("swav")
    c.swav = swav_defaults()
    common.multi_crop(c, num_local=6, local_size=96)
    c.data.image_size = 224
    c.optim.base_learning_rate = 0.3  # x B/256 -> 4.8 at 4096, SwAV's LARS peak
    c.optim.weight_decay = 1e-6
    c.num_epochs = 100.0
    c.model.num_proj_layers = 2  # 2048 -> 2048 -> 128 (see methods/swav.py on the BN)
    c.model.proj_out_dim = 128
    common.apply_args(c, arg, {"demo": demo, "chexpert": common.chexpert})
    return c
