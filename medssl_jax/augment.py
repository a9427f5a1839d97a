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
(crop, rotation, flip) is here and stays on the host; the colour half (jitter, grayscale, blur,
and ``color_params`` / ``apply_color`` with their ``[NUM_COLOR_PARAMS]`` parameter vector) is in
``augment_color``, together with the seed, random-apply and argument-check helpers both halves
share.

Choices where SimCLR leaves freedom in the geometric half (the colour half's are in
``augment_color``):
- The bicubic resize overshoots [0, 1]; we clip right after it so colour ops see valid pixels.
- Rotation uses ``ImageProjectiveTransformV3`` with BILINEAR interpolation and REFLECT fill, so
  rotated views have no black corners that would leak the rotation angle.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from medssl_jax.augment_color import (
    _CROP,
    _FLIP,
    _JITTER,
    _JITTER_APPLY,
    _NUM_SLOTS,
    _ROTATE,
    _check_image_size,
    _check_prob,
    _check_strength,
    _color_jitter_strength,
    _prepare_seed,
    _random_apply,
    apply_color,
    color_params,
)

_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_MAX_ATTEMPTS = 100

# pretrain_view keywords of each half (see split_view_kwargs).
_GEOMETRY_KEYS = ("rotation_degrees", "flip", "area_range")
_COLOR_KEYS = (
    "color_strength",
    "blur",
    "grayscale_prob",
    "color_jitter_prob",
    "jitter",
    "blur_prob",
    "solarize_prob",
)

# DINO's per-view probabilities (global crop 1, global crop 2, local crops): blur and, after it,
# solarization (Caron et al. 2021, DataAugmentationDINO). The input pipeline takes them as
# config.augment.view_blur_prob / view_solarize_prob and passes each view's as blur_prob /
# solarize_prob.
DINO_VIEW_BLUR_PROB = (1.0, 0.1, 0.5)
DINO_VIEW_SOLARIZE_PROB = (0.0, 0.2, 0.0)

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
    # DINO (Caron et al. 2021): weaker jitter (brightness, contrast, saturation, hue), p 0.8;
    # blur and solarization probabilities differ per view (DINO_VIEW_*; 0.5 and 0 here, those
    # of its local crops).
    "dino": dict(
        color_strength=1.0,
        jitter=(0.4, 0.4, 0.2, 0.1),
        blur=True,
        rotation_degrees=0.0,
        flip=True,
        grayscale_prob=0.2,
        color_jitter_prob=0.8,
    ),
}


# ----------------------------------------------------------------------------- validation


def _check_degrees(rotation_degrees: float) -> float:
    r = float(rotation_degrees)
    if not (0.0 <= r <= 180.0):
        raise ValueError(f"rotation_degrees must be in [0, 180], got {rotation_degrees!r}")
    return r


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
    jitter: tuple[float, ...] = (),
    blur_prob: float = 0.5,
    solarize_prob: float = 0.0,
) -> tf.Tensor:
    """One SimCLR pretraining view of ``image`` ([H, W, 3] uint8/float) for ``seed`` ([2] int).

    Returns float32 ``[image_size, image_size, 3]`` in [0, 1]. ``recipe(name)`` gives the
    keyword sets used in the papers; ``area_range`` is the crop's area fraction (multi-crop);
    ``jitter``, ``blur_prob``, ``solarize_prob``: see ``augment_color.color_params`` (DINO).
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
        jitter=jitter,
        blur_prob=blur_prob,
        solarize_prob=solarize_prob,
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
    """Keyword arguments for ``pretrain_view``: 'simclr' (standard set, also derm),
    'chexpert' (Azizi et al.: no blur, colour strength 0.5, rotation up to 45 deg, flip) or
    'dino' (Caron et al.: jitter 0.4/0.4/0.2/0.1; per-view blur/solarize in DINO_VIEW_*)."""
    if name not in _RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; valid: {sorted(_RECIPES)}")
    return dict(_RECIPES[name])
