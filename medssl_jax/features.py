"""Frozen-encoder features of a whole split, computed once and cached (DVME, transfer study).

An encoder is a pretrained checkpoint (a run's workdir or a converted release); its network
(variant, input normalisation, stem padding, ViT feature rule) is read from the checkpoint, so
a config names only (name, path). Features follow DINO's evaluation protocol: a ResNet's pooled
output (2048-d for R50), a ViT's CLS tokens of the last `vit_n_last_blocks` blocks (1536-d for
ViT-S/16 with 4), plus the mean patch token with `vit_avgpool`. Images are centre-cropped and
resized as for evaluation, in BatchNorm inference mode; the cache file is keyed by everything
that changes the numbers and written atomically, so a killed run recomputes nothing finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from medssl_jax import augment_device, eval_loop, input_pipeline, paths, sharding
from medssl_jax import checkpoint as ckpt_lib
from medssl_jax.case_store import CaseStore
from medssl_jax.config_lib import ConfigError

__all__ = ["Encoder", "encoder_from_checkpoint", "extract", "parse_encoders"]

# Model fields an encoder's network takes from its checkpoint (pretraining config or
# converted.json); the rest of SimCLRModel's fields keep their defaults.
_MODEL_FIELDS = ("variant", "input_norm", "torch_maxpool", "cifar_stem", "vit_avgpool")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A named frozen encoder: checkpoint path, its step and the network it needs."""

    name: str
    checkpoint: str
    step: int
    model: dict[str, Any]  # variant, input_norm, torch_maxpool, cifar_stem, vit_avgpool
    vit_n_last_blocks: int = 4
    # 'best': a finished fine-tune's validation-selected best/ (what load_variables gives and
    # its results.json reports), 'latest': the newest checkpoint (or a converted release).
    weights: str = "latest"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "weights": self.weights,
            **self.model,
        }


def parse_encoders(spec: str, field: str = "dvme.encoders") -> list[tuple[str, str]]:
    """'simclr=/runs/simclr,swav=/runs/swav' -> [(name, path), ...]; errors name the field."""
    out: list[tuple[str, str]] = []
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"config.{field}: {item!r} is not name=checkpoint_path")
        out.append((name.strip(), path.strip()))
    if not out:
        raise ConfigError(f"config.{field}: empty; give name=checkpoint_path[,name=path...]")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.{field}: encoder names must be unique, got {names}")
    return out


def encoder_from_checkpoint(name: str, path: str, field: str = "dvme.encoders") -> Encoder:
    """The encoder at `path`, its network read from the checkpoint's own record."""
    from medssl_jax.convert.common import read_info

    if not paths.path(path).exists():
        raise ConfigError(f"config.{field}: encoder {name!r}: {path!r} does not exist")
    info = read_info(path)
    if info is not None:  # a converted release
        model = {k: info[k] for k in _MODEL_FIELDS if k in info}
        step = 0
    else:
        try:
            meta, step = ckpt_lib.load_meta(path)
        except FileNotFoundError as e:
            raise ConfigError(f"config.{field}: encoder {name!r}: {e}") from None
        model_cfg = (meta.get("config") or {}).get("model") or {}
        if "variant" not in model_cfg:
            raise ConfigError(
                f"config.{field}: encoder {name!r}: the checkpoint at {path!r} does not record "
                "its model variant (not a pretraining run of this project or a converted release)"
            )
        model = {k: model_cfg[k] for k in _MODEL_FIELDS if k in model_cfg}
    best = None if info is not None else ckpt_lib.reported_best_step(path)
    return Encoder(
        name=name,
        checkpoint=ckpt_lib.absolute(path),
        step=step if best is None else best,
        model=model,
        weights="latest" if best is None else "best",
    )


def _cache_key(encoder: Encoder, store: CaseStore, image_size: int) -> str:
    spec = store.spec
    key = {
        "encoder": encoder.describe(),
        "vit_n_last_blocks": encoder.vit_n_last_blocks,
        "dataset": spec.name,
        "split": spec.split,
        "num_images": int(store.num_images),
        "image_ids_sha": hashlib.sha256(b"\0".join(store.image_ids.tolist())).hexdigest(),
        "image_size": image_size,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def extract(
    encoder: Encoder,
    store: CaseStore,
    mesh: jax.sharding.Mesh,
    *,
    local_batch: int,
    image_size: int,
    cache_dir: str,
) -> np.ndarray:
    """float32 [N, D]: the encoder's features of every image of `store`, in store row order.

    Read from `cache_dir` when computed before with the same encoder, split and size.
    """
    from medssl_jax.models import create_model

    cache = paths.path(cache_dir) / (
        f"{encoder.name}_{store.spec.split}_p{jax.process_index()}_"
        f"{_cache_key(encoder, store, image_size)}.npy"
    )
    # Every process computes, or none: extraction runs collectives (a process whose own cache
    # file survived a kill must not leave the others alone in them).
    if sharding.all_processes(cache.exists()):
        feats = np.load(io.BytesIO(cache.read_bytes()))
        logging.info(
            "%s features of %s: cached %s %s", encoder.name, store.spec.split, feats.shape, cache
        )
        return feats
    fields = {k: v for k, v in encoder.model.items() if k != "variant"}
    model = create_model(  # the backbone only: checkpoints' heads differ (DINO has none)
        encoder.model["variant"],
        num_classes=0,
        num_proj_layers=0,
        vit_n_last_blocks=encoder.vit_n_last_blocks,
        **fields,
    )
    params, batch_stats, _ = ckpt_lib.load_variables(encoder.checkpoint)
    variables = {
        "params": {"backbone": params["backbone"]},
        "batch_stats": {"backbone": batch_stats.get("backbone", {})},
    }
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    variables = jax.device_put(variables, repl)

    def forward(variables, batch):  # image: uint8 [B, S, S, 3] -> features [B, D]
        x = augment_device.as_float(batch["image"])
        feats = model.apply(variables, x, train=False)["features"]
        return {"features": feats, "valid": batch["valid"], "index": batch["index"]}

    forward = jax.jit(forward, in_shardings=(repl, data_sh), out_shardings=repl)
    n = store.num_images
    t0 = time.time()

    def progress(b: int, n_batches: int) -> None:
        if b % 20 == 0 or b == n_batches - 1:
            done = min((b + 1) * local_batch, n)
            rate = done / max(time.time() - t0, 1e-9)
            logging.info(
                "%s features of %s: %d/%d images (%.0f images/s, ETA %.0f s)",
                encoder.name,
                store.spec.split,
                done,
                n,
                rate,
                (n - done) / max(rate, 1e-9),
            )

    images = input_pipeline.eval_batches(store, batch_size=local_batch, image_size=image_size)
    res = eval_loop.run(
        lambda batch: forward(variables, batch),
        ({k: b[k] for k in ("image", "valid", "index")} for b in images),
        n,
        local_batch=local_batch,
        mesh=mesh,
        local_keys=("features",),
        on_batch=progress,
    )
    out = np.zeros((n, res["local_features"].shape[1]), np.float32)
    out[res["local_index"]] = res["local_features"]
    buf = io.BytesIO()
    np.save(buf, out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / (cache.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(cache)
    return out
