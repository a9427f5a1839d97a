r"""Linear evaluation: a linear head on frozen features (stop_gradient, BN in inference mode).

Launch:
  python main.py --config=configs/linear_eval.py:demo --workdir=/tmp/lin_demo \
      --config.init_checkpoint=/tmp/micle_demo --config.init_name=micle
Variants: r50_1x | r50_4x | r152_2x | r152_3x_sk1 | tiny (architecture), derm | chexpert | pcam |
dr | demo, eval_nih | eval_pad_ufes20.
The backbone parameters are bit-identical after training (only the head is updated).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _linear(c):
    c.optim.name = "sgd"  # SimCLR linear eval: momentum SGD, no weight decay
    c.optim.base_learning_rate = 0.1
    c.optim.weight_decay = 0.0


def _demo(c):
    common.finetune_demo(c)
    c.optim.name = "adam"
    c.optim.base_learning_rate = 0.01
    c.num_steps = 600  # ~40 s on 2 CPU cores; 200 steps left the head under-trained


def get_config(arg: str | None = None):
    c = common.supervised_config("linear_eval")
    _linear(c)
    common.apply_args(
        c,
        arg,
        {
            "demo": _demo,
            "chexpert": common.finetune_chexpert,
            "derm": common.finetune_derm,
            "pcam": common.finetune_pcam,
            "dr": common.finetune_dr,
            "eval_nih": common.eval_nih,
            "eval_pad_ufes20": common.eval_pad_ufes20,
        },
    )
    return c
