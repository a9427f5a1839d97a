"""Tests for the host/device split of the pretraining view: augment.pretrain_geometry +
augment_color.color_params + apply_color (TF) reproduce the pre-split pretrain_view bit for bit,
and augment_device.apply_color (JAX) matches the TF colour half op for op."""

from functools import partial

import jax
import numpy as np
import pytest
import tensorflow as tf

from medssl_jax import augment as A
from medssl_jax import augment_color as C
from medssl_jax import augment_device as D
from medssl_jax import color_layout as L

S = 32  # blur kernel 3
# JAX vs TF: both follow TF's CPU kernels op for op, so the only differences are float32
# rounding (summation order of the contrast mean and the blur taps, exp, a double constant in
# TF's rgb_to_hsv). Measured worst case ~1.3e-6 over drawn params; 1e-5 leaves headroom.
ATOL = 1e-5
_QUIRK = 9  # column of TF's hue-quirk pixel in row 0 of _image


def _seed(i: int, j: int = 7) -> tf.Tensor:
    return tf.constant([j, i], tf.int32)


def _image(i: int, size: int = S) -> np.ndarray:
    """Random float32 [size, size, 3] in [0, 1] with a few special pixels: greys (equal
    channels), ties between two channels, black, white, pure colours, and TF's hue quirk pixel
    (r max, g one ulp below b: AdjustSaturation's hue rounds to 1.0 and the pixel turns grey)."""
    img = np.random.default_rng(100 + i).random((size, size, 3)).astype(np.float32)
    special = [
        [0.2, 0.2, 0.2],
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [0.7, 0.7, 0.1],
        [0.1, 0.7, 0.7],
        [0.7, 0.1, 0.7],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, np.nextafter(np.float32(0.5), np.float32(0)), 0.5],  # index _QUIRK
    ]
    img[0, : len(special)] = np.asarray(special, np.float32)
    return img


@pytest.fixture(scope="module")
def rgb_u8() -> np.ndarray:
    """Non-square uint8 image [37, 53, 3] with structure (as in test_augment.py)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:53]
    base = np.stack([xx * 4.8, yy * 6.9, (xx * yy) % 256], -1)
    return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jax_color():
    """jit-compiled JAX apply_color for [S, S, 3], with and without blur (compiled once)."""
    return {
        blur: jax.jit(partial(D.apply_color, image_size=S, blur=blur)) for blur in (True, False)
    }


def _params(
    *,
    jitter=0.0,
    factors=(1.0, 1.0, 1.0, 0.0),
    order=(0, 1, 2, 3),
    gray=0.0,
    blur=0.0,
    sigma=1.0,
) -> np.ndarray:
    p = np.zeros([L.NUM_COLOR_PARAMS], np.float32)
    p[L.PARAM_JITTER] = jitter
    p[[L.PARAM_BRIGHTNESS, L.PARAM_CONTRAST, L.PARAM_SATURATION, L.PARAM_HUE]] = factors
    p[L.PARAM_ORDER : L.PARAM_ORDER + 4] = order
    p[[L.PARAM_GRAY, L.PARAM_BLUR, L.PARAM_SIGMA]] = gray, blur, sigma
    return p


def _both(jax_color, img, params, blur=True):
    tf_out = C.apply_color(img, params, image_size=S, blur=blur).numpy()
    jax_out = np.asarray(jax_color[blur](img, np.asarray(params)))
    return tf_out, jax_out


# ----------------------------------------------------------------------------- pre-split reference


def _old_color_jitter(image, seed, *, brightness, contrast, saturation, hue):
    """augment_color.color_jitter as it was before the split (verbatim apart from names)."""
    seeds = tf.random.experimental.stateless_split(C._prepare_seed(seed), num=5)

    def _uniform(i, lo, hi):
        return tf.random.stateless_uniform([], seed=seeds[i], minval=lo, maxval=hi)

    def _brightness(x):
        if brightness <= 0:
            return x
        return x * _uniform(0, max(1.0 - brightness, 0.0), 1.0 + brightness)

    def _contrast(x):
        if contrast <= 0:
            return x
        return tf.image.adjust_contrast(x, _uniform(1, max(1.0 - contrast, 0.0), 1.0 + contrast))

    def _saturation(x):
        if saturation <= 0:
            return x
        lo = max(1.0 - saturation, 0.0)
        return tf.image.adjust_saturation(x, _uniform(2, lo, 1.0 + saturation))

    def _hue(x):
        if hue <= 0:
            return x
        h = min(hue, 0.5)
        return tf.image.adjust_hue(x, _uniform(3, -h, h))

    ops = [_brightness, _contrast, _saturation, _hue]
    order = C._jitter_order(seeds[4])
    for i in range(4):
        image = tf.switch_case(order[i], [lambda f=f, x=image: f(x) for f in ops])
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def _old_pretrain_view(
    image,
    seed,
    *,
    image_size,
    color_strength=1.0,
    blur=True,
    rotation_degrees=0.0,
    flip=True,
    grayscale_prob=0.2,
    color_jitter_prob=0.8,
    area_range=A._CROP_AREA_RANGE,
):
    """augment.pretrain_view as it was before the split (validation left out)."""
    seeds = tf.random.experimental.stateless_split(C._prepare_seed(seed), num=C._NUM_SLOTS)
    x = A.to_float_image(image)
    x = A.random_crop_and_resize(x, seeds[C._CROP], image_size, area_range)
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = A._random_rotate(x, seeds[C._ROTATE], rotation_degrees)
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seeds[C._FLIP])
    if color_strength > 0:
        s = color_strength
        jitter = lambda y: _old_color_jitter(  # noqa: E731
            y,
            seeds[C._JITTER],
            brightness=0.8 * s,
            contrast=0.8 * s,
            saturation=0.8 * s,
            hue=0.2 * s,
        )
        x = C._random_apply(jitter, color_jitter_prob, seeds[C._JITTER_APPLY], x)
    x = C._random_apply(C.to_grayscale, grayscale_prob, seeds[C._GRAY], x)
    if blur:
        ksize = C.blur_kernel_size(image_size)
        sigma = tf.random.stateless_uniform([], seed=seeds[C._BLUR_SIGMA], minval=0.1, maxval=2.0)
        x = C._random_apply(
            lambda y: C.gaussian_blur(y, ksize, sigma), 0.5, seeds[C._BLUR_APPLY], x
        )
    return tf.clip_by_value(x, 0.0, 1.0)


_CONFIGS = [
    A.recipe("simclr"),
    A.recipe("chexpert"),
    dict(color_strength=0.0),  # no jitter at all
    dict(color_jitter_prob=1.0, grayscale_prob=1.0),  # p >= 1: decided without a draw
    dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur=False, area_range=(0.05, 0.14)),
]


@pytest.mark.parametrize("cfg", range(len(_CONFIGS)))
def test_split_view_equals_pretrain_view_and_pre_split_implementation(rgb_u8, cfg):
    kw = _CONFIGS[cfg]
    geo, col = A.split_view_kwargs(kw)
    assert set(geo) | set(col) == set(kw)
    for i in range(6):
        seed = _seed(i) if i % 2 else tf.constant([3, i], tf.int64)
        view = A.pretrain_view(rgb_u8, seed, image_size=S, **kw).numpy()
        split = C.apply_color(
            A.pretrain_geometry(rgb_u8, seed, image_size=S, **geo),
            C.color_params(seed, **col),
            image_size=S,
            blur=col.get("blur", True),
        ).numpy()
        old = _old_pretrain_view(rgb_u8, seed, image_size=S, **kw).numpy()
        np.testing.assert_array_equal(view, split)
        np.testing.assert_array_equal(view, old)


def test_color_jitter_unchanged_by_refactor():
    img = _image(0)
    for i in range(6):
        for kw in [
            dict(brightness=0.0, contrast=0.4, saturation=0.0, hue=0.0),
            dict(brightness=0.3, contrast=0.2, saturation=0.5, hue=0.1),
        ]:
            np.testing.assert_array_equal(
                C.color_jitter(img, _seed(i), **kw).numpy(),
                _old_color_jitter(img, _seed(i), **kw).numpy(),
            )


# ----------------------------------------------------------------------------- color_params


def test_color_params_layout_and_decisions():
    draws = np.stack([C.color_params(_seed(i)).numpy() for i in range(40)])
    assert draws.shape == (40, L.NUM_COLOR_PARAMS) and draws.dtype == np.float32
    for col in (L.PARAM_JITTER, L.PARAM_GRAY, L.PARAM_BLUR):
        assert set(np.unique(draws[:, col])) <= {0.0, 1.0}
        assert 0 < draws[:, col].sum() < 40  # p in (0, 1): both outcomes occur
    order = draws[:, L.PARAM_ORDER : L.PARAM_ORDER + 4]
    assert all(sorted(o) == [0, 1, 2, 3] for o in order.tolist())
    for col, lo, hi in [
        (L.PARAM_BRIGHTNESS, 0.2, 1.8),
        (L.PARAM_CONTRAST, 0.2, 1.8),
        (L.PARAM_SATURATION, 0.2, 1.8),
        (L.PARAM_HUE, -0.2, 0.2),
        (L.PARAM_SIGMA, 0.1, 2.0),
    ]:
        assert lo - 1e-6 <= draws[:, col].min() and draws[:, col].max() <= hi + 1e-6
    # p = 1 / p = 0 / blur off / no colour: fixed decisions, neutral factors without strength.
    p = C.color_params(_seed(1), color_jitter_prob=1.0, grayscale_prob=0.0, blur=False).numpy()
    assert p[L.PARAM_JITTER] == 1 and p[L.PARAM_GRAY] == 0 and p[L.PARAM_BLUR] == 0
    p = C.color_params(_seed(1), color_strength=0.0, grayscale_prob=1.0).numpy()
    assert p[L.PARAM_JITTER] == 0 and p[L.PARAM_GRAY] == 1
    np.testing.assert_array_equal(p[L.PARAM_BRIGHTNESS : L.PARAM_HUE + 1], [1, 1, 1, 0])
    with pytest.raises(ValueError, match="grayscale_prob"):
        C.color_params(_seed(1), grayscale_prob=2.0)
    with pytest.raises(ValueError, match="unknown"):
        A.split_view_kwargs(dict(blur=True, colour_strength=1.0))


# ----------------------------------------------------------------------------- JAX vs TF


@pytest.mark.parametrize("name", ["simclr", "chexpert", "strong"])
def test_jax_matches_tf_for_drawn_params(jax_color, name):
    kw = dict(color_strength=1.5, color_jitter_prob=1.0) if name == "strong" else A.recipe(name)
    _, col = A.split_view_kwargs(kw)
    for i in range(8):
        params = C.color_params(_seed(i, 11), **col)
        tf_out, jax_out = _both(jax_color, _image(i), params, blur=col.get("blur", True))
        np.testing.assert_allclose(jax_out, tf_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "op, values",
    [
        ("brightness", [0.0, 0.2, 0.9, 1.7]),
        ("contrast", [0.0, 0.3, 1.0, 1.8]),
        ("saturation", [0.0, 0.4, 1.0, 1.9, 3.0]),
        ("hue", [-1.0, -0.5, -0.31, -0.01, 0.0, 0.07, 0.33, 0.5, 0.97, 1.0]),
    ],
)
def test_each_jitter_op_matches_tf(jax_color, op, values):
    tf_op = {
        "brightness": lambda x, v: x * v,
        "contrast": tf.image.adjust_contrast,
        "saturation": tf.image.adjust_saturation,
        "hue": tf.image.adjust_hue,
    }[op]
    jax_op = jax.jit(getattr(D, f"_{op}"))
    k = ["brightness", "contrast", "saturation", "hue"].index(op)
    # No quirk pixel here: AdjustSaturation greys it even at factor 1, which would also shift
    # the contrast mean, and this test checks that neutral ops are the identity.
    img = _image(k)
    img[0, _QUIRK] = 0.3
    for v in values:
        # The op alone (no clip) against the TF op it mirrors ...
        ref = tf_op(tf.constant(img), tf.constant(v, tf.float32)).numpy()
        np.testing.assert_allclose(np.asarray(jax_op(img, np.float32(v))), ref, atol=ATOL)
        # ... and through apply_color with only this op non-neutral, first or last in order.
        factors = list(C._NEUTRAL_JITTER)
        factors[k] = v
        if op == "hue" and abs(v) > 0.5:
            continue  # apply_color's hue params stay in [-0.5, 0.5]
        for order in ((k, *[j for j in range(4) if j != k]), (*[j for j in range(4) if j != k], k)):
            tf_out, jax_out = _both(jax_color, img, _params(jitter=1, factors=factors, order=order))
            np.testing.assert_allclose(jax_out, tf_out, atol=ATOL, rtol=0)
            # Only this op acted: the neutral ones are the identity up to rounding.
            np.testing.assert_allclose(tf_out, np.clip(ref, 0, 1), atol=1e-5, rtol=0)


def test_hue_quirk_pixel_turns_grey_like_tf():
    """TF's AdjustSaturation maps a hue that rounds to 1.0 to its default branch (grey); JAX too."""
    px = np.array([[[1.0, np.nextafter(np.float32(0.5), np.float32(0)), 0.5]]], np.float32)
    ref = tf.image.adjust_saturation(px, 1.0).numpy()
    np.testing.assert_array_equal(ref, 0.5)
    np.testing.assert_array_equal(np.asarray(D._saturation(px, np.float32(1.0))), ref)


def test_grayscale_and_blur_match_tf(jax_color):
    img = _image(5)
    tf_out, jax_out = _both(jax_color, img, _params(gray=1))
    np.testing.assert_allclose(jax_out, tf_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(tf_out, np.clip(C.to_grayscale(img).numpy(), 0, 1), atol=1e-7)
    for sigma in (0.1, 0.7, 2.0):
        tf_out, jax_out = _both(jax_color, img, _params(blur=1, sigma=sigma))
        np.testing.assert_allclose(jax_out, tf_out, atol=ATOL, rtol=0)
        assert sigma < 0.2 or np.abs(tf_out - img).max() > 0.05  # blurred (sigma 0.1 ~ none)
        # Blur flagged but blur=False: no blur on either side.
        tf_out, jax_out = _both(jax_color, img, _params(blur=1, sigma=sigma), blur=False)
        np.testing.assert_array_equal(tf_out, img)
        np.testing.assert_array_equal(jax_out, img)
    # A larger kernel (image 64 -> kernel 7) with reflect padding at the borders.
    big = _image(6, size=64)
    ref = C.apply_color(big, _params(blur=1, sigma=1.5), image_size=64, blur=True).numpy()
    out = D.apply_color(big, _params(blur=1, sigma=1.5), image_size=64, blur=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)


def test_jit_with_batch_and_view_dims(rgb_u8):
    b, v = 2, 3
    kw = A.recipe("simclr")
    geo, col = A.split_view_kwargs(kw)
    seeds = [[_seed(10 * i + j) for j in range(v)] for i in range(b)]
    # Host side: geometry, then uint8 for the trip to the device, plus the params.
    u8 = np.stack(
        [
            np.stack(
                [
                    tf.image.convert_image_dtype(
                        A.pretrain_geometry(rgb_u8, s, image_size=S, **geo), tf.uint8
                    ).numpy()
                    for s in row
                ]
            )
            for row in seeds
        ]
    )  # [B, V, S, S, 3] uint8
    params = np.stack([np.stack([C.color_params(s, **col).numpy() for s in row]) for row in seeds])
    fn = jax.jit(lambda x, p: D.apply_color(D.to_float(x), p, image_size=S, blur=True))
    out = np.asarray(fn(u8, params))
    assert out.shape == (b, v, S, S, 3) and out.dtype == np.float32
    for i in range(b):
        for j in range(v):
            x = tf.image.convert_image_dtype(u8[i, j], tf.float32)
            np.testing.assert_array_equal(np.asarray(D.to_float(u8[i, j])), x.numpy())
            ref = C.apply_color(x, params[i, j], image_size=S, blur=True).numpy()
            np.testing.assert_allclose(out[i, j], ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="params must have shape"):
        D.apply_color(out, params[:1], image_size=S, blur=True)
    with pytest.raises(ValueError, match="images must have shape"):
        D.apply_color(out, params, image_size=S + 1, blur=True)
    with pytest.raises(ValueError, match="uint8"):
        D.to_float(out)
