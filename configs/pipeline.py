r"""The paper's pipeline in one command (Azizi et al. 2021): domain pretraining (SimCLR), then
MICLe from it, then fine-tuning at label fractions x seeds from scratch, SimCLR and MICLe, then
the report.

Launch:
  python -m medssl_jax.pipeline --config=configs/pipeline.py:demo --workdir=runs/paper_demo
  python -m medssl_jax.pipeline --config=configs/pipeline.py:derm --workdir=DIR \
      --config.data.manual_dir=/data/HAM10000 \
      --config.pretrain.init_checkpoint=runs/imagenet_simclr_r50   # converted ImageNet weights
  python -m medssl_jax.pipeline --config=configs/pipeline.py:derm --workdir=DIR \
      --config.data.manual_dir=/data/HAM10000 --config.weights.format=simclr_v2_tf1 \
      --config.weights.source=/ckpt/r50_1x_sk0/model.ckpt-250228   # converted as stage 0
  python -m medssl_jax.pipeline --config=configs/pipeline.py:demo,swav --workdir=runs/swav_demo
Variants: RECIPE[,METHOD]. RECIPE: demo (built-in data, about 8 minutes on 2 CPU cores) | derm |
chexpert (your copy through data.manual_dir; R50 1x recipes) | nih (below). METHOD: simclr
(default) | swav | dino | hybrid: the pretraining method of both stages (MICLe-SwAV etc. for the
second; the demo then uses the method's own demo step count, e.g. 1200 for SwAV).

Each stage runs in WORKDIR/<stage>/ (simclr, micle, finetune, report; swav, micle_swav, ... for
other methods), is skipped when its results exist, and resumes from its checkpoints when
interrupted: rerun the same command.
Fields: data (applied to every stage: name, data_dir, manual_dir, image_size); pretrain (the
first stage), micle (the base of every arm), finetune, linear (whole stage configs; any field
overridable, e.g. --config.micle.num_steps=2000); pretrain.init_checkpoint (ImageNet/SimCLR
weights to start from: a run or a converted release); arms_from_pretrain (the arms warm-start
from the first stage); fractions, seeds, bootstrap; weights (stage 0: weights.source and
weights.format of a released checkpoint, converted into WORKDIR/weights for
pretrain.model.variant, where the first stage starts).
arms: the stages that continue from the first, name -> overrides of the micle config separated
by ';' (default {'micle': ''}; --config.arms.micle='sampler.distinct_prob=0.5' changes an arm;
the command line cannot add keys, so new arms go in a variant, as nih's), each one more init
of the sweeps. pretrain_per_seed: one first stage and one of each arm per seed
(fine-tuning seed s starts from pretraining seed s). probe: also a linear-eval sweep (config
`linear`) on every init with all labels.

The nih variant: the real NIH chest X-rays of ../shared/data/nih_cxr_1000 (or any folder
described by a labels.csv with image_path, case_id (= patient) and label columns; the derm_csv
builder re-splits it by patient) with the demo's model, 3 seeds, SimCLR continued as a control
and the two MICLe options as arms; benchmarks/nih_pipeline.py writes that CSV, runs it and
summarises it:
  python benchmarks/nih_pipeline.py --workdir=runs/nih
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dino  # noqa: E402
import finetune  # noqa: E402
import hybrid  # noqa: E402
import linear_eval  # noqa: E402
import simclr  # noqa: E402
import swav  # noqa: E402

RECIPES = ("chexpert", "demo", "derm", "nih")
METHODS = {"simclr": simclr, "swav": swav, "dino": dino, "hybrid": hybrid}
PRETRAIN = {"demo": "demo", "nih": "demo", "derm": "r50_1x", "chexpert": "r50_1x,chexpert"}
FINETUNE = {"demo": "demo", "nih": "demo", "derm": "r50_1x,derm", "chexpert": "r50_1x,chexpert"}


def get_config(arg: str | None = None):
    recipe, _, method = (arg or "derm").partition(",")
    method = method or "simclr"
    if recipe not in RECIPES or method not in METHODS:
        raise ValueError(
            f"unknown config variant {arg!r}; valid: RECIPE[,METHOD] with RECIPE in "
            f"{list(RECIPES)} and METHOD in {list(METHODS)}"
        )
    make = METHODS[method].get_config
    c = ml_collections.ConfigDict()
    c.pretrain = make(PRETRAIN[recipe])
    c.micle = make(PRETRAIN[recipe] + ",micle")
    c.finetune = finetune.get_config(FINETUNE[recipe])
    c.linear = linear_eval.get_config(FINETUNE[recipe])
    c.arms = ml_collections.ConfigDict({"micle" if method == "simclr" else f"micle_{method}": ""})
    c.pretrain_per_seed = False
    c.probe = False
    # Stage 0: a released checkpoint (SimCLRv1/v2 TF, torchvision-layout SwAV/DINO ResNet, DINO
    # ViT) converted for pretrain.model.variant into WORKDIR/weights; the first stage starts
    # from it (python -m medssl_jax.convert documents the formats and options).
    c.weights = ml_collections.ConfigDict(
        dict(source="", format="", ema=False, rescale_v1=False, checkpoint_key="", drop_heads=False)
    )
    c.data = ml_collections.ConfigDict(
        dict(
            name=c.finetune.data.name,
            data_dir="",
            manual_dir="",
            image_size=c.finetune.data.image_size,
        )
    )
    c.arms_from_pretrain = True
    c.fractions = (0.1, 1.0)
    c.seeds = (0,)
    c.bootstrap = 1000
    if recipe in ("demo", "nih"):
        if method == "simclr":
            c.pretrain.num_steps = 300
            c.micle.num_steps = 300
        c.finetune.num_steps = 200
    if recipe == "nih":
        c.data.name = "derm_csv"  # labels.csv in data.manual_dir (benchmarks/nih_pipeline.py)
        c.data.image_size = 64  # the images' own size
        for stage in (c.finetune, c.linear):
            stage.eval_splits = ()  # the dataset's own (validation, test); the demo adds a shift
        c.seeds = (0, 1, 2)
        c.fractions = (0.1,)  # all labels: the linear probe (probe=True)
        c.pretrain_per_seed = True
        c.probe = True
        # SimCLR continued for as many steps as MICLe (a fair control), plain MICLe, and the
        # two MICLe options (configs/common.py, sampler): a per-batch SimCLR/MICLe mix, and
        # epochs over images instead of patients.
        c.arms = ml_collections.ConfigDict(
            {
                f"{method}_more": "sampler.multi_instance=False",
                "micle" if method == "simclr" else f"micle_{method}": "",
                "micle_mix": "sampler.distinct_prob=0.5",
                "micle_images": "sampler.epoch_over=images",
            }
        )
    return c
