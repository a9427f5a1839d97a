"""Optimisers and learning-rate schedules (SimCLR conventions) built from a config.

LARS excludes BatchNorm parameters and biases from weight decay and from trust-ratio scaling;
the supervised head (online probe / fine-tuning head) gets weight decay but no trust ratio, as in
SimCLRv2. Learning rates scale with the global batch ("linear": base*B/256, "sqrt": base*sqrt(B)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import optax

OPTIMIZERS = ("lars", "sgd", "adam", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")


def scaled_learning_rate(base: float, batch_size: int, scaling: str) -> float:
    """Peak learning rate for a global batch size (SimCLR's `learning_rate_scaling`)."""
    if scaling == "linear":
        return base * batch_size / 256.0
    if scaling == "sqrt":
        return base * math.sqrt(batch_size)
    if scaling == "none":
        return base
    raise ValueError(f"config.optim.lr_scaling={scaling!r}: expected one of {LR_SCALINGS}")


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at total."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The names along a pytree key path (dict keys, attributes, indices as strings)."""
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


# Decayed leaves: conv/dense kernels, the ViT's class token and position embeddings, and DINO's
# learned last-layer gain (DINO decays every parameter but biases and 1-D ones; its cls_token and
# pos_embed are 3-D, and weight_norm's weight_g is [out_dim, 1], our `gain` [out_dim]).
DECAYED = ("kernel", "cls_token", "pos_embed", "gain")


def decay_mask(params: Any) -> Any:
    """True for kernels (and ViT tokens): BN / LayerNorm scale and bias, biases are excluded."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_names(p)[-1] in DECAYED, params)


def trust_ratio_mask(params: Any) -> Any:
    """Like `decay_mask` but also excludes the supervised head (SimCLRv2)."""

    def f(path, _):
        names = path_names(path)
        return names[-1] in DECAYED and "supervised_head" not in names

    return jax.tree_util.tree_map_with_path(f, params)


def with_probe_head(
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    peak: float,
    probe_learning_rate: float,
) -> optax.GradientTransformation:
    """Pretraining optimiser with the online probe head on its own Adam rate.

    The probe sees stop_gradient features whose scale drifts as the backbone trains: SimCLR's
    raw LARS rate (often > 1 with sqrt scaling), or any fixed SGD rate, makes a linear head on
    large un-normalised features diverge; Adam is invariant to that scale. The probe follows
    the backbone's warm-up/cosine shape, rescaled to peak at `probe_learning_rate`.
    """
    scale = probe_learning_rate / peak if peak > 0 else 0.0
    probe = optax.adam(lambda s: learning_rate(s) * scale)

    def labels(params: Any) -> Any:
        return {
            k: jax.tree.map(lambda _, k=k: "probe" if k == "supervised_head" else "body", v)
            for k, v in params.items()
        }

    return optax.multi_transform({"body": tx, "probe": probe}, labels)


def weight_decay_schedule(start: float, end: float, total_steps: int) -> optax.Schedule:
    """DINO's weight decay: cosine from `start` to `end` over the run."""
    if start <= 0:
        return optax.constant_schedule(end)
    return optax.cosine_decay_schedule(start, max(int(total_steps), 1), alpha=end / start)


def make_optimizer(
    optim: Mapping[str, Any], learning_rate: optax.Schedule, total_steps: int = 1
) -> optax.GradientTransformation:
    """The optimiser named by `optim.name` with the SimCLR parameter masks. AdamW with
    `optim.weight_decay_end` set follows DINO: weight decay cosine from weight_decay to it."""
    name = optim["name"]
    wd = float(optim.get("weight_decay", 0.0))
    wd_end = optim.get("weight_decay_end", None)
    if wd_end is not None:
        if name != "adamw":
            raise ValueError(
                f"config.optim.weight_decay_end is for adamw (DINO's ViT recipe), not {name!r}"
            )
        schedule = weight_decay_schedule(wd, float(wd_end), total_steps)
        return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=learning_rate, weight_decay=schedule, mask=decay_mask
        )
    momentum = float(optim.get("momentum", 0.9))
    if name == "lars":
        return optax.lars(
            learning_rate,
            weight_decay=wd,
            weight_decay_mask=decay_mask,
            trust_coefficient=float(optim.get("trust_coefficient", 1e-3)),
            eps=0.0,
            trust_ratio_mask=trust_ratio_mask,
            momentum=momentum,
            nesterov=bool(optim.get("nesterov", False)),
        )
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.sgd(
                learning_rate, momentum=momentum, nesterov=bool(optim.get("nesterov", False))
            ),
        )
    if name == "adam":
        return optax.chain(
            optax.add_decayed_weights(wd, mask=decay_mask), optax.adam(learning_rate)
        )
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=wd, mask=decay_mask)
    raise ValueError(f"config.optim.name={name!r}: expected one of {OPTIMIZERS}")


def from_config(
    config: Mapping[str, Any], total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule, float]:
    """(optimiser, schedule, peak rate) for `config.optim` at `config.batch_size`."""
    peak = scaled_learning_rate(
        config["optim"]["base_learning_rate"], config["batch_size"], config["optim"]["lr_scaling"]
    )
    lr = learning_rate_schedule(peak, total_steps, warmup_steps)
    return make_optimizer(config["optim"], lr, total_steps), lr, peak
