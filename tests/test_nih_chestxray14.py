"""nih_chestxray14 builder on its dummy release (laid out like the real NIH ChestX-ray14).

Built examples are compared with an independent parse of the dummy Data_Entry_2017.csv and the
official split lists (images, patients, multi-hot labels in the paper's class order, follow-up
order, splits); bad input must stop the build before anything is written, naming the file, row
and column.
"""

from __future__ import annotations

import collections
import csv
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_builders.nih_chestxray14 as nih
from data_builders.common import BadInputError
from medssl_jax.data_splits import patient_split

DUMMY = (
    pathlib.Path(__file__).resolve().parents[1] / "data_builders" / "nih_chestxray14" / "dummy_data"
)
# Written out here (not imported) so a wrong order in the builder fails the tests.
CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
FRACTIONS = {"train": 0.9, "validation": 0.1}
CSV_NAME = "Data_Entry_2017.csv"


# ----------------------------------------------------------------------------- helpers


def build(data_dir, manual_dir, **kwargs) -> tfds.core.DatasetBuilder:
    builder = nih.NihChestXray14(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), try_download_gcs=False
        )
    )
    return builder


def read_all(builder) -> dict[str, list[dict]]:
    return {
        s: list(
            tfds.as_numpy(builder.as_dataset(s, decoders={"images": tfds.decode.SkipDecoding()}))
        )
        for s in builder.info.splits
    }


def text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def reference(root: pathlib.Path = DUMMY) -> dict[str, dict]:
    """image name -> what the builder must store, from the CSV and lists (csv.reader only)."""
    with open(root / CSV_NAME, newline="") as f:
        lines = list(csv.reader(f))
    official = {}
    for list_name, split in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
        for name in (root / list_name).read_text().split():
            official[name] = split
    out = {}
    for v in lines[1:]:
        name, labels, follow_up, pid, age, sex, view = v[:7]
        patient = pid.zfill(8)
        split = official.pop(name)
        if split == "train_val":
            split = patient_split(patient, FRACTIONS, salt="nih_chestxray14")
        out[name] = {
            "patient": patient,
            "label": np.array([c in labels.split("|") for c in CLASSES], np.float32),
            "follow_up": int(follow_up),
            "age": int(age),
            "sex": {"F": "female", "M": "male"}[sex],
            "view": view.lower(),
            "split": split,
            "file": next(root.glob(f"images*/**/{name}")),
        }
    assert not official, f"listed but not in the CSV: {official}"
    return out


def assert_patient_disjoint(splits: dict[str, list[dict]]) -> None:
    seen: dict[str, str] = {}
    for name, exs in splits.items():
        for ex in exs:
            p = text(ex["patient_id"])
            assert seen.setdefault(p, name) == name, f"patient {p} in {seen[p]} and {name}"


def copy_dummy(tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "manual"
    shutil.copytree(DUMMY, dst, ignore=shutil.ignore_patterns("*.py"))
    return dst


def assert_nothing_written(tmp_path: pathlib.Path) -> None:
    """No dataset files (TFDS's own `<name>/.config/` bookkeeping aside)."""
    data = tmp_path / "data"
    files = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    written = [p for p in files if ".config" not in p.relative_to(data).parts]
    assert written == [], written


def line_of(path: pathlib.Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def edit_line(path: pathlib.Path, needle: str, old: str, new: str) -> int:
    """Replaces `old` by `new` in the first line containing `needle`; returns its number."""
    n = line_of(path, needle)
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[n - 1], (old, lines[n - 1])
    lines[n - 1] = lines[n - 1].replace(old, new, 1)
    path.write_text("".join(lines))
    return n


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def patient_built(data_dir):
    b = build(data_dir, DUMMY)
    return b, read_all(b)


# ----------------------------------------------------------------------------- built splits


def test_dummy_release_covers_the_cases_that_matter():
    ref = reference()
    labels = np.stack([r["label"] for r in ref.values()])
    assert labels.sum(0).min() >= 1  # every finding occurs
    assert (labels.sum(1) == 0).any() and (labels.sum(1) >= 2).any()  # No Finding, multi-label
    assert max(collections.Counter(r["patient"] for r in ref.values()).values()) >= 3
    assert {r["split"] for r in ref.values()} == {"train", "validation", "test"}
    folders = {r["file"].parts[-3] for r in ref.values()}
    assert folders == {"images_001", "images_002"}
    assert (DUMMY / CSV_NAME).read_text().splitlines()[1].endswith(",")  # 2017 trailing comma


def test_patient_cases_match_csv_and_lists(patient_built):
    b, splits = patient_built
    ref = reference()
    assert b.info.features["findings"].feature.shape == (14,)
    assert list(b.info.metadata["findings"]) == list(CLASSES)
    expect: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for name, r in sorted(ref.items(), key=lambda kv: (kv[1]["follow_up"], kv[0])):
        expect[r["split"]].setdefault(r["patient"], []).append(name)
    got = {
        s: {text(ex["case_id"]): [text(i) for i in ex["image_ids"]] for ex in exs}
        for s, exs in splits.items()
    }
    assert got == dict(expect)  # splits, cases = patients, images in follow-up order
    for split, exs in splits.items():
        for ex in exs:
            assert text(ex["patient_id"]) == text(ex["case_id"])
            for m, name in enumerate(map(text, ex["image_ids"])):
                r = ref.pop(name)
                assert r["patient"] == text(ex["patient_id"]) and r["split"] == split
                np.testing.assert_array_equal(ex["findings"][m].astype(np.float32), r["label"])
                assert ex["follow_up"][m] == r["follow_up"]
                assert ex["age"][m] == r["age"]
                assert nih.SEXES[ex["sex"][m]] == r["sex"]
                assert nih.AP_PA[ex["ap_pa"][m]] == r["view"]
                assert ex["images"][m] == r["file"].read_bytes()  # original PNG bytes
            assert list(ex["follow_up"]) == sorted(ex["follow_up"])
    assert not ref, f"images missing from the dataset: {sorted(ref)}"
    assert b.info.metadata["num_skipped_rows"] == 0
    assert b.info.metadata["data_entry_csv"] == CSV_NAME
    assert_patient_disjoint(splits)


def test_image_config_one_case_per_image(data_dir, patient_built):
    b = build(data_dir, DUMMY, config="image")
    splits = read_all(b)
    ref = reference()
    for split, exs in splits.items():
        for ex in exs:
            [name] = [text(i) for i in ex["image_ids"]]
            assert text(ex["case_id"]) == name
            assert text(ex["patient_id"]) == ref[name]["patient"]
            assert ref[name]["split"] == split
            np.testing.assert_array_equal(ex["findings"][0], ref[name]["label"] > 0)
    assert sum(len(e) for e in splits.values()) == len(ref)
    by_patient = {s: {text(ex["patient_id"]) for ex in e} for s, e in splits.items()}
    assert by_patient == {
        s: {text(ex["patient_id"]) for ex in e} for s, e in patient_built[1].items()
    }
    assert_patient_disjoint(splits)


def _variant_v2020_flat(root: pathlib.Path) -> None:
    """Data_Entry_2017_v2020.csv (no trailing commas) and one flat images/ folder."""
    csv_path = root / CSV_NAME
    lines = [line.rstrip(",") for line in csv_path.read_text().splitlines()]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    csv_path.unlink()
    (root / "images").mkdir()
    for p in sorted(root.glob("images_*/images/*.png")):
        shutil.move(p, root / "images" / p.name)
    for d in root.glob("images_*"):
        shutil.rmtree(d)


def _variant_quoted_header_and_y_ages(root: pathlib.Path) -> None:
    """A header with 'OriginalImage[Width,Height]' quoted, ages like '058Y', CRLF lines."""
    csv_path = root / CSV_NAME
    lines = csv_path.read_text().splitlines()
    lines[0] = lines[0].replace("OriginalImage[Width,Height]", '"OriginalImage[Width,Height]"')
    lines[0] = lines[0].replace(
        "OriginalImagePixelSpacing[x,y]", '"OriginalImagePixelSpacing[x,y]"'
    )
    for i in range(1, len(lines)):
        v = lines[i].split(",")
        v[4] = f"{int(v[4]):03d}Y"
        lines[i] = ",".join(v)
    csv_path.write_text("\r\n".join(lines) + "\r\n")


@pytest.mark.parametrize("variant", [_variant_v2020_flat, _variant_quoted_header_and_y_ages])
def test_release_variants_give_the_same_dataset(tmp_path, patient_built, variant):
    manual = copy_dummy(tmp_path)
    variant(manual)
    b = build(tmp_path / "data", manual)
    splits = read_all(b)
    summary = {
        s: {text(ex["case_id"]): (list(ex["image_ids"]), list(ex["age"])) for ex in e}
        for s, e in splits.items()
    }
    expect = {
        s: {text(ex["case_id"]): (list(ex["image_ids"]), list(ex["age"])) for ex in e}
        for s, e in patient_built[1].items()
    }
    assert summary == expect


def test_images_follow_the_follow_up_column(tmp_path):
    """Images of a patient are ordered by 'Follow-up #' (not merely by file name)."""
    manual = copy_dummy(tmp_path)
    edit_line(manual / CSV_NAME, "00000001_000.png", "Cardiomegaly,0,1,", "Cardiomegaly,5,1,")
    b = build(tmp_path / "data", manual)
    [ex] = [ex for ex in read_all(b)["train"] if text(ex["case_id"]) == "00000001"]
    assert [text(i) for i in ex["image_ids"]] == [
        "00000001_001.png",
        "00000001_002.png",
        "00000001_000.png",
    ]
    assert list(ex["follow_up"]) == [1, 2, 5]


def test_load_gives_multilabel_store(tmp_path):
    """`medssl_jax.datasets.load` prepares the set and applies the reader hook."""
    from medssl_jax import datasets

    ref = reference()
    seen = set()
    for split in ("train", "validation", "test"):
        store, spec = datasets.load(
            "nih_chestxray14", split, data_dir=str(tmp_path), manual_dir=str(DUMMY)
        )
        assert spec.label_kind == "multilabel" and spec.class_names == CLASSES
        assert spec.num_classes == 14
        names = [text(i) for i in store.image_ids]
        assert store.labels.dtype == np.float32 and store.labels.shape == (len(names), 14)
        np.testing.assert_array_equal(store.labels, np.stack([ref[n]["label"] for n in names]))
        np.testing.assert_array_equal(store.label_masks, np.ones((len(names), 14), np.float32))
        assert {ref[n]["split"] for n in names} == {split}
        for c in range(store.num_cases):
            ids = [store.image_id(c, i) for i in range(store.count(c))]
            assert {ref[n]["patient"] for n in ids} == {text(store.patient_ids[c])}
        seen.update(names)
    assert seen == set(ref)
    with pytest.raises(ValueError, match="takes none"):
        datasets.load(
            "nih_chestxray14", "train", data_dir=str(tmp_path), options={"views": "frontal"}
        )


# ----------------------------------------------------------------------------- bad input


def _prepare(tmp_path, manual, **kwargs):
    return build(tmp_path / "data", manual, **kwargs)


@pytest.mark.parametrize(
    "missing,message",
    [
        (CSV_NAME, r"missing in .*: Data_Entry_2017\.csv or Data_Entry_2017_v2020\.csv"),
        ("train_val_list.txt", r"missing in .*: train_val_list\.txt\."),
        ("test_list.txt", r"missing in .*: test_list\.txt\."),
        ("images_*", r"no image folder in .*images_001/images/"),
    ],
)
def test_missing_release_files_are_named(tmp_path, missing, message):
    manual = copy_dummy(tmp_path)
    for p in manual.glob(missing):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(BadInputError, match=message) as err:
        _prepare(tmp_path, manual)
    assert "Expected files:" in str(err.value)
    assert_nothing_written(tmp_path)


def _csv(manual):
    return manual / CSV_NAME


def _unknown_finding(manual):
    n = edit_line(_csv(manual), "00000003_001.png", "Hernia", "Hernja")
    return CSV_NAME, n, r"unknown finding 'Hernja' in field 'Finding Labels'"


def _empty_findings(manual):
    n = edit_line(_csv(manual), "00000005_000.png", ",No Finding,", ",,")
    return CSV_NAME, n, r"field 'Finding Labels' is empty"


def _no_finding_with_findings(manual):
    n = edit_line(_csv(manual), "00000007_000.png", "Effusion|", "No Finding|")
    return CSV_NAME, n, r"field 'Finding Labels': 'No Finding' together with findings"


def _patient_id_mismatch(manual):
    n = edit_line(_csv(manual), "00000005_000.png", ",0,5,", ",0,6,")
    return CSV_NAME, n, r"field 'Patient ID': '6' does not match .*'00000005'"


def _bad_follow_up(manual):
    n = edit_line(_csv(manual), "00000006_001.png", "Pneumonia,1,6,", "Pneumonia,one,6,")
    return CSV_NAME, n, r"field 'Follow-up #' is not a number: 'one'"


def _bad_view(manual):
    n = edit_line(_csv(manual), "00000002_000.png", ",PA,", ",LAT,")
    return CSV_NAME, n, r"unknown value 'LAT' in field 'View Position'"


def _bad_age(manual):
    n = edit_line(_csv(manual), "00000002_000.png", ",81,", ",eighty,")
    return CSV_NAME, n, r"field 'Patient Age' is not an age: 'eighty'"


def _bad_image_name(manual):
    n = edit_line(_csv(manual), "00000002_000.png", "00000002_000.png", "2_000.png")
    edit_line(manual / "train_val_list.txt", "00000002_000.png", "00000002_000.png", "2_000.png")
    return CSV_NAME, n, r"field 'Image Index': '2_000.png' is not <8-digit"


def _missing_image(manual):
    (manual / "images_002" / "images" / "00000007_000.png").unlink()
    n = line_of(_csv(manual), "00000007_000.png")
    return CSV_NAME, n, r"field 'Image Index': image file not found: 00000007_000\.png"


def _undecodable_image(manual):
    (manual / "images_001" / "images" / "00000003_000.png").write_bytes(b"\x89PNG junk")
    n = line_of(_csv(manual), "00000003_000.png")
    return CSV_NAME, n, r"cannot decode image .*00000003_000\.png"


def _wrong_value_count(manual):
    n = edit_line(_csv(manual), "00000002_000.png", ",16,16,", ",16,")
    return CSV_NAME, n, r"expected 11 values, got 10"


def _in_neither_list(manual):
    path = manual / "train_val_list.txt"
    path.write_text(path.read_text().replace("00000005_000.png\n", ""))
    n = line_of(_csv(manual), "00000005_000.png")
    return CSV_NAME, n, r"field 'Image Index': image '00000005_000.png' is in neither"


def _listed_not_in_csv(manual):
    path = manual / "test_list.txt"
    path.write_text(path.read_text() + "00000099_000.png\n")
    n = line_of(path, "00000099_000.png")
    return "test_list.txt", n, r"image '00000099_000.png' is listed but has no row in " + CSV_NAME


def _in_both_lists(manual):
    path = manual / "test_list.txt"
    path.write_text(path.read_text() + "00000001_000.png\n")
    n = line_of(path, "00000001_000.png")
    return "test_list.txt", n, r"'00000001_000.png' is also in train_val_list\.txt \(line 1\)"


def _patient_in_both_lists(manual):
    test, train_val = manual / "test_list.txt", manual / "train_val_list.txt"
    test.write_text(test.read_text().replace("00000008_001.png\n", ""))
    train_val.write_text(train_val.read_text() + "00000008_001.png\n")
    n = line_of(_csv(manual), "00000008_000.png")  # the patient's (first) test image
    return CSV_NAME, n, r"field 'Patient ID': patient '00000008' has images in both"


@pytest.mark.parametrize(
    "corrupt",
    [
        _unknown_finding,
        _empty_findings,
        _no_finding_with_findings,
        _patient_id_mismatch,
        _bad_follow_up,
        _bad_view,
        _bad_age,
        _bad_image_name,
        _missing_image,
        _undecodable_image,
        _wrong_value_count,
        _in_neither_list,
        _listed_not_in_csv,
        _in_both_lists,
        _patient_in_both_lists,
    ],
)
def test_bad_input_names_file_row_and_column(tmp_path, corrupt):
    manual = copy_dummy(tmp_path)
    file, n, reason = corrupt(manual)
    with pytest.raises(BadInputError) as err:
        _prepare(tmp_path, manual)
    msg = str(err.value)
    assert re.search(rf"{re.escape(str(manual / file))}, row {n}: .*{reason}", msg), msg
    assert "1 bad input row" in msg and "nothing was written" in msg, msg
    assert_nothing_written(tmp_path)


def test_skip_bad_rows_drops_and_records_them(tmp_path):
    manual = copy_dummy(tmp_path)
    _, n_finding, _ = _unknown_finding(manual)
    _, n_patient, _ = _patient_in_both_lists(manual)
    b = _prepare(tmp_path, manual, skip_bad_rows=True)
    meta = nih.NihChestXray14(data_dir=str(tmp_path / "data")).info.metadata
    assert {(r["file"], r["row"]) for r in meta["skipped_rows"]} == {
        (str(_csv(manual)), n_finding),
        (str(_csv(manual)), n_patient),
    }
    ids = {text(i): s for s, exs in read_all(b).items() for ex in exs for i in ex["image_ids"]}
    assert "00000003_001.png" not in ids and ids["00000003_000.png"] == "train"
    assert not any(i.startswith("00000008_") for i in ids)  # the whole patient is left out
    assert len(ids) == 15 - 1 - 2


def test_patient_age_forms_and_range():
    from data_builders.nih_chestxray14 import nih_chestxray14 as nih_mod

    assert [nih_mod.parse_age(t) for t in ("58", "058Y", "11M", "400D", "", "414")] == [
        58, 58, 0, 1, -1, 414  # 414: one of the 2017 file's data errors, kept
    ]  # fmt: skip
    with pytest.raises(ValueError, match="'Patient Age' is out of range: '3000000000'"):
        nih_mod.parse_age("3000000000")  # would overflow the int32 feature after decoding all
