"""Tests for medssl_jax.models: param counts vs REFERENCE.md, ResNet and head semantics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medssl_jax.models import (
    BasicBlock,
    BottleneckBlock,
    ProjectionHead,
    ResNet,
    SupervisedHead,
    abstract_variables,
    count_params,
    create_model,
    feature_dim,
    get_variant,
    layer_call_order,
    variant_name,
)
from medssl_jax.models.resnet import conv_fixed_padding, resnet_d_avg_pool

EPS = 1e-5
IMG = 32


class _Conv(nn.Module):
    strides: int
    features: int = 4
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        return conv_fixed_padding(
            x, self.features, self.kernel, self.strides, dtype=jnp.float32, name="c"
        )


# REFERENCE.md "Backbone parameter counts": (depth, width) -> (no SK, with SK) in millions.
REFERENCE_PARAMS = {
    (50, 1): (23.5, 35.2),
    (50, 2): (93.9, 140.3),
    (50, 4): (375.4, 560.7),
    (101, 1): (42.5, 64.7),
    (101, 2): (169.8, 257.1),
    (152, 1): (58.1, 88.9),
    (152, 2): (232.3, 353.4),
    (152, 3): (522.3, 794.7),
}


@pytest.mark.parametrize("sk", [0, 1])
@pytest.mark.parametrize("depth,width", sorted(REFERENCE_PARAMS))
def test_backbone_param_counts_match_reference(depth, width, sk):
    name = f"r{depth}_{width}x_sk{sk}"
    model = create_model(name)
    variables = abstract_variables(model, image_size=64)  # shapes only, nothing allocated
    n = count_params(variables["params"]["backbone"])
    assert abs(n / 1e6 - REFERENCE_PARAMS[depth, width][sk]) < 0.1, (name, n)
    assert feature_dim(depth, width) == 2048 * width


def _key(seed=0):
    """RBG keys: XLA:CPU compiles threefry-based initialisers very slowly (seconds per shape)."""
    return jax.random.key(seed, impl="rbg")


def _images(key, n=4, size=IMG):
    rng = np.random.default_rng(key)
    return jnp.asarray(rng.random((n, size, size, 3), dtype=np.float32))


def _apply_fn(model, train):
    def f(variables, x):
        if train:
            return model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x, train=False), None

    return jax.jit(f)


@pytest.fixture(scope="module")
def tiny():
    """r18_0.125x_sk0 with a 5-way head, its variables and jitted train/eval applies."""
    model = create_model("tiny", num_classes=5)
    variables = jax.jit(lambda x: model.init(_key(0), x, train=False))(_images(0))
    return model, variables, _apply_fn(model, True), _apply_fn(model, False)


@pytest.fixture(scope="module")
def tiny_sk():
    model = create_model("tiny_sk", num_classes=3)
    variables = jax.jit(lambda x: model.init(_key(1), x, train=False))(_images(0))
    return model, variables


def test_output_keys_shapes_and_dtypes(tiny, tiny_sk):
    model, variables, train_fn, eval_fn = tiny
    for fn in (train_fn, eval_fn):
        out, _ = fn(variables, _images(1))
        assert set(out) == {"features", "projection", "ft_features", "logits"}
        assert out["features"].shape == (4, 64)  # 512 * 0.125
        assert out["projection"].shape == (4, 128)
        assert out["ft_features"].shape == (4, 64)
        assert out["logits"].shape == (4, 5)
        assert all(v.dtype == jnp.float32 for v in out.values())
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
    sk_model, sk_vars = tiny_sk
    out = jax.jit(lambda v, x: sk_model.apply(v, x, train=False))(sk_vars, _images(1))
    assert out["features"].shape == (4, 256)  # 2048 * 0.125
    assert out["logits"].shape == (4, 3)
    # num_classes=0 -> no supervised head, no logits.
    m0 = create_model("tiny")
    v0 = jax.eval_shape(lambda: m0.init(jax.random.key(0), _images(0), train=False))
    assert set(v0["params"]) == {"backbone", "projection_head"}


def test_collections_heads_and_inits(tiny):
    _, variables, _, _ = tiny
    params, stats = variables["params"], variables["batch_stats"]
    assert set(params) == {"backbone", "projection_head", "supervised_head"}
    assert set(stats) == {"backbone", "projection_head"}
    head = params["projection_head"]
    assert set(head) == {"layer_0", "layer_1"}
    assert set(head["layer_0"]["dense"]) == {"kernel"}  # dense without bias
    assert set(head["layer_0"]["bn"]) == {"scale", "bias"}  # hidden BN with beta
    assert set(head["layer_1"]["bn"]) == {"scale"}  # last BN without beta
    assert head["layer_0"]["dense"]["kernel"].shape == (64, 64)  # hidden width = input dim
    assert head["layer_1"]["dense"]["kernel"].shape == (64, 128)
    sup = params["supervised_head"]["dense"]
    assert sup["kernel"].shape == (64, 5) and not np.any(sup["bias"])
    # Initialiser statistics on full-size layers (R50 head input 2048, 3x3x512x512 conv).
    proj = ProjectionHead().init(_key(2), jnp.ones((4, 2048)), train=False)["params"]
    np.testing.assert_allclose(np.std(proj["layer_0"]["dense"]["kernel"]), 0.01, rtol=0.02)
    sup = SupervisedHead(1000).init(_key(3), jnp.ones((1, 2048)))["params"]["dense"]
    np.testing.assert_allclose(np.std(sup["kernel"]), 0.01, rtol=0.02)
    k = _Conv(strides=1, features=512).init(_key(4), jnp.ones((1, 3, 3, 512)))["params"]["c"]
    k = np.asarray(k["kernel"])  # fan_in 3*3*512
    np.testing.assert_allclose(np.std(k), np.sqrt(1 / (9 * 512)), rtol=0.02)
    assert np.abs(k).max() <= 2 * np.sqrt(1 / (9 * 512)) / 0.8796 + 1e-6  # truncated at 2 std
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32


def test_last_gamma_zero_init(tiny_sk):
    _, variables = tiny_sk
    backbone = variables["params"]["backbone"]
    blocks = [k for k in backbone if k.startswith("group")]
    assert len(blocks) == 16
    for name in blocks:
        block = backbone[name]
        assert not np.any(block["bn3"]["scale"]), name
        assert np.all(block["bn1"]["scale"] == 1), name
        if "shortcut_bn" in block:
            assert np.all(block["shortcut_bn"]["scale"] == 1), name


def test_train_mode_uses_batch_stats_eval_mode_running_stats(tiny):
    model, variables, train_fn, eval_fn = tiny
    x = _images(2)
    x_other = x.at[1:].set(_images(3)[1:])  # same first image, different batch mates
    out_a, upd = train_fn(variables, x)
    out_b, _ = train_fn(variables, x_other)
    assert not np.allclose(out_a["features"][0], out_b["features"][0], atol=1e-5)
    ev_a, _ = eval_fn(variables, x)
    ev_b, _ = eval_fn(variables, x_other)
    np.testing.assert_allclose(ev_a["features"][0], ev_b["features"][0], rtol=1e-6, atol=1e-6)
    # Running stats: new = 0.9 * old + 0.1 * batch statistic of the stem conv output.
    _, inter = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    stem = inter["intermediates"]["backbone"]["stem_conv0"]["__call__"][0]
    old = variables["batch_stats"]["backbone"]["stem_bn0"]
    new = upd["batch_stats"]["backbone"]["stem_bn0"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * stem.var((0, 1, 2)), rtol=1e-3, atol=1e-6
    )
    # Eval mode does not touch batch_stats.
    _, same = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])


def test_bfloat16_forward_close_to_float32(tiny):
    model, variables, _, eval_fn = tiny
    bf_model = model.clone(dtype=jnp.bfloat16)
    bf_vars = jax.eval_shape(lambda: bf_model.init(_key(0), _images(0), train=False))
    for leaf in jax.tree.leaves(bf_vars):  # parameters and statistics stay float32
        assert leaf.dtype == jnp.float32

    def rel_err(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    x = _images(4)
    ref, _ = eval_fn(variables, x)
    out = jax.jit(lambda v, x: bf_model.apply(v, x, train=False))(variables, x)
    for key in ("features", "projection", "logits"):
        assert out[key].dtype == jnp.float32
        assert rel_err(out[key], ref[key]) < 0.02, key
    # Train mode (batch statistics; batch 16 so 1x1 late stages are not normalised over 4).
    x = _images(4, n=16)
    train = [_apply_fn(m, True)(variables, x) for m in (model, bf_model)]
    (ref, _), (out, upd) = train
    for key in ("features", "projection", "logits"):
        assert rel_err(out[key], ref[key]) < 0.06, key
    for leaf in jax.tree.leaves(upd):
        assert leaf.dtype == jnp.float32


def test_sk_and_resnet_d_paths_in_param_tree(tiny_sk):
    _, variables = tiny_sk
    bb = variables["params"]["backbone"]
    stem = {f"stem_{k}{i}" for i in range(3) for k in ("conv", "bn")}  # ResNet-D stem
    assert {k for k in bb if k.startswith("stem")} == stem
    assert bb["stem_conv0"]["kernel"].shape == (3, 3, 3, 4)  # 32 * 0.125
    assert bb["stem_conv2"]["kernel"].shape == (3, 3, 4, 8)  # 64 * 0.125
    block = bb["group2_block0"]
    assert "conv2" not in block
    assert set(block["sk_conv"]) == {"conv", "bn", "fc0", "fc0_bn", "fc1"}
    assert block["sk_conv"]["conv"]["kernel"].shape == (3, 3, 16, 32)  # 2f, f = 16
    assert block["sk_conv"]["fc0"]["kernel"].shape == (1, 1, 16, 32)  # max(f/16, 32)
    assert block["sk_conv"]["fc1"]["kernel"].shape == (1, 1, 32, 32)
    assert block["shortcut_conv"]["kernel"].shape == (1, 1, 32, 64)  # 1x1 after avg-pool
    assert set(block) == {"shortcut_conv", "shortcut_bn", "conv1", "bn1", "sk_conv", "conv3", "bn3"}


def test_layer_call_order_follows_tf_creation_order():
    order = layer_call_order(create_model("tiny_sk", num_classes=3))
    paths = ["/".join(p) for _, p in order]
    assert paths[:6] == [f"backbone/stem_{k}{i}" for i in range(3) for k in ("conv", "bn")]
    names = "shortcut_conv shortcut_bn conv1 bn1 sk_conv/conv sk_conv/bn sk_conv/fc0"
    names += " sk_conv/fc0_bn sk_conv/fc1 conv3 bn3"
    assert paths[6:17] == ["backbone/group1_block0/" + n for n in names.split()]
    kinds = [k for k, _ in order]
    # R50-SK: 3 stem + 16 blocks x 5 convs + 4 shortcut convs; 2 projection + 1 supervised dense.
    assert kinds.count("conv2d") == 3 + 16 * 5 + 4
    assert kinds.count("dense") == 3 and paths[-1] == "supervised_head/dense"
    assert len(set(paths)) == len(paths)


def _avg_pool_reference(x, stride):
    """TF semantics: stride 1 -> SAME (pad after), padding excluded; stride 2 -> VALID."""
    x = np.asarray(x)
    b, h, w, c = x.shape
    if stride == 1:
        out = np.zeros_like(x)
        for i in range(h):
            for j in range(w):
                out[:, i, j] = x[:, i : i + 2, j : j + 2].mean(axis=(1, 2))  # clipped window
        return out
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def test_resnet_d_avg_pool_excludes_padding():
    x = _images(5, n=2, size=6)
    for stride in (1, 2):
        np.testing.assert_allclose(
            resnet_d_avg_pool(x, stride), _avg_pool_reference(x, stride), rtol=1e-6, atol=1e-6
        )
    # Bottom-right corner of stride-1 output is the pixel itself (not pixel / 4).
    np.testing.assert_allclose(resnet_d_avg_pool(x, 1)[:, -1, -1], x[:, -1, -1], rtol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_resnet_d_block_is_relu_of_shortcut_at_init(stride):
    """Zero-init last gamma: a fresh SK bottleneck block = relu(BN(conv1x1(avgpool(x))))."""
    block = BottleneckBlock(filters=8, strides=stride, use_projection=True, sk_ratio=0.0625)
    x = _images(6, n=2, size=8) * 2 - 1
    variables = block.init(_key(0), x, train=False)
    out = block.apply(variables, x, train=False)
    w = np.asarray(variables["params"]["shortcut_conv"]["kernel"])[0, 0]  # [C_in, 32]
    ref = np.maximum(_avg_pool_reference(x, stride) @ w / np.sqrt(1 + EPS), 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_identity_block_is_identity_at_init(block_cls):
    """Non-projection blocks output relu(x) (= x for x >= 0) in train and eval mode."""
    channels = 16
    block = block_cls(filters=channels // (4 if block_cls is BottleneckBlock else 1))
    x = jnp.asarray(2 * np.random.default_rng(8).random((3, 6, 6, channels), dtype=np.float32))
    variables = block.init(_key(0), x, train=False)
    np.testing.assert_allclose(block.apply(variables, x, train=False), x, rtol=1e-6)
    out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, x, rtol=1e-6)


def _subtree_abs_sum(tree):
    return float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))


def test_freeze_backbone_zero_grads_and_running_stats(tiny):
    model, variables, _, eval_fn = tiny
    frozen = model.clone(freeze_backbone=True, ft_proj_selector=1)
    x = _images(9)
    labels = jnp.arange(4) % 5

    def loss(params):
        out, upd = frozen.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        logp = jax.nn.log_softmax(out["logits"])
        return -jnp.take_along_axis(logp, labels[:, None], 1).mean(), (out, upd)

    grads, (out, upd) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert _subtree_abs_sum(grads["backbone"]) == 0.0
    assert _subtree_abs_sum(grads["projection_head"]) == 0.0
    assert _subtree_abs_sum(grads["supervised_head"]) > 0.0
    # BN in inference mode: same as eval outputs; batch_stats untouched.
    ref = frozen.apply(variables, x, train=False)
    for key in ("features", "ft_features", "logits"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6)
    ev, _ = eval_fn(variables, x)
    np.testing.assert_allclose(out["features"], ev["features"], rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], variables["batch_stats"])


def test_head_stop_gradient(tiny):
    model, variables, _, _ = tiny
    probe = model.clone(head_stop_gradient=True)
    x = _images(10)

    def outputs(m, params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        out, _ = m.apply(v, x, train=True, mutable=["batch_stats"])
        return out["logits"], out["projection"]

    @jax.jit
    def all_grads(params):
        (logits, proj), vjp = jax.vjp(lambda p: outputs(probe, p), params)
        g_logits = vjp((logits, jnp.zeros_like(proj)))[0]
        g_proj = vjp((jnp.zeros_like(logits), proj))[0]
        return g_logits, g_proj

    g_logits, g_proj = all_grads(variables["params"])
    assert _subtree_abs_sum(g_logits["backbone"]) == 0.0
    assert _subtree_abs_sum(g_logits["supervised_head"]) > 0.0
    assert _subtree_abs_sum(g_proj["backbone"]) > 0.0  # the backbone still trains


def test_ft_proj_selector_picks_head_hidden(tiny):
    model, variables, _, eval_fn = tiny
    x = _images(11)
    base, _ = eval_fn(variables, x)
    np.testing.assert_array_equal(base["ft_features"], base["features"])
    head = variables["params"]["projection_head"]
    w0 = head["layer_0"]["dense"]["kernel"]
    bn0 = head["layer_0"]["bn"]
    hidden1 = np.maximum(
        base["features"] @ w0 / np.sqrt(1 + EPS) * bn0["scale"] + bn0["bias"], 0
    )  # eval BN with initial running stats (mean 0, var 1)
    params = {k: v for k, v in variables["params"].items() if k != "supervised_head"}
    no_sup = {"params": params, "batch_stats": variables["batch_stats"]}
    m1 = model.clone(num_classes=0, ft_proj_selector=1)
    out1 = m1.apply(no_sup, x, train=False)
    np.testing.assert_allclose(out1["ft_features"], hidden1, rtol=1e-5, atol=1e-6)
    m2 = model.clone(num_classes=0, ft_proj_selector=2)
    out2 = m2.apply(no_sup, x, train=False)
    np.testing.assert_array_equal(out2["ft_features"], out2["projection"])
    assert out2["ft_features"].shape == (4, 128)
    with pytest.raises(ValueError, match="ft_proj_selector"):
        model.clone(ft_proj_selector=3)


def test_sharded_train_forward_matches_unsharded(tiny):
    """Under jit with the batch sharded over 8 devices, BN statistics stay global."""
    model, variables, train_fn, _ = tiny
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = Mesh(devices, ("data",))
    x = _images(12, n=8)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    out, upd = train_fn(vs, xs)
    ref, ref_upd = train_fn(variables, x)
    np.testing.assert_allclose(out["projection"], ref["projection"], rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), upd, ref_upd)


def test_variants_parse_and_errors():
    assert get_variant("r50_1x_sk0") == dict(depth=50, width_multiplier=1, sk_ratio=0.0)
    assert get_variant("r152_3x_sk1") == dict(depth=152, width_multiplier=3, sk_ratio=0.0625)
    assert get_variant("r18_0.125x_sk0")["width_multiplier"] == 0.125
    assert get_variant("tiny") == get_variant("r18_0.125x_sk0")
    for name in ("r50_2x_sk1", "r101_2x_sk1", "r152_2x_sk0", "r50_4x_sk0", "r34_1x_sk0"):
        v = get_variant(name)
        assert variant_name(v["depth"], v["width_multiplier"], v["sk_ratio"]) == name
    for bad in ("r51_1x_sk0", "r50_1x", "r50_0x_sk0", "resnet50", "r50_1x_sk2", ""):
        with pytest.raises(ValueError, match=r"r\{depth\}_\{width\}x_sk\{0\|1\}"):
            get_variant(bad)
    m = create_model("r101_2x_sk1", num_classes=7, depth=50, num_proj_layers=3)
    assert (m.depth, m.width_multiplier, m.sk_ratio, m.num_classes) == (50, 2, 0.0625, 7)
    assert m.num_proj_layers == 3
    with pytest.raises(ValueError, match="unknown SimCLRModel field"):
        create_model("tiny", widht_multiplier=2)
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        create_model("tiny").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_num_proj_layers_three_and_zero():
    m3 = create_model("tiny", num_proj_layers=3, ft_proj_selector=2)
    v3 = jax.eval_shape(lambda: m3.init(jax.random.key(0), _images(0), train=False))
    assert set(v3["params"]["projection_head"]) == {"layer_0", "layer_1", "layer_2"}
    m0 = create_model("tiny", num_proj_layers=0, num_classes=2)
    init = jax.jit(lambda x: m0.init_with_output(_key(0), x, train=False))
    out, v0 = init(_images(0, n=2))
    assert "projection_head" not in v0["params"]
    np.testing.assert_array_equal(out["projection"], out["features"])
    assert out["logits"].shape == (2, 2)
