r"""Export a trained encoder out of JAX: framework-neutral weights or a TF SavedModel.

  python -m medssl_jax.export --workdir=runs/simclr --format=safetensors --out=enc.safetensors
  python -m medssl_jax.export --workdir=/ckpt/dino_r50 --format=savedmodel --out=enc_savedmodel

`--workdir` is a run's workdir (pretraining, fine-tuning or linear evaluation: the newest
checkpoint under DIR/checkpoints/<step>/, or a finished fine-tune's validation-selected DIR/best/
that its results.json reports, and the config saved in the checkpoint `meta`; a DINO run gives
its EMA teacher) or a converted checkpoint folder (DIR/converted.json, `medssl_jax.convert`).

safetensors: every variable of the encoder and its heads, float32, in Flax layout (conv kernels
HWIO, dense kernels [in, out], BatchNorm `scale`/`bias`/`mean`/`var`), named by the Flax path
joined with '.' under `params.` or `batch_stats.` (`params.backbone.stem_conv0.kernel`,
`batch_stats.backbone.stem_bn0.mean`). The header's metadata (all strings) says how to rebuild
the network: variant, feature_dim, input_norm, torch_maxpool, step, source, layout.

savedmodel: a TF SavedModel (jax2tf, native serialization: the StableHLO of the Flax model runs
in TF through XlaCallModule) whose `serving_default` signature maps `images` float32
[batch, H, W, 3] in [0, 1] (any batch, H = W = the run's image size) to {features, projection,
and logits when the model has a supervised head}, in inference mode (BatchNorm running
statistics; the input normalisation is inside the model). The weights are tf.Variables named
like the safetensors tensors (`loaded.weights[name]`), so they are inspectable and TF gradients
reach them; OUT/medssl_export.json holds the safetensors metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from medssl_jax.checkpoint import absolute
from medssl_jax.checkpoint import exists as ckpt_exists
from medssl_jax.convert import common

FORMATS = ("safetensors", "savedmodel")
COLLECTIONS = ("params", "batch_stats")
EXPORT_VERSION = "1"
LAYOUT = (
    "Flax layout, float32: conv kernels HWIO, dense kernels [in, out], BatchNorm "
    "scale/bias/mean/var (PyTorch: weight/bias/running_mean/running_var), eps 1e-5; tensor "
    "names are the Flax variable paths joined by '.', prefixed params. or batch_stats."
)
DEFAULT_CONVERTED_SIZE = 224  # converted releases carry no image size; the size they trained at


class ExportError(ValueError):
    """A request that cannot be exported (no checkpoint, unknown format, output exists...)."""


@dataclasses.dataclass
class Source:
    """An encoder to export: its variables (NumPy), the SimCLRModel computing it, and facts."""

    params: dict
    batch_stats: dict
    step: int
    model: Any  # SimCLRModel (float32 compute) without method head
    image_size: int
    info: dict  # string-able facts for the metadata (variant, input_norm, kind, ...)

    def model_variables(self) -> dict:
        """The variables the exported model applies (a pretraining method's head left out)."""
        keep = ("backbone", "projection_head", "supervised_head")
        return {
            "params": {k: v for k, v in self.params.items() if k in keep},
            "batch_stats": {k: v for k, v in self.batch_stats.items() if k in keep},
        }


# ----------------------------------------------------------------------------- naming


def tensors_from_variables(params: Mapping, batch_stats: Mapping) -> dict[str, np.ndarray]:
    """{'params.backbone.stem_conv0.kernel': float32 array, ...} for every variable."""
    try:
        flat = common.flatten({"params": params, "batch_stats": batch_stats}, sep=".")
    except ValueError as e:
        raise ExportError(str(e)) from None
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}


def variables_from_tensors(tensors: Mapping[str, Any]) -> dict[str, dict]:
    """Inverse of `tensors_from_variables`: {'params': {...}, 'batch_stats': {...}}."""
    return {c: {} for c in COLLECTIONS} | common.unflatten(tensors, sep=".")


# ----------------------------------------------------------------------------- source


def _read_run_meta(workdir: str) -> tuple[dict, int]:
    """(meta, step) of the newest checkpoint of a run's workdir (meta = {'config', ...})."""
    import orbax.checkpoint as ocp
    from etils import epath

    from medssl_jax.checkpoint import absolute

    directory = epath.Path(absolute(workdir)) / "checkpoints"
    with ocp.CheckpointManager(
        directory, item_handlers={"meta": ocp.JsonCheckpointHandler()}
    ) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise ExportError(f"{workdir!r} has no checkpoint under checkpoints/<step>/")
        if not (directory / str(step) / "meta").exists():
            raise ExportError(
                f"{directory}/{step} has no meta (config): not a run's checkpoint; a converted "
                "folder needs its converted.json"
            )
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return dict(meta or {}), int(step)


def _head_shape(params: Mapping) -> tuple[int, int | None]:
    """(num_proj_layers, proj_out_dim) of the projection head in `params`."""
    head = params.get("projection_head", {})
    layers = sorted(int(k.split("_")[1]) for k in head if k.startswith("layer_"))
    if not layers:
        return 0, None
    return len(layers), int(np.shape(head[f"layer_{layers[-1]}"]["dense"]["kernel"])[-1])


def _num_classes(params: Mapping) -> int:
    head = params.get("supervised_head")
    return int(np.shape(head["dense"]["kernel"])[-1]) if head else 0


def load_source(workdir: str, image_size: int | None = None) -> Source:
    """The encoder of a run's workdir or a converted folder, with the model that computes it."""
    import ml_collections

    from medssl_jax import config_lib
    from medssl_jax.checkpoint import load_variables, reported_best_step
    from medssl_jax.models import create_model

    if not ckpt_exists(workdir):
        raise ExportError(
            f"{workdir!r} holds no checkpoints/: expected a run's workdir or a converted folder"
        )
    converted = common.read_info(workdir)
    if converted is None:
        meta, meta_step = _read_run_meta(workdir)
        if "config" not in meta:
            raise ExportError(f"the checkpoint meta of {workdir!r} holds no config")
        config = ml_collections.ConfigDict(meta["config"])
    params, batch_stats, step = load_variables(workdir)  # best/ of a finished fine-tune
    num_classes = _num_classes(params)
    f32 = jnp.float32
    if converted is None:
        if step != meta_step and step != reported_best_step(workdir):
            raise ExportError(f"{workdir!r}: newest state step {step} != meta step {meta_step}")
        model = config_lib.model_from_config(config, num_classes=num_classes, dtype=f32)
        size = int(image_size or config.data.image_size)
        info = {
            "kind": "run",
            "method": str(meta.get("label", meta.get("method", config.get("method", "")))),
            "variant": str(config.model.variant),
            "train_dtype": str(config.model.dtype),
            "config": json.dumps(config.to_dict(), sort_keys=True, default=str),
        }
    else:
        layers, out_dim = _head_shape(params)
        fields: dict[str, Any] = dict(
            num_proj_layers=layers,
            input_norm=str(converted.get("input_norm", "none")),
            torch_maxpool=bool(converted.get("torch_maxpool", False)),
            dtype=f32,
        )
        if out_dim is not None:
            fields["proj_out_dim"] = out_dim
        for key in ("vit_n_last_blocks", "vit_avgpool", "cifar_stem"):
            if key in converted:
                fields[key] = converted[key]
        model = create_model(converted["variant"], num_classes=num_classes, **fields)
        size = int(image_size or converted.get("image_size", DEFAULT_CONVERTED_SIZE))
        info = {
            "kind": "converted",
            "method": str(converted.get("format", "")),
            "variant": str(converted["variant"]),
            "converted": json.dumps(converted, sort_keys=True, default=str),
        }
    src = Source(params, batch_stats, step, model, size, info)
    _check_fits(src, workdir)
    return src


def _check_fits(src: Source, workdir: str) -> None:
    """The rebuilt model must have exactly the exported variables' names and shapes."""

    x = jax.ShapeDtypeStruct((1, src.image_size, src.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: src.model.init(jax.random.key(0), x, train=False), x)
    want = {k: tuple(v.shape) for k, v in common.flatten(abstract).items()}
    have = {k: tuple(np.shape(v)) for k, v in common.flatten(src.model_variables()).items()}
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            raise ExportError(
                f"the checkpoint of {workdir!r} does not fit the model its config describes: "
                f"{name} is {have.get(name, 'absent')} there, {want.get(name, 'absent')} in "
                f"the model"
            )
    # Variables go in as arguments (traced): ViT's pos-embed resize indexes them with traced
    # indices, which fails on NumPy arrays closed over.
    apply = lambda v, x: src.model.apply(v, x, train=False)  # noqa: E731
    out = jax.eval_shape(apply, src.model_variables(), x)
    src.info["feature_dim"] = str(out["features"].shape[-1])
    src.info["proj_out_dim"] = str(out["projection"].shape[-1])
    src.info["num_classes"] = str(out["logits"].shape[-1] if "logits" in out else 0)


def metadata(src: Source, workdir: str) -> dict[str, str]:
    """The safetensors header metadata (string -> string)."""
    m = src.model
    return {
        "format": f"medssl_jax.export/{EXPORT_VERSION}",
        **src.info,
        "input_norm": m.input_norm,
        "torch_maxpool": str(bool(m.torch_maxpool)).lower(),
        "cifar_stem": str(bool(m.cifar_stem)).lower(),
        "image_size": str(src.image_size),
        "step": str(src.step),
        "source": absolute(workdir),
        "layout": LAYOUT,
        "input": "float32 RGB [B, H, W, 3] in [0, 1]; the model applies input_norm itself",
    }


# ----------------------------------------------------------------------------- writers


def export_safetensors(src: Source, out: str, workdir: str) -> str:
    """Every variable (params and batch_stats, heads included) as float32 tensors."""
    from safetensors.numpy import save_file

    save_file(tensors_from_variables(src.params, src.batch_stats), out, metadata(src, workdir))
    return out


def serving_fn(src: Source):
    """(variables, images) -> {features, projection[, logits]}: the exported computation."""
    model = src.model

    def predict(variables: dict, images: jax.Array) -> dict[str, jax.Array]:
        y = model.apply(variables, images, train=False)
        return {k: y[k] for k in ("features", "projection", "logits") if k in y}

    return predict


def export_savedmodel(
    src: Source, out: str, workdir: str, platforms: Sequence[str] = ("cpu", "cuda")
) -> str:
    """TF SavedModel via jax2tf (native serialization) with variables as tf.Variables."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    size = src.image_size
    variables = src.model_variables()
    names = tensors_from_variables(variables["params"], variables["batch_stats"])
    tf_flat = {
        name: tf.Variable(value, trainable=name.startswith("params."), name=name)
        for name, value in names.items()
    }
    tf_vars = variables_from_tensors(tf_flat)
    predict_tf = jax2tf.convert(
        serving_fn(src),
        polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
        native_serialization_platforms=tuple(platforms),
        with_gradient=True,
    )
    module = tf.Module()
    module.weights = dict(tf_flat)  # tracked, so saved; loaded.weights[name] after loading

    @tf.function(
        autograph=False,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")],
    )
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return predict_tf(tf_vars, images)

    module.serve = serve
    tf.saved_model.save(
        module,
        out,
        signatures={"serving_default": serve},
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=True),
    )
    (epath.Path(out) / "medssl_export.json").write_text(
        json.dumps(metadata(src, workdir), indent=2)
    )
    return out


def export(
    workdir: str,
    fmt: str,
    out: str,
    *,
    image_size: int | None = None,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> str:
    """Export the encoder of `workdir` as `fmt` to the new path `out`; returns `out`.

    Raises ExportError before reading anything for an unknown format, an existing output or
    a workdir without checkpoints.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if epath.Path(out).exists():
        raise ExportError(f"{out!r} already exists: choose a new --out")
    if not ckpt_exists(workdir):
        raise ExportError(
            f"{workdir!r} holds no checkpoints/: expected a run's workdir or a converted folder"
        )
    src = load_source(workdir, image_size)
    if fmt == "safetensors":
        return export_safetensors(src, out, workdir)
    return export_savedmodel(src, out, workdir, platforms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medssl_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="run workdir or converted checkpoint folder")
    p.add_argument("--format", required=True, help=f"one of {FORMATS}")
    p.add_argument("--out", required=True, help="new file (safetensors) or folder (savedmodel)")
    p.add_argument(
        "--image_size", type=int, default=None, help="SavedModel input size (default: the run's)"
    )
    p.add_argument(
        "--platforms",
        default="cpu,cuda",
        help="SavedModel: platforms the serialized computation is lowered for",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        out = export(
            a.workdir,
            a.format,
            a.out,
            image_size=a.image_size,
            platforms=tuple(s for s in a.platforms.split(",") if s),
        )
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
