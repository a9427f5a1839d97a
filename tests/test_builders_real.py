"""Real-data TFDS builders on their dummy data (laid out like the real releases).

Each builder is prepared once per module in a tmp data_dir; examples are compared with an
independent parse of the dummy CSVs / trees (labels, states, grouping, split sizes, patient-level
disjointness, image bytes round trip).
"""

from __future__ import annotations

import collections
import csv
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data_builders.chexpert as chx
import data_builders.derm_csv as derm
import data_builders.ham10000 as ham
import data_builders.image_folder_unlabeled as ifu
import data_builders.pad_ufes20 as pad
from medssl_jax.data_splits import patient_split, stable_unit_hash

BUILDERS = pathlib.Path(__file__).resolve().parents[1] / "data_builders"
NAMES = ("chexpert", "ham10000", "pad_ufes20", "derm_csv", "image_folder_unlabeled")
DUMMY = {n: BUILDERS / n / "dummy_data" for n in NAMES}
FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}


def build(cls, data_dir, manual_dir, **kwargs) -> tfds.core.DatasetBuilder:
    builder = cls(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), try_download_gcs=False
        )
    )
    return builder


def read_split(builder, split) -> list[dict]:
    ds = builder.as_dataset(split, decoders={"images": tfds.decode.SkipDecoding()})
    return list(tfds.as_numpy(ds))


def read_all(builder) -> dict[str, list[dict]]:
    return {s: read_split(builder, s) for s in builder.info.splits}


def text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def csv_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_patient_disjoint(splits: dict[str, list[dict]]) -> None:
    seen: dict[str, str] = {}
    for name, exs in splits.items():
        for ex in exs:
            p = text(ex["patient_id"])
            assert seen.setdefault(p, name) == name, f"patient {p} in {seen[p]} and {name}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


# ----------------------------------------------------------------------------- chexpert


@pytest.fixture(scope="module")
def chexpert_study(data_dir):
    b = build(chx.Chexpert, data_dir, DUMMY["chexpert"])
    return b, read_all(b)


def chexpert_reference() -> dict[str, dict]:
    """image_id -> parsed CSV row (independent of the builder)."""
    root = DUMMY["chexpert"] / "CheXpert-v1.0-small"
    out = {}
    for split, name in (("train", "train.csv"), ("test", "valid.csv")):
        for row in csv_rows(root / name):
            image_id = row["Path"].split("/", 1)[1]
            out[image_id] = {**row, "split": split}
    # Validation: train.csv's patients whose hash is under 1%; none in 7, so the lowest hash.
    train_patients = {i.split("/")[1] for i, r in out.items() if r["split"] == "train"}
    h = {p: stable_unit_hash(p, "chexpert/validation") for p in train_patients}
    held = {p for p in h if h[p] < 0.01} or {min(h, key=h.__getitem__)}
    for image_id, row in out.items():
        if image_id.split("/")[1] in held:
            row["split"] = "validation"
    return out


def test_chexpert_registry_and_features(chexpert_study):
    b, _ = chexpert_study
    assert tfds.builder_cls("chexpert") is chx.Chexpert  # replaces TFDS's legacy builder
    feats = b.info.features
    assert feats["images"].feature.shape == (None, None, 1)
    assert set(feats["findings"].feature.keys()) == {
        f.lower().replace(" ", "_") for f in chx.FINDINGS
    }
    assert feats["findings"].feature["edema"].names == list(chx.FINDING_STATES)


def test_chexpert_study_cases_match_csv(chexpert_study):
    b, splits = chexpert_study
    ref = chexpert_reference()
    studies = collections.Counter((r["split"], "/".join(i.split("/")[1:3])) for i, r in ref.items())
    assert {s: len(e) for s, e in splits.items()} == {
        s: len({k for (sp, k) in studies if sp == s}) for s in ("train", "validation", "test")
    }
    assert all(splits[s] for s in ("train", "validation", "test"))
    seen_states = set()
    n_images = 0
    for split, exs in splits.items():
        for ex in exs:
            ids = [text(i) for i in ex["image_ids"]]
            assert text(ex["case_id"]) == "/".join(ids[0].split("/")[1:3])
            assert len(ids) == studies[(split, text(ex["case_id"]))]
            for m, image_id in enumerate(ids):
                row = ref.pop(image_id)
                assert row["split"] == split
                assert text(ex["patient_id"]) == image_id.split("/")[1]
                assert ex["age"][m] == int(row["Age"])
                assert chx.chexpert.VIEWS[ex["view"][m]] == row["Frontal/Lateral"].lower()
                assert chx.chexpert.AP_PA[ex["ap_pa"][m]] == (row["AP/PA"].lower() or "unknown")
                for f in chx.FINDINGS:
                    state = chx.FINDING_STATES[ex["findings"][f.lower().replace(" ", "_")][m]]
                    expect = {"1.0": "positive", "0.0": "negative", "-1.0": "uncertain"}
                    assert state == expect.get(row[f], "not_mentioned")
                    seen_states.add(state)
                # encoded bytes are the original file (no re-encoding)
                path = DUMMY["chexpert"] / "CheXpert-v1.0-small" / image_id
                assert ex["images"][m] == path.read_bytes()
                n_images += 1
    assert not ref, f"images missing from the dataset: {sorted(ref)}"
    assert seen_states == set(chx.FINDING_STATES)  # uncertain and blanks are covered
    assert max(len(ex["image_ids"]) for ex in splits["train"]) >= 2  # multi-image studies
    assert b.info.metadata["num_skipped_rows"] == 0
    assert_patient_disjoint(splits)


def test_chexpert_patient_config(data_dir):
    b = build(chx.Chexpert, data_dir, DUMMY["chexpert"], config="patient")
    splits = read_all(b)
    ref = chexpert_reference()
    for split in ("train", "validation", "test"):
        patients = collections.Counter(
            i.split("/")[1] for i, r in ref.items() if r["split"] == split
        )
        got = {text(ex["case_id"]): len(ex["image_ids"]) for ex in splits[split]}
        assert got == dict(patients)
        for ex in splits[split]:
            assert text(ex["case_id"]) == text(ex["patient_id"])
            assert len({text(s) for s in ex["study_ids"]}) >= 1
    assert any(len({text(s) for s in ex["study_ids"]}) > 1 for ex in splits["train"])


def _fake_chexpert_example(states: list[list[int]], views: list[int]) -> dict:
    """Raw example with the 14 findings; `states` [M][14] in CSV order (no 'images' key)."""
    s = np.asarray(states)
    return {
        "findings": {
            f.lower().replace(" ", "_"): tf.constant(s[:, i], tf.int64)
            for i, f in enumerate(chx.FINDINGS)
        },
        "view": tf.constant(views, tf.int64),
        "image_ids": tf.constant([f"i{m}" for m in range(len(views))]),
    }


def test_chexpert_read_transform_policies():
    # image 0: every competition condition in a different state; image 1: all blank.
    idx = {f: i for i, f in enumerate(chx.FINDINGS)}
    row0 = [3] * 14
    for f, st in zip(chx.COMPETITION, (0, 1, 2, 3, 2), strict=True):
        row0[idx[f]] = st
    ex = _fake_chexpert_example([row0, [3] * 14], views=[0, 1])
    expected = {
        "u_zeros": ([0, 1, 0, 0, 0], [1, 1, 1, 1, 1]),
        "u_ones": ([0, 1, 1, 0, 1], [1, 1, 1, 1, 1]),
        "u_ignore": ([0, 1, 0, 0, 0], [1, 1, 0, 1, 0]),
    }
    for policy, (label, mask) in expected.items():
        fn, fields = chx.read_transform({"uncertainty": policy}, None)
        out = fn(dict(ex))
        assert fields == {
            "label_kind": "multilabel",
            "num_classes": 5,
            "class_names": chx.COMPETITION,
        }
        np.testing.assert_array_equal(out["label"].numpy()[0], label)
        np.testing.assert_array_equal(out["label_mask"].numpy()[0], mask)
        np.testing.assert_array_equal(out["label"].numpy()[1], 0)  # blank -> negative
        np.testing.assert_array_equal(out["label_mask"].numpy()[1], 1)
        assert out["keep_image"].numpy().tolist() == [True, True]
    fn, fields = chx.read_transform({"uncertainty": "u_multiclass", "views": "frontal"}, None)
    out = fn(dict(ex))
    assert fields["num_classes"] == 15 and fields["class_names"][:3] == (
        "Atelectasis:negative", "Atelectasis:positive", "Atelectasis:uncertain",
    )  # fmt: skip
    onehot = out["label"].numpy().reshape(2, 5, 3)
    np.testing.assert_array_equal(onehot[0].argmax(-1), [0, 1, 2, 0, 2])
    np.testing.assert_array_equal(onehot.sum(-1), 1)
    assert out["keep_image"].numpy().tolist() == [True, False]
    fn, fields = chx.read_transform({"conditions": "all"}, None)
    assert fields["class_names"] == chx.FINDINGS and fn(dict(ex))["label"].shape == (2, 14)
    with pytest.raises(ValueError, match="uncertainty.*u_ones"):
        chx.read_transform({"uncertainty": "u_maybe"}, None)
    with pytest.raises(ValueError, match="unknown option.*policy"):
        chx.read_transform({"policy": "u_ones"}, None)


def test_chexpert_full_size_layout(tmp_path):
    """CheXpert-v1.0 (full size) paths, and manual_dir = the dataset folder itself."""
    root = tmp_path / "CheXpert-v1.0"
    shutil.copytree(DUMMY["chexpert"] / "CheXpert-v1.0-small", root)
    for name in ("train.csv", "valid.csv"):
        p = root / name
        p.write_text(p.read_text().replace("CheXpert-v1.0-small/", "CheXpert-v1.0/"))
    b = build(chx.Chexpert, tmp_path / "data", root)
    assert b.info.splits["train"].num_examples + b.info.splits["validation"].num_examples == len(
        {"/".join(r["Path"].split("/")[2:4]) for r in csv_rows(root / "train.csv")}
    )


# ----------------------------------------------------------------------------- derm sets


@pytest.fixture(scope="module")
def ham_built(data_dir):
    b = build(ham.Ham10000, data_dir, DUMMY["ham10000"])
    return b, read_all(b)


def test_ham10000_lesion_cases_and_splits(ham_built):
    b, splits = ham_built
    rows = {r["image_id"]: r for r in csv_rows(DUMMY["ham10000"] / "HAM10000_metadata.csv")}
    lesions = collections.Counter(r["lesion_id"] for r in rows.values())
    assert b.info.features["label"].feature.names == list(ham.CLASSES)
    expect_split = collections.Counter(patient_split(les, FRACTIONS, "ham10000") for les in lesions)
    assert {s: len(e) for s, e in splits.items()} == dict(expect_split)
    assert all(len(e) > 0 for e in splits.values())
    for split, exs in splits.items():
        for ex in exs:
            lesion = text(ex["case_id"])
            assert text(ex["patient_id"]) == lesion  # no patient ids in HAM10000
            assert patient_split(lesion, FRACTIONS, "ham10000") == split
            assert len(ex["image_ids"]) == lesions.pop(lesion)
            for m, image_id in enumerate(map(text, ex["image_ids"])):
                r = rows[image_id]
                assert r["lesion_id"] == lesion
                assert ham.CLASSES[ex["label"][m]] == r["dx"]
                assert ex["age"][m] == (int(float(r["age"])) if r["age"] else -1)
                assert text(ex["localization"][m]) == r["localization"]
                part = next(DUMMY["ham10000"].glob(f"HAM10000_images_part_*/{image_id}.jpg"))
                assert ex["images"][m] == part.read_bytes()
    assert not lesions
    assert any(-1 in ex["age"] for e in splits.values() for ex in e)
    assert max(len(ex["image_ids"]) for e in splits.values() for ex in e) == 3
    assert_patient_disjoint(splits)


@pytest.fixture(scope="module")
def pad_built(data_dir):
    b = build(pad.PadUfes20, data_dir, DUMMY["pad_ufes20"])
    return b, read_all(b)


def test_pad_ufes20_cases_and_patient_splits(pad_built):
    b, splits = pad_built
    rows = {r["img_id"]: r for r in csv_rows(DUMMY["pad_ufes20"] / "metadata.csv")}
    lesions = {r["lesion_id"]: r["patient_id"] for r in rows.values()}
    n_images = sum(len(ex["image_ids"]) for e in splits.values() for ex in e)
    assert n_images == len(rows)
    assert sum(len(e) for e in splits.values()) == len(lesions)
    for split, exs in splits.items():
        for ex in exs:
            assert lesions[text(ex["case_id"])] == text(ex["patient_id"])
            assert patient_split(text(ex["patient_id"]), FRACTIONS, "pad_ufes20") == split
            for m, img in enumerate(map(text, ex["image_ids"])):
                r = rows[img]
                assert pad.CLASSES[ex["label"][m]] == r["diagnostic"]
                assert ex["fitspatrick"][m] == (
                    int(float(r["fitspatrick"])) if r["fitspatrick"] else -1
                )
                assert ex["biopsed"][m] == {"True": 1, "False": 0}[r["biopsed"]]
                assert text(ex["gender"][m]) == (r["gender"] or "unknown")
    # some patient has two lesions, and they stay together
    per_patient = collections.Counter(lesions.values())
    assert max(per_patient.values()) >= 2
    assert all(len(e) > 0 for e in splits.values())
    assert_patient_disjoint(splits)


def test_pad_ufes20_flat_images_folder(pad_built, tmp_path):
    manual = tmp_path / "pad"
    (manual / "images").mkdir(parents=True)
    shutil.copy(DUMMY["pad_ufes20"] / "metadata.csv", manual)
    for p in DUMMY["pad_ufes20"].glob("images/imgs_part_*/*.png"):
        shutil.copy(p, manual / "images" / p.name)
    b = build(pad.PadUfes20, tmp_path / "data", manual)
    assert {s: v.num_examples for s, v in b.info.splits.items()} == {
        s: len(e) for s, e in pad_built[1].items()
    }


@pytest.fixture(scope="module")
def derm_built(data_dir):
    b = build(derm.DermCsv, data_dir, DUMMY["derm_csv"])
    return b, read_all(b)


def test_derm_csv_default_uses_settings_file(derm_built):
    b, splits = derm_built
    rows = csv_rows(DUMMY["derm_csv"] / "labels.csv")
    names = sorted({r["label"] for r in rows})
    assert b.info.features["label"].feature.names == names  # sorted from the data
    by_image = {r["image_path"]: r for r in rows}
    for split, exs in splits.items():
        for ex in exs:
            # derm_csv.json sets patient_column=patient_id -> hash split per patient
            assert patient_split(text(ex["patient_id"]), FRACTIONS, "derm_csv") == split
            for m, img in enumerate(map(text, ex["image_ids"])):
                r = by_image.pop(img)
                assert (r["case_id"], r["patient_id"]) == (
                    text(ex["case_id"]),
                    text(ex["patient_id"]),
                )
                assert names[ex["label"][m]] == r["label"]
                assert ex["images"][m] == (DUMMY["derm_csv"] / img).read_bytes()
    assert not by_image
    assert b.info.metadata["settings"]["patient_column"] == "patient_id"
    assert_patient_disjoint(splits)


def test_derm_csv_custom_config_split_column_and_class_list(tmp_path):
    classes = ("Psoriasis", "Eczema", "Acne", "Other", "Melanoma")  # given order, one unused
    cfg = derm.DermCsvConfig(
        name="custom", patient_column="patient_id", split_column="split", class_names=classes,
        settings_file=None,
    )  # fmt: skip
    b = build(derm.DermCsv, tmp_path, DUMMY["derm_csv"], config=cfg)
    rows = csv_rows(DUMMY["derm_csv"] / "labels.csv")
    assert b.info.features["label"].feature.names == list(classes)
    cases = collections.defaultdict(set)
    for r in rows:
        cases[r["split"]].add(r["case_id"])
    splits = read_all(b)
    assert {s: {text(ex["case_id"]) for ex in e} for s, e in splits.items()} == dict(cases)
    label_of = {r["image_path"]: r["label"] for r in rows}
    for ex in splits["train"]:
        for m, img in enumerate(map(text, ex["image_ids"])):
            assert classes[ex["label"][m]] == label_of[img]


def test_derm_csv_columns_renamed_and_absolute_paths(tmp_path):
    rows = csv_rows(DUMMY["derm_csv"] / "labels.csv")
    manual = tmp_path / "teleder"
    manual.mkdir()
    with open(manual / "teleder.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["file", "case", "condition"])
        for r in rows:
            w.writerow([str(DUMMY["derm_csv"] / r["image_path"]), r["case_id"], r["label"]])
    (manual / "derm_csv.json").write_text(
        json.dumps({"csv_file": "teleder.csv", "image_column": "file", "case_column": "case",
                    "label_column": "condition", "delimiter": ";"})
    )  # fmt: skip
    b = build(derm.DermCsv, tmp_path / "data", manual)
    splits = read_all(b)
    assert sum(len(e) for e in splits.values()) == len({r["case_id"] for r in rows})
    for e in splits.values():
        for ex in e:
            assert text(ex["patient_id"]) == text(ex["case_id"])  # no patient column


# ----------------------------------------------------------------------------- image folder


def tree_images() -> list[str]:
    root = DUMMY["image_folder_unlabeled"]
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )


@pytest.mark.parametrize(
    "config,case_of,patient_of",
    [
        ("patient", lambda r: r.split("/")[0], lambda r: r.split("/")[0]),
        ("study", lambda r: "/".join(r.split("/")[:2]), lambda r: r.split("/")[0]),
        ("image", lambda r: r, lambda r: r),
    ],
)
def test_image_folder_levels(data_dir, config, case_of, patient_of):
    b = build(ifu.ImageFolderUnlabeled, data_dir, DUMMY["image_folder_unlabeled"], config=config)
    assert list(b.info.splits) == ["train"] and "label" not in b.info.features
    images = tree_images()
    expect = collections.defaultdict(list)
    for r in images:
        expect[case_of(r)].append(r)
    got = {}
    for ex in read_split(b, "train"):
        ids = [text(i) for i in ex["image_ids"]]
        got[text(ex["case_id"])] = ids
        assert {patient_of(i) for i in ids} == {text(ex["patient_id"])}
        assert ex["images"][0] == (DUMMY["image_folder_unlabeled"] / ids[0]).read_bytes()
    assert got == dict(expect)
    assert "patient0/notes.txt" not in sum(got.values(), [])


def test_image_folder_heldout_fraction(tmp_path):
    cfg = ifu.ImageFolderConfig(name="held", case_level=1, patient_level=0, heldout_fraction=0.4)
    b = build(ifu.ImageFolderUnlabeled, tmp_path, DUMMY["image_folder_unlabeled"], config=cfg)
    splits = read_all(b)
    assert set(splits) == {"train", "validation"}
    frac = {"train": 0.6, "validation": 0.4}
    for name, exs in splits.items():
        for ex in exs:
            assert patient_split(text(ex["patient_id"]), frac, "image_folder_unlabeled") == name
    assert sum(len(e) for e in splits.values()) == 9
    assert_patient_disjoint(splits)


def test_dummy_data_is_small():
    total = sum(p.stat().st_size for p in BUILDERS.glob("*/dummy_data/**/*") if p.is_file()
                and "demo" not in p.parts)  # fmt: skip
    assert total < 1_000_000, total


def test_reader_hook_through_load(chexpert_study, ham_built, data_dir, tmp_path):
    """`medssl_jax.datasets.load` applies chexpert's read_transform and ham10000's labels; a
    dataset prepared as TFRecord (as `build` here and earlier versions do) gets a clear message."""
    from medssl_jax import datasets

    with pytest.raises(datasets.DatasetFormatError, match="Re-prepare it: delete"):
        datasets.load("chexpert", "train", data_dir=str(data_dir))
    from medssl_jax import train

    assert issubclass(datasets.DatasetFormatError, train.USER_ERRORS)  # main.py: one line
    _, splits = chexpert_study
    raw = {text(ex["case_id"]): ex for ex in splits["train"]}
    opts = {"uncertainty": "u_ignore", "views": "frontal"}
    fresh = str(tmp_path / "ar")
    manual = str(DUMMY["chexpert"])
    ds, spec = datasets.load("chexpert", "train", data_dir=fresh, manual_dir=manual, options=opts)
    assert spec.label_kind == "multilabel" and spec.class_names == chx.COMPETITION
    keys = [c.lower().replace(" ", "_") for c in chx.COMPETITION]
    n_cases = 0
    for el in ds:
        ex = raw[el["case_id"]]
        frontal = ex["view"] == 0
        states = np.stack([ex["findings"][k] for k in keys], -1)[frontal]  # [M_frontal, 5]
        np.testing.assert_array_equal(el["label"], (states == 1).astype(np.float32))
        np.testing.assert_array_equal(el["label_mask"], (states != 2).astype(np.float32))
        assert el["image_ids"] == [text(i) for i in ex["image_ids"][frontal]]
        assert el["images"] == list(ex["images"][frontal])  # the frontal images' bytes
        n_cases += 1
    assert n_cases == sum(bool((ex["view"] == 0).any()) for ex in splits["train"])
    ham_dir = str(DUMMY["ham10000"])
    ds, spec = datasets.load("ham10000", "test", data_dir=fresh, manual_dir=ham_dir)
    assert spec.label_kind == "multiclass" and spec.class_names == ham.CLASSES
    assert spec.num_cases == len(ham_built[1]["test"])


def test_reader_prepares_derm_csv_whose_classes_come_from_the_data(tmp_path):
    """load() on a not-yet-prepared derm_csv (class names unknown until it is built)."""
    from medssl_jax import datasets

    ds, spec = datasets.load(
        "derm_csv", "train", data_dir=str(tmp_path), manual_dir=str(DUMMY["derm_csv"])
    )
    assert spec.label_kind == "multiclass" and spec.num_classes == len(spec.class_names) > 1
    labels = ds.labels
    assert labels.min() >= 0 and labels.max() < spec.num_classes
