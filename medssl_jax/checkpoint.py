"""Orbax checkpointing: periodic saves, save on SIGTERM (preemption), resume, and warm starts.

A run's workdir holds `checkpoints/<step>/{state,meta}`. `state` is the whole train state
(step, params, batch_stats, opt_state, extra); `meta` is JSON (config and progress). Restarting
with the same workdir resumes from the newest usable step; because the input pipeline is a pure
function of (seed, step), the resumed run sees exactly the batches the uninterrupted run would
have seen.

Orbax writes a step into a temporary folder and renames it when complete, so a process killed
mid-save (even mid async save) leaves the previous steps as they were. A newest step that is
unreadable (truncated or missing file) or holds non-finite values is reported, moved aside to
`checkpoints/unusable_<step>_<reason>` and the previous one used; a checkpoint written by a
different model (other shapes) is an error naming the first differing array.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from medssl_jax import paths


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or does not fit this run; the message names it."""


def absolute(path: str) -> str:
    """Orbax needs absolute paths: make local ones absolute, leave URLs (gs://...) alone."""
    return paths.absolute(path)


# Orbax writes array bytes through TensorStore, whose drivers are local files and GCS only.
ORBAX_SCHEMES = ("gs://",)


def orbax_path(path: str | os.PathLike) -> epath.Path:
    """`path` as a folder Orbax can read and write: a local one (made absolute) or gs://.

    Other schemes (ram://, s3://, ...) raise CheckpointError: epath speaks them, but Orbax's
    array files go through TensorStore, which writes local folders or gs:// only.
    """
    text = os.fspath(path)
    if "://" in text and not text.startswith(ORBAX_SCHEMES):
        raise CheckpointError(
            f"{text!r}: Orbax checkpoints need a local folder or one of {ORBAX_SCHEMES} "
            "(TensorStore, which writes the arrays, speaks no other scheme)"
        )
    return epath.Path(absolute(text))


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` is finite (one reduction on device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'params/backbone/conv/kernel' -> shape, for a state, its abstract form or its metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(re.findall(r"[A-Za-z0-9_\-]+", jax.tree_util.keystr(path)))
        out[name] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return out


def check_compatible(saved: Any, abstract_state: Any, where: str) -> None:
    """Raises CheckpointError naming the first array whose presence or shape differs."""
    have, want = _shapes(saved), _shapes(abstract_state)
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise CheckpointError(
                f"checkpoint {where} was written by a different model or method: {name} is "
                f"{have.get(name, 'absent')} there and {want.get(name, 'absent')} in this "
                "config. Use a new --workdir (or the config that wrote this one); to start "
                "from its weights instead, set init_checkpoint."
            )


def _first_line(e: object) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:300] if text else "") or type(e).__name__


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one run directory."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = orbax_path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, every_steps),
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

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

    def restore_newest_usable(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest step that restores and is finite, or None.

        Unusable steps are logged and moved aside; a step with other shapes than
        `abstract_state` raises CheckpointError (the workdir belongs to another config).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self.manager.item_metadata(step)["state"]
                if saved is None:
                    raise ValueError("no readable 'state' metadata")
            except Exception as e:  # noqa: BLE001  (unreadable metadata: a corrupt step)
                self._set_aside(step, "unreadable", e)
                continue
            check_compatible(saved, abstract_state, f"{self.directory}/{step}")
            try:
                state, meta = self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001  (truncated or missing array files)
                self._set_aside(step, "unreadable", e)
                continue
            if not all_finite(state):
                self._set_aside(step, "nonfinite", "it holds NaN or inf values")
                continue
            return state, meta, step
        return None

    def _set_aside(self, step: int, reason: str, why: object) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"unusable_{step}_{reason}"
        logging.warning(
            "Checkpoint %s is unusable (%s); moving it to %s and trying the previous one.",
            src,
            _first_line(why),
            dst.name,
        )
        if jax.process_index() == 0:
            n = 1
            while dst.exists():
                dst, n = self.directory / f"unusable_{step}_{reason}.{n}", n + 1
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started.

        A failed write (disk full, permissions; also one of an earlier async save) raises
        CheckpointError; the steps already saved stay as they were.
        """
        if step in self.manager.all_steps():
            return False
        try:
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001  (whatever orbax's writers raise)
            raise self._write_error(step, e) from e

    def _write_error(self, step: int | None, e: Exception) -> CheckpointError:
        kept = [s for s in self.manager.all_steps() if s != step]
        return CheckpointError(
            f"could not write a checkpoint in {self.directory} ({_first_line(e)}). Earlier "
            f"checkpoints are intact (newest: {max(kept) if kept else 'none'}); free space or "
            "fix permissions, then rerun to resume."
        )

    def close(self) -> None:
        """Waits for a pending async save (raising CheckpointError if it failed), then closes."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(None, e) from e
        finally:
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
    p = orbax_path(path)
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


def latest_step(path: str) -> int:
    """The newest step saved under `path` (a run workdir, its checkpoints/ or a step folder);
    FileNotFoundError naming the path when it holds none (e.g. a typo'd run folder)."""
    mngr, step = _checkpoint_dir(path)
    mngr.close()
    return step


def _best_reader(path: str) -> ocp.CheckpointManager:
    """Reads `path/best` (finetune.BestKeeper writes it: {'variables', 'meta'})."""
    handlers = {"variables": ocp.StandardCheckpointHandler()}
    return ocp.CheckpointManager(orbax_path(path) / "best", item_handlers=handlers)


def reported_best_step(path: str) -> int | None:
    """The step of `path/best` (a fine-tune or DVME run's validation-selected weights) when the
    run's results.json reports that step, else None (no best/, or the run has not finished)."""
    import json

    p = orbax_path(path)
    best, results = p / "best", p / "results.json"
    if not (best.is_dir() and results.is_file()):
        return None
    step = json.loads(results.read_text()).get("step")
    mngr = _best_reader(path)
    try:
        return step if step is not None and step == mngr.latest_step() else None
    finally:
        mngr.close()


def _restore_on_host(mngr: ocp.CheckpointManager, step: int, item: str) -> Any:
    """`item` of `step` as host NumPy, restored onto one local device whatever topology saved
    it (a pod's run warm-starts fine-tuning on a single GPU or a laptop); closes `mngr`."""
    try:
        tree = mngr.item_metadata(step)[item]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
        )
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        return jax.device_get(mngr.restore(step, args=args)[item])
    finally:
        mngr.close()


def _load_best(path: str, step: int) -> tuple[dict, dict, int]:
    v = _restore_on_host(_best_reader(path), step, "variables")
    logging.info(
        "%s: using best/%d, the validation-selected weights results.json reports", path, step
    )
    return dict(v["params"]), dict(v.get("batch_stats") or {}), step


def load_variables(path: str) -> tuple[dict, dict, int]:
    """(params, batch_stats, step) of the model a run at `path` stands for, as host NumPy trees:
    a finished fine-tune / DVME run's validation-selected `best/` weights (those its
    results.json reports), else the latest checkpoint.

    A run with an EMA teacher (DINO: `extra['teacher']`) gives the teacher's network, which
    is the one DINO evaluates and transfers.
    """
    best = reported_best_step(path)
    if best is not None:
        return _load_best(path, best)
    mngr, step = _checkpoint_dir(path)
    state = _restore_on_host(mngr, step, "state")
    teacher = (state.get("extra") or {}).get("teacher")
    if teacher:
        logging.info("%s holds an EMA teacher: using the teacher's weights", path)
        return dict(teacher["params"]), dict(teacher.get("batch_stats", {})), step
    return dict(state["params"]), dict(state.get("batch_stats", {})), step


def load_meta(path: str) -> tuple[dict, int]:
    """(meta, step) of the latest checkpoint at `path`: what the run recorded beside its state
    (method, label, its whole config)."""
    mngr, step = _checkpoint_dir(path)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        mngr.close()
    return dict(meta or {}), step


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
    """`state` (a TrainState) with `parts` of its params and batch_stats taken from the run at
    `path` (`load_variables`: its latest checkpoint, or a finished fine-tune's best/); step and
    optimiser untouched (they start fresh).

    A converted release (converted.json) restores the requested parts it holds; the others
    (e.g. the projection head of a SimCLRv1 or DINO file) keep their random init, logged.
    """
    from medssl_jax.convert.common import read_info

    info = read_info(path)
    if info is not None:
        absent = [p for p in parts if p not in info["parts"]]
        if absent:
            logging.warning(
                "%s (converted from %s) holds no %s: those start from random init",
                path,
                info.get("format"),
                absent,
            )
        parts = tuple(p for p in parts if p in info["parts"])
    params, batch_stats, src_step = load_variables(path)
    # Whole values on every host: with FSDP over several hosts no process holds all of them.
    from jax.experimental import multihost_utils

    host_params, host_stats = multihost_utils.process_allgather(
        (state.params, state.batch_stats), tiled=True
    )
    try:
        new_params = merge_pretrained(host_params, params, parts, proj_layers=proj_layers)
        new_stats = merge_pretrained(
            host_stats, batch_stats, parts, proj_layers=proj_layers, what="batch_stats"
        )
    except (KeyError, ValueError) as e:  # another variant or method wrote it
        msg = e.args[0] if e.args else str(e)
        raise CheckpointError(
            f"config.init_checkpoint {path!r} (step {src_step}) does not fit this model "
            f"(config.model.variant and heads): {msg}"
        ) from None
    logging.info("Warm start from %s (step %d): restored %s", path, src_step, parts)
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.batch_stats))
    params_out, stats_out = jax.device_put((new_params, new_stats), shardings)
    return state.replace(params=params_out, batch_stats=stats_out)


def exists(workdir: str) -> bool:
    return (orbax_path(workdir) / "checkpoints").is_dir()
