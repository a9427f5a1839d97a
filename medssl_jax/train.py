"""Dispatch `config.method` to its stage: pretraining (any registered method) or supervised."""

from __future__ import annotations

import os
import uuid
from typing import Any

import ml_collections

from data_builders.common import BadInputError
from medssl_jax import checkpoint as ckpt_lib
from medssl_jax import finetune, methods, pretrain
from medssl_jax.case_store import StaleIndexError
from medssl_jax.config_lib import SUPERVISED, ConfigError
from medssl_jax.datasets import DatasetFormatError
from medssl_jax.loop import DivergenceError

# What a user can cause and fix (bad config, data, paths, checkpoints; a diverged run): main.py
# prints these as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError,
    BadInputError,
    ckpt_lib.CheckpointError,
    DivergenceError,
    DatasetFormatError,
    StaleIndexError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
)


def check_workdir(workdir: str) -> str:
    """The absolute workdir, created and proven writable, or ConfigError naming the problem."""
    workdir = ckpt_lib.absolute(workdir)
    if "://" in workdir:
        return workdir  # object stores: orbax reports their errors
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir!r} is not usable: {e.strerror or e}") from None
    return workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the stage named by `config.method` in `workdir` (resuming if it has checkpoints)."""
    workdir = check_workdir(workdir)
    method = config.get("method", "")
    if method in methods.names():
        return pretrain.train_and_evaluate(config, workdir)
    if method in SUPERVISED:
        return finetune.train_and_evaluate(config, workdir)
    raise ConfigError(
        f"config.method: {method!r} is neither a pretraining method {methods.names()} nor one "
        f"of {SUPERVISED}"
    )
