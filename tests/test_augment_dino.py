"""Tests for DINO's per-view augmentations: explicit jitter strengths, per-view blur and
solarization probabilities (color_params, both apply_color twins, the input pipeline, the
config), and that SimCLR's defaults still give the views they always gave."""

from __future__ import annotations

import importlib
import re

import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from ml_collections import config_flags

from medssl_jax import augment as A
from medssl_jax import augment_color as C
from medssl_jax import augment_device as D
from medssl_jax import color_layout as L
from medssl_jax import config_lib, datasets, input_pipeline
from medssl_jax.methods.base import Crops, Views
from tests.utils import ROOT

S = 32
N_SEEDS = 400


def _seed(i: int, j: int = 7) -> tf.Tensor:
    return tf.constant([j, i], tf.int64)


def _params(*, solarize=0.0, blur=0.0, sigma=1.0) -> np.ndarray:
    p = np.zeros([L.NUM_COLOR_PARAMS], np.float32)
    p[L.PARAM_BRIGHTNESS : L.PARAM_HUE + 1] = C._NEUTRAL_JITTER
    p[L.PARAM_ORDER : L.PARAM_ORDER + 4] = (0, 1, 2, 3)
    p[[L.PARAM_BLUR, L.PARAM_SIGMA, L.PARAM_SOLARIZE]] = blur, sigma, solarize
    return p


def _dino_views() -> list[dict]:
    """color_params keywords of the 3 view kinds (global 1, global 2, local) of configs/dino.py."""
    aug = config_lib.augment_kwargs(importlib.import_module("dino").get_config())
    per_view = input_pipeline._per_view_probs(aug)
    _, color = A.split_view_kwargs(aug)
    return [{**color, **probs} for probs in per_view]


@tf.function
def _draw(seeds: tf.Tensor, kw_index: int) -> tf.Tensor:
    kw = _dino_views()[kw_index]
    return tf.map_fn(lambda s: C.color_params(s, **kw), seeds, fn_output_signature=tf.float32)


# ----------------------------------------------------------------------------- SimCLR unchanged

# color_params([7, i]) computed before solarization existed (12 entries then).
_OLD_PARAMS = {
    "simclr": [
        [1.0, 0.75467312, 1.50434792, 0.33507615, -0.14298134, 3, 1, 0, 2, 0, 0, 1.19475102],
        [1.0, 0.26349297, 1.38439190, 1.70610344, -0.17253132, 0, 3, 2, 1, 0, 0, 1.02782726],
        [1.0, 1.38357484, 1.06173134, 0.62388951, -0.13280660, 1, 0, 3, 2, 0, 1, 1.45514953],
    ],
    "chexpert": [
        [1.0, 0.87733662, 1.25217390, 0.66753811, -0.07149067, 3, 1, 0, 2, 0, 0, 1.19475102],
        [1.0, 0.63174653, 1.19219589, 1.35305166, -0.08626566, 0, 3, 2, 1, 0, 0, 1.02782726],
        [1.0, 1.19178748, 1.03086567, 0.81194478, -0.06640330, 1, 0, 3, 2, 0, 0, 1.45514953],
    ],
}


@pytest.mark.parametrize("name", ["simclr", "chexpert"])
def test_default_params_are_the_pre_solarization_ones(name):
    _, col = A.split_view_kwargs(A.recipe(name))
    for i, old in enumerate(_OLD_PARAMS[name]):
        p = C.color_params(_seed(i), **col).numpy()
        assert p.shape == (13,) and p[L.PARAM_SOLARIZE] == 0
        np.testing.assert_allclose(p[:12], old, rtol=0, atol=1e-7)


def test_explicit_simclr_jitter_gives_the_same_params():
    """jitter=(0.8, 0.8, 0.8, 0.2) with blur p 0.5 is colour strength 1 draw for draw; the
    solarize decision uses its own seed, so turning it on changes no other entry."""
    for i in range(8):
        base = C.color_params(_seed(i)).numpy()
        explicit = C.color_params(_seed(i), jitter=(0.8, 0.8, 0.8, 0.2), blur_prob=0.5).numpy()
        np.testing.assert_array_equal(base, explicit)
        sol = C.color_params(_seed(i), solarize_prob=1.0).numpy()
        assert sol[L.PARAM_SOLARIZE] == 1
        np.testing.assert_array_equal(sol[: L.PARAM_SOLARIZE], base[: L.PARAM_SOLARIZE])


def test_bad_jitter_and_probabilities_raise():
    for bad in [(0.4, 0.4, 0.2), (0.4, -0.1, 0.2, 0.1), (0.4, 0.4, 0.2, 0.6), (np.nan,) * 4]:
        with pytest.raises(ValueError, match="jitter"):
            C.color_params(_seed(0), jitter=bad)
    with pytest.raises(ValueError, match="blur_prob"):
        C.color_params(_seed(0), blur_prob=1.5)
    with pytest.raises(ValueError, match="solarize_prob"):
        C.color_params(_seed(0), solarize_prob=-0.1)


# ----------------------------------------------------------------------------- DINO's rates


def test_dino_view_rates_and_ranges():
    seeds = tf.stack([tf.constant([3, i], tf.int64) for i in range(N_SEEDS)])
    draws = [_draw(seeds, k).numpy() for k in range(3)]  # [N, P] per view kind

    def rate_ok(col, k, p):
        rate = draws[k][:, col].mean()
        sd = np.sqrt(p * (1 - p) / N_SEEDS)
        return abs(rate - p) <= 4 * sd, rate

    for k, (blur, sol) in enumerate([(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]):
        for col, p in ((L.PARAM_BLUR, blur), (L.PARAM_SOLARIZE, sol)):
            ok, rate = rate_ok(col, k, p)
            assert ok, f"view kind {k}, column {col}: rate {rate} for p {p}"
        for col, p in ((L.PARAM_JITTER, 0.8), (L.PARAM_GRAY, 0.2)):
            assert rate_ok(col, k, p)[0]
        d = draws[k]
        for col, lo, hi in [
            (L.PARAM_BRIGHTNESS, 0.6, 1.4),
            (L.PARAM_CONTRAST, 0.6, 1.4),
            (L.PARAM_SATURATION, 0.8, 1.2),
            (L.PARAM_HUE, -0.1, 0.1),
        ]:
            assert lo - 1e-6 <= d[:, col].min() and d[:, col].max() <= hi + 1e-6
            assert d[:, col].max() - d[:, col].min() > 0.9 * (hi - lo)  # the whole range
    # Solarization on global crop 2 is drawn independently of its blur.
    both = (draws[1][:, L.PARAM_BLUR] * draws[1][:, L.PARAM_SOLARIZE]).mean()
    assert abs(both - 0.02) <= 4 * np.sqrt(0.02 * 0.98 / N_SEEDS)


# ----------------------------------------------------------------------------- solarization op


def test_solarize_matches_pil_in_tf_and_jax():
    u8 = (np.arange(S * S * 3) % 256).astype(np.uint8).reshape(S, S, 3)
    ref = np.where(u8 >= 128, 255 - u8, u8)  # PIL ImageOps.solarize(threshold=128)
    tf_in = tf.image.convert_image_dtype(u8, tf.float32).numpy()
    jax_in = np.asarray(D.to_float(u8))
    np.testing.assert_array_equal(tf_in, jax_in)
    jax_apply = jax.jit(lambda x, p: D.apply_color(x, p, image_size=S, blur=True))
    tf_out = C.apply_color(tf_in, _params(solarize=1), image_size=S, blur=True).numpy()
    jax_out = np.asarray(jax_apply(jax_in, _params(solarize=1)))
    np.testing.assert_allclose(tf_out, ref / 255.0, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.round(tf_out * 255).astype(np.uint8), ref)
    np.testing.assert_array_equal(tf_out, jax_out)
    # Flag off: untouched. Blur then solarize (in that order) agree between the twins.
    off = C.apply_color(tf_in, _params(), image_size=S, blur=True).numpy()
    np.testing.assert_array_equal(off, tf_in)
    img = np.random.default_rng(0).random((S, S, 3)).astype(np.float32)
    p = _params(solarize=1, blur=1, sigma=1.3)
    tf_out = C.apply_color(img, p, image_size=S, blur=True).numpy()
    blurred = C.gaussian_blur(img, L.blur_kernel_size(S), 1.3).numpy()
    np.testing.assert_allclose(
        tf_out, np.clip(np.where(blurred >= 0.5, 1 - blurred, blurred), 0, 1)
    )
    np.testing.assert_allclose(np.asarray(jax_apply(img, p)), tf_out, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- input pipeline


@pytest.fixture(scope="module")
def store(tfds_data_dir):
    datasets.load("demo/small", "train", data_dir=tfds_data_dir)
    return input_pipeline.load_store({"name": "demo/small", "data_dir": tfds_data_dir}, "train")


def _batch(store, aug, color_on_device):
    views = Views(Crops(2, S, (0.3, 1.0)), Crops(2, 16, (0.1, 0.3)))
    ds, _ = input_pipeline.pretrain_dataset(
        store, batch_size=8, views=views, aug=aug, seed=1, color_on_device=color_on_device
    )
    return next(ds.as_numpy_iterator())


def test_pipeline_gives_each_view_its_probabilities(store):
    aug = {
        **A.recipe("dino"),
        "view_blur_prob": (1.0, 0.0, 0.5),
        "view_solarize_prob": (0.0, 1.0, 0.0),
    }
    dev = _batch(store, aug, color_on_device=True)
    p = dev["color_params"]  # [B, 2 + N, P]
    assert p.shape == (8, 4, L.NUM_COLOR_PARAMS)
    np.testing.assert_array_equal(p[:, 0, L.PARAM_BLUR], 1)
    np.testing.assert_array_equal(p[:, 1, L.PARAM_BLUR], 0)
    assert 0 < p[:, 2:, L.PARAM_BLUR].sum() < 16
    np.testing.assert_array_equal(p[:, :, L.PARAM_SOLARIZE], [[0, 1, 0, 0]] * 8)

    # Host path, every colour op off but solarization: view 1 (only) is the solarized crop.
    plain = dict(color_strength=0.0, blur=False, grayscale_prob=0.0, color_jitter_prob=0.0)
    geometry = _batch(store, {**plain, "view_solarize_prob": (0.0, 0.0, 0.0)}, True)["views"]
    host = _batch(store, {**plain, "view_solarize_prob": (0.0, 1.0, 0.0)}, False)["views"]
    np.testing.assert_array_equal(host[:, 0], geometry[:, 0])
    g1 = geometry[:, 1]
    np.testing.assert_array_equal(host[:, 1], np.where(g1 >= 128, 255 - g1, g1))
    assert (g1 >= 128).any() and (g1 < 128).any()


# ----------------------------------------------------------------------------- configs


def _parse(*overrides: str, config: str = "dino.py"):
    """The config as main.py's command line makes it (overrides parsed by ml_collections)."""
    argv = ["prog", f"--config={ROOT / 'configs' / config}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_dino_config_is_dinos_recipe_and_validates():
    c = _parse()
    config_lib.validate(c)
    aug = config_lib.augment_kwargs(c)
    assert c.augment.recipe == "dino"
    assert {k: aug[k] for k in A.recipe("dino")} == A.recipe("dino")
    assert aug["view_blur_prob"] == A.DINO_VIEW_BLUR_PROB == (1.0, 0.1, 0.5)
    assert aug["view_solarize_prob"] == A.DINO_VIEW_SOLARIZE_PROB == (0.0, 0.2, 0.0)
    assert _parse(config="dino.py:vit_s16").augment.view_solarize_prob == (0.0, 0.2, 0.0)
    # The medical recipes keep SimCLR's colour set, in either variant order.
    for variants in ("demo", "demo,vit_tiny", "vit_s16,chexpert", "chexpert,vit_s16"):
        a = _parse(config=f"dino.py:{variants}").augment
        assert a.jitter == () and a.blur is False and a.color_strength == 0.5
        assert a.view_solarize_prob == (0.0, 0.0, 0.0)
    for name in ("simclr.py", "swav.py", "micle.py"):
        a = _parse(config=name).augment
        assert a.jitter == () and a.view_blur_prob == (0.5, 0.5, 0.5)
        assert a.view_solarize_prob == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.augment.view_blur_prob=(1.0, 2.0, 0.5)", "augment.view_blur_prob"),
        ("--config.augment.view_solarize_prob=(0.0, 0.2)", "augment.view_solarize_prob"),
        ("--config.augment.jitter=(0.4, 0.4, 0.2, 0.7)", "augment.jitter"),
        ("--config.augment.jitter=(0.4, 0.4)", "augment.jitter"),
    ],
)
def test_bad_view_colour_fields_fail_validation(override, field):
    pattern = re.escape(f"config.{field}:")
    with pytest.raises(config_lib.ConfigError, match=pattern):
        config_lib.validate(_parse(override))


def test_finetune_augment_does_not_get_the_pretraining_keys():
    """Fine-tuning passes its own config.augment to finetune_view: none of the new keys."""
    c = importlib.import_module("finetune").get_config("demo")
    assert not {"jitter", "view_blur_prob", "view_solarize_prob"} & set(c.augment)
    img = np.zeros((40, 40, 3), np.uint8)
    assert A.finetune_view(img, _seed(0), image_size=S, **dict(c.augment)).shape == (S, S, 3)
