r"""Contrastive learning + online feature clustering, optionally supervised (Ghesu et al. 2022).

L = L_clustering (SwAV codes) + lambda * L_contrastive (NT-Xent of the global crops) +
mu * L_supervised (labelled images of each batch only); see medssl_jax/methods/hybrid.py.

Launch:
  python main.py --config=configs/hybrid.py:demo --workdir=/tmp/hybrid_demo
  python main.py --config=configs/hybrid.py:demo --workdir=/tmp/hybrid_ssl \
      --config.hybrid.supervised_weight=0        # self-supervised only
  python main.py --config=configs/hybrid.py:r50_1x,chexpert --workdir=gs://BUCKET/hybrid_cxr \
      --config.data.manual_dir=/data/CheXpert-v1.0-small
Variants (comma-separated, applied in order):
  r50_1x | r50_4x | r152_2x | tiny     architecture
  chexpert  CheXpert recipe; micle  multi-instance pairing
  demo      tiny ResNet on the built-in synthetic demo data (labels of 10% of the cases used)
Fields: hybrid.contrastive_weight (lambda), hybrid.supervised_weight (mu),
data.label_fraction (share of training cases whose labels the supervised term sees).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import swav  # noqa: E402

from medssl_jax.methods import get  # noqa: E402


def demo(c):
    swav.demo(c)
    c.num_steps = 300  # the supervised and contrastive terms start learning at once
    c.data.label_fraction = 0.1  # hybrid regime: few labels, many unlabelled images


def get_config(arg: str | None = None):
    c = swav.get_config(None)
    c.method = "hybrid"
    c.hybrid = get("hybrid").defaults()
    c.data.label_fraction = 1.0
    common.apply_args(c, arg, {"demo": demo, "chexpert": common.chexpert})
    return c
