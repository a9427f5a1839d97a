"""Dispatch `config.method` to its stage: pretraining (any registered method) or supervised."""

from __future__ import annotations

from typing import Any

import ml_collections

from medssl_jax import checkpoint as ckpt_lib
from medssl_jax import finetune, methods, pretrain
from medssl_jax.config_lib import SUPERVISED


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the stage named by `config.method` in `workdir` (resuming if it has checkpoints)."""
    workdir = ckpt_lib.absolute(workdir)
    method = config.get("method", "")
    if method in methods.names():
        return pretrain.train_and_evaluate(config, workdir)
    if method in SUPERVISED:
        return finetune.train_and_evaluate(config, workdir)
    from medssl_jax.config_lib import ConfigError

    raise ConfigError(
        f"config.method: {method!r} is neither a pretraining method {methods.names()} nor one "
        f"of {SUPERVISED}"
    )
