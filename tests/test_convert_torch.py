"""PyTorch checkpoints without torch: the restricted .pth reader and the SwAV / DINO / torchvision
converters, checked against outputs PyTorch computed (tests/fixtures/make_torch_fixtures.py)."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from medssl_jax.checkpoint import load_variables
from medssl_jax.convert import __main__ as cli
from medssl_jax.convert import common, torch_models, torch_pickle
from medssl_jax.methods.dino import DINOHead
from medssl_jax.methods.swav import Prototypes
from medssl_jax.models import create_model

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch")
TOL = 1e-4
TINY_R50 = "r50_0.0625x_sk0"


def fixture(name: str) -> str:
    return os.path.join(FIX, name)


def fixture_image() -> np.ndarray:
    """Same integer-only image as make_torch_fixtures.test_image: [2, 112, 112, 3] uint8."""
    b, i, j, c = np.meshgrid(
        np.arange(2), np.arange(112), np.arange(112), np.arange(3), indexing="ij"
    )
    h = (b * 7919 + i * 104729 + j * 1299709 + c * 15485863) * 2654435761
    return ((h >> 13) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(fixture("expected.npz")) as z:
        return dict(z)


@pytest.fixture(scope="module")
def x() -> jnp.ndarray:
    return jnp.asarray(fixture_image().astype(np.float32) / 255.0)


def max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


# --- reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reader.pth", "reader_legacy.pth"])
def test_reader_equals_torch(name, expected):
    obj = torch_pickle.load(fixture(name))
    got = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    got["nested.list.0"] = obj["nested"]["list"][0]
    got["nested.tuple.0"] = obj["nested"]["tuple"][0]
    want = {k.removeprefix("reader/"): v for k, v in expected.items() if k.startswith("reader/")}
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(np.asarray(got[k], v.dtype), v, err_msg=k)
    assert obj["bf16"].dtype == ml_dtypes.bfloat16 and obj["half"].dtype == np.float16
    assert obj["i64"].dtype == np.int64 and obj["bool"].dtype == np.bool_
    assert obj["nested"]["list"][1:] == [1, "x"]
    assert obj["transposed"].flags.c_contiguous  # strided views come back as copies


def test_malicious_global_refused():
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"'os\.system'"):
        torch_pickle.load(fixture("malicious.pth"))


def test_malicious_legacy_refused(tmp_path):
    path = tmp_path / "evil.pth"
    evil = b"\x80\x02cbuiltins\neval\n\x8c\x0b1+1 or exit\x85R."
    with open(path, "wb") as f:
        for obj in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, {"x": 1}):
            pickle.dump(obj, f, protocol=2)
        f.write(evil)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"'builtins\.eval'"):
        torch_pickle.load(str(path))


def _tensor_zip(path, size: tuple, stride: tuple, numel: int) -> None:
    """A hand-written zip checkpoint {'t': one float32 tensor}, without torch."""

    def ustr(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    def ints(values: tuple) -> bytes:
        return b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"

    pid = b"(" + ustr("storage") + b"ctorch\nFloatStorage\n" + ustr("0") + ustr("cpu")
    pid += b"K" + bytes([numel]) + b"tQ"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00" + ints(size)
    tensor += ints(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R"
    data = b"\x80\x02}" + ustr("t") + tensor + b"s."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", data)
        z.writestr("ckpt/data/0", struct.pack(f"<{numel}f", *range(numel)))


def test_hand_written_strides_and_bounds(tmp_path):
    ok = tmp_path / "ok.pth"
    _tensor_zip(ok, (2, 3), (1, 2), 6)  # a transposed [3, 2] view
    np.testing.assert_array_equal(
        torch_pickle.load_state_dict(str(ok))["t"], np.arange(6, dtype=np.float32).reshape(3, 2).T
    )
    bad = tmp_path / "bad.pth"
    _tensor_zip(bad, (4,), (3,), 6)  # would read element 9 of 6
    with pytest.raises(ValueError, match="past its storage"):
        torch_pickle.load(str(bad))


def test_wrappers_and_prefixes():
    sd, info = torch_pickle.extract_state_dict(torch_pickle.load(fixture("dino_vit_full.pth")))
    assert info == {"checkpoint_key": "teacher", "stripped_prefixes": ["backbone."]}
    assert "cls_token" in sd and "head.last_layer.weight_v" in sd
    sd, info = torch_pickle.extract_state_dict({"state_dict": {"module.a": np.zeros(1)}})
    assert list(sd) == ["a"] and info["stripped_prefixes"] == ["module."]
    with pytest.raises(ValueError, match="no entry 'ema'"):
        torch_pickle.extract_state_dict({"teacher": {}}, "ema")


# --- converters: parity with PyTorch ------------------------------------------------------------


def _apply(model, converted, x):
    """Inference-mode outputs; jitted (one compilation beats op-by-op dispatch on CPU)."""
    variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def test_torchvision_resnet_parity(x, expected):
    c = torch_models.convert(fixture("resnet_tv_legacy.pth"), TINY_R50, fmt="torch_resnet")
    assert c.parts() == ["backbone", "supervised_head"] and c.input_norm == "imagenet"
    model = create_model(
        TINY_R50, num_classes=5, num_proj_layers=0, torch_maxpool=True, input_norm="imagenet"
    )
    out = _apply(model, c, x)
    assert max_diff(out["features"], expected["resnet/features"]) < TOL
    assert max_diff(out["logits"], expected["resnet/logits"]) < TOL
    out = _apply(model, c, x[:, :100, :100])  # odd sizes: 50 -> pool 25 -> stride-2 convs
    assert max_diff(out["features"], expected["resnet/features_100px"]) < TOL


def test_swav_parity(x, expected):
    c = torch_models.convert(fixture("swav.pth.tar"), TINY_R50, fmt="torch_resnet")
    assert c.parts() == ["backbone", "projection_head", "method_head"]
    assert c.notes["method_head"] == {"method": "swav", "num_prototypes": 10}
    model = create_model(
        TINY_R50,
        num_proj_layers=2,
        proj_out_dim=16,
        torch_maxpool=True,
        input_norm="imagenet",
        method_head=Prototypes(10),
        method_head_input="projection",
    )
    out = _apply(model, c, x)
    z = out["projection"] / np.linalg.norm(out["projection"], axis=-1, keepdims=True)
    assert max_diff(out["features"], expected["swav/features"]) < TOL
    assert max_diff(z, expected["swav/z"]) < TOL
    assert max_diff(out["head"], expected["swav/scores"]) < TOL
    backbone_only = torch_models.convert(
        fixture("swav.pth.tar"), TINY_R50, fmt="torch_resnet", drop_heads=True
    )
    assert backbone_only.parts() == ["backbone"]
    assert "prototypes.weight" in backbone_only.notes["dropped"]


@pytest.mark.parametrize("key", [None, "student"])
def test_dino_vit_parity(key, x, expected):
    c = torch_models.convert(
        fixture("dino_vit_full.pth"), "vit_tiny", fmt="dino_vit", checkpoint_key=key
    )
    teacher = key is None
    assert c.notes["checkpoint_key"] == ("teacher" if teacher else "student")
    assert c.notes["method_head"]["norm_last_layer"] is teacher  # student: trained weight_g
    head = DINOHead(32, 48, 16, 3, norm_last_layer=teacher)
    model = create_model(
        "vit_tiny", num_proj_layers=0, input_norm="imagenet", method_head=head,
        method_head_input="features",
    )  # fmt: skip
    out = _apply(model, c, x)
    assert max_diff(out["features"], expected["vit/cls"]) < TOL
    name = "vit/teacher_head" if teacher else "vit/student_head"
    assert max_diff(out["head"], expected[name]) < TOL
    if teacher:  # DINO's linear-eval features: last 4 CLS tokens, and [CLS, mean patch]
        m = create_model(
            "vit_tiny", num_proj_layers=0, input_norm="imagenet", vit_n_last_blocks=4,
            vit_avgpool=True,
        )  # fmt: skip
        backbone = {"params": {"backbone": c.params["backbone"]}}
        feats = jax.jit(lambda v, x: m.apply(v, x, train=False))(backbone, x)["features"]
        assert max_diff(feats[:, :256], expected["vit/cls_last4"]) < TOL
        assert max_diff(feats[:, 256:], expected["vit/cls_avgpool"][:, 64:]) < TOL


def test_dino_head_with_batchnorm_numpy_reference(resnet_sd):
    """DINO head with use_bn (Linear bias folded into the BN mean), 2 layers and a trained
    weight_g, on a ResNet (DINO's ResNet-50 full checkpoints), against NumPy."""
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    head = {
        "head.mlp.0.weight": r(24, 128), "head.mlp.0.bias": r(24),
        "head.mlp.1.weight": r(24), "head.mlp.1.bias": r(24), "head.mlp.1.running_mean": r(24),
        "head.mlp.1.running_var": rng.uniform(0.5, 2, 24).astype(np.float32),
        "head.mlp.1.num_batches_tracked": np.array(5),
        "head.mlp.3.weight": r(8, 24), "head.mlp.3.bias": r(8),
        "head.last_layer.weight_g": rng.uniform(0.5, 1.5, (12, 1)).astype(np.float32),
        "head.last_layer.weight_v": r(12, 8),
    }  # fmt: skip
    c = torch_models.convert_state_dict({**resnet_sd, **head}, TINY_R50, fmt="torch_resnet")
    assert c.notes["method_head"] == {
        "method": "dino", "out_dim": 12, "hidden_dim": 24, "bottleneck_dim": 8,
        "num_layers": 2, "use_bn": True, "norm_last_layer": False,
    }  # fmt: skip
    feats = r(3, 128)
    variables = {"params": c.params["method_head"], "batch_stats": c.batch_stats["method_head"]}
    got = DINOHead(12, 24, 8, 2, use_bn=True, norm_last_layer=False).apply(
        variables, feats, train=False
    )
    h = feats @ head["head.mlp.0.weight"].T + head["head.mlp.0.bias"]
    h = (h - head["head.mlp.1.running_mean"]) / np.sqrt(head["head.mlp.1.running_var"] + 1e-5)
    h = h * head["head.mlp.1.weight"] + head["head.mlp.1.bias"]
    h = np.asarray(jax.nn.gelu(h, approximate=False))
    h = h @ head["head.mlp.3.weight"].T + head["head.mlp.3.bias"]
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v = head["head.last_layer.weight_v"]
    w = head["head.last_layer.weight_g"] * v / np.linalg.norm(v, axis=1, keepdims=True)
    assert max_diff(got, h @ w.T) < 1e-5


# --- converters: refusals -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_sd() -> dict[str, np.ndarray]:
    return torch_pickle.load_state_dict(fixture("resnet_tv_legacy.pth"))


def test_every_source_array_used_once(resnet_sd):
    sd = dict(resnet_sd)
    del sd["layer2.1.bn2.running_var"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(common.ConversionError) as e:
        torch_models.convert_state_dict(sd, TINY_R50, fmt="torch_resnet")
    msg = str(e.value)
    assert "'layer2.1.bn2.running_var'" in msg and "extra.weight" in msg
    assert "batch_stats/backbone/group2_block1/bn2/var" in msg


@pytest.mark.parametrize(
    "variant, fmt, match",
    [
        ("r50_0.125x_sk0", "torch_resnet", r"width 0\.0625x .* has 0\.125x"),
        ("r50_0.0625x_sk1", "torch_resnet", "selective kernels"),
        ("r18_0.0625x_sk0", "torch_resnet", "only bottleneck"),
        ("vit_s16", "torch_resnet", "is a ViT"),
        ("vit_tiny", "dino_vit", "not a DINO ViT"),
    ],
)
def test_wrong_variant_refused(resnet_sd, variant, fmt, match):
    with pytest.raises(common.ConversionError, match=match):
        torch_models.convert_state_dict(resnet_sd, variant, fmt=fmt)


def test_resnet101_source_as_r50_refused(resnet_sd):
    sd = dict(resnet_sd)
    for b in range(6, 23):  # layer3 with 23 blocks: a ResNet-101 layout
        sd.update({k.replace("layer3.5.", f"layer3.{b}."): v for k, v in resnet_sd.items()
                   if k.startswith("layer3.5.")})  # fmt: skip
    with pytest.raises(common.ConversionError, match=r"source is a ResNet-101 .* 'r50_"):
        torch_models.convert_state_dict(sd, TINY_R50, fmt="torch_resnet")


def test_dino_vit_of_other_size_refused():
    with pytest.raises(common.ConversionError, match=r"dim 64 \(variant 384\)"):
        torch_models.convert(fixture("dino_vit_full.pth"), "vit_s16", fmt="dino_vit")


# --- CLI --------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "swav")
    argv = ["--source", fixture("swav.pth.tar"), "--format", "torch_resnet"]
    assert cli.main([*argv, "--variant", TINY_R50, "--out", out]) == 0
    params, batch_stats, step = load_variables(out)
    assert step == 0 and set(params) == {"backbone", "projection_head", "method_head"}
    ref = torch_models.convert(fixture("swav.pth.tar"), TINY_R50, fmt="torch_resnet")
    np.testing.assert_array_equal(
        params["backbone"]["stem_conv0"]["kernel"], ref.params["backbone"]["stem_conv0"]["kernel"]
    )
    np.testing.assert_array_equal(
        batch_stats["backbone"]["stem_bn0"]["var"], ref.batch_stats["backbone"]["stem_bn0"]["var"]
    )
    with open(os.path.join(out, common.INFO_FILE)) as f:
        info = json.load(f)
    assert info["input_norm"] == "imagenet" and info["torch_maxpool"] is True
    assert info["method_head"]["method"] == "swav" and info["stripped_prefixes"] == ["module."]
    assert (info["num_proj_layers"], info["proj_out_dim"], info["num_classes"]) == (2, 16, 0)

    bad = ["--source", fixture("malicious.pth"), "--format", "torch_resnet"]
    assert cli.main([*bad, "--variant", TINY_R50, "--out", str(tmp_path / "x")]) == 2
    assert "os.system" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_cli_refuses_options_the_format_ignores_and_names_truncation(tmp_path, capsys):
    """--ema / --rescale_v1 mean nothing to a PyTorch file (nor --drop_heads to a SimCLR one):
    refused naming the option, not silently dropped. A legacy .pth cut right after its key list
    is a one-line 'truncated' error, not a traceback."""
    argv = ["--source", fixture("swav.pth.tar"), "--format", "torch_resnet", "--variant", TINY_R50]
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--ema"]) == 2
    assert "--ema does not apply to --format=torch_resnet" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a")
    with pytest.raises(ValueError, match="--drop_heads does not apply to --format=simclr_v2_tf2"):
        cli.convert("unused", "simclr_v2_tf2", TINY_R50, drop_heads=True, ema=False)

    raw = open(fixture("resnet_tv_legacy.pth"), "rb").read()
    f = io.BytesIO(raw)

    class Skim(pickle.Unpickler):  # reads the pickles without building their objects
        def find_class(self, module, name):
            return collections.OrderedDict if name == "OrderedDict" else lambda *a, **k: None

        def persistent_load(self, pid):
            return None

    for _ in range(5):  # magic, protocol, sys_info, the object, the storage keys
        Skim(f).load()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[: f.tell()])
    with pytest.raises(ValueError, match="truncated before storage"):
        torch_pickle.load(str(cut))
    assert cli.main(["--source", str(cut), *argv[2:], "--out", str(tmp_path / "b")]) == 2
    assert "truncated before storage" in capsys.readouterr().err


def test_works_with_torch_unimportable(monkeypatch):
    """Reading and converting never import torch (a None entry makes `import torch` fail)."""
    monkeypatch.setitem(sys.modules, "torch", None)
    c = torch_models.convert(fixture("dino_vit_full.pth"), "vit_tiny", fmt="dino_vit")
    assert c.parts() == ["backbone", "method_head"]
    assert torch_pickle.load(fixture("reader_legacy.pth"))["i64"].dtype == np.int64
