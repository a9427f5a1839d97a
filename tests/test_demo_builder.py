"""The `demo` TFDS builder: features, split sizes, determinism, patient-disjoint splits, and the
properties that make MICLe meaningful on it (per-image nuisance, shifted acquisition)."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.demo import Demo, render
from medssl_jax import datasets

SPLITS = ("train", "validation", "test", "test_shifted")


def _build(data_dir: str, config: str = "default") -> tfds.core.DatasetBuilder:
    builder = Demo(data_dir=data_dir, config=config)
    datasets.prepare(builder)
    return builder


def _read(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"images": tfds.decode.SkipDecoding()}
    )
    return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    builder = _build(str(tmp_path_factory.mktemp("demo_a")))
    return builder, {s: _read(builder, s) for s in SPLITS}


def _digest(cases: list[dict]) -> str:
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c["case_id"]):
        h.update(c["case_id"] + c["patient_id"])
        for img, iid, lab in zip(c["images"], c["image_ids"], c["label"], strict=True):
            h.update(img + iid + bytes([lab]))
    return h.hexdigest()


def test_features(built):
    builder, data = built
    f = builder.info.features
    assert set(f.keys()) == {"case_id", "patient_id", "images", "image_ids", "label"}
    assert f["images"].feature.shape == (64, 64, 3)
    assert f["label"].feature.names == list(render.CLASS_NAMES)
    case = data["train"][0]
    pixels = datasets.decode_image(case["images"][0]).numpy()
    assert pixels.shape == (64, 64, 3) and pixels.std() > 5


def test_split_sizes_and_case_structure(built):
    builder, data = built
    sizes = {s: len(data[s]) for s in SPLITS}
    assert 500 <= sizes["train"] <= 800, sizes
    for s in ("validation", "test", "test_shifted"):
        assert 120 <= sizes[s] <= 220, sizes
    assert {s: builder.info.splits[s].num_examples for s in SPLITS} == sizes
    for s in SPLITS:
        n_images = Counter(len(c["images"]) for c in data[s])
        assert set(n_images) <= {1, 2, 3, 4, 5}
        assert n_images[1] > 0 and sum(v for k, v in n_images.items() if k > 1) > 0
        per_patient = Counter(c["patient_id"] for c in data[s])
        assert max(per_patient.values()) >= 2  # some patients have several lesions
        for c in data[s]:
            assert len(set(c["label"].tolist())) == 1  # one lesion, one label
            assert len(set(c["images"].tolist())) == len(c["images"])  # no duplicate photos
            assert [i.decode() for i in c["image_ids"]] == [
                f"{c['case_id'].decode()}_{k}" for k in range(len(c["images"]))
            ]
    train_classes = Counter(int(c["label"][0]) for c in data["train"])
    assert set(train_classes) == set(range(len(render.CLASS_NAMES)))
    assert min(train_classes.values()) >= 30


def test_splits_are_patient_disjoint(built):
    _, data = built
    patients = {s: {c["patient_id"] for c in data[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not patients[a] & patients[b], (a, b)
    case_ids = [c["case_id"] for s in SPLITS for c in data[s]]
    assert len(case_ids) == len(set(case_ids))


@pytest.mark.slow  # a second full build: ~15-30 s on 2 busy cores
def test_two_builds_are_identical(built, tmp_path):
    _, data = built
    other = _build(str(tmp_path))
    for s in SPLITS:
        assert _digest(_read(other, s)) == _digest(data[s]), s


def _pixels(case: dict) -> np.ndarray:
    return np.stack([datasets.decode_image(b).numpy() for b in case["images"]]).astype(np.float32)


def test_images_of_a_case_differ_by_strong_nuisance(built):
    _, data = built
    diffs = []
    for c in data["validation"]:
        if len(c["images"]) >= 2:
            px = _pixels(c)
            diffs.append(np.abs(px[0] - px[1]).mean())
    # Two photos of one lesion are far apart in pixel space (viewpoint, light, skin).
    assert np.median(diffs) > 20.0, np.median(diffs)


def _sharpness(data: list[dict]) -> tuple[float, float]:
    px = np.concatenate([_pixels(c) for c in data[:60]])
    lap = (
        px[:, 1:-1, 1:-1] * 4
        - px[:, :-2, 1:-1]
        - px[:, 2:, 1:-1]
        - px[:, 1:-1, :-2]
        - px[:, 1:-1, 2:]
    )
    return float(np.abs(lap).mean()), float(px.std(axis=(1, 2)).mean())


def test_test_shifted_has_different_acquisition(built):
    _, data = built
    sharp_test, contrast_test = _sharpness(data["test"])
    sharp_shift, contrast_shift = _sharpness(data["test_shifted"])
    assert sharp_shift < 0.8 * sharp_test  # defocus blur
    assert contrast_shift < 0.85 * contrast_test  # lower contrast


def test_render_is_deterministic_and_lesion_shared():
    les = render.sample_lesion(np.random.default_rng([0, 1]))
    assert les == les and les.label in range(len(render.CLASS_NAMES))
    a = render.render(les, np.random.default_rng(5), 32)
    b = render.render(les, np.random.default_rng(5), 32)
    c = render.render(les, np.random.default_rng(6), 32)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and not np.array_equal(a, c)
    for label in range(len(render.CLASS_NAMES)):
        assert render.sample_lesion(np.random.default_rng(label), label).label == label
