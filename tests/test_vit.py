"""Tests of the DINO-style ViT backbone: sizes, position-embedding resizing, and a NumPy oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from medssl_jax.models.vit import (
    VIT_CONFIGS,
    VisionTransformer,
    interpolate_pos_embed,
    vit_feature_dim,
)

# ----------------------------------------------------------------------------- NumPy oracle
# Written from the architecture description (DINO vision_transformer.py), in float64, using
# only the raw parameter arrays: no Flax module is called.


def np_layer_norm(x: np.ndarray, p: dict) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def np_dense(x: np.ndarray, p: dict) -> np.ndarray:
    return x @ p["kernel"] + p["bias"]


def np_cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of DINO's resize along one axis (float64).

    torch bicubic F.interpolate as DINO calls it: scale_factor (n_out + 0.1) / n_in sets the
    sample positions (dst + 0.5) / factor - 0.5, cubic convolution A = -0.75, taps
    floor(s) - 1 .. floor(s) + 2 clamped to the input range. Not the identity for n_in == n_out.
    """
    a = -0.75
    s = (np.arange(n_out) + 0.5) * n_in / (n_out + 0.1) - 0.5  # sample positions (input)
    base = np.floor(s)
    t = s - base

    def conv1(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def conv2(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.stack([conv2(t + 1), conv1(t), conv1(1 - t), conv2(2 - t)], 1)  # [n_out, 4]
    idx = np.clip(base[:, None].astype(int) + np.arange(-1, 3)[None], 0, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), 4), idx.ravel()), w.ravel())
    return m


def np_vit_features(
    params: dict, images: np.ndarray, *, patch: int, heads: int, n_last: int, avgpool: bool
) -> np.ndarray:
    p = params
    x = np.asarray(images, np.float64)
    b, h, w, c = x.shape
    gh, gw = h // patch, w // patch
    kernel = np.asarray(p["patch_embed"]["kernel"], np.float64)  # [p, p, C, D]
    d = kernel.shape[-1]
    # Patch embedding as an explicit per-patch matmul.
    patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    tok = patches.reshape(b, gh * gw, patch * patch * c) @ kernel.reshape(-1, d)
    tok = tok + p["patch_embed"]["bias"]  # [B, gh*gw, D]
    pos = np.asarray(p["pos_embed"], np.float64)[0]  # [1+g*g, D]
    g = int(round(np.sqrt(pos.shape[0] - 1)))
    patch_pos = pos[1:]
    if (gh, gw) != (g, g):
        grid = patch_pos.reshape(g, g, d)
        grid = np.einsum("ig,gkd->ikd", np_cubic_resize_matrix(g, gh), grid)
        grid = np.einsum("jk,ikd->ijd", np_cubic_resize_matrix(g, gw), grid)
        patch_pos = grid.reshape(gh * gw, d)
    cls = np.broadcast_to(np.asarray(p["cls_token"], np.float64), (b, 1, d))
    x = np.concatenate([cls, tok], 1) + np.concatenate([pos[:1], patch_pos], 0)[None]
    depth = sum(k.startswith("block_") for k in p)
    hd = d // heads
    outs = []
    for i in range(depth):
        bp = p[f"block_{i}"]
        y = np_layer_norm(x, bp["norm1"])
        qkv = np_dense(y, bp["attn"]["qkv"]).reshape(b, -1, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # [B, H, N, hd]
        logits = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        logits = logits - logits.max(-1, keepdims=True)
        attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        x = x + np_dense(y, bp["attn"]["proj"])
        y = np_dense(np_layer_norm(x, bp["norm2"]), bp["mlp"]["fc1"])
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
        x = x + np_dense(y, bp["mlp"]["fc2"])
        if depth - i <= n_last:
            outs.append(np_layer_norm(x, p["norm"]))
    feats = [o[:, 0] for o in outs]
    if avgpool:
        feats.append(outs[-1][:, 1:].mean(1))
    return np.concatenate(feats, -1)


def _to_np(tree: dict) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _images(n: int, size: int, seed: int = 0) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def _init(model: VisionTransformer, x: jnp.ndarray, seed: int = 0) -> dict:
    """The model's variables for `x` (eager: faster than jit for these tiny nets on CPU)."""
    return model.init(jax.random.key(seed), x, train=False)


def _apply(model: VisionTransformer, variables: dict, x: jnp.ndarray, train: bool = False):
    """The model's features for `x`."""
    return model.apply(variables, x, train=train)


# ------------------------------------------------------------------------------------- sizes


def _expected_params(d: int, depth: int, patch: int, grid: int = 14) -> int:
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return 3 * patch * patch * d + d + d + (1 + grid * grid) * d + depth * per_block + 2 * d


@pytest.mark.parametrize("name", ["vit_s16", "vit_b16", "vit_ti16"])
def test_param_counts_and_feature_dims(name: str):
    cfg = VIT_CONFIGS[name]
    model = VisionTransformer(**cfg)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert set(variables) == {"params"}
    leaves = jax.tree.leaves(variables["params"])
    assert all(a.dtype == jnp.float32 for a in leaves)
    n = sum(int(np.prod(a.shape)) for a in leaves)
    assert n == _expected_params(cfg["dim"], cfg["depth"], cfg["patch_size"])
    if name == "vit_s16":
        assert abs(n - 21_665_664) <= 50_000
    if name == "vit_b16":
        assert abs(n - 85.8e6) < 0.1e6
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, vit_feature_dim(cfg["dim"], 4, False)) and out.dtype == jnp.float32
    pooled = VisionTransformer(**cfg, avgpool=True)
    out = jax.eval_shape(lambda v, x: pooled.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 5 * cfg["dim"])


def test_feature_dim_values():
    assert vit_feature_dim(384, 4, False) == 1536
    assert vit_feature_dim(384, 4, True) == 1920
    assert vit_feature_dim(768, 1, True) == 1536
    assert VisionTransformer(**VIT_CONFIGS["vit_s16"]).feature_dim == 1536


def test_param_names_mirror_dino():
    model = VisionTransformer(**VIT_CONFIGS["vit_tiny"])
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = params["params"]
    d, p = 64, 8
    assert params["patch_embed"]["kernel"].shape == (p, p, 3, d)
    assert params["cls_token"].shape == (1, 1, d)
    assert params["pos_embed"].shape == (1, 1 + 14 * 14, d)
    assert sorted(params) == sorted(
        ["patch_embed", "cls_token", "pos_embed", "norm"] + [f"block_{i}" for i in range(4)]
    )
    blk = params["block_0"]
    assert sorted(blk) == ["attn", "mlp", "norm1", "norm2"]
    assert blk["attn"]["qkv"]["kernel"].shape == (d, 3 * d)
    assert blk["mlp"]["fc1"]["kernel"].shape == (d, 4 * d)


# ------------------------------------------------------------------------- NumPy equivalence


@pytest.mark.parametrize(
    "ref_grid, n_last, avgpool, hw",
    [
        (4, 4, False, (32, 32)),
        (4, 2, True, (32, 32)),
        (14, 4, True, (32, 48)),  # pos embed resized 14x14 -> 4x6 (non-square: axis order)
    ],
)
def test_matches_numpy_reference(ref_grid: int, n_last: int, avgpool: bool, hw: tuple[int, int]):
    model = VisionTransformer(
        **VIT_CONFIGS["vit_tiny"], ref_grid=ref_grid, n_last_blocks=n_last, avgpool=avgpool
    )
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3), jnp.float32)
    params = _init(model, x, seed=1)["params"]
    # Random (non-default) LayerNorm params, so scale/bias handling is exercised too.
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda a: jnp.asarray(a + 0.1 * rng.standard_normal(a.shape), jnp.float32), params
    )
    got = np.asarray(_apply(model, {"params": params}, x))
    want = np_vit_features(
        _to_np(params), np.asarray(x), patch=8, heads=2, n_last=n_last, avgpool=avgpool
    )
    assert got.shape == (2, vit_feature_dim(64, n_last, avgpool))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # `train` changes nothing (no BN / dropout).
    np.testing.assert_array_equal(got, np.asarray(_apply(model, {"params": params}, x, train=True)))


def test_features_are_concatenated_block_cls_tokens():
    cfg = VIT_CONFIGS["vit_tiny"]
    x = _images(2, 32, seed=3)
    full = VisionTransformer(**cfg, n_last_blocks=4, avgpool=True)
    params = _init(full, x, seed=4)
    f4 = np.asarray(_apply(full, params, x))  # [2, 5*64]
    f1 = np.asarray(_apply(VisionTransformer(**cfg, n_last_blocks=1), params, x))
    f2 = np.asarray(_apply(VisionTransformer(**cfg, n_last_blocks=2), params, x))
    np.testing.assert_allclose(f1, f4[:, 192:256], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f2, f4[:, 128:256], rtol=1e-6, atol=1e-6)
    assert not np.allclose(f4[:, :64], f4[:, 192:256])  # different blocks, different tokens


# ------------------------------------------------------------------ position-embedding resize


def test_pos_embed_unchanged_at_reference_grid():
    # A ViT with patch 16 at 224 px: grid 14 = ref_grid, the stored embedding must be used as is.
    model = VisionTransformer(dim=32, depth=2, num_heads=2, patch_size=16, n_last_blocks=2)
    x = _images(1, 224, seed=5)
    params = _init(model, x, seed=6)["params"]
    pos = params["pos_embed"]
    assert interpolate_pos_embed(pos, (14, 14)) is pos
    got = np.asarray(_apply(model, {"params": params}, x))
    want = np_vit_features(
        _to_np(params), np.asarray(x), patch=16, heads=2, n_last=2, avgpool=False
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pos_embed_resized_for_other_sizes():
    model = VisionTransformer(
        dim=32, depth=2, num_heads=2, patch_size=16, n_last_blocks=2, avgpool=True
    )
    x64 = _images(2, 64, seed=7)  # grid 4x4
    params = _init(model, x64, seed=8)
    assert params["params"]["pos_embed"].shape == (1, 197, 32)  # stored at the 14x14 grid
    for shape in [(2, 64, 64, 3), (2, 48, 80, 3), (1, 320, 320, 3)]:  # 4x4, 3x5, 20x20
        out = _apply(model, params, jnp.ones(shape))
        assert out.shape == (shape[0], 3 * 32) and bool(jnp.all(jnp.isfinite(out)))
    pos = params["params"]["pos_embed"]
    resized = interpolate_pos_embed(pos, (3, 5))
    assert resized.shape == (1, 1 + 15, 32)
    np.testing.assert_array_equal(np.asarray(resized[:, 0]), np.asarray(pos[:, 0]))  # CLS kept
    # A constant embedding stays constant (interpolation weights sum to one).
    const = jnp.full((1, 197, 4), 0.25)
    np.testing.assert_allclose(np.asarray(interpolate_pos_embed(const, (6, 3))), 0.25, atol=1e-6)


def test_unaligned_image_size_raises():
    model = VisionTransformer(**VIT_CONFIGS["vit_tiny"])
    params = _init(model, jnp.ones((1, 32, 32, 3)), seed=0)
    with pytest.raises(ValueError, match="30x32.*patch_size 8"):
        model.apply(params, jnp.ones((1, 30, 32, 3)), train=False)
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(params, jnp.ones((32, 32, 3)), train=False)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, field",
    [
        ({"dim": 65}, "num_heads"),
        ({"num_heads": 0}, "num_heads"),
        ({"depth": 0}, "depth"),
        ({"patch_size": 0}, "patch_size"),
        ({"n_last_blocks": 5}, "n_last_blocks"),
        ({"n_last_blocks": 0}, "n_last_blocks"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"ref_grid": 0}, "ref_grid"),
    ],
)
def test_invalid_fields_raise(override: dict, field: str):
    with pytest.raises(ValueError, match=field):
        VisionTransformer(**{**VIT_CONFIGS["vit_tiny"], **override})


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = VisionTransformer(**VIT_CONFIGS["vit_tiny"], dtype=jnp.bfloat16)
    x = _images(2, 32)
    variables = _init(model, x, seed=0)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    out = _apply(model, variables, x)
    ref = _apply(VisionTransformer(**VIT_CONFIGS["vit_tiny"]), variables, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.1)
