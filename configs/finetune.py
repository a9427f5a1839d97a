r"""Supervised fine-tuning from a pretraining checkpoint (or from scratch as the baseline).

Launch:
  python main.py --config=configs/finetune.py:demo --workdir=/tmp/ft_demo \
      --config.init_checkpoint=/tmp/micle_demo --config.init_name=micle \
      --config.data.label_fraction=0.1
  python main.py --config=configs/finetune.py:r50_1x,chexpert --workdir=DIR \
      --config.data.manual_dir=/data/CheXpert-v1.0-small --config.init_checkpoint=PRETRAIN_DIR
Variants (comma-separated, applied in order):
  r50_1x | r50_4x | r152_2x | r152_3x_sk1 | tiny   architecture (must match the checkpoint)
  derm | chexpert | pcam | dr | demo             dataset recipe
  eval_nih | eval_pad_ufes20                      also evaluate on another dataset (mapped
                                                  classes; chexpert -> NIH, derm -> PAD-UFES-20)
  python main.py --config=configs/finetune.py:r50_1x,chexpert,eval_nih --workdir=DIR \
      --config.data.manual_dir=/data/chexpert --config.eval_datasets.nih.manual_dir=/data/nih
Fields: init_checkpoint ('' = random init), init_name (label in reports), model.ft_proj_selector
(projection-head layers kept, 0 = backbone), data.label_fraction, eval_splits, val_split,
selection_metric, eval_datasets.
Sweeps over label fractions x seeds x initialisations: python -m medssl_jax.sweep --help.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config(arg: str | None = None):
    c = common.supervised_config("finetune")
    common.apply_args(
        c,
        arg,
        {
            "demo": common.finetune_demo,
            "chexpert": common.finetune_chexpert,
            "derm": common.finetune_derm,
            "pcam": common.finetune_pcam,
            "dr": common.finetune_dr,
            "eval_nih": common.eval_nih,
            "eval_pad_ufes20": common.eval_pad_ufes20,
        },
    )
    return c
