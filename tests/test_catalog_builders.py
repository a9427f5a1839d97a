"""Builders over TFDS catalogue datasets (patch_camelyon, diabetic_retinopathy).

The catalogue datasets are prepared for real in a tmp data_dir by their own catalogue builder
classes, whose `_split_generators` is replaced by deterministic examples we control (no
download: DownloadManager is made to fail). Our builders then read them with `as_dataset` like
real data, and their splits are compared with those examples: ids, labels, grouping, split
membership and image bytes / pixels.
"""

from __future__ import annotations

import io
import os
import tempfile
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import catalog, common
from data_builders.diabetic_retinopathy import (
    GRADES,
    DiabeticRetinopathy,
    DiabeticRetinopathyConfig,
)
from data_builders.patch_camelyon import CLASSES, PatchCamelyon
from medssl_jax import datasets

SPLITS = ("train", "validation", "test")


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"TFDS tried to download: {args} {kwargs}")

    for attr in ("download", "download_and_extract", "download_kaggle_data"):
        monkeypatch.setattr(tfds.download.DownloadManager, attr, refuse, raising=False)


def text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def prepare_catalogue(
    name, data_dir, examples, config=None, file_format=None
) -> tfds.core.DatasetBuilder:
    """Prepares the catalogue dataset `name[/config]` in `data_dir` from `examples`
    ({split: [example dict]}; the key is the example's 'id' / 'name'), as TFRecord (what
    `tfds build` writes by default) or `file_format`."""
    cls = tfds.builder_cls(name)
    features = cls(data_dir=str(data_dir), **_config(config)).info.features
    key = "id" if "id" in features.keys() else "name"

    def split_generators(self, dl_manager):
        del self, dl_manager

        def gen(exs):
            for ex in exs:
                yield ex[key], ex

        return {split: gen(exs) for split, exs in examples.items()}

    fmt = {"file_format": file_format} if file_format else {}
    with mock.patch.object(cls, "_split_generators", split_generators):
        builder = cls(data_dir=str(data_dir), **_config(config), **fmt)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    assert builder.is_prepared()
    return builder


def _config(config):
    return {"config": config} if config else {}


def build(cls, data_dir, **kwargs) -> tfds.core.DatasetBuilder:
    builder = cls(data_dir=str(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def read_all(builder) -> dict[str, list[dict]]:
    """{split: examples sorted by case_id}; images as their stored (encoded) bytes. Our
    datasets are ArrayRecord, read record by record as `medssl_jax.case_store` does."""
    out = {}
    for split in builder.info.splits:
        data = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE
        )
        exs = []
        for i in range(len(data)):
            f = data[i].features.feature
            ex = {k: list(f[k].bytes_list.value) for k in _BYTES if k in f}
            ex.update({k: list(f[k].int64_list.value) for k in _INTS if k in f})
            ex["case_id"], ex["patient_id"] = ex["case_id"][0], ex["patient_id"][0]
            exs.append(ex)
        out[split] = sorted(exs, key=lambda ex: text(ex["case_id"]))
    return out


_BYTES = ("case_id", "patient_id", "image_ids", "images")
_INTS = ("label", "eye")


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def assert_patient_disjoint(splits: dict[str, list[dict]]) -> None:
    seen: dict[str, str] = {}
    for name, exs in splits.items():
        for ex in exs:
            p = text(ex["patient_id"])
            assert seen.setdefault(p, name) == name, f"patient {p} in {seen[p]} and {name}"


# ----------------------------------------------------------------------------- patch_camelyon

PCAM_SIZES = {"train": 9, "validation": 4, "test": 5}


def pcam_examples() -> dict[str, list[dict]]:
    out = {}
    for split, n in PCAM_SIZES.items():
        prefix = {"validation": "valid"}.get(split, split)  # as the catalogue names them
        exs = []
        for i in range(n):
            rng = np.random.default_rng([n, i, len(split)])
            exs.append(
                {
                    "id": f"{prefix}_{i}",
                    "image": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
                    "label": (i * 7 + n) % 3 % 2,
                }
            )
        out[split] = exs
    return out


@pytest.fixture(scope="module")
def pcam(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pcam")
    source = pcam_examples()
    prepare_catalogue("patch_camelyon", data_dir, source)
    builder = build(PatchCamelyon, data_dir)
    return data_dir, source, builder, read_all(builder)


def test_pcam_is_not_registered_over_the_catalogue(pcam):
    _, _, builder, _ = pcam
    assert tfds.builder_cls("patch_camelyon") is not PatchCamelyon
    assert "patch_camelyon/default/1.0.0" in str(builder.data_dir)
    assert builder.info.features["label"].feature.names == list(CLASSES)
    assert builder.info.metadata["source"]["name"] == "patch_camelyon"
    assert builder.info.metadata["source"]["version"] == "2.0.0"


def test_pcam_splits_hold_exactly_the_catalogue_patches(pcam):
    _, source, _, splits = pcam
    assert sorted(splits) == sorted(SPLITS)
    for split, exs in splits.items():
        ref = {ex["id"]: ex for ex in source[split]}
        assert sorted(text(ex["case_id"]) for ex in exs) == sorted(ref)
        for ex in exs:
            pid = text(ex["case_id"])
            assert text(ex["patient_id"]) == pid
            assert [text(i) for i in ex["image_ids"]] == [pid]
            assert list(ex["label"]) == [ref[pid]["label"]]
            assert len(ex["images"]) == 1
            np.testing.assert_array_equal(decode(ex["images"][0]), ref[pid]["image"])
    assert_patient_disjoint(splits)
    # both classes present, so a constant label would fail
    assert {int(ex["label"][0]) for exs in splits.values() for ex in exs} == {0, 1}


def test_pcam_load_is_multiclass_normal_tumor(pcam):
    data_dir, source, _, _ = pcam
    for split in SPLITS:
        store, spec = datasets.load("patch_camelyon", split, data_dir=str(data_dir))
        assert spec.label_kind == "multiclass"
        assert spec.class_names == ("normal", "tumor") and spec.num_classes == 2
        ref = {ex["id"]: ex for ex in source[split]}
        ids = [text(i) for i in store.image_ids]
        assert sorted(ids) == sorted(ref)
        np.testing.assert_array_equal(store.labels, [ref[i]["label"] for i in ids])
        assert [text(p) for p in store.patient_ids] == [text(c) for c in store.case_ids]
        data = store.read([(0, 0)])[0]
        np.testing.assert_array_equal(decode(data), ref[store.image_id(0, 0)]["image"])


def test_pcam_missing_catalogue_is_a_clear_error(tmp_path):
    with pytest.raises(catalog.CatalogueNotPreparedError) as err:
        build(PatchCamelyon, tmp_path)
    msg = str(err.value)
    assert "'patch_camelyon'" in msg and str(tmp_path) in msg
    assert "tfds build patch_camelyon" in msg
    assert not PatchCamelyon(data_dir=str(tmp_path)).is_prepared()
    with pytest.raises(common.BadInputError, match="not prepared in the data_dir"):
        datasets.load("patch_camelyon", "train", data_dir=str(tmp_path / "other"))


def test_pcam_source_data_dir_option(pcam, tmp_path):
    from data_builders.patch_camelyon import PatchCamelyonConfig

    data_dir, source, _, _ = pcam
    config = PatchCamelyonConfig(name="elsewhere", source_data_dir=str(data_dir))
    builder = build(PatchCamelyon, tmp_path, config=config)
    got = read_all(builder)
    assert {s: len(e) for s, e in got.items()} == PCAM_SIZES


# ----------------------------------------------------------------------------- diabetic_retinopathy

# (patient, eye) -> catalogue split; patient 4 has only a left eye, 11 only a right one.
DR_LAYOUT = {
    "train": ["1", "2", "3", "4L", "5", "6"],
    "validation": ["7", "8"],
    "test": ["9", "10", "11R"],
}


def jpeg(seed: int, shape=(36, 44)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def dr_example(name: str, salt: int = 0) -> dict:
    patient, eye = name.rsplit("_", 1)
    seed = int(patient) * 2 + (eye == "right") + 1000 * salt
    return {
        "name": name,
        "image": jpeg(seed),
        "label": (int(patient) * 3 + 2 * (eye == "right")) % 5,
    }


def dr_examples(layout=DR_LAYOUT, salt: int = 0) -> dict[str, list[dict]]:
    out = {}
    for split, entries in layout.items():
        names = []
        for e in entries:
            if e.endswith("L"):
                names.append(f"{e[:-1]}_left")
            elif e.endswith("R"):
                names.append(f"{e[:-1]}_right")
            else:
                names += [f"{e}_left", f"{e}_right"]
        names = names[1::2] + names[::2]  # eyes of a patient are not adjacent in the catalogue
        out[split] = [dr_example(n, salt) for n in names]
    return out


def dr_config(**kwargs) -> DiabeticRetinopathyConfig:
    """A custom config (TFDS wants a name of its own; source_config stays btgraham-300)."""
    return DiabeticRetinopathyConfig(name="custom", **kwargs)


@pytest.fixture(scope="module")
def dr(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("dr")
    source = dr_examples()
    prepare_catalogue("diabetic_retinopathy_detection", data_dir, source, "btgraham-300")
    builder = build(DiabeticRetinopathy, data_dir)
    return data_dir, source, builder, read_all(builder)


def check_dr_cases(splits, source, expected_split_of=None) -> None:
    """Every split holds one case per patient, left then right, per-image labels and bytes
    of the catalogue; `expected_split_of` overrides the catalogue split of a patient."""
    ref = {ex["name"]: (split, ex) for split, exs in source.items() for ex in exs}
    patients: dict[str, list[str]] = {}
    for name in ref:
        patients.setdefault(name.rsplit("_", 1)[0], []).append(name)
    seen = set()
    for split, exs in splits.items():
        for ex in exs:
            pid = text(ex["case_id"])
            assert text(ex["patient_id"]) == pid
            names = [text(i) for i in ex["image_ids"]]
            assert names == sorted(patients[pid], key=lambda n: n.endswith("_right"))
            want = (expected_split_of or {}).get(pid) or ref[names[0]][0]
            assert split == want, f"patient {pid} in {split}, expected {want}"
            assert list(ex["label"]) == [ref[n][1]["label"] for n in names]
            assert list(ex["eye"]) == [int(n.endswith("_right")) for n in names]
            assert [bytes(b) for b in ex["images"]] == [ref[n][1]["image"] for n in names]
            seen.update(names)
    assert seen == set(ref)
    assert_patient_disjoint(splits)


def test_dr_groups_both_eyes_of_a_patient(dr):
    _, source, builder, splits = dr
    assert builder.builder_config.name == "btgraham-300"
    assert sorted(splits) == sorted(SPLITS)
    check_dr_cases(splits, source)
    cases = {text(ex["case_id"]): ex for exs in splits.values() for ex in exs}
    assert [text(i) for i in cases["1"]["image_ids"]] == ["1_left", "1_right"]
    assert list(cases["1"]["label"]) == [3, 0]  # per image, in image order (left, right)
    assert [text(i) for i in cases["4"]["image_ids"]] == ["4_left"]
    assert [text(i) for i in cases["11"]["image_ids"]] == ["11_right"]
    assert {s: len(e) for s, e in splits.items()} == {s: len(v) for s, v in DR_LAYOUT.items()}
    pixels = decode(bytes(cases["7"]["images"][1]))
    np.testing.assert_array_equal(pixels, decode(dr_example("7_right")["image"]))
    meta = builder.info.metadata
    assert meta["source"]["config"] == "btgraham-300" and meta["num_moved_images"] == 0
    assert meta["split_counts"]["train"] == {"cases": 6, "images": 11, "patients": 6}


def test_dr_load_is_multiclass_graded_names(dr):
    data_dir, source, _, _ = dr
    ref = {ex["name"]: ex for exs in source.values() for ex in exs}
    for split in SPLITS:
        store, spec = datasets.load("diabetic_retinopathy", split, data_dir=str(data_dir))
        assert spec.label_kind == "multiclass" and spec.num_classes == 5
        assert spec.class_names == GRADES
        assert spec.class_names[0] == "no_dr" and spec.class_names[4] == "proliferative"
        ids = [text(i) for i in store.image_ids]
        assert {n.rsplit("_", 1)[0] for n in ids} == {e.rstrip("LR") for e in DR_LAYOUT[split]}
        np.testing.assert_array_equal(store.labels, [ref[n]["label"] for n in ids])
        for c in range(store.num_cases):
            names = [store.image_id(c, i) for i in range(store.count(c))]
            assert {n.rsplit("_", 1)[0] for n in names} == {text(store.patient_ids[c])}
    # named config too
    store, spec = datasets.load("diabetic_retinopathy/btgraham-300", "test", data_dir=str(data_dir))
    assert spec.num_cases == 3


def test_dr_spills_waiting_images_to_disk(dr, tmp_path, monkeypatch):
    """With no memory budget the first eye of each patient waits in a temp folder."""
    data_dir, source, _, _ = dr
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        if kwargs.get("prefix") != "medssl_catalog_":
            return real_mkdtemp(*args, **kwargs)
        made.append(real_mkdtemp(dir=str(tmp_path), prefix="medssl_catalog_"))
        return made[-1]

    monkeypatch.setattr(catalog, "MEMORY_BUDGET", 0)
    monkeypatch.setattr(catalog.tempfile, "mkdtemp", mkdtemp)
    config = dr_config(source_data_dir=str(data_dir))
    builder = build(DiabeticRetinopathy, tmp_path / "out", config=config)
    check_dr_cases(read_all(builder), source)
    assert made and not any(os.path.exists(m) for m in made)  # used, then removed


def test_dr_source_config_option(tmp_path):
    """Our config '250K' reads the catalogue's '250K', not its default config."""
    source = dr_examples({"train": ["1", "2"], "validation": ["3"], "test": ["4"]}, salt=1)
    prepare_catalogue("diabetic_retinopathy_detection", tmp_path, source, "250K")
    builder = build(DiabeticRetinopathy, tmp_path, config="250K")
    assert "diabetic_retinopathy/250K/1.0.0" in str(builder.data_dir)
    check_dr_cases(read_all(builder), source)
    assert builder.info.metadata["source"]["config"] == "250K"
    # the default config wants btgraham-300, which is not prepared here
    with pytest.raises(catalog.CatalogueNotPreparedError, match="btgraham-300"):
        build(DiabeticRetinopathy, tmp_path)


def test_dr_reads_an_array_record_catalogue(tmp_path):
    """A catalogue dataset prepared as ArrayRecord (no `as_dataset` in TFDS) works too."""
    source = dr_examples({"train": ["1", "2", "3L"], "validation": ["4"], "test": ["5", "6R"]})
    src = prepare_catalogue(
        "diabetic_retinopathy_detection", tmp_path, source, "btgraham-300", "array_record"
    )
    assert src.info.file_format.value == "array_record"
    check_dr_cases(read_all(build(DiabeticRetinopathy, tmp_path)), source)


def test_dr_missing_catalogue_is_a_clear_error(tmp_path):
    with pytest.raises(catalog.CatalogueNotPreparedError) as err:
        build(DiabeticRetinopathy, tmp_path)
    msg = str(err.value)
    assert "'diabetic_retinopathy_detection/btgraham-300'" in msg and str(tmp_path) in msg
    assert "kaggle.com/c/diabetic-retinopathy-detection" in msg and "--manual_dir" in msg
    assert not DiabeticRetinopathy(data_dir=str(tmp_path)).is_prepared()
    with pytest.raises(catalog.CatalogueNotPreparedError, match="MANUAL download"):
        datasets.load("diabetic_retinopathy", "train", data_dir=str(tmp_path / "other"))


def test_dr_unknown_source_config(tmp_path):
    with pytest.raises(ValueError, match=r"no config 'tiny'; valid: .*btgraham-300"):
        build(DiabeticRetinopathy, tmp_path, config=dr_config(source_config="tiny"))
    with pytest.raises(ValueError, match="split_conflict must be one of"):
        build(DiabeticRetinopathy, tmp_path, config=dr_config(split_conflict="merge"))


# (patient 5's right eye in validation, left eye in train)
CONFLICT = {"train": ["1", "2", "5L"], "validation": ["3", "5R"], "test": ["4"]}


@pytest.fixture(scope="module")
def conflict_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("dr_conflict")
    source = dr_examples(CONFLICT)
    prepare_catalogue("diabetic_retinopathy_detection", data_dir, source, "btgraham-300")
    return data_dir, source


def test_dr_patient_in_two_splits_is_an_error(conflict_dir, tmp_path):
    data_dir, _ = conflict_dir
    config = dr_config(source_data_dir=str(data_dir))
    with pytest.raises(common.BadInputError) as err:
        build(DiabeticRetinopathy, tmp_path, config=config)
    msg = str(err.value)
    assert "patient '5' has '5_right' in catalogue split 'validation'" in msg
    assert "'5_left' in split 'train'" in msg and "1 bad input row" in msg
    assert "nothing was written" in msg
    assert not DiabeticRetinopathy(data_dir=str(tmp_path), config=config).is_prepared()


def test_dr_heldout_puts_both_eyes_in_the_later_split(conflict_dir, tmp_path):
    data_dir, source = conflict_dir
    config = dr_config(source_data_dir=str(data_dir), split_conflict="heldout")
    builder = build(DiabeticRetinopathy, tmp_path, config=config)
    splits = read_all(builder)
    check_dr_cases(splits, source, expected_split_of={"5": "validation"})
    assert [text(ex["case_id"]) for ex in splits["validation"]] == ["3", "5"]
    assert builder.info.metadata["moved_images"] == [
        {"image_id": "5_left", "from": "train", "to": "validation"}
    ]


def test_dr_skip_bad_rows_keeps_the_first_split(conflict_dir, tmp_path):
    data_dir, source = conflict_dir
    config = dr_config(source_data_dir=str(data_dir))
    builder = build(DiabeticRetinopathy, tmp_path, config=config, skip_bad_rows=True)
    splits = read_all(builder)
    cases = {text(ex["case_id"]): (s, ex) for s, exs in splits.items() for ex in exs}
    split, ex = cases["5"]
    assert split == "train" and [text(i) for i in ex["image_ids"]] == ["5_left"]
    assert builder.info.metadata["num_skipped_rows"] == 1
    assert "patient '5'" in builder.info.metadata["skipped_rows"][0]["reason"]
    assert_patient_disjoint(splits)


def test_dr_bad_names_are_named(tmp_path):
    source = dr_examples({"train": ["1", "2"], "validation": ["3"], "test": ["4"]})
    source["train"].append({**dr_example("2_left"), "name": "2_middle"})
    source["test"].append(dr_example("1_left"))  # repeats a train image
    prepare_catalogue("diabetic_retinopathy_detection", tmp_path, source, "btgraham-300")
    with pytest.raises(common.BadInputError) as err:
        build(DiabeticRetinopathy, tmp_path)
    msg = str(err.value)
    assert "diabetic_retinopathy_detection/btgraham-300 3.0.0 split 'train', row" in msg
    assert "'2_middle' is not '<patient>_left' or '<patient>_right'" in msg
    assert "duplicate image id '1_left'" in msg and "2 bad input row" in msg


def test_our_chexpert_leaves_the_catalogue_intact():
    """Our 'chexpert' takes TFDS's name over without breaking the rest of the catalogue
    (TFDS's own Chexpert failing to register used to hide diabetic_retinopathy_detection)."""
    import data_builders.chexpert as chx

    assert tfds.builder_cls("chexpert") is chx.Chexpert
    assert tfds.builder_cls("diabetic_retinopathy_detection").__name__ == (
        "DiabeticRetinopathyDetection"
    )
    assert tfds.builder_cls("patch_camelyon").name == "patch_camelyon"
