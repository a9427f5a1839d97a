r"""The paper's pipeline in one command (Azizi et al. 2021): domain SimCLR, then MICLe from it,
then fine-tuning at label fractions x seeds from scratch, SimCLR and MICLe, then the report.

Launch:
  python -m medssl_jax.pipeline --config=configs/pipeline.py:demo --workdir=runs/paper_demo
  python -m medssl_jax.pipeline --config=configs/pipeline.py:derm --workdir=DIR \
      --config.data.manual_dir=/data/HAM10000 \
      --config.simclr.init_checkpoint=runs/imagenet_simclr_r50   # converted ImageNet weights
Variants: demo (built-in data, about 10 minutes on 2 CPU cores) | derm | chexpert (your copy
through data.manual_dir; R50 1x recipes).

Each stage runs in WORKDIR/<stage>/ (simclr, micle, finetune, report), is skipped when its
results exist, and resumes from its checkpoints when interrupted: rerun the same command.
Fields: data (applied to every stage: name, data_dir, manual_dir, image_size), simclr / micle /
finetune (whole stage configs; any field overridable, e.g. --config.micle.num_steps=2000),
simclr.init_checkpoint (ImageNet/SimCLR weights to start from: a run or a converted release),
micle_from_simclr (MICLe warm-starts from the SimCLR stage), fractions, seeds, bootstrap.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import finetune  # noqa: E402
import micle  # noqa: E402
import simclr  # noqa: E402


def get_config(arg: str | None = None):
    variant = arg or "derm"
    if variant not in ("demo", "derm", "chexpert"):
        raise ValueError(f"unknown config variant {variant!r}; valid: ['chexpert', 'demo', 'derm']")
    pre = {"demo": "demo", "derm": "r50_1x", "chexpert": "r50_1x,chexpert"}[variant]
    ft = {"demo": "demo", "derm": "r50_1x,derm", "chexpert": "r50_1x,chexpert"}[variant]
    c = ml_collections.ConfigDict()
    c.simclr = simclr.get_config(pre)
    c.micle = micle.get_config(pre)
    c.finetune = finetune.get_config(ft)
    c.data = ml_collections.ConfigDict(
        dict(
            name=c.finetune.data.name,
            data_dir="",
            manual_dir="",
            image_size=c.finetune.data.image_size,
        )
    )
    c.micle_from_simclr = True
    c.fractions = (0.1, 1.0)
    c.seeds = (0,)
    c.bootstrap = 1000
    if variant == "demo":
        c.simclr.num_steps = 300
        c.micle.num_steps = 300
        c.finetune.num_steps = 200
    return c
