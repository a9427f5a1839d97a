"""The stem's 3x3 stride-2 max-pool, with a gradient XLA:CPU runs fast.

JAX differentiates `reduce_window` max through select-and-gather, which XLA:CPU lowers to a
variadic reduce-window over (value, iota) pairs: ~4% of the ResNet-50 step's op time on CPU
(benchmarks/README.md). Here the gradient is nine elementwise masks instead, each routed back
to its window offset by an interior-padded `lax.pad`, all of which XLA fuses. Ties go to the
first maximum in row-major window order, as XLA's select-and-scatter does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]


def mask_max_pool_grad() -> bool:
    """Whether the stem's max-pool uses the mask gradient: on XLA:CPU (GPU and TPU have fast
    select-and-scatter kernels). MEDSSL_MAXPOOL_GRAD=mask|xla overrides the backend rule."""
    choice = os.environ.get("MEDSSL_MAXPOOL_GRAD", "auto")
    if choice not in ("auto", "mask", "xla"):
        raise ValueError(f"MEDSSL_MAXPOOL_GRAD={choice!r}: expected auto, mask or xla")
    return choice == "mask" or (choice == "auto" and jax.default_backend() == "cpu")


def _same_pads(size: int, window: int = 3, stride: int = 2) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def max_pool_3x3_s2(x: jax.Array, padding: str | Sequence[tuple[int, int]] = "SAME") -> jax.Array:
    """nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding) on NHWC `x`; same forward
    values, and the mask gradient where `mask_max_pool_grad()`."""
    if not mask_max_pool_grad():
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)
    if isinstance(padding, str):
        if padding != "SAME":
            raise ValueError(f"padding must be 'SAME' or explicit pairs, got {padding!r}")
        pads = (_same_pads(x.shape[1]), _same_pads(x.shape[2]))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _pool(x, pads)


def window_slices(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int]
) -> list[jax.Array]:
    """The kh*kw strided slices of NHWC `x` that a VALID window op reads, row-major over the
    window: kh*kw x [B, ho, wo, C] (slice (i, j) holds x[:, i + sh*r, j + sw*c])."""
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    return [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]


def _pad_lowest(x: jax.Array, pads: Pads) -> jax.Array:
    low = jnp.array(-jnp.inf, x.dtype)
    return lax.pad(x, low, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool(x: jax.Array, pads: Pads) -> jax.Array:
    return lax.reduce_window(
        x,
        jnp.array(-jnp.inf, x.dtype),
        lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), *pads, (0, 0)),
    )  # [B, ho, wo, C]


def _pool_fwd(x: jax.Array, pads: Pads) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _pool(x, pads)
    return y, (x, y)


def _pool_bwd(pads: Pads, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, y = res
    _, h, w, _ = x.shape
    ho, wo = y.shape[1:3]
    xp = _pad_lowest(x, pads)  # [B, Hp, Wp, C]
    hp, wp = xp.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    for k, window in enumerate(window_slices(xp, (3, 3), (2, 2), (ho, wo))):
        i, j = divmod(k, 3)
        hit = (window == y) & ~taken  # first maximum of each window
        taken = taken | hit
        routed = jnp.where(hit, g, jnp.zeros((), g.dtype))  # [B, ho, wo, C]
        dxp = dxp + lax.pad(
            routed,
            jnp.zeros((), g.dtype),
            (
                (0, 0, 0),
                (i, hp - i - 2 * (ho - 1) - 1, 1),  # back to rows i, i+2, ... of xp
                (j, wp - j - 2 * (wo - 1) - 1, 1),
                (0, 0, 0),
            ),
        )
    (top, _), (left, _) = pads
    return (dxp[:, top : top + h, left : left + w, :],)


_pool.defvjp(_pool_fwd, _pool_bwd)
