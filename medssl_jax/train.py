"""Dispatch `config.method` to its stage: pretraining (any registered method) or supervised."""

from __future__ import annotations

import uuid
from typing import Any

import ml_collections

from data_builders.common import BadInputError
from medssl_jax import checkpoint as ckpt_lib
from medssl_jax import config_lib, dvme, finetune, methods, paths, pretrain
from medssl_jax.case_store import StaleIndexError
from medssl_jax.config_lib import SUPERVISED, ConfigError
from medssl_jax.datasets import DatasetFormatError, DatasetSourceError
from medssl_jax.loop import DivergenceError

# What a user can cause and fix (bad config, data, paths, checkpoints; a diverged run): main.py
# prints these as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError,
    BadInputError,
    ckpt_lib.CheckpointError,
    DivergenceError,
    DatasetFormatError,
    DatasetSourceError,
    StaleIndexError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
)


def quiet_libraries() -> None:
    """Orbax logs every checkpoint phase at INFO; keep its warnings (>= 30), drop the chatter
    (main.py, sweeps and the study call this)."""
    from absl import logging

    logging.get_absl_handler().addFilter(lambda r: r.levelno >= 30 or "/orbax/" not in r.pathname)


def check_workdir(workdir: str) -> str:
    """The absolute workdir (local, or a URL such as gs://), created and proven writable, or
    ConfigError naming the problem; CheckpointError if Orbax cannot write checkpoints there."""
    workdir = ckpt_lib.absolute(workdir)
    ckpt_lib.orbax_path(workdir)  # a scheme Orbax cannot write: say so before training
    path = paths.path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
    probe = path / f".write_test_{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001  (OSError, or an object store's own error)
        text = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [repr(e)])[0]
        raise ConfigError(f"--workdir {workdir!r} is not usable: {text}") from None
    return workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the stage named by `config.method` in `workdir` (resuming if it has checkpoints)."""
    config_lib.normalize_lists(config)  # --config.eval_splits=validation,test: two splits
    workdir = check_workdir(workdir)
    method = config.get("method", "")
    if method in methods.names():
        return pretrain.train_and_evaluate(config, workdir)
    if method in SUPERVISED:
        return finetune.train_and_evaluate(config, workdir)
    if method == "dvme":
        return dvme.train_and_evaluate(config, workdir)
    raise ConfigError(
        f"config.method: {method!r} is neither a pretraining method {methods.names()} nor one "
        f"of {SUPERVISED + ('dvme',)}"
    )
