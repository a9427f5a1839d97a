"""SimCLR TensorFlow checkpoints -> our SimCLRModel (issue 14).

A TensorFlow network following SimCLR's conventions (tests/tf_simclr_net.py: fixed padding,
inference BN with random statistics, SK convs, ResNet-D stem and avg-pool shortcuts, both
heads) is saved under the real variable naming of each TF format (TF1 Saver with `/Momentum`
slots and an `ema_model/` copy, TF2 tf.train.Checkpoint, SavedModel), converted, and our
features, projections and logits must match TensorFlow's within 1e-4.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from medssl_jax import checkpoint
from medssl_jax.convert import common, tf_simclr
from medssl_jax.convert.__main__ import main as convert_main
from medssl_jax.models import create_model

tf_net = pytest.importorskip("tests.tf_simclr_net")

VARIANT = {0: "r50_0.0625x_sk0", 1: "r50_0.0625x_sk1"}
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(size=(2, 48, 48, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def nets() -> dict:
    """(sk, 'main' | 'ema') -> SimCLRNet; the EMA copies hold different values."""
    return {
        (sk, copy): tf_net.SimCLRNet(50, 0.0625, bool(sk), seed=10 * sk + (copy == "ema"))
        for sk in (0, 1)
        for copy in ("main", "ema")
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory, nets) -> dict:
    """(sk, format) -> path. TF1: the sk0 EMA copy has no head_supervised, the sk1 one has."""
    root = tmp_path_factory.mktemp("tf_simclr")
    out = {}
    for sk in (0, 1):
        ema = tf_net.tf1_names(nets[sk, "ema"], prefix="ema_model/")
        if sk == 0:
            ema = {k: v for k, v in ema.items() if "head_supervised" not in k}
        arrays = {**tf_net.tf1_names(nets[sk, "main"]), **ema}
        out[sk, "tf1"] = tf_net.save_tf1(
            str(root / f"tf1_sk{sk}" / "model.ckpt-250228"), arrays, momentum=True
        )
        out[sk, "tf2"] = tf_net.save_tf2_checkpoint(
            str(root / f"tf2_sk{sk}" / "ckpt-10"), nets[sk, "main"]
        )
    out[1, "saved_model"] = tf_net.save_tf2_saved_model(str(root / "saved_model"), nets[1, "main"])
    return out


@pytest.fixture(scope="module")
def converted_tf1(saved) -> dict:
    return {
        sk: tf_simclr.convert(saved[sk, "tf1"], VARIANT[sk], fmt="simclr_v2_tf1") for sk in (0, 1)
    }


_APPLY: dict = {}


def forward(c: common.Converted, images: np.ndarray) -> dict:
    """Our model (float32, BN in inference mode) on the converted variables."""
    n = c.notes
    key = (c.variant, n["num_classes"], n["num_proj_layers"], n.get("proj_out_dim", 128))
    if key not in _APPLY:
        model = create_model(
            c.variant,
            num_classes=key[1],
            num_proj_layers=key[2],
            proj_out_dim=key[3],
            dtype=np.float32,
        )
        _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    out = _APPLY[key]({"params": c.params, "batch_stats": c.batch_stats}, images)
    return {k: np.asarray(v) for k, v in out.items()}


def assert_matches(ours: dict, ref: dict, keys=("features", "projection", "logits")) -> None:
    for k in keys:
        np.testing.assert_allclose(ours[k], ref[k], **TOL, err_msg=k)


def assert_same_tree(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("sk", [0, 1])
def test_tf1_v2_matches_tensorflow(sk, converted_tf1, nets, images):
    c = converted_tf1[sk]
    assert c.parts() == ["backbone", "projection_head", "supervised_head"]
    assert c.notes["num_proj_layers"] == 3 and c.notes["proj_out_dim"] == 16
    assert c.notes["num_classes"] == 5 and c.notes["ema"] is False
    assert "bias" not in c.params["projection_head"]["layer_2"]["bn"]  # last BN: no beta
    assert_matches(forward(c, images), nets[sk, "main"](images))


@pytest.mark.parametrize("sk", [0, 1])
def test_tf2_checkpoint_and_saved_model_match_tensorflow(sk, saved, converted_tf1, nets, images):
    for fmt_path in ("tf2", "saved_model") if sk else ("tf2",):
        c = tf_simclr.convert(saved[sk, fmt_path], VARIANT[sk], fmt="simclr_v2_tf2")
        # Same network as the TF1 checkpoint: the same arrays land in the same places.
        assert_same_tree(c.params, converted_tf1[sk].params)
        assert_same_tree(c.batch_stats, converted_tf1[sk].batch_stats)
    assert_matches(forward(c, images), nets[sk, "main"](images))


def test_saved_model_folder_holds_trainable_variables_under_list_keys(saved):
    """The export's shortest paths are `trainable_variables_list/N`: the converter must
    have recovered the model paths from the object graph, not from the keys."""
    names = [
        n
        for n, _ in tf_net.tf.train.list_variables(saved[1, "saved_model"] + "/variables/variables")
    ]
    assert any(n.startswith("trainable_variables_list/") for n in names)


@pytest.mark.parametrize("sk", [0, 1])
def test_ema_takes_the_ema_copy(sk, saved, nets, images):
    c = tf_simclr.convert(saved[sk, "tf1"], VARIANT[sk], fmt="simclr_v2_tf1", ema=True)
    assert c.notes["ema"] is True
    ours, ref = forward(c, images), nets[sk, "ema"](images)
    assert_matches(ours, ref, ("features", "projection"))
    if sk == 1:  # ema_model/head_supervised exists: taken
        assert c.notes["supervised_head_from_ema"] is True
        assert_matches(ours, ref, ("logits",))
    else:  # no EMA classifier: the plain head_supervised is used
        assert c.notes["supervised_head_from_ema"] is False
        head = {layer.scope: layer.values for layer in nets[sk, "main"].layers}
        w = head["head_supervised/linear_layer"]
        np.testing.assert_allclose(ours["logits"], ref["features"] @ w["kernel"] + w["bias"], **TOL)


@pytest.mark.parametrize(
    "sk, fmt, variant, expected",
    [
        (1, "tf1", "r50_0.0625x_sk0", r"16 selective-kernel.*looks like r50_0.0625x_sk1"),
        (0, "tf1", "r50_0.0625x_sk1", r"0 selective-kernel.*variant r50_0.0625x_sk1 expects"),
        (0, "tf1", "r101_0.0625x_sk0", r"53 conv layers.*r101_0.0625x_sk0 expects 104 conv"),
        (0, "tf1", "r50_0.125x_sk0", r"128 output channels.*expects.*256 output channels"),
        (1, "tf2", "r50_0.0625x_sk0", r"looks like r50_0.0625x_sk1"),
    ],
)
def test_wrong_variant_is_refused_readably(sk, fmt, variant, expected, saved):
    fmt_name = {"tf1": "simclr_v2_tf1", "tf2": "simclr_v2_tf2"}[fmt]
    with pytest.raises(common.ConversionError, match=expected) as e:
        tf_simclr.convert(saved[sk, fmt], variant, fmt=fmt_name)
    assert "does not hold a" in str(e.value)


def test_wrong_format_or_option_is_refused(saved, tmp_path):
    with pytest.raises(common.ConversionError, match="simclr_v2_tf2"):
        tf_simclr.convert(saved[0, "tf2"], VARIANT[0], fmt="simclr_v2_tf1")
    with pytest.raises(common.ConversionError, match="simclr_v2_tf1"):
        tf_simclr.convert(saved[0, "tf1"], VARIANT[0], fmt="simclr_v2_tf2")
    with pytest.raises(common.ConversionError, match="no EMA"):
        tf_simclr.convert(saved[0, "tf2"], VARIANT[0], fmt="simclr_v2_tf2", ema=True)
    with pytest.raises(ValueError, match="rescale_v1"):
        tf_simclr.convert(saved[0, "tf1"], VARIANT[0], fmt="simclr_v2_tf1", rescale_v1=True)
    with pytest.raises(FileNotFoundError):
        tf_simclr.convert(str(tmp_path / "nothing"), VARIANT[0], fmt="simclr_v2_tf1")


def test_v1_rescale_keeps_outputs(tmp_path, images):
    net = tf_net.SimCLRNet(50, 0.0625, False, num_proj_layers=0, seed=5, kernel_scale=16.8)
    prefix = tf_net.save_tf1(
        str(tmp_path / "v1" / "model.ckpt-225206"), tf_net.tf1_names(net), momentum=False
    )
    with pytest.raises(common.ConversionError, match="no ema_model"):
        tf_simclr.convert(prefix, VARIANT[0], fmt="simclr_v1_tf1", ema=True)
    ref = net(images)
    plain = tf_simclr.convert(prefix, VARIANT[0], fmt="simclr_v1_tf1")
    scaled = tf_simclr.convert(prefix, VARIANT[0], fmt="simclr_v1_tf1", rescale_v1=True)
    assert plain.parts() == scaled.parts() == ["backbone", "supervised_head"]
    assert plain.notes["num_proj_layers"] == 0
    assert_matches(forward(plain, images), ref, ("features", "logits"))
    assert_matches(forward(scaled, images), ref, ("features", "logits"))
    # Each kernel now has the RMS of a fresh VarianceScaling(1, fan_in) init.
    kernels = [
        (k, v)
        for k, v in common.flatten(scaled.params).items()
        if k.endswith("kernel") and "backbone" in k
    ]
    for name, k in kernels:
        np.testing.assert_allclose(
            np.sqrt(np.mean(k**2)), 1 / np.sqrt(np.prod(k.shape[:-1])), rtol=1e-4, err_msg=name
        )
    assert 15 < scaled.notes["rescale_v1_mean_factor"] < 19  # ~16.8
    assert scaled.notes["rescale_v1_clipped_channels"] == 0


def test_cli_writes_what_load_variables_reads(saved, converted_tf1, tmp_path, capsys):
    out = str(tmp_path / "converted")
    argv = [f"--source={saved[1, 'tf1']}", "--format=simclr_v2_tf1", f"--variant={VARIANT[1]}"]
    assert convert_main([*argv, f"--out={out}"]) == 0
    params, batch_stats, step = checkpoint.load_variables(out)
    assert step == 0
    assert_same_tree(params, converted_tf1[1].params)
    assert_same_tree(batch_stats, converted_tf1[1].batch_stats)
    with open(os.path.join(out, common.INFO_FILE)) as f:
        info = json.load(f)
    assert info["format"] == "simclr_v2_tf1" and info["variant"] == VARIANT[1]
    assert (info["num_proj_layers"], info["proj_out_dim"], info["num_classes"]) == (3, 16, 5)
    assert info["parts"] == ["backbone", "projection_head", "supervised_head"]
    # A wrong variant is refused by the CLI with the readable message, nothing written.
    bad = str(tmp_path / "bad")
    argv[2] = "--variant=r50_0.0625x_sk0"
    assert convert_main([*argv, f"--out={bad}"]) == 2
    assert "selective-kernel" in capsys.readouterr().err and not os.path.exists(bad)
