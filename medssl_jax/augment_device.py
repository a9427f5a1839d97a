"""Colour half of the SimCLR pretraining view in JAX, to run inside the train step on the device.

The host runs ``augment.pretrain_geometry`` (crop, rotation, flip) and
``augment_color.color_params`` and ships uint8 images plus a float32 ``[NUM_COLOR_PARAMS]``
vector per view; ``apply_color`` here then does what ``augment_color.apply_color`` does in TF,
so hosts with few cores per accelerator keep up. The maths follows TF's CPU kernels
(AdjustContrastv2, AdjustSaturation, AdjustHue, ``rgb_to_grayscale``) op for op, so the two
agree to float rounding (see tests/test_augment_device.py). Everything is float32, jit-able,
and broadcasts over any leading batch dims (e.g. ``[B, V, S, S, 3]`` images with
``[B, V, NUM_COLOR_PARAMS]`` params).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medssl_jax.color_layout import (
    NUM_COLOR_PARAMS,
    PARAM_BLUR,
    PARAM_BRIGHTNESS,
    PARAM_CONTRAST,
    PARAM_GRAY,
    PARAM_HUE,
    PARAM_JITTER,
    PARAM_ORDER,
    PARAM_SATURATION,
    PARAM_SIGMA,
    PARAM_SOLARIZE,
    SOLARIZE_THRESHOLD,
    blur_kernel_size,
)

__all__ = ["NUM_COLOR_PARAMS", "apply_color", "to_float"]

_F32 = jnp.float32
# tf.image.rgb_to_grayscale's ITU-R 601 luma weights.
_LUMA = (np.float32(0.2989), np.float32(0.5870), np.float32(0.1140))


def to_float(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1], the way ``tf.image.convert_image_dtype`` does it
    (multiply by float32(1/255), not divide), so device and host conversions agree bit for bit."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return images.astype(_F32) * np.float32(1.0 / 255.0)


def _expand(v: jax.Array) -> jax.Array:
    """Per-example scalar [...] -> [..., 1, 1, 1] to broadcast against [..., H, W, 3]."""
    return v[..., None, None, None]


def _split_rgb(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return x[..., 0], x[..., 1], x[..., 2]


# ----------------------------------------------------------------------------- jitter ops


def _brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """x [..., H, W, 3] * factor [...]."""
    return x * _expand(factor)


def _contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``tf.image.adjust_contrast``: (x - mean) * factor + mean, mean per channel over H, W."""
    h, w = x.shape[-3], x.shape[-2]
    mean = jnp.sum(x, axis=(-3, -2), keepdims=True) / np.float32(h * w)  # [..., 1, 1, 3]
    return (x - mean) * _expand(factor) + mean


def _saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``tf.image.adjust_saturation`` (TF's AdjustSaturation CPU kernel): RGB -> HSV, saturation
    times ``factor`` clipped to [0, 1], HSV -> RGB."""
    r, g, b = _split_rgb(x)  # each [..., H, W]
    vv = jnp.maximum(r, jnp.maximum(g, b))
    rng = vv - jnp.minimum(r, jnp.minimum(g, b))
    s = jnp.where(vv > 0, rng / jnp.where(vv > 0, vv, 1.0), 0.0)
    norm = 1.0 / (6.0 * jnp.where(rng > 0, rng, 1.0))
    hh = jnp.where(
        r == vv,
        norm * (g - b),
        jnp.where(
            g == vv, norm * (b - r) + np.float32(2.0 / 6.0), norm * (r - g) + np.float32(4.0 / 6.0)
        ),
    )
    hh = jnp.where(rng <= 0, 0.0, hh)
    hh = jnp.where(hh < 0, hh + 1.0, hh)  # can round to exactly 1.0, as in TF (see below)
    s = jnp.clip(s * factor[..., None, None], 0.0, 1.0)

    c = s * vv
    m = vv - c
    dh = hh * 6.0
    cat = jnp.floor(dh).astype(jnp.int32)  # dh >= 0, so floor == TF's truncation
    fmodu = dh - 2.0 * jnp.floor(dh / 2.0)  # == TF's +-2 loops (exact for dh in [0, 6])
    xx = c * (1.0 - jnp.abs(fmodu - 1.0))
    zero = jnp.zeros_like(c)
    # TF's switch: category 6 (hh rounded to 1.0) falls to its default branch, rr = gg = bb = 0.
    conds = [cat == k for k in range(6)]
    rr = jnp.select(conds, [c, xx, zero, zero, xx, c], zero)
    gg = jnp.select(conds, [xx, c, c, xx, zero, zero], zero)
    bb = jnp.select(conds, [zero, zero, xx, c, c, xx], zero)
    return jnp.stack([rr + m, gg + m, bb + m], axis=-1)


def _hue(x: jax.Array, delta: jax.Array) -> jax.Array:
    """``tf.image.adjust_hue`` (TF's AdjustHue CPU kernel): hue in [0, 6) from the sorted
    channels, plus 6 * delta wrapped into [0, 6), back to RGB keeping min and max. Matches TF
    for delta in [-1, 1] (TF's own range; params hold [-0.5, 0.5])."""
    r, g, b = _split_rgb(x)  # each [..., H, W]
    r_lt_g = r < g
    # (v_max, v_mid, v_min, category) for the 6 orderings, branch for branch as in TF.
    v_max = jnp.where(
        r_lt_g,
        jnp.where(b < r, g, jnp.where(b > g, b, g)),
        jnp.where(b < g, r, jnp.where(b > r, b, r)),
    )
    v_mid = jnp.where(
        r_lt_g,
        jnp.where(b < r, r, jnp.where(b > g, g, b)),
        jnp.where(b < g, g, jnp.where(b > r, r, b)),
    )
    v_min = jnp.where(r_lt_g, jnp.where(b < r, b, r), jnp.where(b < g, b, g))
    cat = jnp.where(
        r_lt_g,
        jnp.where(b < r, 1, jnp.where(b > g, 3, 2)),
        jnp.where(b < g, 0, jnp.where(b > r, 4, 5)),
    )
    flat = v_max == v_min
    ratio = (v_mid - v_min) / jnp.where(flat, 1.0, v_max - v_min)
    h = cat.astype(_F32) + jnp.where(cat % 2 == 0, ratio, 1.0 - ratio)
    h = jnp.where(flat, 0.0, h)

    h = h + delta[..., None, None] * 6.0
    h = jnp.where(h < 0, h + 6.0, h)  # h >= -6 for |delta| <= 1: one step suffices
    for _ in range(2):  # h may round to exactly 12 (or 6 after the step above)
        h = jnp.where(h >= 6.0, h - 6.0, h)

    cat = jnp.floor(h).astype(jnp.int32)  # h in [0, 6)
    ratio = h - cat.astype(_F32)
    ratio = jnp.where(cat % 2 == 0, ratio, 1.0 - ratio)
    v_mid = v_min + ratio * (v_max - v_min)
    conds = [cat == k for k in range(5)]  # 5 and anything else: TF's case 5 / default
    rr = jnp.select(conds, [v_max, v_mid, v_min, v_min, v_mid], v_max)
    gg = jnp.select(conds, [v_mid, v_max, v_max, v_mid, v_min], v_min)
    bb = jnp.select(conds, [v_min, v_min, v_mid, v_max, v_max], v_mid)
    return jnp.stack([rr, gg, bb], axis=-1)


def _jitter(x: jax.Array, params: jax.Array) -> jax.Array:
    """The 4 jitter ops in the per-example order ``params[..., PARAM_ORDER:+4]``, clipping to
    [0, 1] after each. Each step computes all 4 ops and selects (what vmap makes of a switch)."""
    factors = (
        params[..., PARAM_BRIGHTNESS],
        params[..., PARAM_CONTRAST],
        params[..., PARAM_SATURATION],
        params[..., PARAM_HUE],
    )  # each [...]
    ops = (_brightness, _contrast, _saturation, _hue)
    order = params[..., PARAM_ORDER : PARAM_ORDER + 4].astype(jnp.int32)  # [..., 4]
    for i in range(4):
        idx = _expand(order[..., i])  # [..., 1, 1, 1]
        outs = [op(x, f) for op, f in zip(ops, factors, strict=True)]
        x = jnp.select([idx == k for k in range(3)], outs[:3], outs[3])
        x = jnp.clip(x, 0.0, 1.0)
    return x


# ----------------------------------------------------------------------------- grayscale, blur


def _grayscale(x: jax.Array) -> jax.Array:
    """ITU-R 601 luma (``tf.image.rgb_to_grayscale``) replicated to 3 channels."""
    r, g, b = _split_rgb(x)
    gray = r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]  # [..., H, W]
    return jnp.broadcast_to(gray[..., None], x.shape)


def _gaussian_blur(x: jax.Array, kernel_size: int, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur with REFLECT padding, per-example ``sigma`` [...]; as
    ``augment_color.gaussian_blur`` (horizontal pass, then vertical)."""
    radius = kernel_size // 2
    if radius == 0:
        return x
    h, w = x.shape[-3], x.shape[-2]
    t = jnp.arange(-radius, radius + 1, dtype=_F32)  # [K]
    sigma = sigma[..., None]  # [..., 1]
    k = jnp.exp(-jnp.square(t) / (2.0 * jnp.square(sigma)))  # [..., K]
    k = k / jnp.sum(k, axis=-1, keepdims=True)
    lead = [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, lead + [(radius, radius), (radius, radius), (0, 0)], mode="reflect")
    # [..., H + 2r, W + 2r, 3] -> [..., H + 2r, W, 3] -> [..., H, W, 3]
    xh = sum(_expand(k[..., j]) * xp[..., :, j : j + w, :] for j in range(kernel_size))
    return sum(_expand(k[..., j]) * xh[..., j : j + h, :, :] for j in range(kernel_size))


# ----------------------------------------------------------------------------- public


def apply_color(images: jax.Array, params: jax.Array, *, image_size: int, blur: bool) -> jax.Array:
    """JAX twin of ``augment_color.apply_color``: jitter (in the given order) where flagged,
    grayscale where flagged, Gaussian blur (kernel ``blur_kernel_size(image_size)``) where
    ``blur`` and flagged, solarization (x >= 0.5 -> 1 - x) where flagged, final clip. images
    float32 [..., S, S, 3] in [0, 1]; params float32 [..., NUM_COLOR_PARAMS] with the same
    leading dims; returns float32 [..., S, S, 3].
    """
    images = jnp.asarray(images, _F32)
    params = jnp.asarray(params, _F32)
    if images.shape[-3:] != (image_size, image_size, 3):
        raise ValueError(
            f"images must have shape [..., {image_size}, {image_size}, 3], got {images.shape}"
        )
    if params.shape != images.shape[:-3] + (NUM_COLOR_PARAMS,):
        raise ValueError(
            f"params must have shape {images.shape[:-3] + (NUM_COLOR_PARAMS,)}, got {params.shape}"
        )
    x = images

    def flag(i: int) -> jax.Array:
        return _expand(params[..., i] > 0.5)  # [..., 1, 1, 1]

    x = jnp.where(flag(PARAM_JITTER), _jitter(x, params), x)
    x = jnp.where(flag(PARAM_GRAY), _grayscale(x), x)
    if blur:
        blurred = _gaussian_blur(x, blur_kernel_size(image_size), params[..., PARAM_SIGMA])
        x = jnp.where(flag(PARAM_BLUR), blurred, x)
    solarized = jnp.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)
    x = jnp.where(flag(PARAM_SOLARIZE), solarized, x)
    return jnp.clip(x, 0.0, 1.0)


def as_float(images: jax.Array) -> jax.Array:
    """Batch images as the model takes them: uint8 (what the input pipeline sends) -> float32 in
    [0, 1]; float input (synthetic batches in tests and benchmarks) passes through."""
    return to_float(images) if images.dtype == jnp.uint8 else images


def device_views(batch: dict, *, blur: bool) -> dict:
    """Pretraining batch as the methods take it: 'views' [B, 2, S, S, 3] and 'local_views'
    [B, N, s, s, 3] as float32; when the host sent 'color_params' [B, 2 + N, P] (colour on the
    device), the colour/blur stage runs here with them and the key is dropped."""
    batch = dict(batch)
    params = batch.pop("color_params", None)
    for key, views in (("views", slice(0, 2)), ("local_views", slice(2, None))):
        if key not in batch:
            continue
        x = as_float(batch[key])
        if params is not None:
            x = apply_color(x, params[:, views], image_size=x.shape[-2], blur=blur)
        batch[key] = x
    return batch
