"""Export round trips: safetensors (rebuilt Flax tree gives the same outputs) and a TF
SavedModel (its serving signature gives the Flax model's outputs), from a converted folder and
from a run's workdir. Variables are random NumPy arrays shaped by `eval_shape` (no init
compile, no training)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, safe_open

from medssl_jax import export
from medssl_jax.convert import common
from medssl_jax.models import create_model
from tests.utils import tiny_pretrain_config

SIZE = 32


def random_variables(model, seed: int, size: int = SIZE) -> dict:
    """Random variables of `model` with well-scaled kernels and non-trivial BN statistics."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)
    flat = {}
    for name, s in common.flatten(abstract).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif leaf in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, size=s.shape)
        else:  # bias, mean, cls_token, pos_embed
            v = rng.normal(size=s.shape) * 0.1
        flat[name] = v.astype(np.float32)
    return common.unflatten(flat)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def write_converted(tmp_path, variant: str, **fields) -> tuple[str, object, dict]:
    model = create_model(variant, num_classes=3, dtype=jnp.float32, **fields)
    v = random_variables(model, seed=1)
    out = common.write(
        common.Converted(
            params=v["params"],
            batch_stats=v.get("batch_stats", {}),
            variant=variant,
            source="random",
            format="test",
            input_norm=fields.get("input_norm", "none"),
            torch_maxpool=fields.get("torch_maxpool", False),
            notes={"image_size": SIZE},
        ),
        str(tmp_path / f"converted_{variant}"),
    )
    return out, model, v


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A converted r18 folder with ImageNet input norm and torch max-pool padding."""
    tmp = tmp_path_factory.mktemp("export")
    path, model, v = write_converted(
        tmp, "r18_0.125x_sk0", input_norm="imagenet", torch_maxpool=True
    )
    x = images(5)
    ref = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x))
    return tmp, path, v, x, ref


def test_safetensors_round_trip(resnet):
    tmp, path, v, x, ref = resnet
    out = export.export(path, "safetensors", str(tmp / "r18.safetensors"))
    tensors = load_file(out)
    assert tensors["params.backbone.stem_conv0.kernel"].shape == (7, 7, 3, 8)  # HWIO
    assert tensors["params.supervised_head.dense.kernel"].shape == (64, 3)  # [in, out]
    assert "batch_stats.backbone.stem_bn0.var" in tensors
    assert all(t.dtype == np.float32 for t in tensors.values())
    with safe_open(out, "numpy") as f:
        meta = f.metadata()
    assert meta["variant"] == "r18_0.125x_sk0" and meta["feature_dim"] == "64"
    assert meta["input_norm"] == "imagenet" and meta["torch_maxpool"] == "true"
    assert meta["step"] == "0" and meta["kind"] == "converted"

    rebuilt = export.variables_from_tensors(tensors)
    jax.tree.map(np.testing.assert_array_equal, rebuilt, v)
    model = create_model(
        meta["variant"],
        num_classes=int(meta["num_classes"]),
        input_norm=meta["input_norm"],
        torch_maxpool=meta["torch_maxpool"] == "true",
    )
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(rebuilt, x)
    for k in ("features", "projection", "logits"):
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0)


def test_savedmodel_round_trip(resnet):
    import tensorflow as tf

    tmp, path, v, x, ref = resnet
    out = export.export(path, "savedmodel", str(tmp / "r18_savedmodel"), platforms=("cpu",))
    loaded = tf.saved_model.load(out)
    serve = loaded.signatures["serving_default"]
    got = serve(images=tf.constant(x))
    assert sorted(got) == ["features", "logits", "projection"]
    for k in got:
        np.testing.assert_allclose(got[k].numpy(), ref[k], atol=1e-5, rtol=0)
    # One module serialized with a symbolic batch (the call above ran it at batch 5).
    assert serve.structured_input_signature[1]["images"].shape.as_list() == [None, SIZE, SIZE, 3]
    w = loaded.weights["params.backbone.stem_conv0.kernel"]
    assert w.trainable and w.shape == (7, 7, 3, 8)
    assert not loaded.weights["batch_stats.backbone.stem_bn0.mean"].trainable
    info = json.loads(open(os.path.join(out, "medssl_export.json")).read())
    assert info["feature_dim"] == "64" and info["image_size"] == str(SIZE)


def test_vit_safetensors(tmp_path):
    path, model, v = write_converted(tmp_path, "vit_tiny")
    out = export.export(path, "safetensors", str(tmp_path / "vit.safetensors"))
    tensors = load_file(out)
    assert tensors["params.backbone.patch_embed.kernel"].shape == (8, 8, 3, 64)
    assert tensors["params.backbone.block_0.attn.qkv.kernel"].shape == (64, 192)
    rebuilt = export.variables_from_tensors(tensors)
    x = images(2)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)["features"])
    np.testing.assert_allclose(apply(rebuilt, x), apply(v, x), atol=1e-5, rtol=0)


def test_run_workdir_exports_the_teacher(tmp_path):
    """A DINO-style run checkpoint (state + meta with the config): the EMA teacher is
    exported, its method head included in safetensors, the config's facts in the metadata."""
    from medssl_jax import config_lib
    from medssl_jax.checkpoint import Checkpointer

    config = tiny_pretrain_config("dino")
    model = config_lib.model_from_config(config, num_classes=0)
    student, teacher = random_variables(model, seed=2), random_variables(model, seed=3)
    teacher["params"]["method_head"] = {"last": {"kernel": np.ones((64, 16), np.float32)}}
    state = {
        "step": np.int32(4),
        "params": student["params"],
        "batch_stats": student["batch_stats"],
        "extra": {"teacher": teacher},
    }
    ckpt = Checkpointer(str(tmp_path / "run"), every_steps=1, keep=1, async_save=False)
    ckpt.save(4, state, {"method": "dino", "config": config.to_dict()}, force=True)
    ckpt.close()

    out = export.export(str(tmp_path / "run"), "safetensors", str(tmp_path / "run.safetensors"))
    tensors = load_file(out)
    rebuilt = export.variables_from_tensors(tensors)
    jax.tree.map(np.testing.assert_array_equal, rebuilt, teacher)
    with safe_open(out, "numpy") as f:
        meta = f.metadata()
    assert meta["kind"] == "run" and meta["method"] == "dino" and meta["step"] == "4"
    assert meta["variant"] == "r18_0.125x_sk0" and meta["image_size"] == str(SIZE)
    assert json.loads(meta["config"])["model"]["variant"] == "r18_0.125x_sk0"


def test_clear_errors(tmp_path, resnet, capsys):
    _, path, *_ = resnet
    with pytest.raises(export.ExportError, match="format"):
        export.export(path, "onnx", str(tmp_path / "x"))
    (tmp_path / "taken").write_text("")
    with pytest.raises(export.ExportError, match="already exists"):
        export.export(path, "safetensors", str(tmp_path / "taken"))
    with pytest.raises(export.ExportError, match="no checkpoints"):
        export.export(str(tmp_path), "safetensors", str(tmp_path / "y"))
    argv = ["--workdir", str(tmp_path), "--format", "safetensors", "--out", str(tmp_path / "z")]
    assert export.main(argv) == 2
    assert "no checkpoints" in capsys.readouterr().err
