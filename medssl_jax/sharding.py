"""Device mesh and shardings: the global batch is split on the 'data' axis, state is replicated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D Mesh('data') over all devices of all processes (or the given ones)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "config.batch_size") -> int:
    """Per-process batch size; raises naming `field` when it cannot be split evenly."""
    n_dev = mesh.devices.size
    if global_batch <= 0 or global_batch % n_dev:
        from medssl_jax.config_lib import ConfigError

        raise ConfigError(
            f"{field}={global_batch} must be a positive multiple of the number of devices "
            f"({n_dev} over {jax.process_count()} process(es))"
        )
    return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the global batch (numeric leaves only) -> global jax.Arrays."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
        if np.asarray(v).dtype.kind in "biuf"
    }


def abstract_like(tree: Any, sharding: NamedSharding) -> Any:
    """ShapeDtypeStructs (with sharding) for every leaf: for lowering/AOT compilation."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
