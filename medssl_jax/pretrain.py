"""Contrastive pretraining: SimCLR (two views of one image) and MICLe (two images of one case).

Only the views and the loss are method specific; the loop is `train.fit`. The train step is built
from the config and a mesh alone (`build`), so it can be lowered from abstract shapes and
compiled ahead of time for a topology that is not attached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medssl_jax import checkpoint as ckpt_lib
from medssl_jax import config_lib, input_pipeline, losses, optim, sharding
from medssl_jax.train import Built, TrainState, compile_train, fit, label_structs, write_json

PRETRAIN_KEYS = ("views", "label", "patient_key", "distinct")


def batch_keys(label_kind: str) -> tuple[str, ...]:
    return PRETRAIN_KEYS + (("label_mask",) if label_kind == "multilabel" else ())


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    temperature: float,
    label_kind: str,
    mask_same_patient: bool,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Pure (state, batch) -> (state, metrics) for SimCLR/MICLe with an optional online probe."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        views = batch["views"]  # [B, 2, S, S, 3], B sharded on 'data'
        b = views.shape[0]
        # Interleave the two views of each row: keeps each device's rows local, and BN sees 2B.
        x = views.reshape((2 * b,) + views.shape[2:])

        def loss_fn(params):
            out, mutated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            z = out["projection"].reshape(b, 2, -1)
            keys = batch["patient_key"] if mask_same_patient else None
            loss, metrics = losses.nt_xent(z[:, 0], z[:, 1], temperature, keys)
            metrics["contrastive_loss"] = loss
            if "logits" in out:  # online linear probe on stop_gradient features
                if label_kind == "multilabel":
                    probe = losses.masked_sigmoid_ce(
                        out["logits"],
                        jnp.repeat(batch["label"], 2, axis=0),
                        jnp.repeat(batch["label_mask"], 2, axis=0),
                    )
                else:
                    probe, acc = losses.masked_softmax_ce(
                        out["logits"], jnp.repeat(batch["label"], 2)
                    )
                    metrics["probe_acc"] = acc
                metrics["probe_loss"] = probe
                loss = loss + probe
            return loss, (mutated["batch_stats"], metrics)

        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        metrics.update(
            loss=loss,
            learning_rate=lr_schedule(state.step),
            distinct_pairs=jnp.mean(batch["distinct"]),
            grad_norm=optax.global_norm(grads),
        )
        return state.apply_gradients(tx, grads, batch_stats), metrics

    return step


def build(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    label_kind: str,
    total_steps: int,
    warmup_steps: int,
) -> Built:
    """Model, optimiser and the sharded, donated, jitted train step for `config` on `mesh`."""
    probe = bool(config.linear_probe) and label_kind != "none" and num_classes > 0
    model = config_lib.model_from_config(
        config, num_classes=num_classes if probe else 0, head_stop_gradient=True
    )
    tx, lr, peak = optim.from_config(config, total_steps, warmup_steps)
    if probe:
        tx = optim.with_probe_head(
            tx, lr, peak, float(config.optim.get("probe_learning_rate", 0.003))
        )
    size = int(config.data.image_size)

    mask = config.get("micle", {}).get("same_patient", "exclude") == "mask"
    step = make_train_step(
        model,
        tx,
        lr,
        temperature=float(config.loss.temperature),
        label_kind=label_kind,
        mask_same_patient=mask and config.method == "micle",
    )
    b, data_sh = int(config.batch_size), sharding.batch_sharded(mesh)
    abstract_batch = {
        "views": jax.ShapeDtypeStruct((b, 2, size, size, 3), jnp.float32, sharding=data_sh),
        "patient_key": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sh),
        "distinct": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=data_sh),
        **label_structs(b, num_classes, label_kind, data_sh),
    }
    return compile_train(model, tx, lr, step, mesh, image_size=size, abstract_batch=abstract_batch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains with SimCLR or MICLe per `config`; writes checkpoints and `results.json`."""
    config_lib.validate(config)
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(int(config.batch_size), mesh)
    micle = config.method == "micle"
    store = input_pipeline.load_store(
        config.data,
        config.data.split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    spec = store.spec
    epoch_items = spec.num_cases if micle else spec.num_images
    total_steps, warmup_steps = config_lib.steps(config, epoch_items)
    logging.info(
        "%s on %s/%s: %d cases, %d images (this process: %d cases); global batch %d on %d "
        "devices; %d steps (%d warm-up)",
        config.method,
        spec.name,
        spec.split,
        spec.num_cases,
        spec.num_images,
        store.num_cases,
        config.batch_size,
        mesh.devices.size,
        total_steps,
        warmup_steps,
    )
    built = build(
        config,
        mesh,
        num_classes=spec.num_classes,
        label_kind=spec.label_kind,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
    )
    state = built.init(jax.random.key(int(config.seed)))
    if config.get("init_checkpoint"):
        state = ckpt_lib.warm_start(state, config.init_checkpoint, tuple(config.init_parts))

    patient_unique = micle and config.micle.same_patient == "exclude"
    schedule_holder = {}

    def make_batches(start_step: int):
        ds, sched = input_pipeline.pretrain_dataset(
            store,
            batch_size=local_batch,
            image_size=int(config.data.image_size),
            aug=config_lib.augment_kwargs(config),
            seed=int(config.seed),
            start_step=start_step,
            multi_instance=micle,
            patient_unique=patient_unique,
            process_index=jax.process_index(),
        )
        schedule_holder["s"] = sched
        return ds.as_numpy_iterator()

    def epoch_of_step(step: int) -> float:
        return schedule_holder["s"].epoch_float(step) if "s" in schedule_holder else 0.0

    state, summary = fit(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        train_step=built.step,
        make_batches=make_batches,
        batch_keys=batch_keys(spec.label_kind),
        total_steps=total_steps,
        global_batch_size=int(config.batch_size),
        images_per_example=2,
        restore_abstract=built.abstract_state,
        meta={"method": config.method, "config": config.to_dict()},
        epoch_of_step=epoch_of_step,
    )
    results = {
        "kind": "pretrain",
        "method": config.method,
        "dataset": spec.name,
        "split": spec.split,
        "num_cases": spec.num_cases,
        "num_images": spec.num_images,
        "epoch_unit": "cases" if micle else "images",
        "total_steps": total_steps,
        "global_batch_size": int(config.batch_size),
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        **summary,
    }
    write_json(f"{workdir}/results.json", results)
    logging.info("Results: %s/results.json; checkpoints: %s", workdir, summary["checkpoint_dir"])
    return results
