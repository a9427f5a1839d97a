"""The generic training loop of every stage (each pretraining method, fine-tuning, linear eval).

A stage supplies a compiled step `(state, batch) -> (state, metrics)` and a batch iterator that
starts at any step; this loop owns everything else: resume from the workdir, checkpoints on an
interval / at the end / on SIGTERM, NaN guard, clu metric writers, progress with images/sec and
ETA, collapse warnings, and the run summary.

NaN guard: only a finite state is ever checkpointed. A non-finite loss (or state at a save)
stops the run with DivergenceError naming the newest checkpoint, which a rerun resumes from;
with nan_policy='skip' the step drops such updates itself (state.skip_nonfinite) and the loop
logs them, stopping after nan_max_skips in a row.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from medssl_jax import checkpoint as ckpt_lib
from medssl_jax import paths, results, sharding
from medssl_jax.state import TrainState


class DivergenceError(FloatingPointError):
    """The loss or the state became NaN/inf; the message names the newest finite checkpoint."""


def write_json(path: str | os.PathLike, obj: Mapping[str, Any]) -> None:
    """Writes JSON to a temporary name, then renames it into place (process 0 only); any
    filesystem epath speaks (local, gs://, ...)."""
    if jax.process_index() != 0:
        return
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(results.json_text(obj))
    tmp.replace(path)


# Summary entries a resumed run continues from its checkpoint's meta (see `_carried_summary`).
CARRIED = ("first_metrics", "collapse_warnings", "skipped_steps")


def _mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def fit(
    *,
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]],
    make_batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
    batch_keys: tuple[str, ...],
    total_steps: int,
    global_batch_size: int,
    images_per_example: int,
    restore_abstract: Any,
    meta: Mapping[str, Any],
    epoch_of_step: Callable[[int], float] | None = None,
    after_step: Callable[[int, TrainState], None] | None = None,
    check_collapse: Callable[[Mapping[str, float]], str | None] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Trains from the latest checkpoint in `workdir` (or `state`) up to `total_steps`.

    Returns the final state and a summary (final metrics averaged over the last log window,
    throughput, resume information, stop reason, collapse warnings). `check_collapse` maps the
    logged metrics to a warning text (or None) at every log step. Raises FloatingPointError on
    a NaN/inf loss, leaving the last good checkpoint in place.
    """
    checkpointer = ckpt_lib.Checkpointer(
        workdir,
        every_steps=int(config.checkpoint_every_steps),
        keep=int(config.keep_checkpoints),
        async_save=bool(config.get("async_checkpointing", True)),
    )
    start_step = 0
    found = checkpointer.restore_newest_usable(restore_abstract)
    # What the earlier pieces of a resumed run logged (saved with each checkpoint), so the
    # summary spans the whole run, also when a rerun finds it already at total_steps.
    carried: dict[str, Any] = {}
    if found is not None:
        carried = dict((found[1] or {}).get("summary") or {})
        state = found[0]
        start_step = int(jax.device_get(state.step))
        logging.info("Resumed from checkpoint at step %d in %s", start_step, checkpointer.directory)
    else:
        logging.info("No checkpoint in %s: starting from step 0", checkpointer.directory)
    policy = str(config.get("nan_policy", "stop"))
    max_skips = int(config.get("nan_max_skips", 10))
    skips_in_row = 0
    meta = dict(meta)

    # clu's writers import TensorFlow (TensorBoard summaries): imported only when a loop runs,
    # so the step and its benchmarks import on machines without TensorFlow.
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    if start_step == 0:
        writer.write_hparams(_flat_hparams(config))
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    log_every = max(1, int(config.log_every_steps))
    history: list[Mapping[str, jax.Array]] = []
    summary: dict[str, Any] = {"resumed_from_step": start_step, "stop_reason": "completed"}
    for key in CARRIED:
        if key in carried:
            summary[key] = carried[key]
    last: dict[str, float] = dict(carried.get("final_metrics") or {})
    seconds_before = float(carried.get("train_seconds", 0.0))
    images_per_step = global_batch_size * images_per_example
    batches = make_batches(start_step)
    t_log, steps_in_window = time.time(), 0
    t_start = time.time()
    compile_time = None
    prev_metrics = None
    step = start_step
    # Leave after this many steps of this invocation (checkpointed; rerun resumes), e.g. to
    # split a long run into Colab- or queue-sized pieces.
    stop_after = int(config.get("stop_after_steps", 0))

    try:
        with ckpt_lib.PreemptionGuard() as guard:
            while step < total_steps:
                batch = next(batches)
                batch = sharding.to_global({k: batch[k] for k in batch_keys}, mesh)
                t0 = time.time()
                state, metrics = train_step(state, batch)
                if compile_time is None:
                    jax.block_until_ready(metrics)
                    compile_time = time.time() - t0
                    logging.info("First step (compile + run) took %.1f s", compile_time)
                if prev_metrics is not None:
                    skips_in_row = _check_finite(
                        prev_metrics, step - 1, checkpointer, summary, skips_in_row, max_skips
                    )
                prev_metrics = metrics
                step += 1
                history.append(metrics)
                steps_in_window += 1
                report(step)
                if after_step is not None:
                    after_step(step, state)
                if step % log_every == 0 or step == total_steps:
                    last = _mean_metrics(history)
                    dt = max(time.time() - t_log, 1e-9)
                    last["images_per_sec"] = steps_in_window * images_per_step / dt
                    last["images_per_sec_per_device"] = last["images_per_sec"] / mesh.devices.size
                    last["steps_per_sec"] = steps_in_window / dt
                    if epoch_of_step is not None:
                        last["epoch"] = epoch_of_step(step)
                    writer.write_scalars(step, last)
                    summary.setdefault("first_metrics", dict(last, step=step))
                    eta = (total_steps - step) / max(last["steps_per_sec"], 1e-9)
                    logging.info(
                        "step %d/%d  loss %.4f  %.1f img/s  ETA %s",
                        step,
                        total_steps,
                        last.get("loss", math.nan),
                        last["images_per_sec"],
                        _fmt_seconds(eta),
                    )
                    history, steps_in_window, t_log = [], 0, time.time()
                    warning = check_collapse(last) if check_collapse is not None else None
                    if warning:
                        logging.warning("step %d: possible collapse: %s", step, warning)
                        summary.setdefault("collapse_warnings", []).append(
                            f"step {step}: {warning}"
                        )
                preempted = guard.requested()
                stop = preempted or (stop_after > 0 and step - start_step >= stop_after)
                if stop or step == total_steps or step % int(config.checkpoint_every_steps) == 0:
                    jax.block_until_ready(metrics)
                    skips_in_row = _check_finite(
                        metrics, step - 1, checkpointer, summary, skips_in_row, max_skips
                    )
                    prev_metrics = None  # checked
                    if not ckpt_lib.all_finite(state):  # the loss can be finite a step too long
                        _diverged(f"the train state became non-finite by step {step}", checkpointer)
                    meta.update(
                        step=step,
                        epoch=epoch_of_step(step) if epoch_of_step else None,
                        summary=_carried_summary(summary, last, t_start - seconds_before),
                    )
                    checkpointer.save(step, state, meta, force=stop or step == total_steps)
                if stop:
                    summary["stop_reason"] = "preempted" if preempted else "stop_after_steps"
                    logging.warning(
                        "Stopped (%s) at step %d; checkpoint saved, rerun to resume.",
                        summary["stop_reason"],
                        step,
                    )
                    break
    finally:
        # Stop the input threads now, also on an error: a traceback keeps this frame (and a
        # live iterator) until exit, where its reader threads can abort the interpreter.
        del batches
    if prev_metrics is not None:
        _check_finite(prev_metrics, step - 1, checkpointer, summary, skips_in_row, max_skips)
    checkpointer.close()
    writer.flush()
    summary.setdefault("nan_policy", policy)
    summary.update(
        step=step,
        final_metrics=last,
        train_seconds=seconds_before + time.time() - t_start,  # all pieces of the run
        first_step_seconds=compile_time,
        checkpoint_dir=str(checkpointer.directory),
    )
    return state, summary


def _carried_summary(summary: dict, last: dict, since: float) -> dict[str, Any]:
    """The part of the summary a resumed run continues (JSON, in the checkpoint's meta);
    `since` is this piece's start minus the earlier pieces' seconds."""
    keep = {k: summary[k] for k in CARRIED if k in summary}
    return dict(keep, final_metrics=dict(last), train_seconds=time.time() - since)


def _check_finite(
    metrics: Mapping[str, jax.Array],
    step: int,
    checkpointer: ckpt_lib.Checkpointer,
    summary: dict[str, Any],
    skips_in_row: int,
    max_skips: int,
) -> int:
    """Raises DivergenceError on a non-finite loss, unless the step skipped that update
    (nan_policy='skip'); returns the number of consecutive skipped steps."""
    host = jax.device_get({k: metrics[k] for k in ("loss", "skipped") if k in metrics})
    loss = float(host["loss"])
    if float(host.get("skipped", 0.0)) > 0:
        summary.setdefault("skipped_steps", []).append(step)
        logging.warning("step %d: loss %s, update skipped (nan_policy=skip)", step, loss)
        if skips_in_row + 1 >= max_skips:
            _diverged(
                f"{skips_in_row + 1} updates in a row were non-finite (nan_max_skips)", checkpointer
            )
        return skips_in_row + 1
    if not math.isfinite(loss):
        _diverged(f"the loss became {loss} at step {step}", checkpointer)
    return 0


def _diverged(what: str, checkpointer: ckpt_lib.Checkpointer) -> None:
    good = checkpointer.latest_step()  # every saved step is finite (checked before saving)
    checkpointer.close()
    where = "none yet" if good is None else f"step {good} in {checkpointer.directory}"
    raise DivergenceError(
        f"{what}; stopped. Newest checkpoint (finite): {where}; rerunning resumes from it. "
        "Lower optim.base_learning_rate, check the data, or set nan_policy=skip."
    )


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s"


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, d: Any) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping | ml_collections.ConfigDict):
                walk(key + ".", v)
            elif isinstance(v, int | float | str | bool):
                flat[key] = v

    walk("", config)
    return flat
