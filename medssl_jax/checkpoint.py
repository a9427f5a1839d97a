"""Orbax checkpointing: periodic saves, save on SIGTERM (preemption), resume, and warm starts.

A run's workdir holds `checkpoints/<step>/{state,meta}`. `state` is the whole train state
(step, params, batch_stats, opt_state); `meta` is JSON (config and progress). Restarting with the
same workdir resumes from the latest step; because the input pipeline is a pure function of
(seed, step), the resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def absolute(path: str) -> str:
    """Orbax needs absolute paths: make local ones absolute, leave URLs (gs://...) alone."""
    return path if "://" in path else os.path.abspath(path)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one run directory."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = epath.Path(absolute(workdir)) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, every_steps),
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore `state` (shaped and sharded like `abstract_state`) and `meta` of a step."""
        step = self.manager.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta or {})

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=force,
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionGuard:
    """Records SIGTERM instead of dying so the loop can checkpoint and exit cleanly.

    `requested()` is agreed across processes (any process signalled -> all stop at the same
    step), so multi-host runs save one consistent checkpoint.
    """

    def __init__(self) -> None:
        self._flag = False
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not in the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handler(self, signum: int, frame: object) -> None:
        logging.warning("SIGTERM received: will checkpoint and stop after this step.")
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
        return bool(np.any(flags))


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def _checkpoint_dir(path: str) -> tuple[ocp.CheckpointManager, int]:
    """Accepts a run workdir, its checkpoints/ folder, or one step folder inside it."""
    p = epath.Path(absolute(path))
    if not p.exists():
        raise FileNotFoundError(f"init checkpoint {path!r} does not exist")
    candidates = [p / "checkpoints", p]
    for c in candidates:
        if c.is_dir():
            mngr = _reader(c)
            step = mngr.latest_step()
            if step is not None:
                return mngr, step
            mngr.close()
    if p.name.isdigit() and (p.parent).is_dir():
        return _reader(p.parent), int(p.name)
    raise FileNotFoundError(
        f"no checkpoint found under {path!r} (expected a run workdir with checkpoints/<step>/)"
    )


def load_variables(path: str) -> tuple[dict, dict, int]:
    """(params, batch_stats, step) of the latest checkpoint at `path`, as host NumPy trees.

    A run with an EMA teacher (DINO: `extra['teacher']`) gives the teacher's network, which
    is the one DINO evaluates and transfers.
    """
    mngr, step = _checkpoint_dir(path)
    # Restore onto one local device whatever topology saved it (a pod's pretraining run
    # warm-starts fine-tuning on a single GPU or a laptop).
    tree = mngr.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    state = jax.device_get(restored.state)
    teacher = (state.get("extra") or {}).get("teacher")
    if teacher:
        logging.info("%s holds an EMA teacher: using the teacher's weights", path)
        return dict(teacher["params"]), dict(teacher.get("batch_stats", {})), step
    return dict(state["params"]), dict(state.get("batch_stats", {})), step


def merge_pretrained(
    target: Mapping[str, Any],
    source: Mapping[str, Any],
    parts: Iterable[str],
    *,
    proj_layers: int | None = None,
    what: str = "params",
) -> dict:
    """Copy `parts` ('backbone', 'projection_head', ...) of `source` into `target`.

    For 'projection_head', only `layer_0 .. layer_{proj_layers-1}` are copied when
    `proj_layers` is given (fine-tuning from `ft_proj_selector`). Shapes must match exactly:
    a mismatch raises naming the parameter path (e.g. a different width or depth).
    """
    out = dict(target)
    for part in parts:
        if part not in target or (part == "projection_head" and proj_layers == 0):
            continue
        if part not in source:
            raise KeyError(f"pretrained {what} have no {part!r} (have {sorted(source)})")
        src, tgt = source[part], target[part]
        if part == "projection_head" and proj_layers is not None:
            keep = {f"layer_{i}" for i in range(proj_layers)}
            src = {k: v for k, v in src.items() if k in keep}
            merged = dict(tgt)
            merged.update({k: _check_same(tgt[k], v, f"{what}/{part}/{k}") for k, v in src.items()})
            out[part] = merged
        else:
            out[part] = _check_same(tgt, src, f"{what}/{part}")
    return out


def _check_same(target: Any, source: Any, where: str) -> Any:
    t_leaves = jax.tree_util.tree_leaves_with_path(target)
    s_leaves = jax.tree_util.tree_leaves_with_path(source)
    t_map = {jax.tree_util.keystr(k): v for k, v in t_leaves}
    s_map = {jax.tree_util.keystr(k): v for k, v in s_leaves}
    if set(t_map) != set(s_map):
        missing = sorted(set(t_map) ^ set(s_map))[:5]
        raise ValueError(f"pretrained {where} does not match the model: differing keys {missing}")
    for k, v in t_map.items():
        if tuple(np.shape(v)) != tuple(np.shape(s_map[k])):
            raise ValueError(
                f"pretrained {where}{k} has shape {np.shape(s_map[k])}, model expects "
                f"{np.shape(v)} (different variant or width?)"
            )
    return jax.tree.map(lambda t, s: np.asarray(s, dtype=np.asarray(t).dtype), target, source)


def warm_start(state: Any, path: str, parts: tuple[str, ...], proj_layers: int | None = None):
    """`state` (a TrainState) with `parts` of its params and batch_stats taken from the latest
    checkpoint at `path`; step and optimiser untouched (they start fresh)."""
    params, batch_stats, src_step = load_variables(path)
    host_params = jax.device_get(state.params)
    host_stats = jax.device_get(state.batch_stats)
    new_params = merge_pretrained(host_params, params, parts, proj_layers=proj_layers)
    new_stats = merge_pretrained(
        host_stats, batch_stats, parts, proj_layers=proj_layers, what="batch_stats"
    )
    logging.info("Warm start from %s (step %d): restored %s", path, src_step, parts)
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.batch_stats))
    params_out, stats_out = jax.device_put((new_params, new_stats), shardings)
    return state.replace(params=params_out, batch_stats=stats_out)


def exists(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, "checkpoints"))
