"""Vision Transformer backbone as DINO releases it (facebookresearch/dino `vision_transformer.py`).

Same layout and parameter names as the PyTorch module, so DINO's ViT-S/16 and ViT-B/16 weights
map one to one: a patch-embedding conv, a CLS token, a learnt position embedding stored for a
`ref_grid` x `ref_grid` patch grid (224 px / 16), pre-norm blocks (LayerNorm eps 1e-6, one qkv
projection with bias, exact GELU MLP), and a final LayerNorm. No dropout or drop-path: the
backbone serves frozen-feature and fine-tuning evaluation, where DINO turns both off.

The output follows DINO's linear-evaluation protocol (`eval_linear.py`): the CLS tokens of the
last `n_last_blocks` blocks, each passed through the final norm, concatenated (earliest block
first); with `avgpool`, the mean of the last block's normed patch tokens is appended.
DINO itself interleaves [cls, avg] element-wise when avgpool is on (it only supports that with
n_last_blocks == 1); a converter of DINO's *linear-classifier* weights must de-interleave their
input columns (`w[:, 0::2]` -> CLS part, `w[:, 1::2]` -> avg part) to match this layout.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> constructor fields. mlp_ratio 4 everywhere (DINO's vit_tiny/small/base); "vit_tiny"
# here is a small test/demo net, not DINO's `vit_tiny` (which is "vit_ti16").
VIT_CONFIGS: dict[str, dict] = {
    "vit_s16": {"dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16, "mlp_ratio": 4.0},
    "vit_b16": {"dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "mlp_ratio": 4.0},
    "vit_ti16": {"dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16, "mlp_ratio": 4.0},
    "vit_tiny": {"dim": 64, "depth": 4, "num_heads": 2, "patch_size": 8, "mlp_ratio": 4.0},
}

LN_EPSILON = 1e-6
# DINO: trunc_normal_(std=.02) on Linear weights, cls_token and pos_embed; zero Linear biases.
dense_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def vit_feature_dim(dim: int, n_last_blocks: int, avgpool: bool) -> int:
    """Size of the backbone output: one `dim` CLS vector per block used, plus `dim` if avgpool."""
    return dim * (n_last_blocks + int(avgpool))


def mlp_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """Width of the MLP hidden layer, int(dim * mlp_ratio) as DINO computes it."""
    return int(dim * mlp_ratio)


def _torch_conv_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's bicubic constant (`get_cubic_upsample_coefficients`, A = -0.75; Keys' is -0.5).
_TORCH_CUBIC_A = -0.75


def _torch_bicubic_taps(n_in: int, n_out: int, scale_factor: float) -> tuple[np.ndarray, ...]:
    """4-tap source indices [n_out, 4] int32 and weights [n_out, 4] float32 along one axis.

    Reproduces PyTorch's CPU `upsample_bicubic2d` with align_corners=False, a user-given
    `scale_factor` and no antialiasing (aten/src/ATen/native/UpSample.h): the coordinate scale
    is float32(1 / scale_factor) (`compute_scales_value`; the given factor, not n_in / n_out),
    src = scale * (dst + 0.5) - 0.5 (`area_pixel_compute_source_index`, cubic: negative src
    kept), taps floor(src) - 1 .. floor(src) + 2 with weights `cubic_convolution2(t + 1)`,
    `cubic_convolution1(t)`, `cubic_convolution1(1 - t)`, `cubic_convolution2(2 - t)` at
    t = src - floor(src), and out-of-range taps clamped to [0, n_in - 1]
    (`upsample_get_value_bounded`). Arithmetic in float32 like torch's float kernel.
    """
    f32 = np.float32
    a = f32(_TORCH_CUBIC_A)
    scale = f32(1.0 / scale_factor)
    dst = np.arange(n_out, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(f32)  # [n_out]
    base = np.floor(src)
    t = (src - base).astype(f32)

    def conv1(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def conv2(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

    one = f32(1)
    weights = np.stack([conv2(t + one), conv1(t), conv1(one - t), conv2((one - t) + one)], 1)
    idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]  # [n_out, 4]
    idx = np.clip(idx, 0, n_in - 1).astype(np.int32)
    return idx, weights.astype(f32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Resize a [1, 1+g*g, D] position embedding to a `grid_hw` patch grid (CLS part kept).

    Numerically DINO's `VisionTransformer.interpolate_pos_encoding` (facebookresearch/dino,
    main branch, `vision_transformer.py`). DINO returns the stored embedding when the token
    count matches and the image is square; here that is grid_hw == (g, g), returned unchanged
    (same object). Otherwise DINO does, for an NCHW image x:

        B, nc, w, h = x.shape            # so DINO's "w" is the height H, "h" the width W
        w0, h0 = w // patch + 0.1, h // patch + 0.1
        F.interpolate(pos.reshape(1, g, g, D).permute(0, 3, 1, 2),   # [1, D, g, g]
                      scale_factor=(w0 / g, h0 / g), mode="bicubic")  # align_corners=False

    The swapped names cancel out: the row (height) axis is scaled by (gh + 0.1) / g and the
    column (width) axis by (gw + 0.1) / g, the output is [gh, gw] (floor(g * factor)), and it
    is flattened row-major, so non-square grids come out in the right orientation. The given
    factor -- not gh / g -- sets the sampling positions, (dst + 0.5) * g / (gh + 0.1) - 0.5,
    with PyTorch's cubic convolution (A = -0.75), border taps clamped, no antialiasing. Both
    axes are done as separable 4-tap gathers + weighted sums whose indices/weights are
    precomputed in NumPy from the static shapes (jit-friendly), in float32; this matches
    torch's output to float32 rounding (tests/fixtures/pos_embed_resize.npz). The `grid_hw`
    grid must be the image's (H // patch, W // patch). Output [1, 1+gh*gw, D].
    """
    n_patches = pos_embed.shape[1] - 1
    g = math.isqrt(n_patches)
    if g * g != n_patches:
        raise ValueError(f"pos_embed must hold 1 + g*g tokens, got {pos_embed.shape[1]}")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if (gh, gw) == (g, g):
        return pos_embed
    taps = []
    for n_out in (gh, gw):
        factor = (n_out + 0.1) / math.sqrt(n_patches)  # DINO's w0 / sqrt(N), h0 / sqrt(N)
        if math.floor(g * factor) != n_out:  # torch's output size; DINO asserts int(w0) == it
            raise ValueError(f"scale factor {factor} gives {math.floor(g * factor)} != {n_out}")
        idx, w = _torch_bicubic_taps(g, n_out, factor)
        taps.append((jnp.asarray(idx), jnp.asarray(w)))
    (idx_h, w_h), (idx_w, w_w) = taps
    dim = pos_embed.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    cls_pos = pos_embed[:, :1]  # [1, 1, D]
    pos_embed = jnp.asarray(pos_embed)  # a NumPy constant too (traced gathers below)
    grid = pos_embed[0, 1:].astype(jnp.float32).reshape(g, g, dim)  # [g, g, D], (y, x)
    grid = jnp.einsum("hk,hkxd->hxd", w_h, grid[idx_h], precision=hi)  # [gh, g, D]
    grid = jnp.einsum("wk,hwkd->hwd", w_w, grid[:, idx_w], precision=hi)  # [gh, gw, D]
    patch_pos = grid.reshape(1, gh * gw, dim).astype(pos_embed.dtype)  # [1, gh*gw, D]
    return jnp.concatenate([cls_pos, patch_pos], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (DINO `Attention`, qkv_bias)."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape  # [B, N, D]
        head_dim = d // self.num_heads
        dense = lambda features, name: nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_kernel_init,
            bias_init=nn.initializers.zeros,
            name=name,
        )
        # Output features ordered (3, heads, head_dim) as torch's reshape(B, N, 3, H, hd).
        qkv = dense(3 * self.dim, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, H, hd]
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) * head_dim**-0.5  # [B, H, N, N]
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(b, n, d)  # [B, N, D]
        return dense(self.dim, "proj")(y)


class Mlp(nn.Module):
    """Two-layer MLP fc1 -> exact GELU -> fc2 (DINO `Mlp`)."""

    dim: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_kernel_init,
            bias_init=nn.initializers.zeros,
            name=name,
        )
        x = dense(self.hidden_dim, "fc1")(x)  # [B, N, hidden]
        x = nn.gelu(x, approximate=False)
        return dense(self.dim, "fc2")(x)  # [B, N, D]


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    """DINO's LayerNorm: eps 1e-6, scale 1, bias 0, float32 params."""
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(self.dtype, "norm1")(x)
        x = x + Attention(self.dim, self.num_heads, dtype=self.dtype, name="attn")(y)
        y = layer_norm(self.dtype, "norm2")(x)
        hidden = mlp_hidden_dim(self.dim, self.mlp_ratio)
        return x + Mlp(self.dim, hidden, dtype=self.dtype, name="mlp")(y)  # [B, N, D]


class VisionTransformer(nn.Module):
    """DINO ViT backbone: images [B, H, W, 3] -> float32 linear-eval features [B, F].

    F = vit_feature_dim(dim, n_last_blocks, avgpool). H and W must be multiples of
    `patch_size`; the position embedding, stored for a `ref_grid` x `ref_grid` grid, is resized
    bicubically to (H // patch_size, W // patch_size) when that differs. Inputs are used as
    given (DINO's weights expect ImageNet mean/std normalisation; the pipeline applies it).
    `dtype` is the compute dtype; parameters are float32. `remat` recomputes each block's
    activations in the backward pass (`nn.remat`), with the same variables and numbers.
    """

    dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    n_last_blocks: int = 4
    avgpool: bool = False
    ref_grid: int = 14
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self) -> None:
        for field in ("dim", "depth", "num_heads", "patch_size", "ref_grid"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if not self.mlp_ratio > 0 or mlp_hidden_dim(self.dim, self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must give an MLP width >= 1, got {self.mlp_ratio!r}")
        if not 1 <= self.n_last_blocks <= self.depth:
            raise ValueError(
                f"n_last_blocks must be in [1, depth={self.depth}], got {self.n_last_blocks!r}"
            )
        super().__post_init__()

    @property
    def feature_dim(self) -> int:
        """Size of the output features."""
        return vit_feature_dim(self.dim, self.n_last_blocks, self.avgpool)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """`train` is accepted for interface parity with ResNet; it changes nothing here."""
        del train  # no BatchNorm, dropout or drop-path
        if x.ndim != 4:
            raise ValueError(f"VisionTransformer expects NHWC images [B, H, W, C], got {x.shape}")
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} (H x W) must be a multiple of patch_size {p} in both axes"
            )
        dtype = jnp.dtype(self.dtype)
        d = self.dim
        fan_in = p * p * c

        # Patch embedding: conv kernel = stride = p, PyTorch default Conv2d init (as in DINO).
        x = nn.Conv(
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=_torch_conv_bias_init(fan_in),
            name="patch_embed",
        )(x.astype(dtype))  # [B, gh, gw, D]
        gh, gw = h // p, w // p
        x = x.reshape(b, gh * gw, d)  # [B, gh*gw, D], row-major like torch's flatten(2)

        std_init = nn.initializers.truncated_normal(stddev=0.02)
        cls_token = self.param("cls_token", std_init, (1, 1, d), jnp.float32)  # [1, 1, D]
        n_ref = self.ref_grid * self.ref_grid
        pos_embed = self.param("pos_embed", std_init, (1, 1 + n_ref, d), jnp.float32)
        pos_embed = interpolate_pos_embed(pos_embed, (gh, gw))  # [1, 1+gh*gw, D]

        cls = jnp.broadcast_to(cls_token.astype(dtype), (b, 1, d))  # [B, 1, D]
        x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(dtype)  # [B, N, D]

        norm = layer_norm(dtype, "norm")  # shared by every returned block output
        outputs = []
        block_cls = nn.remat(Block) if self.remat else Block  # same name=, same variables
        for i in range(self.depth):
            x = block_cls(d, self.num_heads, self.mlp_ratio, dtype=dtype, name=f"block_{i}")(x)
            if self.depth - i <= self.n_last_blocks:
                outputs.append(norm(x))  # [B, N, D]

        feats = [o[:, 0] for o in outputs]  # n_last_blocks x [B, D], earliest first
        if self.avgpool:
            feats.append(jnp.mean(outputs[-1][:, 1:].astype(jnp.float32), axis=1))  # [B, D]
        return jnp.concatenate([f.astype(jnp.float32) for f in feats], axis=-1)  # [B, F]
