"""SimCLR-flavoured ResNet v1 (post-activation) backbone in Flax linen.

Mirrors google-research/simclr `resnet.py`: fixed padding on strided convs, BN eps 1e-5 /
momentum 0.9 with the last gamma of every residual branch initialised to 0, a projection
shortcut on the first block of every group, and, when `sk_ratio > 0`, selective-kernel convs
together with the ResNet-D stem and ResNet-D (avg-pool) projection shortcuts.

Layers are called in the order the TF reference creates its variables (in each block the
projection shortcut first, then the residual branch); `layer_order.layer_call_order` recovers
that order for checkpoint restorers (variable dicts themselves come back key-sorted).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medssl_jax.models.pooling import max_pool_3x3_s2, window_slices

# depth -> number of blocks per group (4 groups).
BLOCK_SIZES: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
BOTTLENECK_DEPTHS = frozenset({50, 101, 152, 200})
GROUP_FILTERS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2, 2)
SK_MIN_DIM = 32

# keras VarianceScaling() default == jax variance_scaling(1, fan_in, truncated_normal).
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def scaled_channels(channels: int, width_multiplier: float) -> int:
    """Channel count `channels * width_multiplier` rounded to an int (at least 1)."""
    return max(1, int(round(channels * width_multiplier)))


def feature_dim(depth: int, width_multiplier: float) -> int:
    """Size of the pooled backbone output: 2048*w for bottleneck nets, 512*w otherwise."""
    expansion = 4 if depth in BOTTLENECK_DEPTHS else 1
    return expansion * scaled_channels(GROUP_FILTERS[-1], width_multiplier)


def validate_backbone(depth: int, width_multiplier: float, sk_ratio: float) -> None:
    """Raise ValueError for an unsupported depth / width / sk_ratio combination."""
    if depth not in BLOCK_SIZES:
        raise ValueError(f"ResNet depth must be one of {sorted(BLOCK_SIZES)}, got {depth!r}")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
    if not sk_ratio >= 0:
        raise ValueError(f"sk_ratio must be >= 0, got {sk_ratio!r}")


def fixed_padding(x: jax.Array, kernel_size: int) -> jax.Array:
    """Zero-pad H and W of NHWC `x` by k-1 in total, (k-1)//2 before, independent of input size."""
    pad_total = kernel_size - 1
    pad_beg = pad_total // 2
    pad_end = pad_total - pad_beg
    return jnp.pad(x, ((0, 0), (pad_beg, pad_end), (pad_beg, pad_end), (0, 0)))


def im2col_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    *,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """VALID NHWC x HWIO convolution as one matmul of the kh*kw shifted slices (im2col).

    Drop-in `conv_general_dilated` for nn.Conv on tiny feature maps: XLA swaps the operands of
    a conv whose kernel exceeds its input (e.g. 3x3 on 2x2), and XLA:CPU then runs the swapped
    conv (and its input gradient) ~100x slower than a normal one. Same numbers, same params.
    """
    del dimension_numbers  # flax passes NHWC/HWIO for 4-D inputs
    if (
        padding != "VALID"
        or feature_group_count != 1
        or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    ):
        raise ValueError("im2col_conv supports only VALID, undilated, ungrouped convolutions")
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    ho = (lhs.shape[1] - kh) // sh + 1
    wo = (lhs.shape[2] - kw) // sw + 1
    cols = window_slices(lhs, (kh, kw), (sh, sw), (ho, wo))
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]  # [B, ho, wo, K]
    # A 2-D dot over [B*ho*wo, K] rows: its weight gradient then contracts the rows of two
    # 2-D arrays, which XLA:CPU runs in place. Contracting the (B, ho, wo) dims of 4-D arrays
    # made it copy the output gradient transposed first: a 64 -> 256 1x1 conv at 32x32,
    # batch 64, fwd+bwd 4x faster in float32, 1.1x in bfloat16 (benchmarks/README.md).
    b = patches.shape[0]
    w = rhs.reshape(kh * kw * cin, cout)
    out = jnp.dot(patches.reshape(b * ho * wo, -1), w, precision=precision)
    return out.reshape(b, ho, wo, cout)


def conv1x1_as_dot() -> bool:
    """Whether 1x1 convolutions run as a dot (`im2col_conv` with one slice): on XLA:CPU the
    backward of a 1x1 conv runs as a transposed convolution behind a copy of its input
    (benchmarks/README.md: ResNet-50 steps 1.2-1.6x faster as a dot); GPU and TPU compilers
    already lower 1x1 convs to matmuls. MEDSSL_CONV1X1=dot|conv overrides the backend rule."""
    choice = os.environ.get("MEDSSL_CONV1X1", "auto")
    if choice not in ("auto", "dot", "conv"):
        raise ValueError(f"MEDSSL_CONV1X1={choice!r}: expected auto, dot or conv")
    return choice == "dot" or (choice == "auto" and jax.default_backend() == "cpu")


def conv_fixed_padding(
    x: jax.Array,
    features: int,
    kernel_size: int,
    strides: int,
    *,
    dtype: Any,
    name: str,
) -> jax.Array:
    """Bias-free conv: SAME when stride 1, else fixed padding + VALID (TF SimCLR semantics).

    Convs whose output map is smaller than the kernel run as `im2col_conv` (explicit padding,
    which equals SAME at stride 1), and so do 1x1 convs where `conv1x1_as_dot()`. Must be
    called inside a compact method: the conv becomes a child of the calling module.
    """
    k = kernel_size
    out_hw = [-(-d // strides) for d in x.shape[1:3]]  # same for SAME and fixed padding
    small = k > 1 and min(out_hw) < k
    as_dot = small or (k == 1 and conv1x1_as_dot())
    if (strides > 1 or small) and k > 1:
        x = fixed_padding(x, k)  # at stride 1 this is exactly SAME padding
    return nn.Conv(
        features,
        (k, k),
        strides=(strides, strides),
        padding="VALID" if as_dot or strides > 1 else "SAME",  # 1x1: SAME == VALID
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=im2col_conv if as_dot else None,
        name=name,
    )(x)


def batch_norm(
    x: jax.Array,
    *,
    train: bool,
    relu: bool = True,
    zero_init: bool = False,
    use_bias: bool = True,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    dtype: Any = jnp.float32,
    name: str,
) -> jax.Array:
    """BatchNorm (float32 params and statistics) optionally followed by ReLU.

    Train mode normalises with batch statistics (global under jit on a sharded batch) and
    updates `batch_stats`; eval mode uses the running averages.
    """
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_bias=use_bias,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        force_float32_reductions=True,
        name=name,
    )(x)
    return nn.relu(x) if relu else x


def resnet_d_avg_pool(x: jax.Array, strides: int) -> jax.Array:
    """ResNet-D shortcut pooling: 2x2 average pool with the block's stride.

    As in TF SimCLR: stride 1 uses SAME padding (one row/col after) with the padding EXCLUDED
    from the average; stride > 1 uses fixed padding then VALID, so for even input sizes (all
    standard resolutions) the padding is never inside a window.
    """
    if strides > 1:
        x = fixed_padding(x, 2)
        return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding="VALID")
    return nn.avg_pool(x, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)


class _BlockBase(nn.Module):
    """Fields shared by residual blocks."""

    filters: int
    strides: int = 1
    use_projection: bool = False
    sk_ratio: float = 0.0
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def _bn(self, train: bool):
        return partial(
            batch_norm,
            train=train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )

    def _shortcut(self, x: jax.Array, out_features: int, train: bool) -> jax.Array:
        """Identity, or projection (ResNet-D avg-pool + 1x1 conv when SK) followed by BN."""
        if not self.use_projection:
            return x
        if self.sk_ratio > 0:
            x = resnet_d_avg_pool(x, self.strides)
            x = conv_fixed_padding(x, out_features, 1, 1, dtype=self.dtype, name="shortcut_conv")
        else:
            x = conv_fixed_padding(
                x, out_features, 1, self.strides, dtype=self.dtype, name="shortcut_conv"
            )
        return self._bn(train)(x, relu=False, name="shortcut_bn")


class SelectiveKernelConv(nn.Module):
    """Selective-kernel 3x3 conv (SKNet as simplified in SimCLRv2): two 3x3 streams from one
    conv with 2f filters, mixed per channel by a softmax computed from their global average."""

    filters: int
    strides: int = 1
    sk_ratio: float = 0.0625
    min_dim: int = SK_MIN_DIM
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = partial(
            batch_norm,
            train=train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        f = self.filters
        x = conv_fixed_padding(x, 2 * f, 3, self.strides, dtype=self.dtype, name="conv")
        x = bn(x, name="bn")
        a, b = jnp.split(x, 2, axis=-1)  # 2 x [B, H, W, f]
        g = jnp.mean((a + b).astype(jnp.float32), axis=(1, 2), keepdims=True)  # [B, 1, 1, f]
        mid_dim = max(int(f * self.sk_ratio), self.min_dim)
        g = conv_fixed_padding(g.astype(self.dtype), mid_dim, 1, 1, dtype=self.dtype, name="fc0")
        g = bn(g, name="fc0_bn")
        m = conv_fixed_padding(g, 2 * f, 1, 1, dtype=self.dtype, name="fc1")  # [B, 1, 1, 2f]
        ma, mb = jnp.split(m.astype(jnp.float32), 2, axis=-1)
        w = jax.nn.softmax(jnp.stack([ma, mb]), axis=0).astype(x.dtype)  # [2, B, 1, 1, f]
        return a * w[0] + b * w[1]


class BottleneckBlock(_BlockBase):
    """1x1 -> 3x3 (or SK) -> 1x1 (4f) residual block; output relu(branch + shortcut)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = self._bn(train)
        f = self.filters
        shortcut = self._shortcut(x, 4 * f, train)
        y = conv_fixed_padding(x, f, 1, 1, dtype=self.dtype, name="conv1")
        y = bn(y, name="bn1")
        if self.sk_ratio > 0:
            y = SelectiveKernelConv(
                f,
                self.strides,
                self.sk_ratio,
                dtype=self.dtype,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                name="sk_conv",
            )(y, train)
        else:
            y = conv_fixed_padding(y, f, 3, self.strides, dtype=self.dtype, name="conv2")
            y = bn(y, name="bn2")
        y = conv_fixed_padding(y, 4 * f, 1, 1, dtype=self.dtype, name="conv3")
        y = bn(y, relu=False, zero_init=True, name="bn3")
        return nn.relu(y + shortcut)


class BasicBlock(_BlockBase):
    """3x3 -> 3x3 residual block (ResNet-18/34). SK only switches the shortcut to ResNet-D,
    exactly as in the TF reference."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = self._bn(train)
        shortcut = self._shortcut(x, self.filters, train)
        y = conv_fixed_padding(x, self.filters, 3, self.strides, dtype=self.dtype, name="conv1")
        y = bn(y, name="bn1")
        y = conv_fixed_padding(y, self.filters, 3, 1, dtype=self.dtype, name="conv2")
        y = bn(y, relu=False, zero_init=True, name="bn2")
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """SimCLR ResNet v1 backbone: [B, H, W, C] in [0, 1] -> pooled float32 features [B, D].

    D = 2048*w (bottleneck) or 512*w (basic). `cifar_stem` replaces the stem by one 3x3
    stride-1 conv without max-pool (SimCLR's CIFAR variant, for tiny images). `torch_maxpool`
    pads the stem's max-pool by 1 on every side (torchvision) instead of SAME (SimCLR), so that
    converted PyTorch weights (SwAV, DINO) reproduce their network's outputs. `remat` recomputes
    the stem's and each residual block's activations in the backward pass (`nn.remat`, one at a
    time) instead of keeping them: less memory, one more forward; same variables and numbers.
    """

    depth: int = 50
    width_multiplier: float = 1
    sk_ratio: float = 0.0
    cifar_stem: bool = False
    torch_maxpool: bool = False
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    remat: bool = False

    def __post_init__(self) -> None:
        validate_backbone(self.depth, self.width_multiplier, self.sk_ratio)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images [B, H, W, C], got shape {x.shape}")
        dtype = jnp.dtype(self.dtype)
        ch = partial(scaled_channels, width_multiplier=self.width_multiplier)
        conv = partial(conv_fixed_padding, dtype=dtype)
        bn = partial(
            batch_norm, train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=dtype
        )
        x = x.astype(dtype)

        def stem(mdl: nn.Module, x: jax.Array) -> jax.Array:  # -> [B, H/4, W/4, C] (CIFAR: H, W)
            del mdl  # the lifted scope: layers below keep their names (stem_conv0, ...)
            if self.cifar_stem:
                return bn(conv(x, ch(64), 3, 1, name="stem_conv0"), name="stem_bn0")
            if self.sk_ratio > 0:  # ResNet-D stem: three 3x3 convs.
                x = bn(conv(x, ch(32), 3, 2, name="stem_conv0"), name="stem_bn0")
                x = bn(conv(x, ch(32), 3, 1, name="stem_conv1"), name="stem_bn1")
                x = bn(conv(x, ch(64), 3, 1, name="stem_conv2"), name="stem_bn2")
            else:
                x = bn(conv(x, ch(64), 7, 2, name="stem_conv0"), name="stem_bn0")
            pool_pad = ((1, 1), (1, 1)) if self.torch_maxpool else "SAME"
            return max_pool_3x3_s2(x, pool_pad)

        x = (nn.remat(stem) if self.remat else stem)(self, x)

        block_cls = BottleneckBlock if self.depth in BOTTLENECK_DEPTHS else BasicBlock
        if self.remat:  # same name= below, so the same variable paths; `train` is static
            block_cls = nn.remat(block_cls, static_argnums=(2,))  # (self, x, train)
        groups = zip(BLOCK_SIZES[self.depth], GROUP_FILTERS, GROUP_STRIDES, strict=True)
        for g, (num_blocks, filters, strides) in enumerate(groups, start=1):
            for b in range(num_blocks):
                x = block_cls(
                    filters=ch(filters),
                    strides=strides if b == 0 else 1,
                    use_projection=b == 0,
                    sk_ratio=self.sk_ratio,
                    dtype=dtype,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    name=f"group{g}_block{b}",
                )(x, train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, D]
