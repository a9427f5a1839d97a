r"""SimCLR pretraining (Chen et al. 2020) on medical or demo images.

Launch (single host, any number of devices):
  python main.py --config=configs/simclr.py:demo --workdir=/tmp/simclr_demo
  python main.py --config=configs/simclr.py:r50_1x,chexpert --workdir=gs://BUCKET/simclr_cxr \
      --config.data.manual_dir=/data/CheXpert-v1.0-small
Variants (comma-separated, applied in order):
  r50_1x | r50_4x | r152_2x | r152_3x_sk1 | tiny   architecture (released SimCLR names)
  derm      dermatology recipe (SimCLR augmentations, 448 px; Azizi et al. 2021, unverified)
  chexpert  Azizi CheXpert recipe: no blur, colour strength 0.5, rotation up to 45 degrees
  demo      tiny ResNet on the built-in synthetic demo data (minutes on a laptop CPU)
Any field can be overridden: --config.batch_size=512 --config.loss.temperature=0.5
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def derm(c):
    """Azizi et al. dermatology pretraining (batch 512, lr 0.3, 448 px: unverified)."""
    c.data.name = "ham10000"
    c.data.image_size = 448
    c.batch_size = 512
    c.optim.base_learning_rate = 0.3
    c.num_steps = 150_000


def get_config(arg: str | None = None):
    c = common.pretrain_config("simclr")
    common.apply_args(c, arg, {"demo": common.demo, "chexpert": common.chexpert, "derm": derm})
    return c
