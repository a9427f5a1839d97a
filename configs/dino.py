r"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, ResNet-50 or ViT.

Launch:
  python main.py --config=configs/dino.py:demo --workdir=/tmp/dino_demo
  python main.py --config=configs/dino.py:demo,vit_tiny --workdir=/tmp/dino_vit_demo
  python main.py --config=configs/dino.py:demo,micle --workdir=/tmp/micle_dino_demo
  python main.py --config=configs/dino.py:vit_s16,chexpert --workdir=gs://BUCKET/dino_cxr \
      --config.data.manual_dir=/data/CheXpert-v1.0-small
Variants (comma-separated, applied in order):
  r50       DINO's ResNet-50 recipe: SGD lr 0.03 x B/256, wd 1e-4, crops (0.14,1)/(0.05,0.14),
            teacher temperature 0.04 (no warm-up), BN in the head; DINO's views (below)
  vit_s16   ViT-S/16 recipe: AdamW 0.0005 x B/256, weight decay cosine 0.04 -> 0.4, teacher
            0.04 -> 0.07 over 30 epochs, out_dim 65536, last layer not normalised (as the
            released ViT-S/16)
  vit_b16   the same for ViT-B/16
  vit_tiny  a 4-block 64-d ViT with 8 px patches (tests and the demo)
  chexpert  CheXpert view recipe; micle  multi-instance pairing
  demo      tiny ResNet on the built-in synthetic demo data (minutes on 2 CPU cores)
Default: the r50 recipe at batch 1024, 100 epochs.
Views (DataAugmentationDINO): flip, jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur
p 1.0 / 0.1 / 0.5 (global crop 1 / global crop 2 / local crops), solarization p 0.2 on global
crop 2 only. chexpert and demo keep their medical recipes instead (SimCLR jitter at colour
strength 0.5, no blur, no solarization), whatever the order of the variants.
Linear evaluation of a DINO run uses the teacher (as DINO does); for ViTs set
--config.model.vit_n_last_blocks=4 in configs/linear_eval.py (DINO's ViT-S protocol, 1536-d).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from medssl_jax.methods.dino import dino_defaults  # noqa: E402


def dino_views(c):
    """DINO's per-view augmentations (Caron et al. 2021, DataAugmentationDINO; the same as
    medssl_jax.augment's 'dino' recipe and DINO_VIEW_*, spelled out to keep configs TF-free)."""
    c.augment.recipe = "dino"
    c.augment.color_strength = 1.0  # unused: jitter gives the strengths
    c.augment.jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    c.augment.color_jitter_prob = 0.8
    c.augment.grayscale_prob = 0.2
    c.augment.blur = True
    c.augment.rotation_degrees = 0.0
    c.augment.flip = True
    c.augment.view_blur_prob = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    c.augment.view_solarize_prob = (0.0, 0.2, 0.0)


def r50(c):
    c.model.variant = "r50_1x_sk0"
    c.optim.name = "sgd"
    c.optim.base_learning_rate = 0.03
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 1e-4
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.04
    c.dino.warmup_teacher_temp_epochs = 0.0
    c.dino.use_bn_in_head = True


def _vit(c, variant):
    c.model.variant = variant
    c.model.vit_n_last_blocks = 1  # the DINO head reads the final CLS token
    c.optim.name = "adamw"
    c.optim.base_learning_rate = 0.0005
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 0.04  # DINO: cosine from 0.04 to 0.4 over the run
    c.optim.weight_decay_end = 0.4
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_epochs = 30.0
    c.dino.norm_last_layer = False
    c.dino.use_bn_in_head = False  # DINO's default, and its ViT releases' (r50() sets True)
    c.model.dtype = "float32"


def demo(c):
    """Tiny ResNet, 64 px global + 4 x 32 px local crops, a small head (K = 1024).

    LARS at 4.8 as the SimCLR demo (chosen on validation over AdamW 1e-3, see the README).
    BatchNorm in the head (as DINO's ResNet-50 recipe): without it the pooled ResNet features
    share one large mean direction, every image gets the same head output from the first step
    (assignment entropy = per-image entropy), centring then leaves a uniform teacher, and
    linear eval stays at random level. With it the teacher still drifts towards uniform
    (sample_entropy near ln K = 6.93, the collapse guard warns); linear eval beats random
    weights in 3/3 seeds on validation and test top-1, in seed 1 only barely.
    """
    common.demo(c)  # its medical views (no blur, colour strength 0.5), not DINO's
    common.multi_crop(c, num_local=4, local_size=32)
    c.crops.global_area = (0.4, 1.0)  # as configs/swav.py:demo (small lesions)
    c.crops.local_area = (0.1, 0.4)
    c.num_steps = 600
    c.optim.name = "lars"  # the SimCLR demo's rate: 0.6 * sqrt(64) = 4.8
    c.optim.base_learning_rate = 0.6
    c.optim.lr_scaling = "sqrt"
    c.optim.weight_decay = 1e-4
    c.dino.out_dim = 1024
    c.dino.hidden_dim = 256
    c.dino.bottleneck_dim = 64
    c.dino.use_bn_in_head = True
    c.dino.momentum_teacher = 0.99  # a 600-step run: 0.996 leaves the teacher near its init
    c.dino.warmup_teacher_temp, c.dino.teacher_temp = 0.04, 0.07
    c.dino.warmup_teacher_temp_epochs = 3.0
    c.dino.freeze_last_layer_epochs = 1.0


def get_config(arg: str | None = None):
    c = common.pretrain_config("dino")
    c.dino = dino_defaults()
    c.model.num_proj_layers = 0  # the DINO head replaces SimCLR's projection head
    c.model.vit_n_last_blocks = 1
    common.multi_crop(c, num_local=6, local_size=96)
    c.data.image_size = 224
    c.batch_size = 1024
    c.num_epochs = 100.0
    dino_views(c)  # before the variants: chexpert and demo replace them with their own
    r50(c)
    common.apply_args(
        c,
        arg,
        {
            "r50": r50,
            "vit_s16": lambda c: _vit(c, "vit_s16"),
            "vit_b16": lambda c: _vit(c, "vit_b16"),
            "vit_tiny": lambda c: _vit(c, "vit_tiny"),
            "demo": demo,
            "chexpert": common.chexpert,
        },
    )
    return c
