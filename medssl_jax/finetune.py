"""Supervised fine-tuning and linear evaluation from a pretraining checkpoint (or from scratch).

Multi-class (softmax CE, e.g. 27-way derm) and multi-label (masked sigmoid CE, e.g. CheXpert's 5
conditions). Linear evaluation freezes the backbone (stop_gradient, BatchNorm in inference mode,
optimiser updates masked to the head). The best checkpoint on the validation split is kept and
evaluated, without further tuning, on every split in `config.eval_splits`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers

from medssl_jax import (
    augment_device,
    config_lib,
    cross_eval,
    datasets,
    eval_loop,
    input_pipeline,
    losses,
    metrics,
    optim,
    paths,
    predictions,
    sharding,
)
from medssl_jax import checkpoint as ckpt_lib
from medssl_jax.case_store import CaseStore
from medssl_jax.loop import fit
from medssl_jax.predictions import join_process_shards, shard_name
from medssl_jax.results import write_results
from medssl_jax.state import Built, TrainState, compile_train, label_structs, make_init

HEAD = "supervised_head"


def head_only_mask(params: Any) -> Any:
    """'train' for the supervised head, 'freeze' for everything else (linear evaluation)."""
    return {
        k: jax.tree.map(lambda _, k=k: "train" if k == HEAD else "freeze", v)
        for k, v in params.items()
    }


def make_train_step(model, tx, lr_schedule, *, label_kind: str) -> Callable:
    """Pure (state, batch) -> (state, metrics) for supervised training."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            out, mutated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                augment_device.as_float(batch["image"]),
                train=True,
                mutable=["batch_stats"],
            )
            m = {}
            if label_kind == "multilabel":
                loss = losses.masked_sigmoid_ce(out["logits"], batch["label"], batch["label_mask"])
            else:
                loss, m["accuracy"] = losses.masked_softmax_ce(out["logits"], batch["label"])
            return loss, (mutated["batch_stats"], m)

        (loss, (batch_stats, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        m.update(loss=loss, learning_rate=lr_schedule(state.step))
        return state.apply_gradients(tx, grads, batch_stats), m

    return step


def build(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    label_kind: str,
    total_steps: int,
    warmup_steps: int,
) -> tuple[Built, Callable]:
    """(train Built, jitted eval step) for `config` on `mesh`."""
    if label_kind not in ("multiclass", "multilabel"):
        raise ValueError(
            f"config.data.name={config.data.name!r} has label_kind {label_kind!r}: fine-tuning "
            "needs labels (multiclass or multilabel)"
        )
    linear = config.method == "linear_eval"
    model = config_lib.model_from_config(config, num_classes=num_classes, freeze_backbone=linear)
    tx, lr, peak = optim.from_config(config, total_steps, warmup_steps)
    if linear:
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, head_only_mask)
    size = int(config.data.image_size)

    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def eval_step(params, batch_stats, batch):
        out = model.apply(
            {"params": params, "batch_stats": batch_stats},
            augment_device.as_float(batch["image"]),
            train=False,
        )
        return {k: v for k, v in batch.items() if k != "image"} | {"logits": out["logits"]}

    b = int(config.batch_size)
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=data_sh),
        **label_structs(b, num_classes, label_kind, data_sh),
    }
    step = make_train_step(model, tx, lr, label_kind=label_kind)
    init = make_init(model, tx, size)
    built = compile_train(
        model,
        tx,
        lr,
        step,
        mesh,
        init=init,
        abstract_batch=abstract_batch,
        nan_policy=config.get("nan_policy", "stop"),
        **sharding.fsdp_options(config),
    )
    placed = built.state_sharding  # replicated, or split over 'data' with FSDP
    eval_jit = jax.jit(
        eval_step,
        in_shardings=(placed.params, placed.batch_stats, data_sh),
        out_shardings=repl,
    )
    return built, eval_jit


# What an eval step's outputs are gathered for over the whole split.
GATHERED = ("logits", "label", "label_mask", "encoder_weights")


def predict(
    eval_step: Callable,
    params: Any,
    batch_stats: Any,
    store: CaseStore,
    mesh: jax.sharding.Mesh,
    *,
    local_batch: int,
    image_size: int,
) -> dict[str, np.ndarray]:
    """Logits for every image of the (global) split, plus this process's own rows.

    All processes run the same number of eval steps (shorter shards are padded), as the
    collectives require. Returns global 'logits', 'label', ('label_mask') of valid rows, and
    'local_logits' + 'local_index' (rows of the store's per-image arrays) for this process's CSV.
    """
    return eval_loop.run(
        lambda batch: eval_step(params, batch_stats, batch),
        input_pipeline.eval_batches(store, batch_size=local_batch, image_size=image_size),
        store.num_images,
        local_batch=local_batch,
        mesh=mesh,
        global_keys=GATHERED,
        local_keys=("logits",),
    )


def split_metrics(pred: dict[str, np.ndarray], spec, *, graded: bool) -> dict[str, float]:
    if spec.label_kind == "multilabel":
        return metrics.sigmoid_metrics(
            pred["logits"], pred["label"], pred["label_mask"], class_names=spec.class_names
        )
    return metrics.softmax_metrics(
        pred["logits"], pred["label"], graded=graded, class_names=spec.class_names
    )


SELECTION_METRICS = {
    "multiclass": ("balanced_accuracy", "top1", "auc_mean", "kappa_quadratic"),
    "multilabel": ("auc_mean", "accuracy"),
}


def selection_metric(config: ml_collections.ConfigDict, label_kind: str) -> str:
    """The validation metric the best checkpoint maximises (config.selection_metric, checked
    against the dataset's label kind before anything is compiled)."""
    name = str(config.get("selection_metric", "") or SELECTION_METRICS[label_kind][0])
    allowed = SELECTION_METRICS[label_kind]
    if name not in allowed:
        raise config_lib.ConfigError(
            f"config.selection_metric: {name!r} is not a {label_kind} metric; one of {allowed}"
        )
    if name == "kappa_quadratic" and not config.get("graded", False):
        raise config_lib.ConfigError(
            "config.selection_metric: kappa_quadratic needs --config.graded=True"
        )
    return name


def stopped_early(summary: dict) -> bool:
    """Whether training stopped before its end (SIGTERM, stop_after_steps). Then nothing is
    evaluated: the checkpoint is saved, the launcher's grace period (SLURM: 120 s) is short,
    and a partly trained model's metrics are not results; the rerun resumes and evaluates."""
    if summary["stop_reason"] == "completed":
        return False
    logging.info(
        "Stopped (%s) at step %d: evaluation waits for the resumed run's end",
        summary["stop_reason"],
        summary["step"],
    )
    return True


def write_predictions(
    path: paths.PathLike,
    pred: dict,
    store: CaseStore,
    target: cross_eval.Target | None = None,
    train_spec: Any = None,
) -> None:
    """This process's rows of `pred` as a prediction CSV; with `target` (another dataset), the
    labels are put in the training classes' space (unmapped ones masked)."""
    rows = np.asarray(pred["local_index"], np.int64)  # rows of the per-image arrays
    cases, _ = store.locate(rows)
    logits = pred["local_logits"]
    spec = train_spec or store.spec
    multilabel = spec.label_kind == "multilabel"
    scores = metrics.probabilities(logits, multilabel)  # float64: the AUC of results.json
    labels = store.labels[rows]
    mask = store.label_masks[rows] if multilabel else None
    if target is not None:
        labels, mask = cross_eval.to_training_space(target, labels, mask, spec.num_classes)
        labels = labels if multilabel else np.where(mask, labels, 0)
    predictions.write_predictions_csv(
        path,
        case_ids=[s.decode() for s in store.case_ids[cases]],
        image_ids=[s.decode() for s in store.image_ids[rows]],
        patient_ids=[s.decode() for s in store.patient_ids[cases]],
        labels=labels,
        scores=scores,
        class_names=list(spec.class_names),
        label_mask=mask,
    )


def load_stores(
    config: ml_collections.ConfigDict,
) -> tuple[CaseStore, dict[str, CaseStore], str]:
    """(labelled training store at config.data.label_fraction, {split: store} of val_split
    first then eval_splits, val_split): all read and checked before anything is compiled;
    an unknown split names its config field."""
    pidx, pcount = jax.process_index(), jax.process_count()
    val_split = config.get("val_split", "")

    def load(split: str, field: str, **kw: Any) -> CaseStore:
        try:
            return input_pipeline.load_store(
                config.data, split, process_index=pidx, process_count=pcount, **kw
            )
        except datasets.UnknownSplitError as e:
            raise config_lib.ConfigError(f"config.{field}: {e}") from None

    train_store = load(
        config.data.split, "data.split", label_fraction=float(config.data.label_fraction)
    )
    eval_splits = list(config.eval_splits)
    if not eval_splits:  # () = every split of the dataset but the training one
        names = datasets.split_names(config.data.name, config.data.get("data_dir") or None)
        eval_splits = [s for s in names if s != config.data.split]
    if val_split and val_split not in eval_splits:
        eval_splits.insert(0, val_split)
    eval_stores = {
        s: load(s, "val_split" if s == val_split else "eval_splits") for s in eval_splits
    }
    return train_store, eval_stores, val_split


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes (or linear-evaluates) per `config`; writes checkpoints, predictions and
    `results.json` (schema: medssl_jax.results)."""
    config_lib.validate(config)
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(int(config.batch_size), mesh)
    pidx, pcount = jax.process_index(), jax.process_count()
    train_store, eval_stores, val_split = load_stores(config)
    eval_splits = list(eval_stores)
    spec = train_store.spec
    selection = selection_metric(config, spec.label_kind)
    targets = cross_eval.load_targets(config, spec, process_index=pidx, process_count=pcount)
    total_steps, warmup_steps = config_lib.steps(config, spec.num_images)
    logging.info(
        "%s on %s: %d labelled images (fraction %.3g), eval on %s; %d steps",
        config.method,
        spec.name,
        spec.num_images,
        config.data.label_fraction,
        eval_splits,
        total_steps,
    )
    built, eval_step = build(
        config,
        mesh,
        num_classes=spec.num_classes,
        label_kind=spec.label_kind,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
    )
    state = built.init(jax.random.key(int(config.seed)))
    if config.init_checkpoint:
        state = ckpt_lib.warm_start(
            state,
            config.init_checkpoint,
            ("backbone", "projection_head"),
            proj_layers=int(config.model.ft_proj_selector),
        )
    size = int(config.data.image_size)
    graded = bool(config.get("graded", False))
    best = BestKeeper(workdir, val_split, selection) if val_split else None
    eval_writer = metric_writers.create_default_writer(
        workdir, just_logging=pidx > 0, collection="eval"
    )

    def evaluate(split: str, params, batch_stats) -> tuple[dict, dict]:
        pred = predict(
            eval_step,
            params,
            batch_stats,
            eval_stores[split],
            mesh,
            local_batch=local_batch,
            image_size=size,
        )
        return split_metrics(pred, eval_stores[split].spec, graded=graded), pred

    def after_step(step: int, st: TrainState) -> None:
        if best is None or (step % int(config.eval_every_steps) and step != total_steps):
            return
        m, _ = evaluate(val_split, st.params, st.batch_stats)
        eval_writer.write_scalars(step, {f"{val_split}/{k}": v for k, v in m.items()})
        best.offer(step, m, st)

    def make_batches(start_step: int):
        ds, _ = input_pipeline.finetune_dataset(
            train_store,
            batch_size=local_batch,
            image_size=size,
            aug=dict(config.augment),
            seed=int(config.seed),
            start_step=start_step,
            process_index=pidx,
        )
        return ds.as_numpy_iterator()

    keys = ("image", "label") + (("label_mask",) if spec.label_kind == "multilabel" else ())
    state, summary = fit(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        train_step=built.step,
        make_batches=make_batches,
        batch_keys=keys,
        total_steps=total_steps,
        global_batch_size=int(config.batch_size),
        images_per_example=1,
        restore_abstract=built.abstract_state,
        meta={"method": config.method, "config": config.to_dict()},
        after_step=after_step,
    )
    params, batch_stats, chosen = state.params, state.batch_stats, summary["step"]
    stopped = stopped_early(summary)
    if not stopped and best is not None and best.step is not None:
        params, batch_stats = best.restore(state)
        chosen = best.step
    split_results, predictions = {}, {}
    for split in [] if stopped else eval_splits:
        m, pred = evaluate(split, params, batch_stats)
        split_results[split] = m
        predictions[split] = name = f"predictions_{split}.csv"
        write_predictions(
            paths.path(workdir) / shard_name(name, pidx, pcount), pred, eval_stores[split]
        )
        logging.info("%s: %s", split, {k: round(v, 4) for k, v in m.items() if "/" not in k})
    for t in [] if stopped else targets:  # other datasets, through the label mapping
        pred = predict(
            eval_step, params, batch_stats, t.store, mesh, local_batch=local_batch, image_size=size
        )
        label, mask = cross_eval.to_training_space(
            t, pred["label"], pred.get("label_mask"), spec.num_classes
        )
        if spec.label_kind == "multilabel":
            m = metrics.sigmoid_metrics(pred["logits"], label, mask, class_names=spec.class_names)
        else:
            m = metrics.softmax_metrics(
                pred["logits"][mask], label[mask], graded=graded, class_names=spec.class_names
            )
        split_results[t.result_split] = m
        predictions[t.result_split] = name = f"predictions_{t.result_split}.csv"
        write_predictions(
            paths.path(workdir) / shard_name(name, pidx, pcount), pred, t.store, t, spec
        )
        logging.info(
            "%s (%s %s, mapped classes %s): %s",
            t.result_split,
            t.dataset,
            t.split,
            [a for a, _ in t.names],
            {k: round(v, 4) for k, v in m.items() if "/" not in k},
        )
    join_process_shards(workdir, list(predictions.values()), pcount)
    eval_writer.flush()
    results = {
        "kind": config.method,
        "name": config.get("name") or paths.path(workdir).name,
        "dataset": spec.name,
        "label_kind": spec.label_kind,
        "init": config.init_name,
        "label_fraction": float(config.data.label_fraction),
        "seed": int(config.seed),
        "step": int(chosen),
        "class_names": list(spec.class_names),
        "splits": split_results,
        "predictions": predictions,
        "train": summary,
        "stop_reason": summary["stop_reason"],
        "selected_on": val_split or "last step",
        "selection_metric": selection if val_split else "",
        "eval_datasets": {t.result_split: t.describe() for t in targets},
    }
    if pidx == 0:
        write_results(workdir, results)
    logging.info("Results: %s/results.json", workdir)
    return results


class BestKeeper:
    """Keeps the parameters of the best validation step in `workdir/best` (survives resumes)."""

    def __init__(self, workdir: str, split: str, metric: str):
        self.metric = metric
        self.split = split
        self.manager = ocp.CheckpointManager(
            ckpt_lib.orbax_path(workdir) / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )
        self.step = self.manager.latest_step()
        self.value = -np.inf
        if self.step is not None:
            meta = self.manager.restore(
                self.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
            if meta.get("metric", metric) != metric or meta.get("split", split) != split:
                raise config_lib.ConfigError(
                    f"config.selection_metric: {workdir}/best was chosen by {meta.get('split')}/"
                    f"{meta.get('metric')}, this run asks for {split}/{metric}; use a new workdir"
                )
            self.value = float(meta["value"])

    def offer(self, step: int, m: dict[str, float], state: TrainState) -> None:
        value = float(m.get(self.metric, np.nan))
        if not np.isfinite(value) or value <= self.value:
            return
        self.value, self.step = value, step
        self.manager.save(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(
                    {"params": state.params, "batch_stats": state.batch_stats}
                ),
                meta=ocp.args.JsonSave(
                    {"value": value, "metric": self.metric, "split": self.split}
                ),
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        logging.info("New best %s/%s = %.4f at step %d", self.split, self.metric, value, step)

    def restore(self, state: TrainState) -> tuple[Any, Any]:
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct,
            {"params": state.params, "batch_stats": state.batch_stats},
        )
        v = self.manager.restore(
            self.step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract))
        ).variables
        return v["params"], v["batch_stats"]
