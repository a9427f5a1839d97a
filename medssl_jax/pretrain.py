"""Self-supervised pretraining with any registered method (SimCLR, SwAV, DINO, hybrid), with or
without multi-instance (MICLe) pairing.

One generic step: the method's pure loss, its gradient hooks, the optimiser, then the method's
post-update (EMA teacher, prototype normalisation). The step is built from the config and a
mesh alone (`build`), so it can be lowered from abstract shapes and compiled ahead of time for
a topology that is not attached. The loop is `loop.fit`.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medssl_jax import augment_device, color_layout, config_lib, methods, optim, sharding
from medssl_jax import checkpoint as ckpt_lib
from medssl_jax.loop import fit, write_json
from medssl_jax.state import Built, TrainState, compile_train, init_variables, label_structs


def batch_keys(
    label_kind: str, num_local: int = 0, color_on_device: bool = False
) -> tuple[str, ...]:
    keys = ("views", "label", "patient_key", "distinct")
    keys += ("local_views",) if num_local > 0 else ()
    keys += ("color_params",) if color_on_device else ()
    return keys + (("label_mask",) if label_kind == "multilabel" else ())


def make_train_step(parts: methods.Parts, tx, lr_schedule, *, seed: int, blur: bool = True):
    """Pure (state, batch) -> (state, metrics) for the method described by `parts`. The batch's
    uint8 views become float32 here (and get their colour/blur stage if the host sent
    'color_params'), so pixels cross host -> device as uint8."""
    key = jax.random.key(seed)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(key, state.step)
        batch = augment_device.device_views(batch, blur=blur)

        def loss_fn(params):
            return parts.loss(params, state.batch_stats, state.extra, batch, rng, state.step)

        (loss, (metrics, batch_stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        new = state.apply_gradients(tx, grads, batch_stats, frozen=parts.frozen)
        params, extra = parts.post_update(new.params, extra, state.step)
        metrics.update(
            loss=loss,
            learning_rate=lr_schedule(state.step),
            distinct_pairs=jnp.mean(batch["distinct"]),
            grad_norm=optax.global_norm(grads),
        )
        return new.replace(params=params, extra=extra), metrics

    return step


def build(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    label_kind: str,
    total_steps: int,
    warmup_steps: int,
    steps_per_epoch: float | None = None,
) -> Built:
    """Model, optimiser and the sharded, donated, jitted train step for `config` on `mesh`.

    `steps_per_epoch` converts the methods' epoch-valued fields (prototype freeze, teacher
    temperature warm-up) to steps; None means the whole run is one epoch.
    """
    method = methods.get(config.method)
    parts = method.build(
        config,
        num_classes=num_classes,
        label_kind=label_kind,
        total_steps=total_steps,
        steps_per_epoch=float(steps_per_epoch or total_steps),
    )
    tx, lr, peak = optim.from_config(config, total_steps, warmup_steps)
    views = method.views(config)
    size = views.global_crops.size

    abstract_params = jax.eval_shape(
        lambda r: init_variables(parts.model, r, size)[0], jax.random.key(0)
    )
    # The supervised head (online probe, or hybrid's supervised term) trains on its own Adam:
    # a raw LARS/SGD rate on a linear head over drifting features diverges. Whether its
    # gradient reaches the backbone is the model's business (stop_gradient or not).
    if "supervised_head" in abstract_params:
        tx = optim.with_probe_head(
            tx, lr, peak, float(config.optim.get("probe_learning_rate", 0.003))
        )

    def init(rng: jax.Array) -> TrainState:
        params, batch_stats = init_variables(parts.model, rng, size)
        params = parts.init_params(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            extra=parts.init_extra(params, batch_stats),
        )

    blur = bool(config.augment.blur)
    step = make_train_step(parts, tx, lr, seed=int(config.seed), blur=blur)
    b, data_sh = int(config.batch_size), sharding.batch_sharded(mesh)
    abstract_batch = {
        "views": jax.ShapeDtypeStruct((b, 2, size, size, 3), jnp.uint8, sharding=data_sh),
        "patient_key": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sh),
        "distinct": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=data_sh),
        **label_structs(b, num_classes, label_kind, data_sh),
    }
    if views.local_crops is not None:
        n, s = views.local_crops.count, views.local_crops.size
        abstract_batch["local_views"] = jax.ShapeDtypeStruct(
            (b, n, s, s, 3), jnp.uint8, sharding=data_sh
        )
    if color_on_device(config):
        abstract_batch["color_params"] = jax.ShapeDtypeStruct(
            (b, 2 + views.num_local, color_layout.NUM_COLOR_PARAMS), jnp.float32, sharding=data_sh
        )
    return compile_train(
        parts.model,
        tx,
        lr,
        step,
        mesh,
        init=init,
        abstract_batch=abstract_batch,
        method=parts,
        nan_policy=config.get("nan_policy", "stop"),
        **sharding.fsdp_options(config),
    )


def warm_start(
    state: TrainState, built: Built, path: str, parts: tuple[str, ...], mesh: jax.sharding.Mesh
) -> TrainState:
    """`parts` of the network from the checkpoint at `path`; the method's state (e.g. DINO's
    teacher) then starts again from the warm-started network, not from the random one."""
    state = ckpt_lib.warm_start(state, path, parts)
    extra = jax.jit(built.method.init_extra, out_shardings=built.state_sharding.extra)(
        state.params, state.batch_stats
    )
    return state.replace(extra=extra)


def color_on_device(config: ml_collections.ConfigDict) -> bool:
    """config.augment.on_device: the colour/blur stage runs in the train step, not on the host."""
    return bool(config.augment.get("on_device", False))


def sampler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`pretrain_dataset` keywords from `config.sampler`: multi-instance pairs (a fraction
    `distinct_prob` of them from two images; epochs over cases or images), and batches
    without two cases of one patient unless same_patient is 'mask' or 'allow'."""
    multi = bool(config.sampler.multi_instance)
    return {
        "multi_instance": multi,
        "patient_unique": multi and config.sampler.same_patient == "exclude",
        "distinct_prob": float(config.sampler.get("distinct_prob", 1.0)),
        "image_items": multi and config.sampler.get("epoch_over", "cases") == "images",
    }


def method_label(config: ml_collections.ConfigDict) -> str:
    """'simclr', 'swav', ...; with multi-instance pairing 'micle' (SimCLR) or 'micle_<method>'."""
    if not config.sampler.multi_instance:
        return config.method
    return "micle" if config.method == "simclr" else f"micle_{config.method}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains per `config` (method + sampler); writes checkpoints and `results.json`."""
    # The host pipeline needs TensorFlow; the step (`build`) does not, so it is imported here.
    from medssl_jax import datasets, input_pipeline

    config_lib.validate(config)
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(int(config.batch_size), mesh)
    multi_instance = bool(config.sampler.multi_instance)
    by_case = multi_instance and config.sampler.get("epoch_over", "cases") == "cases"
    method = methods.get(config.method)
    views = method.views(config)
    try:
        store = input_pipeline.load_store(
            config.data,
            config.data.split,
            # Every image is used; labels (probe / hybrid supervision) only of this fraction.
            label_fraction=float(config.data.get("label_fraction", 1.0)),
            unlabel_rest=True,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except datasets.UnknownSplitError as e:
        raise config_lib.ConfigError(f"config.data.split: {e}") from None
    spec = store.spec
    epoch_items = spec.num_cases if by_case else spec.num_images
    total_steps, warmup_steps = config_lib.steps(config, epoch_items)
    label = method_label(config)
    logging.info(
        "%s on %s/%s: %d cases, %d images (this process: %d cases); global batch %d on %d "
        "devices; %d steps (%d warm-up); crops 2x%d + %dx%s",
        label,
        spec.name,
        spec.split,
        spec.num_cases,
        spec.num_images,
        store.num_cases,
        config.batch_size,
        mesh.devices.size,
        total_steps,
        warmup_steps,
        views.global_crops.size,
        views.num_local,
        views.local_crops.size if views.local_crops else "-",
    )
    built = build(
        config,
        mesh,
        num_classes=spec.num_classes,
        label_kind=spec.label_kind,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        steps_per_epoch=max(epoch_items / int(config.batch_size), 1.0),
    )
    state = built.init(jax.random.key(int(config.seed)))
    if config.get("init_checkpoint"):
        state = warm_start(state, built, config.init_checkpoint, tuple(config.init_parts), mesh)

    schedule_holder = {}

    def make_batches(start_step: int):
        ds, sched = input_pipeline.pretrain_dataset(
            store,
            batch_size=local_batch,
            views=views,
            aug=config_lib.augment_kwargs(config),
            seed=int(config.seed),
            start_step=start_step,
            process_index=jax.process_index(),
            color_on_device=color_on_device(config),
            **sampler_options(config),
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
        batch_keys=batch_keys(spec.label_kind, views.num_local, color_on_device(config)),
        total_steps=total_steps,
        global_batch_size=int(config.batch_size),
        images_per_example=views.images_per_example,
        restore_abstract=built.abstract_state,
        meta={"method": config.method, "label": label, "config": config.to_dict()},
        epoch_of_step=epoch_of_step,
        check_collapse=built.method.check_collapse,
    )
    results = {
        "kind": "pretrain",
        "method": config.method,
        "label": label,
        "multi_instance": multi_instance,
        "dataset": spec.name,
        "split": spec.split,
        "num_cases": spec.num_cases,
        "num_images": spec.num_images,
        "epoch_unit": "cases" if by_case else "images",
        "total_steps": total_steps,
        "global_batch_size": int(config.batch_size),
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        **summary,
    }
    write_json(f"{workdir}/results.json", results)
    logging.info("Results: %s/results.json; checkpoints: %s", workdir, summary["checkpoint_dir"])
    return results
