"""Device mesh and shardings: the global batch is split on the 'data' axis; the train state is
replicated (data parallelism) or, with FSDP, its large arrays are split on 'data' as well."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_MIN_SIZE = 2**14  # arrays with fewer elements stay replicated under FSDP
T = TypeVar("T")


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D Mesh('data') over all devices of all processes (or the given ones), each
    process's devices side by side (a stable sort by process): process p's rows of a global
    batch are then rows [p * local, (p + 1) * local), as eval_loop and the pipeline assume,
    whatever order jax lists the devices in."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: d.process_index)
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


def fsdp_sharding(
    shape: tuple[int, ...], mesh: Mesh, min_size: int = FSDP_MIN_SIZE
) -> NamedSharding:
    """FSDP placement of one array: split over 'data' on its largest dimension divisible by
    the number of devices on that axis (the last such one on ties); replicated if it has fewer
    than `min_size` elements, no such dimension, or the axis has a single device."""
    n = mesh.shape[DATA_AXIS]
    dims = [(d, i) for i, d in enumerate(shape) if d % n == 0]
    if n == 1 or not dims or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    _, axis = max(dims)
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def fsdp_options(config: Any) -> dict[str, Any]:
    """{'fsdp': bool, 'fsdp_min_size': int} from config.sharding (absent: plain data parallel)."""
    section = config.get("sharding") or {}
    return {
        "fsdp": bool(section.get("fsdp", False)),
        "fsdp_min_size": int(section.get("fsdp_min_size", FSDP_MIN_SIZE)),
    }


def abstract_like(tree: Any, sharding: NamedSharding) -> Any:
    """ShapeDtypeStructs (with sharding) for every leaf: for lowering/AOT compilation."""
    return abstract_with(tree, jax.tree.map(lambda _: sharding, tree))


def abstract_with(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves, each with its own sharding from `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


_BARRIERS: dict[str, int] = {}
_DAY_MS = 24 * 3600 * 1000


def _distributed() -> Any:
    """jax.distributed's state (its coordination-service client; no public API offers a
    barrier with a long time-out or a key-value store)."""
    from jax._src import distributed

    return distributed.global_state


def process_ids() -> tuple[int, int]:
    """(this process, number of processes) from jax.distributed's state, without starting a
    backend (data-only tools such as `prepare` must not claim the accelerator); (0, 1) when
    jax.distributed is not initialised."""
    state = _distributed()
    if state.client is None:
        return 0, 1
    return int(state.process_id), int(state.num_processes)


def _unique(name: str) -> str:
    _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
    return f"{name}#{_BARRIERS[name]}"


def barrier(name: str) -> None:
    """All processes meet here (nothing with one process). The coordination service's barrier
    waits up to a day: what the others wait for (a dataset being prepared) can take longer
    than a collective's time-out. Every process must call it in the same order."""
    if process_ids()[1] > 1:
        _distributed().client.wait_at_barrier(_unique(name), _DAY_MS)


def first_then_others(name: str, fn: Callable[[], T], others: Callable[[], T] | None = None) -> T:
    """`fn()` on process 0, then, once it has finished, `others()` (default `fn`) on the rest:
    e.g. preparing a dataset in a folder they share. If it failed on process 0 the others raise
    naming that error rather than run (or wait forever). One process: `fn()`."""
    pid, count = process_ids()
    if count == 1:
        return fn()
    client, key = _distributed().client, _unique(f"status {name}")
    if pid == 0:
        try:
            out = fn()
        except BaseException as e:
            client.key_value_set(
                key, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            )
            raise
        client.key_value_set(key, "ok")
        return out
    status = client.blocking_key_value_get(key, _DAY_MS)
    if status != "ok":
        raise RuntimeError(f"process 0 could not {name}: {status.removeprefix('failed: ')}")
    return (others or fn)()


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (itself with one): decisions that lead into
    collectives (skip work whose result is cached) must be the same on all processes."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))
