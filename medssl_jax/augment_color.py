"""Colour half of the SimCLR pretraining view in TensorFlow: colour jitter (random order),
grayscale, Gaussian blur, solarization (DINO), and the colour-parameter vector that lets the
half run elsewhere.

``color_params`` draws every random quantity of the colour half into a ``[NUM_COLOR_PARAMS]``
float32 vector (layout: the ``PARAM_*`` indices), and ``apply_color`` here or
``augment_device.apply_color`` (JAX) applies it: ``augment.pretrain_view`` is
``apply_color(pretrain_geometry(...), color_params(...))``. Like ``augment``, every function is
per-example, graph-compatible and driven by a ``[2]`` int32/int64 stateless seed.

This module also holds the helpers both halves share (seed preparation and its fixed sub-seed
slots, random decision/apply, argument checks): ``augment`` imports from here, never the reverse.

Choices where SimCLR leaves freedom (documented here once):
- Gaussian blur pads with REFLECT (SimCLR uses zero SAME padding, which darkens borders);
  reflect keeps a constant image constant.
- Contrast/saturation lower bounds are clamped at 0 like brightness (matters only for
  colour strength > 1.25); the hue delta is capped at 0.5 (a full turn of the hue circle).
- Solarization (DINO) inverts x >= 0.5 (``color_layout.SOLARIZE_THRESHOLD``): PIL's threshold
  128 on the uint8 value the float pixel rounds to.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

# The colour parameter vector's layout (TF-free, shared with augment_device).
from medssl_jax.color_layout import (
    NUM_COLOR_PARAMS,
    PARAM_BLUR,
    PARAM_BRIGHTNESS,
    PARAM_GRAY,
    PARAM_HUE,
    PARAM_JITTER,
    PARAM_ORDER,
    PARAM_SIGMA,
    PARAM_SOLARIZE,
    SOLARIZE_THRESHOLD,
    blur_kernel_size,
    check_jitter,
)

# Sub-seed slots of both halves (fixed so that disabling one stage leaves the others' draws
# unchanged); crop, flip and rotation are used by augment's geometric half.
_CROP, _FLIP, _JITTER_APPLY, _JITTER, _GRAY, _BLUR_APPLY, _BLUR_SIGMA, _ROTATE = range(8)
_NUM_SLOTS = 8
# Solarization came later: its decision is drawn from fold_in(seed, _SOLARIZE_SALT), outside the
# slots above, so that adding it left every earlier draw (and so every existing view) unchanged.
_SOLARIZE_SALT = 12

_BLUR_SIGMA_RANGE = (0.1, 2.0)

_NEUTRAL_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue delta


# ----------------------------------------------------------------------------- validation


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _check_prob(name: str, p: float) -> float:
    if not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    return float(p)


def _check_strength(color_strength: float) -> float:
    s = float(color_strength)
    if not math.isfinite(s) or s < 0.0:
        raise ValueError(f"color_strength must be finite and >= 0, got {color_strength!r}")
    return s


def _prepare_seed(seed: Any) -> tf.Tensor:
    """Converts ``seed`` to a ``[2]`` int32/int64 tensor, raising early on a bad dtype/shape."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"seed must be an int32 or int64 tensor of shape [2], got {seed.dtype}")
    if seed.shape.rank is not None and seed.shape.as_list() != [2]:
        raise ValueError(f"seed must have shape [2], got {seed.shape}")
    return tf.ensure_shape(seed, [2])


def _random_decision(p: float, seed: tf.Tensor) -> tf.Tensor:
    """The float32 0/1 decision ``_random_apply`` takes: p >= 1 and p <= 0 draw nothing."""
    if p <= 0.0:
        return tf.constant(0.0, tf.float32)
    if p >= 1.0:
        return tf.constant(1.0, tf.float32)
    u = tf.random.stateless_uniform([], seed=seed, dtype=tf.float32)
    return tf.cast(u < p, tf.float32)


def _random_apply(fn, p: float, seed: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Returns ``fn(x)`` with probability ``p`` (drawn from ``seed``), else ``x``."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return fn(x)
    u = tf.random.stateless_uniform([], seed=seed, dtype=tf.float32)
    return tf.cond(u < p, lambda: fn(x), lambda: x)


# ----------------------------------------------------------------------------- colour


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma replicated to 3 channels: ``[H, W, 3] -> [H, W, 3]``."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def _jitter_order(seed: tf.Tensor) -> tf.Tensor:
    """Random permutation of the 4 jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    return tf.argsort(tf.random.stateless_uniform([4], seed=seed))


def _jitter_factors(
    seed: tf.Tensor, *, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws the jitter factors (float32 ``[4]``: brightness, contrast, saturation factors, hue
    delta; the neutral 1, 1, 1, 0 for an op of strength 0) and the op order (int32 ``[4]``)."""
    seeds = tf.random.experimental.stateless_split(_prepare_seed(seed), num=5)  # [5, 2]
    ranges = [
        (max(1.0 - brightness, 0.0), 1.0 + brightness) if brightness > 0 else None,
        (max(1.0 - contrast, 0.0), 1.0 + contrast) if contrast > 0 else None,
        (max(1.0 - saturation, 0.0), 1.0 + saturation) if saturation > 0 else None,
        (-min(hue, 0.5), min(hue, 0.5)) if hue > 0 else None,
    ]
    factors = [
        tf.constant(neutral, tf.float32)
        if rng is None
        else tf.random.stateless_uniform([], seed=seeds[i], minval=rng[0], maxval=rng[1])
        for i, (rng, neutral) in enumerate(zip(ranges, _NEUTRAL_JITTER, strict=True))
    ]
    return tf.stack(factors), _jitter_order(seeds[4])


def _apply_jitter(
    image: tf.Tensor,
    factors: tf.Tensor,
    order: tf.Tensor,
    enabled: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tf.Tensor:
    """Applies the 4 jitter ops (``factors`` [4] float32) in ``order`` ([4] int32), clipping to
    [0, 1] after each; an op that is not ``enabled`` is the identity (then only clipped)."""
    ops = [
        lambda x: x * factors[0],
        lambda x: tf.image.adjust_contrast(x, factors[1]),
        lambda x: tf.image.adjust_saturation(x, factors[2]),
        lambda x: tf.image.adjust_hue(x, factors[3]),
    ]
    ops = [f if on else (lambda x: x) for f, on in zip(ops, enabled, strict=True)]
    for i in range(4):
        image = tf.switch_case(order[i], [lambda f=f, x=image: f(x) for f in ops])
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> tf.Tensor:
    """SimCLR(v2) colour jitter in a random per-example order, clipping to [0, 1] after each op.

    Factors: brightness multiplicative U[max(1-b, 0), 1+b]; contrast U[max(1-c, 0), 1+c];
    saturation U[max(1-s, 0), 1+s]; hue delta U[-h, h] (h capped at 0.5). A zero strength
    leaves that op out (as SimCLR does).
    """
    strengths = (brightness, contrast, saturation, hue)
    factors, order = _jitter_factors(
        seed, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
    )
    return _apply_jitter(image, factors, order, enabled=tuple(v > 0 for v in strengths))


def _jitter_strengths(strength: float) -> dict[str, float]:
    return dict(
        brightness=0.8 * strength,
        contrast=0.8 * strength,
        saturation=0.8 * strength,
        hue=0.2 * strength,
    )


def _solarize(image: tf.Tensor) -> tf.Tensor:
    """PIL-style solarization of float [0, 1] pixels: x >= SOLARIZE_THRESHOLD -> 1 - x."""
    return tf.where(image >= SOLARIZE_THRESHOLD, 1.0 - image, image)


def _color_jitter_strength(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    return color_jitter(image, seed, **_jitter_strengths(strength))


# ----------------------------------------------------------------------------- blur


def gaussian_kernel_1d(kernel_size: int, sigma: tf.Tensor | float) -> tf.Tensor:
    """Normalised 1-D Gaussian ``[kernel_size]`` (odd size) with std ``sigma``; sums to 1."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    radius = kernel_size // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    k = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    return k / tf.reduce_sum(k)


def gaussian_blur(image: tf.Tensor, kernel_size: int, sigma: tf.Tensor | float) -> tf.Tensor:
    """Separable depthwise Gaussian blur of ``[H, W, 3]`` with REFLECT padding (same shape)."""
    radius = kernel_size // 2
    if radius == 0:
        return image
    k = gaussian_kernel_1d(kernel_size, sigma)
    channels = 3
    k_h = tf.tile(tf.reshape(k, [1, kernel_size, 1, 1]), [1, 1, channels, 1])
    k_v = tf.tile(tf.reshape(k, [kernel_size, 1, 1, 1]), [1, 1, channels, 1])
    x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    x = tf.nn.depthwise_conv2d(x, k_h, strides=[1, 1, 1, 1], padding="VALID")
    x = tf.nn.depthwise_conv2d(x, k_v, strides=[1, 1, 1, 1], padding="VALID")
    return x[0]


# ----------------------------------------------------------------------------- colour parameters


def color_params(
    seed: Any,
    *,
    color_strength: float = 1.0,
    blur: bool = True,
    grayscale_prob: float = 0.2,
    color_jitter_prob: float = 0.8,
    jitter: tuple[float, ...] = (),
    blur_prob: float = 0.5,
    solarize_prob: float = 0.0,
) -> tf.Tensor:
    """Every random quantity of ``pretrain_view``'s colour half for ``seed`` ([2] int), as a
    float32 ``[NUM_COLOR_PARAMS]`` vector (layout: ``PARAM_*``), so the colour ops can run
    elsewhere (``augment_device.apply_color``). Draws from the same sub-seeds and with the same
    ops as ``pretrain_view`` always has, so the random stream is unchanged.

    ``jitter``: () gives SimCLR's strengths from ``color_strength`` (0.8s, 0.8s, 0.8s, 0.2s);
    else 4 explicit ones (brightness, contrast, saturation, hue; DINO: 0.4, 0.4, 0.2, 0.1).
    ``blur_prob`` is the blur probability when ``blur``; ``solarize_prob`` that of solarizing
    after blur (DINO's second global crop), drawn from a seed of its own.
    """
    color_strength = _check_strength(color_strength)
    grayscale_prob = _check_prob("grayscale_prob", grayscale_prob)
    color_jitter_prob = _check_prob("color_jitter_prob", color_jitter_prob)
    blur_prob = _check_prob("blur_prob", blur_prob)
    solarize_prob = _check_prob("solarize_prob", solarize_prob)
    if len(jitter):
        b, c, s, h = check_jitter(tuple(jitter))
        strengths = dict(brightness=b, contrast=c, saturation=s, hue=h)
    else:
        strengths = _jitter_strengths(color_strength)
    seed = _prepare_seed(seed)
    seeds = tf.random.experimental.stateless_split(seed, num=_NUM_SLOTS)

    if any(v > 0 for v in strengths.values()):
        jitter_on = _random_decision(color_jitter_prob, seeds[_JITTER_APPLY])
    else:
        jitter_on = tf.constant(0.0, tf.float32)
    factors, order = _jitter_factors(seeds[_JITTER], **strengths)
    gray_on = _random_decision(grayscale_prob, seeds[_GRAY])
    blur_on = _random_decision(blur_prob if blur else 0.0, seeds[_BLUR_APPLY])
    sigma = tf.random.stateless_uniform(
        [], seed=seeds[_BLUR_SIGMA], minval=_BLUR_SIGMA_RANGE[0], maxval=_BLUR_SIGMA_RANGE[1]
    )
    solarize_seed = tf.random.experimental.stateless_fold_in(seed, _SOLARIZE_SALT)
    solarize_on = _random_decision(solarize_prob, solarize_seed)
    params = tf.concat(
        [
            jitter_on[None],
            factors,
            tf.cast(order, tf.float32),
            tf.stack([gray_on, blur_on, sigma, solarize_on]),
        ],
        axis=0,
    )
    return tf.ensure_shape(params, [NUM_COLOR_PARAMS])


def apply_color(image: Any, params: Any, *, image_size: int, blur: bool) -> tf.Tensor:
    """Colour half of ``pretrain_view`` driven by ``params`` (from ``color_params``): jitter in
    the given order if flagged, grayscale if flagged, Gaussian blur if ``blur`` and flagged,
    solarization if flagged, clip. ``image`` float32 [image_size, image_size, 3] in [0, 1] ->
    same shape in [0, 1].
    """
    image_size = _check_image_size(image_size)
    params = tf.ensure_shape(tf.convert_to_tensor(params, tf.float32), [NUM_COLOR_PARAMS])
    x = tf.ensure_shape(tf.convert_to_tensor(image, tf.float32), [image_size, image_size, 3])

    factors = params[PARAM_BRIGHTNESS : PARAM_HUE + 1]  # [4]
    order = tf.cast(params[PARAM_ORDER : PARAM_ORDER + 4], tf.int32)  # [4]
    x = tf.cond(params[PARAM_JITTER] > 0.5, lambda: _apply_jitter(x, factors, order), lambda: x)
    x = tf.cond(params[PARAM_GRAY] > 0.5, lambda: to_grayscale(x), lambda: x)
    if blur:
        ksize = blur_kernel_size(image_size)
        x = tf.cond(
            params[PARAM_BLUR] > 0.5,
            lambda: gaussian_blur(x, ksize, params[PARAM_SIGMA]),
            lambda: x,
        )
    x = tf.cond(params[PARAM_SOLARIZE] > 0.5, lambda: _solarize(x), lambda: x)
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.ensure_shape(x, [image_size, image_size, 3])
