"""The DVME stage: a DVME head (`models/dvme.py`) trained on the cached features of several
frozen pretrained encoders, chosen on validation, evaluated on every eval split.

`python main.py --config=configs/dvme.py:demo --workdir=DIR --config.dvme.encoders=a=RUN,b=RUN`.
Features are computed once per (encoder, split) and cached (`medssl_jax.features`); the head's
training goes through the common loop (checkpoints, preemption, resume, progress). With
`dvme.finetune_encoders=True` the encoders are fine-tuned end to end through DVME on images
instead (each backbone warm-started from its checkpoint, fine-tune augmentations). results.json
is a linear evaluation (frozen) or a fine-tune (end to end), init `init_name` (default
'dvme(a+b)'), with a 'dvme' entry: the encoders and, per split, the mean attention each
encoder receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from medssl_jax import (
    augment_device,
    config_lib,
    eval_loop,
    features,
    finetune,
    input_pipeline,
    losses,
    optim,
    paths,
    sharding,
)
from medssl_jax import checkpoint as ckpt_lib
from medssl_jax.case_store import CaseStore
from medssl_jax.loop import fit
from medssl_jax.models.dvme import DVME, DVMEOverImages
from medssl_jax.predictions import join_process_shards, shard_name
from medssl_jax.results import write_results
from medssl_jax.state import TrainState, compile_train, init_variables, label_structs

__all__ = ["model_from_config", "train_and_evaluate", "validate"]


def validate(config: ml_collections.ConfigDict) -> None:
    """The dvme section, before any data is read (encoders are checked when loaded)."""
    d = config.get("dvme")
    if d is None:
        raise config_lib.ConfigError("config.dvme: missing (encoders, token_dim, ...)")
    features.parse_encoders(d.encoders)
    for f in ("token_dim", "out_dim", "num_heads"):
        if int(d[f]) < 1:
            raise config_lib.ConfigError(f"config.dvme.{f}: must be >= 1, got {d[f]}")
    if int(d.token_dim) % int(d.num_heads):
        raise config_lib.ConfigError(
            f"config.dvme.num_heads: {d.num_heads} does not divide token_dim={d.token_dim}"
        )
    if not 0.0 <= float(d.dropout) < 1.0:
        raise config_lib.ConfigError(f"config.dvme.dropout: must be in [0, 1), got {d.dropout}")


def model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> DVME:
    d = config.dvme
    return DVME(
        num_classes=num_classes,
        token_dim=int(d.token_dim),
        out_dim=int(d.out_dim),
        num_heads=int(d.num_heads),
        mlp_ratio=float(d.mlp_ratio),
        attention=bool(d.attention),
        dropout=float(d.dropout),
    )


def _default_init(names: list[str], attention: bool) -> str:
    """'dvme(a+b)'; one encoder without attention is a linear probe: 'probe(a)'."""
    if len(names) == 1 and not attention:
        return f"probe({names[0]})"
    return f"dvme({'+'.join(names)})"


def _embedding_keys(n: int) -> list[str]:
    return [f"emb{i}" for i in range(n)]


def _batches(
    feats: list[np.ndarray], store: CaseStore, local_batch: int, seed: int, start_step: int
):
    """Training batches, a pure function of (seed, step): epoch e visits this process's rows
    in the order of a permutation drawn from (seed, process, e)."""
    n = store.num_images
    step = start_step
    multilabel = store.label_masks is not None
    while True:
        pos = step * local_batch
        epoch, offset = divmod(pos, n)
        order = np.random.default_rng([seed, jax.process_index(), epoch]).permutation(n)
        rows = order[offset : offset + local_batch]
        while rows.size < local_batch:  # wrap into the next epoch's permutation
            epoch += 1
            nxt = np.random.default_rng([seed, jax.process_index(), epoch]).permutation(n)
            rows = np.concatenate([rows, nxt[: local_batch - rows.size]])
        batch = {k: f[rows] for k, f in zip(_embedding_keys(len(feats)), feats, strict=True)}
        batch["label"] = store.labels[rows]
        if multilabel:
            batch["label_mask"] = store.label_masks[rows]
        yield batch
        step += 1


@dataclasses.dataclass
class _Trainer:
    """What the common loop needs from a DVME variant (cached features or end to end)."""

    built: Any
    state: TrainState
    make_batches: Callable[[int], Any]
    batch_keys: tuple[str, ...]
    predict: Callable[[Any, Any, str], dict[str, np.ndarray]]  # (params, stats, split)
    feature_dims: list[int]  # one per encoder


def _loss(out: dict, batch: dict, multilabel: bool) -> tuple[jax.Array, dict]:
    if multilabel:
        return losses.masked_sigmoid_ce(out["logits"], batch["label"], batch["label_mask"]), {}
    loss, acc = losses.masked_softmax_ce(out["logits"], batch["label"])
    return loss, {"accuracy": acc}


def _cached(config, ctx: dict, encoders: list, tx, lr) -> _Trainer:
    """The DVME head on cached frozen-encoder features (`medssl_jax.features`)."""
    mesh, local_batch, spec = ctx["mesh"], ctx["local_batch"], ctx["spec"]
    train_store, eval_stores = ctx["train_store"], ctx["eval_stores"]
    size = int(config.data.image_size)
    cache_dir = config.dvme.get("cache_dir") or f"{ctx['workdir']}/features"

    def embed(store: CaseStore) -> list[np.ndarray]:
        return [
            features.extract(
                e, store, mesh, local_batch=local_batch, image_size=size, cache_dir=cache_dir
            )
            for e in encoders
        ]

    train_feats = embed(train_store)
    eval_feats = {s: embed(st) for s, st in eval_stores.items()}
    dims = [f.shape[1] for f in train_feats]
    logging.info("DVME over %s: feature sizes %s", [e.name for e in encoders], dims)
    model = model_from_config(config, spec.num_classes)
    keys = _embedding_keys(len(encoders))
    multilabel = spec.label_kind == "multilabel"
    data_sh, repl = sharding.batch_sharded(mesh), sharding.replicated(mesh)

    def init(rng: jax.Array) -> TrainState:
        params = model.init(rng, [jnp.zeros((2, d), jnp.float32) for d in dims])["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params)
        )

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(int(config.seed)), state.step)

        def loss_fn(params):
            embs = [batch[k] for k in keys]
            out = model.apply({"params": params}, embs, train=True, rngs={"dropout": rng})
            return _loss(out, batch, multilabel)

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        m.update(loss=loss, learning_rate=lr(state.step))
        return state.apply_gradients(tx, grads, {}), m

    b = int(config.batch_size)
    abstract_batch = {
        **{
            k: jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=data_sh)
            for k, d in zip(keys, dims, strict=True)
        },
        **label_structs(b, spec.num_classes, spec.label_kind, data_sh),
    }
    built = compile_train(
        model,
        tx,
        lr,
        step,
        mesh,
        init=init,
        abstract_batch=abstract_batch,
        nan_policy=config.get("nan_policy", "stop"),
    )

    def eval_fn(params, batch):
        out = model.apply({"params": params}, [batch[k] for k in keys], train=False)
        rest = {k: v for k, v in batch.items() if k not in keys}  # valid, index, labels
        return rest | {"logits": out["logits"], "encoder_weights": out["encoder_weights"]}

    eval_jit = jax.jit(eval_fn, in_shardings=(repl, data_sh), out_shardings=repl)

    def feature_batches(store: CaseStore, feats: list[np.ndarray]):
        """Local batches of cached features in row order; the last one padded (valid 0)."""
        n = store.num_images
        for start in range(0, n, local_batch):
            rows = np.arange(start, start + local_batch)
            valid = (rows < n).astype(np.float32)
            rows = np.minimum(rows, n - 1)
            batch = {k: f[rows] for k, f in zip(keys, feats, strict=True)}
            batch |= {"valid": valid, "index": rows, "label": store.labels[rows]}
            if multilabel:
                batch["label_mask"] = store.label_masks[rows]
            yield batch

    def predict(params, _batch_stats, split: str) -> dict[str, np.ndarray]:
        store = eval_stores[split]
        return eval_loop.run(
            lambda batch: eval_jit(params, batch),
            feature_batches(store, eval_feats[split]),
            store.num_images,
            local_batch=local_batch,
            mesh=mesh,
            global_keys=finetune.GATHERED,
            local_keys=("logits",),
        )

    return _Trainer(
        built=built,
        state=built.init(jax.random.key(int(config.seed))),
        make_batches=lambda s: _batches(train_feats, train_store, local_batch, int(config.seed), s),
        batch_keys=tuple(abstract_batch),
        predict=predict,
        feature_dims=dims,
    )


def _end_to_end(config, ctx: dict, encoders: list, tx, lr) -> _Trainer:
    """Encoders fine-tuned through DVME on images: each a SimCLRModel backbone warm-started
    from its checkpoint (BatchNorm in training mode), the DVME head on their features."""
    from medssl_jax.models import create_model

    mesh, local_batch, spec = ctx["mesh"], ctx["local_batch"], ctx["spec"]
    size = int(config.data.image_size)
    nets = [
        create_model(
            e.model["variant"],
            num_classes=0,
            vit_n_last_blocks=e.vit_n_last_blocks,
            **{k: v for k, v in e.model.items() if k != "variant"},
        )
        for e in encoders
    ]
    model = DVMEOverImages(encoders=tuple(nets), head=model_from_config(config, spec.num_classes))
    data_sh = sharding.batch_sharded(mesh)
    loaded = [ckpt_lib.load_variables(e.checkpoint)[:2] for e in encoders]
    x = jnp.zeros((2, size, size, 3), jnp.float32)
    dims = [  # shapes only: nothing is computed
        int(
            jax.eval_shape(lambda n=n: n.init_with_output(jax.random.key(0), x, train=False))[0][
                "features"
            ].shape[-1]
        )
        for n in nets
    ]

    def init(rng: jax.Array) -> TrainState:
        params, stats = init_variables(model, rng, size)
        params, stats = dict(params), dict(stats)
        for i, (p, bs) in enumerate(loaded):  # each encoder's backbone from its checkpoint
            params[f"encoders_{i}"] = dict(params[f"encoders_{i}"]) | {"backbone": p["backbone"]}
            if "backbone" in bs:
                stats[f"encoders_{i}"] = dict(stats[f"encoders_{i}"]) | {"backbone": bs["backbone"]}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=stats,
            opt_state=tx.init(params),
        )

    step = finetune.make_train_step(model, tx, lr, label_kind=spec.label_kind)
    b = int(config.batch_size)
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=data_sh),
        **label_structs(b, spec.num_classes, spec.label_kind, data_sh),
    }
    built = compile_train(
        model,
        tx,
        lr,
        step,
        mesh,
        init=init,
        abstract_batch=abstract_batch,
        nan_policy=config.get("nan_policy", "stop"),
    )

    def eval_step(params, batch_stats, batch):
        out = model.apply(
            {"params": params, "batch_stats": batch_stats},
            augment_device.as_float(batch["image"]),
            train=False,
        )
        rest = {k: v for k, v in batch.items() if k != "image"}
        return rest | {"logits": out["logits"], "encoder_weights": out["encoder_weights"]}

    placed, repl = built.state_sharding, sharding.replicated(mesh)
    eval_jit = jax.jit(
        eval_step, in_shardings=(placed.params, placed.batch_stats, data_sh), out_shardings=repl
    )

    def predict(params, batch_stats, split: str) -> dict[str, np.ndarray]:
        return finetune.predict(
            eval_jit,
            params,
            batch_stats,
            ctx["eval_stores"][split],
            mesh,
            local_batch=local_batch,
            image_size=size,
        )

    def make_batches(start_step: int):
        ds, _ = input_pipeline.finetune_dataset(
            ctx["train_store"],
            batch_size=local_batch,
            image_size=size,
            aug=dict(config.augment),
            seed=int(config.seed),
            start_step=start_step,
            process_index=jax.process_index(),
        )
        return ds.as_numpy_iterator()

    keys = ("image", "label") + (("label_mask",) if spec.label_kind == "multilabel" else ())
    return _Trainer(
        built=built,
        state=built.init(jax.random.key(int(config.seed))),
        make_batches=make_batches,
        batch_keys=keys,
        predict=predict,
        feature_dims=dims,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains DVME (head on cached features, or encoders end to end with
    `dvme.finetune_encoders`), chooses on validation, writes predictions, `results.json` and
    the encoders' mean attention."""
    config_lib.validate(config)
    encoders = [
        features.encoder_from_checkpoint(n, p)
        for n, p in features.parse_encoders(config.dvme.encoders)
    ]
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(int(config.batch_size), mesh)
    pidx, pcount = jax.process_index(), jax.process_count()
    train_store, eval_stores, val_split = finetune.load_stores(config)
    spec = train_store.spec
    selection = finetune.selection_metric(config, spec.label_kind)
    if spec.label_kind not in ("multiclass", "multilabel"):
        raise config_lib.ConfigError(
            f"config.data.name: {spec.name!r} has no labels ({spec.label_kind}); DVME needs them"
        )
    total_steps, warmup_steps = config_lib.steps(config, spec.num_images)
    tx, lr, _ = optim.from_config(config, total_steps, warmup_steps)
    ctx = dict(
        mesh=mesh,
        local_batch=local_batch,
        spec=spec,
        train_store=train_store,
        eval_stores=eval_stores,
        workdir=workdir,
    )
    end_to_end = bool(config.dvme.get("finetune_encoders", False))
    trainer = (_end_to_end if end_to_end else _cached)(config, ctx, encoders, tx, lr)
    graded = bool(config.get("graded", False))
    best = finetune.BestKeeper(workdir, val_split, selection) if val_split else None
    eval_writer = metric_writers.create_default_writer(
        workdir, just_logging=pidx > 0, collection="eval"
    )

    def after_step(step_no: int, st: TrainState) -> None:
        if best is None or (step_no % int(config.eval_every_steps) and step_no != total_steps):
            return
        pred = trainer.predict(st.params, st.batch_stats, val_split)
        m = finetune.split_metrics(pred, spec, graded=graded)
        eval_writer.write_scalars(step_no, {f"{val_split}/{k}": v for k, v in m.items()})
        best.offer(step_no, m, st)

    state, summary = fit(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=trainer.state,
        train_step=trainer.built.step,
        make_batches=trainer.make_batches,
        batch_keys=trainer.batch_keys,
        total_steps=total_steps,
        global_batch_size=int(config.batch_size),
        images_per_example=1,
        restore_abstract=trainer.built.abstract_state,
        meta={"method": config.method, "config": config.to_dict()},
        after_step=after_step,
    )
    params, batch_stats, chosen = state.params, state.batch_stats, summary["step"]
    stopped = finetune.stopped_early(summary)
    if not stopped and best is not None and best.step is not None:
        params, batch_stats = best.restore(state)
        chosen = best.step
    split_results, preds, attention = {}, {}, {}
    names = [e.name for e in encoders]
    for split in [] if stopped else eval_stores:
        pred = trainer.predict(params, batch_stats, split)
        split_results[split] = finetune.split_metrics(pred, eval_stores[split].spec, graded=graded)
        attention[split] = [float(v) for v in pred["encoder_weights"].mean(0)]
        preds[split] = name = f"predictions_{split}.csv"
        finetune.write_predictions(
            paths.path(workdir) / shard_name(name, pidx, pcount), pred, eval_stores[split]
        )
        logging.info(
            "%s: %s; mean attention %s",
            split,
            {k: round(v, 4) for k, v in split_results[split].items() if "/" not in k},
            dict(zip(names, np.round(attention[split], 3), strict=True)),
        )
    join_process_shards(workdir, list(preds.values()), pcount)
    eval_writer.flush()
    results = {
        "kind": "finetune" if end_to_end else "linear_eval",
        "name": config.get("name") or paths.path(workdir).name,
        "dataset": spec.name,
        "label_kind": spec.label_kind,
        "init": config.get("init_name") or _default_init(names, bool(config.dvme.attention)),
        "label_fraction": float(config.data.label_fraction),
        "seed": int(config.seed),
        "step": int(chosen),
        "class_names": list(spec.class_names),
        "splits": split_results,
        "predictions": preds,
        "train": summary,
        "stop_reason": summary["stop_reason"],
        "selected_on": val_split or "last step",
        "selection_metric": selection if val_split else "",
        "dvme": {
            "encoders": [
                e.describe() | {"feature_dim": d}
                for e, d in zip(encoders, trainer.feature_dims, strict=True)
            ],
            "attention": bool(config.dvme.attention),
            "frozen": not end_to_end,
            "mean_encoder_weights": {
                s: dict(zip(names, w, strict=True)) for s, w in attention.items()
            },
        },
    }
    if pidx == 0:
        write_results(workdir, results)
    logging.info("Results: %s/results.json", workdir)
    return results
