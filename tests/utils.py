"""Shared test helpers: tiny configs and synthetic batches."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


def tiny_pretrain_config(config_name: str = "simclr", /, **overrides):
    """A tiny ResNet on 32 px demo data: compiles in seconds on 2 cores. `config_name` is a config
    file name (simclr, micle, swav, dino, hybrid); multi-crop methods get 2 local 16 px crops."""
    import importlib

    c = importlib.import_module(config_name).get_config("demo")
    c.data.image_size = 32  # unit tests: small and fast (the demo config uses 64)
    c.batch_size = 16
    c.num_steps = 6
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    if c.crops.num_local:
        c.crops.num_local, c.crops.local_size = 2, 16
    if "swav" in c:
        c.swav.num_prototypes, c.swav.queue_length = 16, 0
    if "dino" in c:
        c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 64, 32, 16
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def synthetic_pretrain_batch(
    seed: int, batch: int, size: int, num_classes: int, num_local: int = 0, local_size: int = 16
) -> dict:
    rng = np.random.default_rng(seed)
    local = {}
    if num_local:
        shape = (batch, num_local, local_size, local_size, 3)
        local["local_views"] = rng.uniform(size=shape).astype(np.float32)
    return {
        **local,
        "views": rng.uniform(size=(batch, 2, size, size, 3)).astype(np.float32),
        "label": rng.integers(-1, num_classes, size=batch).astype(np.int32),
        "patient_key": rng.integers(0, 4, size=batch).astype(np.int32),
        "distinct": (rng.uniform(size=batch) < 0.5).astype(np.float32),
    }


def step_through(built, mesh, batches) -> tuple:
    """(initial state on host, final state on device, metrics per step on host) of running
    `built.step` over host `batches` (keys the step does not take are dropped)."""
    import jax

    from medssl_jax import sharding

    state = built.init(jax.random.key(0))
    init = jax.device_get(state)
    metrics = []
    for b in batches:
        b = {k: v for k, v in b.items() if k in built.abstract_batch}
        state, m = built.step(state, sharding.to_global(b, mesh))
        metrics.append(jax.device_get(m))
    return init, state, metrics
