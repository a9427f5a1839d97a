"""Fields shared by the pretraining configs (SimCLR and MICLe). Not a config file itself."""

import ml_collections

# Released SimCLR architectures used by Azizi et al. 2021 (config arg -> model.variant).
ARCHITECTURES = {
    "r50_1x": "r50_1x_sk0",
    "r50_4x": "r50_4x_sk0",
    "r152_2x": "r152_2x_sk0",
    "r152_3x_sk1": "r152_3x_sk1",
    "tiny": "r18_0.125x_sk0",
    # Vision Transformers as DINO releases them (Truong et al. compare ViT-S/16 features).
    "vit_s16": "vit_s16",
    "vit_b16": "vit_b16",
    "vit_tiny": "vit_tiny",
}


def pretrain_config(method: str) -> ml_collections.ConfigDict:
    """SimCLR defaults (Chen et al. 2020 / google-research/simclr), overridden per variant."""
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = "r50_1x_sk0"
    # Compute dtype of the activations (bf16 activations: half their memory); parameters,
    # BatchNorm statistics, losses and the optimiser stay float32.
    c.model.dtype = "bfloat16"
    # Recompute each backbone block's activations in the backward pass (nn.remat per ResNet
    # stem and block / ViT block) instead of storing them: ~1/3 more compute, far less
    # activation memory. The variables (and checkpoints) are the same as without it.
    c.model.remat = False
    c.model.num_proj_layers = 2  # SimCLRv1 head as in Azizi et al.; SimCLRv2 uses 3
    c.model.proj_out_dim = 128
    c.model.ft_proj_selector = 0
    c.model.bn_momentum = 0.9
    c.model.cifar_stem = False  # 3x3 stride-1 stem without max-pool, for tiny images
    # Weights converted from PyTorch (SwAV, DINO) expect ImageNet mean/std inputs and
    # torchvision's max-pool padding; converted.json says which, and a warm start checks it.
    c.model.input_norm = "none"  # or "imagenet"
    c.model.torch_maxpool = False
    # ViT backbones: features = CLS tokens of the last N blocks (+ mean patch token). Heads
    # read the final CLS token while pretraining; evaluation uses DINO's 4 (see supervised).
    c.model.vit_n_last_blocks = 1
    c.model.vit_avgpool = False

    c.data = ml_collections.ConfigDict()
    c.data.name = "demo"
    c.data.split = "train"
    c.data.data_dir = ""  # TFDS data_dir ('' -> $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.manual_dir = ""  # where the licensed raw files are (real datasets only)
    c.data.options = ml_collections.ConfigDict()  # read-time options (e.g. CheXpert uncertainty)
    c.data.image_size = 224
    c.data.fraction_seed = 0
    # Pretraining reads every image; only this fraction of cases shows its labels (online
    # probe, hybrid supervision). Fine-tuning keeps just those cases.
    c.data.label_fraction = 1.0
    # Real-data builders: drop malformed CSV rows / unreadable images (listed in the dataset's
    # metadata.json) instead of stopping; applies when the dataset is first prepared.
    c.data.skip_bad_rows = False

    c.augment = ml_collections.ConfigDict()
    c.augment.recipe = "simclr"  # documentation only: the fields below are what is applied
    c.augment.color_strength = 1.0
    c.augment.blur = True
    c.augment.rotation_degrees = 0.0
    c.augment.flip = True
    c.augment.grayscale_prob = 0.2
    c.augment.color_jitter_prob = 0.8
    # Jitter strengths (brightness, contrast, saturation, hue): () = SimCLR's from color_strength
    # (0.8, 0.8, 0.8, 0.2 times it); DINO gives its own (configs/dino.py).
    c.augment.jitter = ()
    # Blur (when blur=True) and solarization probabilities per view kind: global crop 1, global
    # crop 2, local crops. SimCLR, MICLe and SwAV blur every view with p 0.5; DINO differs.
    c.augment.view_blur_prob = (0.5, 0.5, 0.5)
    c.augment.view_solarize_prob = (0.0, 0.0, 0.0)
    # Colour jitter, grayscale and blur in the train step on the accelerator (crops stay on the
    # host): for hosts with few CPU cores per accelerator. Same draws either way.
    c.augment.on_device = False

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1  # NT-Xent (SimCLR); the other methods' live in their own section

    # Which images form an example's crops. multi_instance: the two global crops come from two
    # DISTINCT images of one case (MICLe, Azizi et al.), for any method; epochs count cases.
    c.sampler = ml_collections.ConfigDict()
    c.sampler.multi_instance = False
    # 'exclude': no global batch holds two cases of one patient (Azizi et al. 2021, MICLe);
    # 'mask': allow them but drop same-patient pairs from NT-Xent's negatives (for datasets whose
    # cases are much smaller than patients); 'allow': plain batches. Multi-instance only.
    c.sampler.same_patient = "exclude"
    # Multi-instance options (measured on real X-rays: benchmarks/nih_pipeline.py, README).
    # distinct_prob: the fraction of multi-image cases whose pair is two distinct images; the
    # rest give one image twice (a SimCLR pair), so 0.5 mixes MICLe and SimCLR pairs per batch.
    # epoch_over: epochs over 'cases' (MICLe as published: every case once per epoch, whatever its
    # number of images) or over 'images' (each image once per epoch, as SimCLR sees the data,
    # paired with another image of its case).
    c.sampler.distinct_prob = 1.0
    c.sampler.epoch_over = "cases"

    # Crops per example: 2 global crops at data.image_size, plus num_local local crops
    # (multi-crop: SwAV, DINO, hybrid). Areas are fractions of the image (SimCLR: 0.08-1).
    c.crops = ml_collections.ConfigDict()
    c.crops.global_area = (0.08, 1.0)
    c.crops.num_local = 0
    c.crops.local_size = 96
    c.crops.local_area = (0.05, 0.14)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "lars"
    c.optim.base_learning_rate = 0.3
    c.optim.lr_scaling = "linear"  # base * B / 256; 'sqrt' for small batches
    c.optim.weight_decay = 1e-6
    c.optim.momentum = 0.9
    c.optim.warmup_epochs = 10.0
    c.optim.warmup_steps = -1  # >= 0 overrides warmup_epochs
    c.optim.probe_learning_rate = 0.003  # online probe head: Adam, same schedule shape

    c.batch_size = 4096  # global, over all devices and hosts

    # How the train state lies on the device mesh (the batch is always split over 'data').
    # fsdp=False: every device holds all parameters and optimiser state (data parallelism).
    # fsdp=True: parameters, optimiser state and the method's state (e.g. DINO's teacher) are
    # split over the 'data' axis too (ZeRO-3 / FSDP): each array of at least fsdp_min_size
    # elements on its largest dimension divisible by the device count; XLA gathers them for
    # the forward pass and reduce-scatters the gradients. BatchNorm statistics and smaller
    # arrays stay replicated. Same results as fsdp=False; checkpoints are interchangeable.
    # Also the faster choice with fake CPU devices (8 on one host: 1.3x the 1-device step time
    # instead of 1.8x, as each device then does 1/8 of the LARS update; benchmarks/README.md).
    c.sharding = ml_collections.ConfigDict()
    c.sharding.fsdp = False
    c.sharding.fsdp_min_size = 2**14
    # TPU only: libtpu's scheduler set for memory instead of overlapping collectives with
    # compute (medssl_jax/tpu_schedule.py). Opt-in for configs that do not fit otherwise:
    # R152-3x-SK at 448 px on v4-32 needs it with remat and fsdp (35 -> 28.8 GiB per chip).
    c.sharding.low_memory_schedule = False
    c.num_epochs = 100.0
    c.num_steps = -1  # > 0 overrides num_epochs
    c.linear_probe = True  # online probe on stop_gradient features when labels exist

    c.init_checkpoint = ""  # warm start: an earlier stage's workdir (e.g. ImageNet SimCLR)
    c.init_parts = ("backbone", "projection_head")

    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.stop_after_steps = 0  # > 0: checkpoint and exit after this many steps (rerun resumes)
    # A non-finite loss or state: 'stop' (name the newest finite checkpoint; rerun resumes
    # from it) or 'skip' (drop that update, log it; stop after nan_max_skips in a row).
    c.nan_policy = "stop"
    c.nan_max_skips = 10
    return c


def chexpert(c: ml_collections.ConfigDict) -> None:
    """Azizi et al. CheXpert pretraining recipe (Azizi et al. 2021; batch/lr/steps unverified)."""
    c.data.name = "chexpert"
    c.data.options.uncertainty = "u_ones"
    c.data.options.conditions = "competition"
    c.data.image_size = 224
    c.augment.recipe = "chexpert"
    c.augment.color_strength = 0.5
    c.augment.blur = False
    c.augment.rotation_degrees = 45.0
    simclr_colour(c)  # SimCLR's jitter set and no solarization, whatever the method's own
    c.batch_size = 1024  # unverified
    c.optim.base_learning_rate = 0.5  # unverified
    c.num_steps = 100_000  # "up to 100k steps" (unverified)
    c.loss.temperature = 0.1  # paper grid {0.1, 0.5, 1.0}


def demo(c: ml_collections.ConfigDict) -> None:
    """Tiny ResNet on the synthetic demo set (64 px): a few minutes on a 2-core CPU."""
    c.data.name = "demo"
    c.data.image_size = 64  # the demo's native size; its class patterns vanish at 32 px
    c.model.variant = "r18_0.125x_sk0"
    c.model.dtype = "float32"
    c.batch_size = 64
    c.num_steps = 300
    c.loss.temperature = 0.2
    # Milder views than ImageNet SimCLR for tiny images and a tiny model (as the CheXpert
    # recipe): colour strength 0.5 and no blur; crop, flip and grayscale as usual.
    c.augment.recipe = "demo"
    c.augment.color_strength = 0.5
    c.augment.blur = False
    simclr_colour(c)
    c.optim.lr_scaling = "sqrt"  # SimCLRv2's small-batch rule: base * sqrt(B)
    # 0.6 * sqrt(64) = 4.8, SimCLR's ImageNet peak. LARS moves a conv kernel by about
    # lr * 1e-3 of its norm per step, so a few hundred steps need the large rate: at 1.2 the
    # kernels moved ~1% in 300 steps and the features stayed close to random ones.
    c.optim.base_learning_rate = 0.6
    c.optim.warmup_steps = 30
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100


def simclr_colour(c: ml_collections.ConfigDict) -> None:
    """SimCLR's jitter strengths (from color_strength), blur p 0.5 and no solarization on every
    view: what the medical recipes (chexpert, demo) keep for every method, DINO's included."""
    c.augment.jitter = ()
    c.augment.view_blur_prob = (0.5, 0.5, 0.5)
    c.augment.view_solarize_prob = (0.0, 0.0, 0.0)


def apply_args(c: ml_collections.ConfigDict, arg: str | None, dataset_variants: dict) -> None:
    """Applies comma-separated variant names (architectures, datasets, 'micle') in order. A
    config's own variant wins over an architecture of the same name (dino.py's 'vit_s16' is
    the whole ViT recipe, not only the backbone)."""
    for name in filter(None, (arg or "").split(",")):
        if name == "micle" and "sampler" in c:
            micle(c)
        elif name in dataset_variants:
            dataset_variants[name](c)
        elif name in ARCHITECTURES:
            c.model.variant = ARCHITECTURES[name]
        else:
            valid = sorted(ARCHITECTURES) + sorted(dataset_variants)
            valid += ["micle"] if "sampler" in c else []
            raise ValueError(f"unknown config variant {name!r}; valid: {valid}")


def micle(c: ml_collections.ConfigDict) -> None:
    """Multi-instance pairing (MICLe) for any method: global crops from two images of a case."""
    c.sampler.multi_instance = True


def multi_crop(c: ml_collections.ConfigDict, num_local: int = 6, local_size: int = 96) -> None:
    """SwAV/DINO multi-crop: 2 global crops (area 0.14-1) + `num_local` local (0.05-0.14)."""
    c.crops.global_area = (0.14, 1.0)
    c.crops.num_local = num_local
    c.crops.local_size = local_size
    c.crops.local_area = (0.05, 0.14)


def supervised_config(method: str) -> ml_collections.ConfigDict:
    """Fine-tuning / linear-evaluation defaults (SimCLR's fine-tune recipe unless noted)."""
    c = pretrain_config(method)
    del c.loss, c.linear_probe, c.init_parts, c.sampler, c.crops
    c.model.dtype = "float32"
    c.model.vit_n_last_blocks = 4  # DINO's linear-eval protocol for ViT-S/16 (1536-d)
    c.augment = ml_collections.ConfigDict()
    c.augment.crop = True  # fine-tune augmentations: crop + flip (Azizi et al. 2021)
    c.augment.flip = True
    c.augment.rotation_degrees = 0.0
    c.augment.color_strength = 0.0
    c.optim.name = "sgd"
    c.optim.nesterov = True
    c.optim.base_learning_rate = 0.1  # linear scaling: 0.1 * B / 256
    c.optim.weight_decay = 0.0
    c.optim.warmup_epochs = 0.0
    c.batch_size = 1024
    c.num_epochs = 90.0
    c.data.label_fraction = 1.0  # 0.1 = 10% of the training cases' labels (case level, nested)
    c.val_split = "validation"  # best checkpoint chosen here ('' = keep the last step)
    # Metric the best checkpoint maximises on val_split: '' = balanced_accuracy (multi-class;
    # top1 rewards predicting the majority class on imbalanced sets such as HAM10000) or
    # auc_mean (multi-label). Also top1, auc_mean, kappa_quadratic (graded) or accuracy.
    c.selection_metric = ""
    c.eval_splits = ()  # () = the dataset's own splits except data.split; or e.g. validation,test
    # Other datasets the chosen checkpoint is evaluated on through a label mapping, no further
    # tuning (medssl_jax/cross_eval.py; variants eval_nih, eval_pad_ufes20).
    c.eval_datasets = ml_collections.ConfigDict()
    c.eval_every_steps = 500
    c.graded = False  # True adds quadratic-weighted kappa (graded tasks, e.g. DR grading)
    c.init_checkpoint = ""  # pretraining workdir; '' = random init (supervised baseline)
    c.init_name = "scratch"  # label of the initialisation in results.json / reports
    c.name = ""
    return c


def finetune_demo(c: ml_collections.ConfigDict) -> None:
    """The demo data: tiny ResNet, 64 px, test + shifted test (a couple of minutes on a CPU)."""
    c.data.name = "demo"
    c.data.image_size = 64
    c.model.variant = "r18_0.125x_sk0"
    c.batch_size = 64
    c.num_steps = 300
    c.optim.name = "adam"
    c.optim.base_learning_rate = 0.002
    c.optim.lr_scaling = "none"
    c.optim.warmup_steps = 20
    c.eval_splits = ("validation", "test", "test_shifted")
    c.eval_every_steps = 100
    c.log_every_steps = 50
    c.checkpoint_every_steps = 100


def finetune_chexpert(c: ml_collections.ConfigDict) -> None:
    """CheXpert, 5 competition conditions (mean AUC), U-Ones. Chosen on validation (patients
    held out of train.csv), reported on test (the official valid.csv)."""
    c.data.name = "chexpert"
    c.data.options.uncertainty = "u_ones"
    c.data.options.conditions = "competition"
    c.data.image_size = 224
    c.augment.rotation_degrees = 20.0  # unverified
    c.eval_splits = ("validation", "test")
    c.val_split = "validation"


def finetune_pcam(c: ml_collections.ConfigDict) -> None:
    """PatchCamelyon (96 px lymph-node patches, TFDS catalogue `patch_camelyon` prepared in
    data.data_dir): tumour vs normal, AUC; Truong et al.'s first task."""
    c.data.name = "patch_camelyon"
    c.data.image_size = 96
    c.eval_splits = ("validation", "test")
    c.selection_metric = "auc_mean"


def finetune_dr(c: ml_collections.ConfigDict) -> None:
    """Diabetic retinopathy grading 0-4 (TFDS `diabetic_retinopathy_detection`, manual
    download, btgraham-300), quadratic-weighted kappa chooses the checkpoint."""
    c.data.name = "diabetic_retinopathy"
    c.data.image_size = 224  # unverified (btgraham-300 images, random 224 crops)
    c.graded = True
    c.selection_metric = "kappa_quadratic"
    c.eval_splits = ("validation", "test")


def eval_nih(c: ml_collections.ConfigDict) -> None:
    """CheXpert's 5 competition conditions on NIH ChestX-ray14's official test list (all five
    exist there; 'Pleural Effusion' is NIH's 'Effusion').
    Give --config.eval_datasets.nih.manual_dir."""
    c.eval_datasets.nih = ml_collections.ConfigDict(
        dict(
            name="nih_chestxray14",
            data_dir="",
            manual_dir="",
            options={},
            splits=("test",),
            label_map="Atelectasis=Atelectasis,Cardiomegaly=Cardiomegaly,"
            "Consolidation=Consolidation,Edema=Edema,Pleural Effusion=Effusion",
        )
    )


def eval_pad_ufes20(c: ml_collections.ConfigDict) -> None:
    """HAM10000 diagnoses on PAD-UFES-20 (smartphone images): the shared ones. Our mapping:
    bcc=BCC, mel=MEL, nv=NEV; bkl (benign keratosis-like) = SEK (seborrheic keratosis); akiec
    (actinic keratosis / Bowen's) = ACK (actinic keratosis). PAD's SCC and HAM's df / vasc have
    no counterpart and are not scored. Give --config.eval_datasets.pad_ufes20.manual_dir."""
    c.eval_datasets.pad_ufes20 = ml_collections.ConfigDict(
        dict(
            name="pad_ufes20",
            data_dir="",
            manual_dir="",
            options={},
            splits=("test",),
            label_map="bcc=BCC,mel=MEL,nv=NEV,bkl=SEK,akiec=ACK",
        )
    )


def finetune_derm(c: ml_collections.ConfigDict) -> None:
    """Dermatology multi-class (HAM10000 stand-in; use derm_csv for a 27-way private set)."""
    c.data.name = "ham10000"
    c.data.image_size = 448  # unverified
    c.eval_splits = ("validation", "test")
