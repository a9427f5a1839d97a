"""Reader API (`medssl_jax.datasets`), patient splits and nested label fractions."""

from __future__ import annotations

import io
import math
import sys
import types
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from medssl_jax import data_splits, datasets

# ----------------------------------------------------------------------------- data_splits


def test_patient_split_deterministic_disjoint_and_proportional():
    fractions = {"train": 0.7, "validation": 0.15, "test": 0.15}
    ids = [f"patient{i:05d}" for i in range(6000)]
    first = {p: data_splits.patient_split(p, fractions, salt="x") for p in ids}
    again = {p: data_splits.patient_split(p, fractions, salt="x") for p in reversed(ids)}
    assert first == again  # a patient always lands in the same single split
    counts = Counter(first.values())
    for name, frac in fractions.items():
        assert abs(counts[name] / len(ids) - frac) < 0.03, counts
    other = {p: data_splits.patient_split(p, fractions, salt="y") for p in ids}
    assert sum(first[p] != other[p] for p in ids) > 1000  # the salt re-draws the assignment


@pytest.mark.parametrize(
    "fractions", [{}, {"train": 0.5}, {"train": 0.5, "test": 0.6}, {"train": 1.0, "test": 0.0}]
)
def test_patient_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        data_splits.patient_split("p1", fractions)


def test_patient_split_rejects_empty_id():
    with pytest.raises(ValueError, match="patient_id"):
        data_splits.patient_split("", {"train": 1.0})


def _toy_cases(n: int = 1000, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    strata = rng.choice(5, size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    return [f"case{i}" for i in range(n)], strata


def test_label_fraction_is_stratified_nested_and_order_free():
    ids, strata = _toy_cases()
    masks = {
        f: data_splits.select_label_fraction(ids, strata, f, seed=3)
        for f in (0.01, 0.1, 0.25, 0.5, 0.9, 1.0)
    }
    prev = np.zeros(len(ids), bool)
    for f, mask in masks.items():
        assert not (prev & ~mask).any(), f"subset for smaller fraction not inside {f}"
        prev = mask
        for s in np.unique(strata):
            n = int((strata == s).sum())
            assert mask[strata == s].sum() == max(1, math.ceil(f * n - 1e-6)), (f, s)
    assert masks[1.0].all()
    # Same ids in another order -> the same chosen ids.
    perm = np.random.default_rng(1).permutation(len(ids))
    m2 = data_splits.select_label_fraction([ids[i] for i in perm], strata[perm], 0.1, seed=3)
    assert {ids[i] for i in perm[m2]} == {ids[i] for i in np.flatnonzero(masks[0.1])}
    # Deterministic for a seed, different for another seed.
    again = data_splits.select_label_fraction(ids, strata, 0.1, seed=3)
    np.testing.assert_array_equal(again, masks[0.1])
    other = data_splits.select_label_fraction(ids, strata, 0.1, seed=4)
    assert (other != masks[0.1]).any()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "half", None])
def test_label_fraction_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="label_fraction"):
        data_splits.select_label_fraction(["a", "b"], [0, 1], bad)


def test_label_fraction_rejects_duplicates_and_shape_mismatch():
    with pytest.raises(ValueError, match="duplicate case_id 'a'"):
        data_splits.select_label_fraction(["a", "b", "a"], [0, 0, 0], 0.5)
    with pytest.raises(ValueError, match="shape"):
        data_splits.select_label_fraction(["a", "b"], [0], 0.5)


def test_multilabel_strata_picks_most_frequent_positive():
    labels = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1]], np.float32)
    masks = np.ones_like(labels)
    masks[4, 2] = 0  # the last case's only positive does not count
    # Column frequencies over counted positives: [2, 2, 2] -> ties go to the lowest index.
    np.testing.assert_array_equal(data_splits.multilabel_strata(labels, masks), [0, 1, 3, 0, 3])
    labels2 = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1]], np.float32)
    np.testing.assert_array_equal(
        data_splits.multilabel_strata(labels2, np.ones_like(labels2)), [2, 2, 2]
    )


# ----------------------------------------------------------------------------- demo reader


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    datasets.load("demo/small", "train", data_dir=data_dir)  # prepares every split
    return data_dir


def _collect(store) -> list[dict]:
    return list(store)


def test_load_element_contract(demo_dir):
    store, spec = datasets.load("demo/small", "train", data_dir=demo_dir)
    assert spec.label_kind == "multiclass" and spec.num_classes == 6
    assert spec.class_names[:2] == ("homogeneous", "reticular")
    assert store.spec == spec and store.labels.dtype == np.int32
    assert store.patient_keys.dtype == np.int32 and store.label_masks is None
    cases = _collect(store)
    assert set(cases[0]) == {
        "case_id",
        "patient_id",
        "patient_key",
        "images",
        "image_ids",
        "label",
        "num_images",
    }
    assert len(cases) == spec.num_cases == store.num_cases
    assert sum(int(c["num_images"]) for c in cases) == spec.num_images == store.num_images
    for c in cases:
        m = int(c["num_images"])
        assert len(c["images"]) == len(c["image_ids"]) == c["label"].shape[0] == m
        assert c["images"][0][:8] == b"\x89PNG\r\n\x1a\n"  # still encoded
        assert len(set(c["label"].tolist())) == 1 and 0 <= c["label"][0] < 6
        assert c["patient_key"] == int(datasets.patient_key(c["patient_id"]))
    # Deterministic order.
    again = [
        c["case_id"] for c in _collect(datasets.load("demo/small", "train", data_dir=demo_dir)[0])
    ]
    assert again == [c["case_id"] for c in cases]


def test_patient_key_is_stable_and_non_negative():
    assert int(datasets.patient_key("P00001")) == 1008036667  # FarmHash: stable across runs
    keys = datasets.patient_key(tf.constant(["P00001", "x", ""])).numpy()
    assert keys.dtype == np.int32 and (keys >= 0).all() and keys[0] == 1008036667


def test_process_sharding_by_patient(demo_dir):
    full, spec = datasets.load("demo/small", "train", data_dir=demo_dir)
    all_ids = {c["case_id"] for c in _collect(full)}
    seen: dict[str, int] = {}
    union: list[str] = []
    for index in range(3):
        ds, s = datasets.load(
            "demo/small", "train", data_dir=demo_dir, process_index=index, process_count=3
        )
        assert s == spec  # spec is global, before sharding
        for c in _collect(ds):
            assert c["patient_key"] % 3 == index
            assert seen.setdefault(c["patient_id"], index) == index  # patient on one host
            union.append(c["case_id"])
    assert len(union) == len(set(union)) and set(union) == all_ids
    assert len(set(seen.values())) == 3


def test_label_fraction_through_load_is_nested_and_stratified(demo_dir):
    full, _ = datasets.load("demo/small", "train", data_dir=demo_dir)
    per_class = Counter(int(c["label"][0]) for c in _collect(full))
    chosen = {}
    for f in (0.2, 0.5):
        ds, spec = datasets.load(
            "demo/small", "train", data_dir=demo_dir, label_fraction=f, fraction_seed=7
        )
        cases = _collect(ds)
        assert spec.num_cases == len(cases)
        assert spec.num_images == sum(int(c["num_images"]) for c in cases)
        got = Counter(int(c["label"][0]) for c in cases)
        assert got == {k: max(1, math.ceil(f * n - 1e-6)) for k, n in per_class.items()}
        chosen[f] = {c["case_id"] for c in cases}
    assert chosen[0.2] < chosen[0.5]


def test_index_file_cache_gives_same_spec(demo_dir):
    _, spec = datasets.load("demo/small", "validation", data_dir=demo_dir, label_fraction=0.5)
    _, again = datasets.load("demo/small", "validation", data_dir=demo_dir, label_fraction=0.5)
    assert again == spec


def test_random_reads_match_the_cases(demo_dir):
    """Any (case, image) read by index equals the same image read case by case, in any order."""
    store, spec = datasets.load("demo/small", "test", data_dir=demo_dir)
    cases = _collect(store)
    assert store.num_images == spec.num_images
    order = np.random.default_rng(0).permutation(store.num_images)
    cs, images = store.locate(order)
    # Reference: row r of the per-image arrays is image r - first_row(c) of the case c it falls in.
    ref = [(c, i) for c in range(len(cases)) for i in range(len(cases[c]["image_ids"]))]
    pairs = list(zip(cs.tolist(), images.tolist(), strict=True))
    assert pairs == [ref[r] for r in order]
    got = store.read(pairs)
    for (c, i), enc in zip(pairs, got, strict=True):
        assert enc == cases[c]["images"][i]
        assert store.image_id(c, i) == cases[c]["image_ids"][i]
        assert store.label_of(c, i)["label"] == cases[c]["label"][i]
    pixels = datasets.decode_image(got[0]).numpy()
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_png_jpeg_and_grayscale():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(datasets.decode_image(_encode(rgb, "PNG")).numpy(), rgb)
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    out = datasets.decode_image(tf.constant(_encode(gray, "PNG"))).numpy()
    assert out.shape == (5, 7, 3)
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], gray)
    smooth = np.full((16, 16, 3), 120, np.uint8)
    jpeg = datasets.decode_image(_encode(smooth, "JPEG")).numpy()
    assert jpeg.shape == (16, 16, 3) and np.abs(jpeg.astype(int) - 120).max() <= 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "no_such_set", "split": "train"}, "unknown dataset name .*'demo'"),
        ({"name": "demo/huge", "split": "train"}, "unknown config 'huge'.*'small'"),
        ({"name": "demo/small", "split": "trian"}, "unknown split 'trian'.*'test_shifted'"),
        (
            {"name": "demo/small", "split": "train", "options": {"uncertainty": "u_ones"}},
            "takes no options",
        ),
        ({"name": "demo/small", "split": "train", "label_fraction": 0.0}, "label_fraction"),
        (
            {"name": "demo/small", "split": "train", "process_index": 2, "process_count": 2},
            "process_index",
        ),
        ({"name": "demo/small", "split": "train", "process_count": 0}, "process_count"),
    ],
)
def test_load_rejects_bad_arguments(demo_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.load(data_dir=demo_dir, **kwargs)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert datasets.default_data_dir("/given") == "/given"
    assert datasets.default_data_dir(None) == str(tmp_path)
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert datasets.default_data_dir(None).endswith("tensorflow_datasets")


# ----------------------------------------------------------------------------- hook path

# A small multilabel builder with a `read_transform` hook (like CheXpert): finding states
# 0 negative / 1 positive / 2 uncertain, and a view used to drop lateral images.
_FAKE_CASES = [
    {
        "case_id": f"c{i}",
        "patient_id": f"p{i // 2}",
        "findings": [[(i + j + k) % 3 for k in range(3)] for j in range(1 + i % 3)],
        "view": [0 if (j + i) % 4 else 1 for j in range(1 + i % 3)],
    }
    for i in range(30)
]
_FAKE_CASES[5]["view"] = [1] * len(_FAKE_CASES[5]["view"])  # all lateral -> case dropped


class FakeMultilabel(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    "patient_id": tfds.features.Text(),
                    "images": tfds.features.Sequence(tfds.features.Image(shape=(4, 4, 1))),
                    "image_ids": tfds.features.Sequence(tfds.features.Text()),
                    "findings": tfds.features.Sequence(
                        tfds.features.Tensor(shape=(3,), dtype=np.int64)
                    ),
                    "view": tfds.features.Sequence(tfds.features.ClassLabel(names=["pa", "lat"])),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for c in _FAKE_CASES:
            m = len(c["view"])
            yield (
                c["case_id"],
                {
                    **c,
                    "images": [np.full((4, 4, 1), 10 * j, np.uint8) for j in range(m)],
                    "image_ids": [f"{c['case_id']}_{j}" for j in range(m)],
                },
            )


def _fake_read_transform(options, info):
    policy = dict(options).get("uncertainty", "u_ignore")
    if set(options) - {"uncertainty"} or policy not in ("u_ignore", "u_ones"):
        raise ValueError(f"bad options {dict(options)}; valid: uncertainty=u_ignore|u_ones")

    def fn(ex):
        assert "images" not in ex or ex["images"].dtype == tf.string
        pos = tf.equal(ex["findings"], 1)
        unc = tf.equal(ex["findings"], 2)
        label = tf.cast(pos | unc if policy == "u_ones" else pos, tf.float32)
        mask = tf.ones_like(label) if policy == "u_ones" else 1.0 - tf.cast(unc, tf.float32)
        return {**ex, "label": label, "label_mask": mask, "keep_image": tf.equal(ex["view"], 0)}

    return fn, {"label_kind": "multilabel", "num_classes": 3, "class_names": ("a", "b", "c")}


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    module = types.ModuleType("data_builders.fake_multilabel")
    module.FakeMultilabel = FakeMultilabel
    module.read_transform = _fake_read_transform
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "data_builders.fake_multilabel", module)
        yield str(tmp_path_factory.mktemp("fake"))


def _fake_reference(policy: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    out = {}
    for c in _FAKE_CASES:
        keep = np.array(c["view"]) == 0
        states = np.array(c["findings"])[keep]
        if not keep.any():
            continue
        label = (states == 1) | ((states == 2) & (policy == "u_ones"))
        mask = np.ones_like(states) if policy == "u_ones" else (states != 2)
        ids = [f"{c['case_id']}_{j}" for j in np.flatnonzero(keep)]
        out[c["case_id"]] = (label.astype(np.float32), mask.astype(np.float32), ids)
    return out


@pytest.mark.parametrize("policy", ["u_ignore", "u_ones"])
def test_read_transform_hook_multilabel_and_keep_image(fake_dir, policy):
    ds, spec = datasets.load(
        "fake_multilabel", "train", data_dir=fake_dir, options={"uncertainty": policy}
    )
    assert (spec.label_kind, spec.num_classes, spec.class_names) == (
        "multilabel",
        3,
        ("a", "b", "c"),
    )
    ref = _fake_reference(policy)
    cases = _collect(ds)
    assert {c["case_id"] for c in cases} == set(ref)  # all-lateral case dropped
    assert spec.num_cases == len(ref) and spec.num_images == sum(len(r[2]) for r in ref.values())
    for c in cases:
        label, mask, ids = ref[c["case_id"]]
        np.testing.assert_array_equal(c["label"], label)
        np.testing.assert_array_equal(c["label_mask"], mask)
        assert c["image_ids"] == ids and c["num_images"] == len(ids)
        # The kept images are read from their positions in the record (lateral views skipped).
        values = [int(datasets.decode_image(e).numpy()[0, 0, 0]) for e in c["images"]]
        assert values == [10 * int(i.rsplit("_", 1)[1]) for i in ids]
    assert ds.labels.shape == ds.label_masks.shape == (spec.num_images, 3)
    assert ds.label_of(0, 0)["label"].shape == ds.label_of(0, 0)["label_mask"].shape == (3,)
    assert datasets.decode_image(ds.read([(0, 0)])[0]).shape == (4, 4, 3)


def test_hook_label_fraction_and_bad_options(fake_dir):
    ds, spec = datasets.load("fake_multilabel", "train", data_dir=fake_dir, label_fraction=0.3)
    small = {c["case_id"] for c in _collect(ds)}
    assert spec.num_cases == len(small) > 0
    ds, _ = datasets.load("fake_multilabel", "train", data_dir=fake_dir, label_fraction=0.6)
    assert small < {c["case_id"] for c in _collect(ds)}
    with pytest.raises(ValueError, match="valid: uncertainty"):
        datasets.load("fake_multilabel", "train", data_dir=fake_dir, options={"policy": "x"})


class FakeManual(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put metadata.csv and images/ in manual_dir."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({}))

    def _split_generators(self, dl_manager):
        raise AssertionError("must not be reached without manual files")

    def _generate_examples(self):
        yield from ()


def test_missing_manual_dir_names_expected_files(tmp_path):
    builder = FakeManual(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="metadata.csv and images/"):
        datasets.prepare(builder, manual_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="downloads/manual"):
        datasets.prepare(builder, data_dir=str(tmp_path))


def test_cached_index_of_a_read_only_data_dir_follows_a_re_prepared_dataset(tmp_path, monkeypatch):
    """A read-only (or gs://) data_dir keeps its index in a local cache keyed by the folder's
    path: labels corrected in the CSV and the dataset prepared again (same size) must be read
    as corrected, not from the stale cached index."""
    import os
    import shutil

    from PIL import Image

    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    monkeypatch.setenv("MEDSSL_INDEX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(manual / f"i{i}.png")
    real_access = os.access

    def read_only(path, mode, *a, **k):
        if "derm_csv" in str(path) and mode == os.W_OK:
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", read_only)

    def labels(names):
        rows = "".join(f"i{i}.png,c{i},{n}\n" for i, n in enumerate(names))
        (manual / "labels.csv").write_text("image_path,case_id,label\n" + rows)
        store, spec = datasets.load("derm_csv", "train", data_dir=str(data), manual_dir=str(manual))
        cases = range(store.num_cases)
        return {store.case_id(c): spec.class_names[store.labels[store.offsets[c]]] for c in cases}

    first = labels(["a", "b"] * 4)
    assert not any(p.name.startswith("medssl_index") for p in data.rglob("*"))  # cached locally
    shutil.rmtree(data / "derm_csv")  # prepared again with every label swapped
    second = labels(["b", "a"] * 4)
    assert first and set(first) == set(second)
    assert all({first[c], second[c]} == {"a", "b"} for c in first), (first, second)
