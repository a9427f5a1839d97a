"""Shared test helpers: tiny configs and synthetic batches."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


def tiny_pretrain_config(method: str = "simclr", **overrides):
    """A tiny ResNet on 32 px demo data: compiles in seconds on 2 cores."""
    import common

    c = common.pretrain_config(method)
    common.demo(c)
    c.model.variant = "r18_0.125x_sk0"
    c.data.image_size = 32  # unit tests: small and fast (the demo config uses 64)
    c.batch_size = 16
    c.num_steps = 6
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    if method == "micle":
        c.micle = common.micle_defaults()
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def synthetic_pretrain_batch(seed: int, batch: int, size: int, num_classes: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "views": rng.uniform(size=(batch, 2, size, size, 3)).astype(np.float32),
        "label": rng.integers(-1, num_classes, size=batch).astype(np.int32),
        "patient_key": rng.integers(0, 4, size=batch).astype(np.int32),
        "distinct": (rng.uniform(size=batch) < 0.5).astype(np.float32),
    }
