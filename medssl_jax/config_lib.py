"""Config helpers shared by every stage: validation, model construction, step arithmetic.

`validate` runs before any data is read or anything compiled, so an impossible config fails in
seconds with a message naming the offending field.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from medssl_jax import color_layout, optim, paths

SUPERVISED = ("finetune", "linear_eval")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SAME_PATIENT = ("exclude", "mask", "allow")
SAMPLER_EPOCH_OVER = ("cases", "images")
NAN_POLICIES = ("stop", "skip")
AUGMENT_KEYS = (
    "color_strength",
    "blur",
    "rotation_degrees",
    "flip",
    "grayscale_prob",
    "color_jitter_prob",
    "jitter",  # () = SimCLR's from color_strength; else brightness, contrast, saturation, hue
    "view_blur_prob",  # per view kind: global crop 1, global crop 2, local crops
    "view_solarize_prob",
)


class ConfigError(ValueError):
    """An impossible or inconsistent config; the message names the field."""


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def split_list(value: str) -> tuple[str, ...]:
    """'validation,test' -> ('validation', 'test'): the one list syntax on every command line
    (main.py's --config.<field>=a,b and the benchmark scripts' key=a,b)."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def normalize_lists(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tuple/list fields of strings given as 'a,b' on the command line arrive as ('a,b',):
    split them in place (every field, nested ones too) so that `--config.eval_splits=
    validation,test` means two splits. Returns `config`."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            normalize_lists(value)
        elif isinstance(value, (tuple, list)) and any(
            isinstance(v, str) and "," in v for v in value
        ):
            parts = tuple(p for v in value for p in (split_list(v) if isinstance(v, str) else [v]))
            config[key] = type(value)(parts)
    return config


def parse_value(old: Any, text: str) -> Any:
    """A command-line string as the type of the field's current value (bool, int, float,
    str, tuples with `split_list`)."""
    if isinstance(old, bool):
        if text not in ("True", "False", "true", "false", "1", "0"):
            raise ConfigError(f"expected True or False, got {text!r}")
        return text in ("True", "true", "1")
    if isinstance(old, (tuple, list)):
        return type(old)(split_list(text))
    return type(old)(text) if old is not None else text


def set_field(config: ml_collections.ConfigDict, key: str, text: str, where: str = "") -> None:
    """config[a][b]... = `text` parsed like the field's current value (`parse_value`), for a
    dotted `key` 'a.b' that must exist; ValueError names `where` and the missing part."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise ConfigError(f"{where}{key!r}: no field {part!r}")
        node = node[part]
    if last not in node:
        raise ConfigError(f"{where}{key!r}: no field {last!r}")
    node[last] = parse_value(node[last], text)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field the stages read; raises ConfigError naming the first bad one."""
    from data_builders import KNOWN
    from medssl_jax import methods
    from medssl_jax.models import get_variant

    known = methods.names() + SUPERVISED + ("dvme",)
    _require(config.get("method") in known, "method", f"{config.get('method')!r} not in {known}")
    _require(int(config.batch_size) > 0, "batch_size", f"must be > 0, got {config.batch_size}")
    steps_ok = int(config.get("num_steps", -1)) > 0 or float(config.get("num_epochs", 0)) > 0
    _require(steps_ok, "num_steps", "set num_steps > 0 or num_epochs > 0")
    base = str(config.data.name).partition("/")[0]  # 'name' or 'name/builder_config'
    _require(base in KNOWN, "data.name", f"{config.data.name!r}: {base!r} not in {KNOWN}")
    _require(int(config.data.image_size) >= 16, "data.image_size", "must be >= 16")
    lf = float(config.data.get("label_fraction", 1.0))
    _require(0.0 < lf <= 1.0, "data.label_fraction", f"must be in (0, 1], got {lf}")
    try:
        get_variant(config.model.variant)
    except ValueError as e:
        raise ConfigError(f"config.model.variant: {e}") from None
    _require(
        config.model.dtype in DTYPES,
        "model.dtype",
        f"{config.model.dtype!r} not in {tuple(DTYPES)}",
    )
    remat = config.model.get("remat", False)
    _require(isinstance(remat, bool), "model.remat", f"must be a bool, got {remat!r}")
    if "sharding" in config:
        fsdp = config.sharding.get("fsdp", False)
        _require(isinstance(fsdp, bool), "sharding.fsdp", f"must be a bool, got {fsdp!r}")
        low = config.sharding.get("low_memory_schedule", False)
        _require(
            isinstance(low, bool), "sharding.low_memory_schedule", f"must be a bool, got {low!r}"
        )
        min_size = config.sharding.get("fsdp_min_size", 0)
        _require(
            isinstance(min_size, int) and not isinstance(min_size, bool) and min_size >= 0,
            "sharding.fsdp_min_size",
            f"must be an int >= 0, got {min_size!r}",
        )
    _require(config.optim.name in optim.OPTIMIZERS, "optim.name", f"not in {optim.OPTIMIZERS}")
    _require(
        config.optim.lr_scaling in optim.LR_SCALINGS,
        "optim.lr_scaling",
        f"{config.optim.lr_scaling!r} not in {optim.LR_SCALINGS}",
    )
    _require(float(config.optim.base_learning_rate) > 0, "optim.base_learning_rate", "must be > 0")
    wd_end = config.optim.get("weight_decay_end", None)
    if wd_end is not None:
        _require(config.optim.name == "adamw", "optim.weight_decay_end", "is for adamw only")
        _require(float(wd_end) >= 0, "optim.weight_decay_end", "must be >= 0")
    for f in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _require(int(config[f]) > 0, f, f"must be > 0, got {config[f]}")
    if config.method in SUPERVISED + ("dvme",):
        every = config.get("eval_every_steps", 1)
        _require(int(every) > 0, "eval_every_steps", f"must be > 0, got {every}")
    policy = config.get("nan_policy", "stop")
    _require(policy in NAN_POLICIES, "nan_policy", f"{policy!r} not in {NAN_POLICIES}")
    _require(int(config.get("nan_max_skips", 1)) >= 1, "nan_max_skips", "must be >= 1")
    if config.method in methods.names():
        for k in AUGMENT_KEYS:
            _require(k in config.augment, f"augment.{k}", "missing")
        on_device = config.augment.get("on_device", False)
        _require(
            isinstance(on_device, bool), "augment.on_device", f"must be a bool, got {on_device!r}"
        )
        _validate_view_colour(config.augment, _require)
        _require("sampler" in config, "sampler", "missing (multi_instance, same_patient)")
        sp = config.sampler.same_patient
        _require(sp in SAME_PATIENT, "sampler.same_patient", f"{sp!r} not in {SAME_PATIENT}")
        _validate_sampler(config.sampler, _require)
        method = methods.get(config.method)
        if method.defaults() is not None:
            _require(method.name in config, method.name, "missing: the method's config section")
        method.validate(config, _require)
    if config.method == "dvme":
        from medssl_jax import dvme

        dvme.validate(config)
    path = config.get("init_checkpoint", "")
    if path:
        _require(paths.path(path).exists(), "init_checkpoint", f"{path!r} does not exist")
        _validate_converted(config, path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_view_colour(augment: ml_collections.ConfigDict, require) -> None:
    """augment.jitter: () or 4 strengths (finite, >= 0, hue <= 0.5); view_blur_prob and
    view_solarize_prob: 3 probabilities (global crop 1, global crop 2, local crops)."""
    jitter = augment.jitter
    require(isinstance(jitter, (tuple, list)), "augment.jitter", f"must be a tuple, got {jitter!r}")
    if jitter:
        try:
            color_layout.check_jitter(jitter)
        except ValueError as e:
            require(False, "augment.jitter", str(e))
    for key in ("view_blur_prob", "view_solarize_prob"):
        probs = augment[key]
        require(
            isinstance(probs, (tuple, list))
            and len(probs) == 3
            and all(_is_number(p) and 0.0 <= p <= 1.0 for p in probs),
            f"augment.{key}",
            "must be 3 probabilities in [0, 1] (global crop 1, global crop 2, local crops), "
            f"got {probs!r}",
        )


def _validate_sampler(sampler: ml_collections.ConfigDict, require) -> None:
    """Multi-instance options need multi-instance pairing (they would silently do nothing)."""
    p = sampler.get("distinct_prob", 1.0)
    require(
        isinstance(p, (int, float)) and 0.0 <= float(p) <= 1.0,
        "sampler.distinct_prob",
        f"must be a number in [0, 1], got {p!r}",
    )
    over = sampler.get("epoch_over", "cases")
    require(
        over in SAMPLER_EPOCH_OVER, "sampler.epoch_over", f"{over!r} not in {SAMPLER_EPOCH_OVER}"
    )
    if not sampler.multi_instance:
        for key, default in (("distinct_prob", 1.0), ("epoch_over", "cases")):
            value = sampler.get(key, default)
            require(
                value == default,
                f"sampler.{key}",
                f"{value!r} needs sampler.multi_instance=True (MICLe pairing)",
            )


# Model fields that change what the same weights compute (input normalisation, stem), with
# their defaults: a warm start must keep the source's, and every pipeline stage the first's.
WARM_START_FIELDS = {"input_norm": "none", "torch_maxpool": False, "cifar_stem": False}


def _validate_converted(config: ml_collections.ConfigDict, path: str) -> None:
    """A converted release (converted.json) must meet a model that computes what its source
    network did: same variant, input normalisation, max-pool padding and, when its projection
    head is restored, the same head shape."""
    from medssl_jax.convert.common import read_info
    from medssl_jax.models import get_variant

    info = read_info(path)
    if info is None:
        _validate_run_model(config, path)
        return
    src = f"init_checkpoint {path!r} (converted from {info.get('format')})"
    _require(
        get_variant(config.model.variant) == get_variant(info["variant"]),
        "model.variant",
        f"{config.model.variant!r}, but {src} holds {info['variant']!r}",
    )
    for field, default in WARM_START_FIELDS.items():
        want, have = info.get(field, default), config.model.get(field, default)
        _require(
            have == want,
            f"model.{field}",
            f"{have!r}, but {src} expects {want!r}: set --config.model.{field}={want}",
        )
    head_wanted = "projection_head" in tuple(config.get("init_parts", ())) or (
        int(config.model.get("ft_proj_selector", 0)) > 0
    )
    if head_wanted and "projection_head" in info.get("parts", ()):
        for field in ("num_proj_layers", "proj_out_dim"):
            if field in info and int(config.model[field]) != int(info[field]):
                _require(
                    False,
                    f"model.{field}",
                    f"{config.model[field]}, but the projection head of {src} has "
                    f"{field}={info[field]}: set --config.model.{field}={info[field]} or leave "
                    "the head out (--config.init_parts=backbone, ft_proj_selector=0)",
                )


def _validate_run_model(config: ml_collections.ConfigDict, path: str) -> None:
    """A run's workdir records its config: a warm start must keep the fields that change what
    its network computes from the same weights (input normalisation, stem)."""
    from medssl_jax import checkpoint

    try:
        meta, _ = checkpoint.load_meta(path)
    except (FileNotFoundError, ValueError):  # not a run's workdir: the warm start says why
        return
    saved = (meta.get("config") or {}).get("model") or {}
    for field, default in WARM_START_FIELDS.items():
        want, have = saved.get(field, default), config.model.get(field, default)
        _require(
            have == want,
            f"model.{field}",
            f"{have!r}, but init_checkpoint {path!r} was trained with {want!r}: set "
            f"--config.model.{field}={want}",
        )


def model_from_config(config: ml_collections.ConfigDict, *, num_classes: int, **overrides: Any):
    """The SimCLRModel named by `config.model` (variant + head fields), with `overrides`."""
    from medssl_jax.models import create_model

    m = config.model
    fields = dict(
        num_proj_layers=int(m.num_proj_layers),
        proj_out_dim=int(m.proj_out_dim),
        ft_proj_selector=int(m.get("ft_proj_selector", 0)),
        dtype=DTYPES[m.dtype],
        bn_momentum=float(m.get("bn_momentum", 0.9)),
        cifar_stem=bool(m.get("cifar_stem", False)),
        torch_maxpool=bool(m.get("torch_maxpool", False)),
        input_norm=str(m.get("input_norm", "none")),
        vit_n_last_blocks=int(m.get("vit_n_last_blocks", 1)),
        vit_avgpool=bool(m.get("vit_avgpool", False)),
        remat=bool(m.get("remat", False)),
    )
    fields.update(overrides)
    return create_model(m.variant, num_classes=num_classes, **fields)


def steps(config: ml_collections.ConfigDict, epoch_items: int) -> tuple[int, int]:
    """(total_steps, warmup_steps): SimCLR's N*epochs//B + 1 unless num_steps is set."""
    b = int(config.batch_size)
    if int(config.get("num_steps", -1)) > 0:
        total = int(config.num_steps)
    else:
        total = int(epoch_items * float(config.num_epochs)) // b + 1
    ws = int(config.optim.get("warmup_steps", -1))
    warmup = ws if ws >= 0 else int(round(float(config.optim.warmup_epochs) * epoch_items / b))
    return total, min(warmup, total)


def augment_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: config.augment[k] for k in AUGMENT_KEYS}
