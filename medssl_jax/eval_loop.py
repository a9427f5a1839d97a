"""The one evaluation loop over a split: every process runs the same number of steps (a
process whose shard ran out feeds an all-invalid batch, as the collectives require), outputs
are gathered for the whole split and for this process's own rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from medssl_jax import sharding

__all__ = ["run"]


def run(
    eval_fn: Callable[[dict], Mapping[str, jax.Array]],
    batches: Iterator[Mapping[str, np.ndarray]],
    num_local: int,
    *,
    local_batch: int,
    mesh: jax.sharding.Mesh,
    global_keys: Sequence[str] = (),
    local_keys: Sequence[str] = (),
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """eval_fn(global batch) -> replicated outputs that include the batch's 'valid' (1 = real
    row) and 'index' (the row in this process's split). `batches` are this process's local
    batches of `local_batch` rows covering its `num_local` rows.

    Returns global_keys over the valid rows of every process, and 'local_<key>' for
    local_keys plus 'local_index' over this process's valid rows. `on_batch(b, n)` is
    called after batch b of n (progress).
    """
    n_batches = -(-num_local // local_batch)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        n_batches = int(np.max(multihost_utils.process_allgather(np.asarray(n_batches))))
    padding = None
    out: dict[str, list] = {}
    mine = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
    for b in range(n_batches):
        batch = next(batches, None)
        if batch is None:
            batch = padding
        elif padding is None:
            padding = {k: np.zeros_like(v) for k, v in batch.items()}
        res = jax.device_get(eval_fn(sharding.to_global(batch, mesh)))
        valid = res["valid"] > 0
        for k in global_keys:
            if k in res:
                out.setdefault(k, []).append(res[k][valid])
        keep = res["valid"][mine] > 0
        for k in (*local_keys, "index"):
            out.setdefault(f"local_{k}", []).append(res[k][mine][keep])
        if on_batch is not None:
            on_batch(b, n_batches)
    return {k: np.concatenate(v) for k, v in out.items()}
