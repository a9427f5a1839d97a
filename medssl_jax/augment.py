"""SimCLR-style image augmentations in TensorFlow, deterministic given a seed.

Every function here is per-example and graph-compatible, so the input pipeline can call it
inside ``tf.data.Dataset.map(..., num_parallel_calls=...)``. All randomness comes from
stateless ops driven by a ``[2]`` int32/int64 seed tensor: the same seed gives bit-identical
output, and sub-seeds for each stage are derived with ``stateless_split`` at fixed indices, so
turning one stage off does not change the random draws of the others.

Pipeline of a pretraining view (SimCLR, Chen et al. 2020; Azizi et al. 2021):
random crop + bicubic resize -> rotation (optional) -> horizontal flip -> colour jitter (random
order) -> grayscale -> Gaussian blur -> clip to [0, 1].

The view splits in two so the colour half can run on the accelerator:
``pretrain_view = apply_color(pretrain_geometry(...), color_params(...))``. The geometric half
(crop, rotation, flip) stays on the host; ``color_params`` draws every random quantity of the
colour half into a ``[NUM_COLOR_PARAMS]`` float32 vector (layout: the ``PARAM_*`` indices), and
``apply_color`` here or ``augment_device.apply_color`` (JAX) applies it.

Choices where SimCLR leaves freedom (documented here once):
- The bicubic resize overshoots [0, 1]; we clip right after it so colour ops see valid pixels.
- Gaussian blur pads with REFLECT (SimCLR uses zero SAME padding, which darkens borders);
  reflect keeps a constant image constant.
- Rotation uses ``ImageProjectiveTransformV3`` with BILINEAR interpolation and REFLECT fill, so
  rotated views have no black corners that would leak the rotation angle.
- Contrast/saturation lower bounds are clamped at 0 like brightness (matters only for
  colour strength > 1.25); the hue delta is capped at 0.5 (a full turn of the hue circle).
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

# Sub-seed slots (fixed so that disabling one stage leaves the others' draws unchanged).
_CROP, _FLIP, _JITTER_APPLY, _JITTER, _GRAY, _BLUR_APPLY, _BLUR_SIGMA, _ROTATE = range(8)
_NUM_SLOTS = 8

_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_MAX_ATTEMPTS = 100
_BLUR_SIGMA_RANGE = (0.1, 2.0)

# Layout of the colour parameter vector (float32 [NUM_COLOR_PARAMS]) that ``color_params`` draws
# and ``apply_color`` (TF here, JAX in augment_device) consumes. Flags are 0.0 / 1.0.
PARAM_JITTER = 0  # colour jitter applied
PARAM_BRIGHTNESS = 1  # brightness factor (multiplicative; 1 = no-op)
PARAM_CONTRAST = 2  # contrast factor (1 = no-op)
PARAM_SATURATION = 3  # saturation factor (1 = no-op)
PARAM_HUE = 4  # hue delta in turns, in [-0.5, 0.5] (0 = no-op)
PARAM_ORDER = 5  # 4 slots [5, 9): jitter op order, a permutation of 0..3 (see _jitter_order)
PARAM_GRAY = 9  # grayscale applied
PARAM_BLUR = 10  # Gaussian blur applied
PARAM_SIGMA = 11  # blur sigma (drawn even when blur is off; unused then)
NUM_COLOR_PARAMS = 12
_NEUTRAL_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue delta

# pretrain_view keywords of each half (see split_view_kwargs).
_GEOMETRY_KEYS = ("rotation_degrees", "flip", "area_range")
_COLOR_KEYS = ("color_strength", "blur", "grayscale_prob", "color_jitter_prob")

_RECIPES: dict[str, dict[str, Any]] = {
    # Standard SimCLR set (also used for dermatology in Azizi et al.).
    "simclr": dict(
        color_strength=1.0,
        blur=True,
        rotation_degrees=0.0,
        flip=True,
        grayscale_prob=0.2,
        color_jitter_prob=0.8,
    ),
    # Azizi et al. CheXpert pretraining: no blur, colour strength 0.5, rotation up to 45 deg.
    "chexpert": dict(
        color_strength=0.5,
        blur=False,
        rotation_degrees=45.0,
        flip=True,
        grayscale_prob=0.2,
        color_jitter_prob=0.8,
    ),
}


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


def _check_degrees(rotation_degrees: float) -> float:
    r = float(rotation_degrees)
    if not (0.0 <= r <= 180.0):
        raise ValueError(f"rotation_degrees must be in [0, 180], got {rotation_degrees!r}")
    return r


def _prepare_seed(seed: Any) -> tf.Tensor:
    """Converts ``seed`` to a ``[2]`` int32/int64 tensor, raising early on a bad dtype/shape."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"seed must be an int32 or int64 tensor of shape [2], got {seed.dtype}")
    if seed.shape.rank is not None and seed.shape.as_list() != [2]:
        raise ValueError(f"seed must have shape [2], got {seed.shape}")
    return tf.ensure_shape(seed, [2])


def to_float_image(image: Any) -> tf.Tensor:
    """Converts an ``[H, W, C]`` integer or float image to float32 in [0, 1] with C == 3.

    Integer images are scaled by their dtype's max (uint8 / 255, uint16 / 65535); float images
    are assumed to already be in [0, 1]. A single-channel image is tiled to 3 channels.
    """
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.bool or not (image.dtype.is_integer or image.dtype.is_floating):
        raise ValueError(f"image must have an integer or float dtype, got {image.dtype}")
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"image must have shape [H, W, C], got {image.shape}")
    channels = image.shape[-1] if image.shape.rank is not None else None
    if channels not in (None, 1, 3):
        raise ValueError(f"image must have 1 or 3 channels, got shape {image.shape}")
    image = tf.image.convert_image_dtype(image, tf.float32)
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    return tf.ensure_shape(image, [None, None, 3])


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


# ----------------------------------------------------------------------------- geometry


def center_crop(image: tf.Tensor, image_size: int, crop_proportion: float) -> tf.Tensor:
    """SimCLR centre crop: central region of ``crop_proportion`` keeping the (square) target
    aspect ratio, then bicubic resize to ``[image_size, image_size, 3]`` (not clipped)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    aspect = 1.0  # target height / width (square output)

    def _target_wider_than_image():
        return (
            tf.cast(tf.math.rint(crop_proportion / aspect * wf), tf.int32),
            tf.cast(tf.math.rint(crop_proportion * wf), tf.int32),
        )

    def _image_wider_than_target():
        return (
            tf.cast(tf.math.rint(crop_proportion * hf), tf.int32),
            tf.cast(tf.math.rint(crop_proportion * aspect * hf), tf.int32),
        )

    crop_h, crop_w = tf.cond(aspect > wf / hf, _target_wider_than_image, _image_wider_than_target)
    crop_h, crop_w = tf.maximum(crop_h, 1), tf.maximum(crop_w, 1)
    off_h = (h - crop_h + 1) // 2
    off_w = (w - crop_w + 1) // 2
    image = tf.slice(image, [off_h, off_w, 0], [crop_h, crop_w, -1])
    return tf.image.resize(image, [image_size, image_size], method="bicubic")


def random_crop_and_resize(
    image: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    area_range: tuple[float, float] = _CROP_AREA_RANGE,
) -> tf.Tensor:
    """Inception-style random crop (area ``area_range``, default 0.08-1; aspect 3/4-4/3; 100
    attempts; whole image as fallback) then bicubic resize to ``[image_size, image_size, 3]``
    (not clipped). Multi-crop uses e.g. (0.14, 1) for global and (0.05, 0.14) for local crops.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
        seed=seed,
        # SimCLR's 0.1 for its own range; a multi-crop range uses its floor, so that local
        # crops (e.g. area 0.05-0.14) can be as small as their range allows.
        min_object_covered=(
            _CROP_MIN_OBJECT_COVERED
            if tuple(area_range) == _CROP_AREA_RANGE
            else float(area_range[0])
        ),
        aspect_ratio_range=_CROP_ASPECT_RANGE,
        area_range=tuple(float(a) for a in area_range),
        max_attempts=_CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    return tf.image.resize(image, [image_size, image_size], method="bicubic")


def rotate(image: tf.Tensor, angle: tf.Tensor | float, fill_mode: str = "REFLECT") -> tf.Tensor:
    """Rotates ``[H, W, C]`` float ``image`` counter-clockwise by ``angle`` radians about its
    centre (bilinear interpolation, ``fill_mode`` in REFLECT/CONSTANT/NEAREST/WRAP)."""
    shape = tf.shape(image)
    hf = tf.cast(shape[0], tf.float32) - 1.0
    wf = tf.cast(shape[1], tf.float32) - 1.0
    angle = tf.cast(angle, tf.float32)
    cos, sin = tf.math.cos(angle), tf.math.sin(angle)
    # Output pixel (x, y) samples input (cos*x - sin*y + dx, sin*x + cos*y + dy).
    dx = (wf - (cos * wf - sin * hf)) / 2.0
    dy = (hf - (sin * wf + cos * hf)) / 2.0
    zero = tf.zeros([], tf.float32)
    transform = tf.stack([cos, -sin, dx, sin, cos, dy, zero, zero])[None]  # [1, 8]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=shape[:2],
        fill_value=zero,
        interpolation="BILINEAR",
        fill_mode=fill_mode,
    )
    return out[0]


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


def _color_jitter_strength(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    return color_jitter(image, seed, **_jitter_strengths(strength))


# ----------------------------------------------------------------------------- blur


def blur_kernel_size(image_size: int) -> int:
    """SimCLR kernel size for ``image_size``: ``image_size // 10`` made odd (2*(k//2)+1)."""
    return 2 * ((image_size // 10) // 2) + 1


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


# ----------------------------------------------------------------------------- public views


def _random_rotate(image: tf.Tensor, seed: tf.Tensor, rotation_degrees: float) -> tf.Tensor:
    if rotation_degrees <= 0:
        return image
    max_rad = rotation_degrees * math.pi / 180.0
    angle = tf.random.stateless_uniform([], seed=seed, minval=-max_rad, maxval=max_rad)
    return rotate(image, angle)


def pretrain_geometry(
    image: Any,
    seed: Any,
    *,
    image_size: int,
    rotation_degrees: float = 0.0,
    flip: bool = True,
    area_range: tuple[float, float] = _CROP_AREA_RANGE,
) -> tf.Tensor:
    """Geometric half of ``pretrain_view`` (host side): random crop + bicubic resize, clip,
    optional rotation, flip. ``image`` [H, W, 3] uint8/float, ``seed`` [2] int (the same seed as
    ``color_params``). Returns float32 ``[image_size, image_size, 3]`` in [0, 1].
    """
    image_size = _check_image_size(image_size)
    rotation_degrees = _check_degrees(rotation_degrees)
    seeds = tf.random.experimental.stateless_split(_prepare_seed(seed), num=_NUM_SLOTS)
    x = to_float_image(image)

    x = random_crop_and_resize(x, seeds[_CROP], image_size, area_range)
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = _random_rotate(x, seeds[_ROTATE], rotation_degrees)
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seeds[_FLIP])
    return tf.ensure_shape(x, [image_size, image_size, 3])


def color_params(
    seed: Any,
    *,
    color_strength: float = 1.0,
    blur: bool = True,
    grayscale_prob: float = 0.2,
    color_jitter_prob: float = 0.8,
) -> tf.Tensor:
    """Every random quantity of ``pretrain_view``'s colour half for ``seed`` ([2] int), as a
    float32 ``[NUM_COLOR_PARAMS]`` vector (layout: ``PARAM_*``), so the colour ops can run
    elsewhere (``augment_device.apply_color``). Draws from the same sub-seeds and with the same
    ops as ``pretrain_view`` always has, so the random stream is unchanged.
    """
    color_strength = _check_strength(color_strength)
    grayscale_prob = _check_prob("grayscale_prob", grayscale_prob)
    color_jitter_prob = _check_prob("color_jitter_prob", color_jitter_prob)
    seeds = tf.random.experimental.stateless_split(_prepare_seed(seed), num=_NUM_SLOTS)

    if color_strength > 0:
        jitter_on = _random_decision(color_jitter_prob, seeds[_JITTER_APPLY])
    else:
        jitter_on = tf.constant(0.0, tf.float32)
    factors, order = _jitter_factors(seeds[_JITTER], **_jitter_strengths(color_strength))
    gray_on = _random_decision(grayscale_prob, seeds[_GRAY])
    blur_on = _random_decision(0.5 if blur else 0.0, seeds[_BLUR_APPLY])
    sigma = tf.random.stateless_uniform(
        [], seed=seeds[_BLUR_SIGMA], minval=_BLUR_SIGMA_RANGE[0], maxval=_BLUR_SIGMA_RANGE[1]
    )
    params = tf.concat(
        [
            jitter_on[None],
            factors,
            tf.cast(order, tf.float32),
            tf.stack([gray_on, blur_on, sigma]),
        ],
        axis=0,
    )
    return tf.ensure_shape(params, [NUM_COLOR_PARAMS])


def apply_color(image: Any, params: Any, *, image_size: int, blur: bool) -> tf.Tensor:
    """Colour half of ``pretrain_view`` driven by ``params`` (from ``color_params``): jitter in
    the given order if flagged, grayscale if flagged, Gaussian blur if ``blur`` and flagged,
    clip. ``image`` float32 [image_size, image_size, 3] in [0, 1] -> same shape in [0, 1].
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
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.ensure_shape(x, [image_size, image_size, 3])


def split_view_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits ``pretrain_view`` keywords (e.g. a ``recipe``) into those of
    ``pretrain_geometry`` and of ``color_params`` (``blur`` also goes to ``apply_color``)."""
    unknown = set(kwargs) - set(_GEOMETRY_KEYS) - set(_COLOR_KEYS) - {"image_size"}
    if unknown:
        raise ValueError(f"unknown pretrain_view keywords: {sorted(unknown)}")
    geometry = {k: v for k, v in kwargs.items() if k in _GEOMETRY_KEYS}
    color = {k: v for k, v in kwargs.items() if k in _COLOR_KEYS}
    return geometry, color


def pretrain_view(
    image: Any,
    seed: Any,
    *,
    image_size: int,
    color_strength: float = 1.0,
    blur: bool = True,
    rotation_degrees: float = 0.0,
    flip: bool = True,
    grayscale_prob: float = 0.2,
    color_jitter_prob: float = 0.8,
    area_range: tuple[float, float] = _CROP_AREA_RANGE,
) -> tf.Tensor:
    """One SimCLR pretraining view of ``image`` ([H, W, 3] uint8/float) for ``seed`` ([2] int).

    Returns float32 ``[image_size, image_size, 3]`` in [0, 1]. ``recipe(name)`` gives the
    keyword sets used in the paper; ``area_range`` is the crop's area fraction (multi-crop).
    Equal to ``apply_color(pretrain_geometry(...), color_params(...), ...)``.
    """
    image_size = _check_image_size(image_size)
    _check_strength(color_strength)
    _check_degrees(rotation_degrees)
    _check_prob("grayscale_prob", grayscale_prob)
    _check_prob("color_jitter_prob", color_jitter_prob)
    x = pretrain_geometry(
        image,
        seed,
        image_size=image_size,
        rotation_degrees=rotation_degrees,
        flip=flip,
        area_range=area_range,
    )
    params = color_params(
        seed,
        color_strength=color_strength,
        blur=blur,
        grayscale_prob=grayscale_prob,
        color_jitter_prob=color_jitter_prob,
    )
    return apply_color(x, params, image_size=image_size, blur=blur)


def finetune_view(
    image: Any,
    seed: Any,
    *,
    image_size: int,
    rotation_degrees: float = 0.0,
    color_strength: float = 0.0,
    crop: bool = True,
    flip: bool = True,
) -> tf.Tensor:
    """Fine-tuning / linear-eval view: random crop (or, with ``crop=False``, the largest central
    square) + bicubic resize, optional rotation, flip, and optional colour jitter (p=0.8, no
    grayscale) when ``color_strength > 0``. Float32 ``[image_size, image_size, 3]`` in [0, 1].
    """
    image_size = _check_image_size(image_size)
    color_strength = _check_strength(color_strength)
    rotation_degrees = _check_degrees(rotation_degrees)
    seeds = tf.random.experimental.stateless_split(_prepare_seed(seed), num=_NUM_SLOTS)
    x = to_float_image(image)

    if crop:
        x = random_crop_and_resize(x, seeds[_CROP], image_size)
    else:
        x = center_crop(x, image_size, 1.0)
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = _random_rotate(x, seeds[_ROTATE], rotation_degrees)
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seeds[_FLIP])
    if color_strength > 0:
        jitter = lambda y: _color_jitter_strength(y, seeds[_JITTER], color_strength)
        x = _random_apply(jitter, 0.8, seeds[_JITTER_APPLY], x)
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.ensure_shape(x, [image_size, image_size, 3])


def eval_view(image: Any, *, image_size: int, crop_proportion: float = 0.875) -> tf.Tensor:
    """Deterministic eval view: SimCLR centre crop of ``crop_proportion`` then bicubic resize;
    float32 ``[image_size, image_size, 3]`` clipped to [0, 1]."""
    image_size = _check_image_size(image_size)
    if not (0.0 < float(crop_proportion) <= 1.0):
        raise ValueError(f"crop_proportion must be in (0, 1], got {crop_proportion!r}")
    x = center_crop(to_float_image(image), image_size, float(crop_proportion))
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.ensure_shape(x, [image_size, image_size, 3])


def recipe(name: str) -> dict[str, Any]:
    """Keyword arguments for ``pretrain_view``: 'simclr' (standard set, also derm) or
    'chexpert' (Azizi et al.: no blur, colour strength 0.5, rotation up to 45 deg, flip)."""
    if name not in _RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; valid: {sorted(_RECIPES)}")
    return dict(_RECIPES[name])
