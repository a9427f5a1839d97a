"""Bad input for the real-data builders: clear errors naming file + row before anything is
written, or (skip_bad_rows=True) skipped rows recorded in the log and in metadata.json."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil

import pytest
import tensorflow_datasets as tfds

import data_builders.chexpert as chx
import data_builders.derm_csv as derm
import data_builders.ham10000 as ham
import data_builders.image_folder_unlabeled as ifu
import data_builders.pad_ufes20 as pad
from data_builders.common import BadInputError

BUILDERS = pathlib.Path(__file__).resolve().parents[1] / "data_builders"


def copy_dummy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "manual"
    shutil.copytree(BUILDERS / name / "dummy_data", dst, ignore=shutil.ignore_patterns("*.py"))
    return dst


def prepare(cls, tmp_path, manual, **kwargs) -> tfds.core.DatasetBuilder:
    builder = cls(data_dir=str(tmp_path / "data"), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
    )
    return builder


def assert_nothing_written(tmp_path: pathlib.Path) -> None:
    """No dataset files (TFDS's own `<name>/.config/` bookkeeping aside)."""
    data = tmp_path / "data"
    files = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    written = [p for p in files if ".config" not in p.relative_to(data).parts]
    assert written == [], written


def edit_line(path: pathlib.Path, lineno: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[lineno - 1], (old, lines[lineno - 1])
    lines[lineno - 1] = lines[lineno - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def line_of(path: pathlib.Path, needle: str) -> int:
    """1-based line number of the first line containing `needle` (independent of the builders)."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def image_of_line(csv_path: pathlib.Path, lineno: int) -> str:
    return re.search(r"ISIC_\d{7}", csv_path.read_text().splitlines()[lineno - 1]).group(0)


def find_ham_image(manual: pathlib.Path, image_id: str) -> pathlib.Path:
    return next(manual.glob(f"HAM10000_images_part_*/{image_id}.jpg"))


# ----------------------------------------------------------------------------- ham10000


def _ham_missing(manual, csv_path, n):
    find_ham_image(manual, image_of_line(csv_path, n)).unlink()
    return "image file not found"


def _ham_undecodable(manual, csv_path, n):
    find_ham_image(manual, image_of_line(csv_path, n)).write_bytes(b"this is not a jpeg")
    return "cannot decode image"


def _ham_truncated(manual, csv_path, n):
    p = find_ham_image(manual, image_of_line(csv_path, n))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "cannot decode image"


def _ham_columns(manual, csv_path, n):
    lines = csv_path.read_text().splitlines(keepends=True)
    lines[n - 1] = "HAM_0000099,ISIC_0099999,nv\n"
    csv_path.write_text("".join(lines))
    return "expected 7 columns.*got 3"


def _ham_bad_age(manual, csv_path, n):
    row = csv_path.read_text().splitlines()[n - 1].split(",")
    row[4] = "abc"
    lines = csv_path.read_text().splitlines()
    lines[n - 1] = ",".join(row)
    csv_path.write_text("\n".join(lines) + "\n")
    return "field 'age' is not a number: 'abc'"


def _ham_unknown_label(manual, csv_path, n):
    row = csv_path.read_text().splitlines()[n - 1].split(",")
    row[2] = "melanomaa"
    lines = csv_path.read_text().splitlines()
    lines[n - 1] = ",".join(row)
    csv_path.write_text("\n".join(lines) + "\n")
    return r"unknown value 'melanomaa' in field 'dx' \(valid: 'akiec', 'bcc'"


def _ham_age(value, reason):
    def corrupt(manual, csv_path, n):
        lines = csv_path.read_text().splitlines()
        row = lines[n - 1].split(",")
        row[4] = value
        lines[n - 1] = ",".join(row)
        csv_path.write_text("\n".join(lines) + "\n")
        return reason

    corrupt.__name__ = f"_ham_age_{value}"
    return corrupt


def _ham_unbalanced_quote(manual, csv_path, n):
    """A stray quote makes the csv module read on to the end of the file as one record: the
    error is at the row with the quote and says which rows the record swallowed."""
    lines = csv_path.read_text().splitlines()
    lines[n - 1] = '"' + lines[n - 1]
    csv_path.write_text("\n".join(lines) + "\n")
    return rf"expected 7 columns .*runs over rows {n}-{len(lines)}: an unbalanced quote"


@pytest.mark.parametrize(
    "corrupt",
    [
        _ham_age("inf", "field 'age' is not an integer: 'inf'"),
        _ham_age("3000000000", "field 'age' is out of range: '3000000000'"),
        _ham_unbalanced_quote,
        _ham_missing,
        _ham_undecodable,
        _ham_truncated,
        _ham_columns,
        _ham_bad_age,
        _ham_unknown_label,
    ],
)
def test_ham10000_bad_row_names_file_and_row(tmp_path, corrupt):
    manual = copy_dummy("ham10000", tmp_path)
    csv_path = manual / "HAM10000_metadata.csv"
    n = 7  # a data row (line 1 is the header)
    reason = corrupt(manual, csv_path, n)
    with pytest.raises(BadInputError) as err:
        prepare(ham.Ham10000, tmp_path, manual)
    msg = str(err.value)
    assert re.search(rf"{re.escape(str(csv_path))}, row {n}: .*{reason}", msg), msg
    assert "1 bad input row" in msg and "nothing was written" in msg
    assert_nothing_written(tmp_path)


def test_ham10000_skip_bad_rows_records_them(tmp_path, caplog):
    manual = copy_dummy("ham10000", tmp_path)
    csv_path = manual / "HAM10000_metadata.csv"
    n_rows = len(csv_path.read_text().splitlines()) - 1
    _ham_missing(manual, csv_path, 3)
    _ham_undecodable(manual, csv_path, 5)
    _ham_unknown_label(manual, csv_path, 9)
    with open(csv_path, "a") as f:
        f.write("HAM_0000099,ISIC_0099999,nv,histo\n")  # wrong column count, line n_rows + 2
    with caplog.at_level(logging.WARNING):
        b = prepare(ham.Ham10000, tmp_path, manual, skip_bad_rows=True)
    expect_rows = {3: "image file not found", 5: "cannot decode", 9: "unknown value",
                   n_rows + 2: "expected 7 columns"}  # fmt: skip
    # a fresh builder reads the skipped rows back from metadata.json
    meta = ham.Ham10000(data_dir=str(tmp_path / "data")).info.metadata
    assert meta["num_skipped_rows"] == 4
    got = {r["row"]: r for r in meta["skipped_rows"]}
    assert set(got) == set(expect_rows)
    for row, reason in expect_rows.items():
        assert got[row]["file"] == str(csv_path) and reason in got[row]["reason"]
        assert re.search(rf"skipped bad row: .*row {row}: ", caplog.text)
    images = sum(v.num_examples for v in b.info.splits.values())
    assert images > 0
    n_images = sum(
        len(ex["image_ids"])
        for s in b.info.splits
        for ex in tfds.as_numpy(b.as_dataset(s, decoders={"images": tfds.decode.SkipDecoding()}))
    )
    assert n_images == n_rows - 3


def test_missing_manual_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()  # no data files (TFDS itself rejects an empty manual dir)
    (tmp_path / "empty" / "readme.txt").write_text("wrong folder")
    with pytest.raises(BadInputError, match="HAM10000_metadata.csv"):
        prepare(ham.Ham10000, tmp_path, tmp_path / "empty")
    with pytest.raises(BadInputError, match=r"train\.csv \+ valid\.csv"):
        prepare(chx.Chexpert, tmp_path, tmp_path / "empty")
    with pytest.raises(BadInputError, match="metadata.csv"):
        prepare(pad.PadUfes20, tmp_path, tmp_path / "empty")
    with pytest.raises(BadInputError, match="labels.csv"):
        prepare(derm.DermCsv, tmp_path, tmp_path / "empty")
    with pytest.raises(BadInputError, match="no .* images under"):
        prepare(ifu.ImageFolderUnlabeled, tmp_path, tmp_path / "empty")
    assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------- chexpert


@pytest.mark.parametrize(
    "old,new,reason",
    [
        (",-1.0,", ",2.0,", r"unknown value '2.0' in field '[A-Za-z /]+'"),
        ("/study1/", "/studyX/", "field 'Path'"),
        (",Frontal,", ",Oblique,", "unknown value 'Oblique' in field 'Frontal/Lateral'"),
    ],
)
def test_chexpert_bad_values(tmp_path, old, new, reason):
    manual = copy_dummy("chexpert", tmp_path)
    csv_path = manual / "CheXpert-v1.0-small" / "train.csv"
    n = line_of(csv_path, old)
    edit_line(csv_path, n, old, new)
    with pytest.raises(BadInputError, match=rf"train\.csv, row {n}: .*{reason}"):
        prepare(chx.Chexpert, tmp_path, manual)
    assert_nothing_written(tmp_path)


def test_chexpert_skip_via_config(tmp_path):
    manual = copy_dummy("chexpert", tmp_path)
    root = manual / "CheXpert-v1.0-small"
    (root / "valid" / "patient64542" / "study1" / "view1_frontal.jpg").write_bytes(b"\xff\xd8junk")
    cfg = chx.ChexpertConfig(name="study_skip", skip_bad_rows=True)
    b = prepare(chx.Chexpert, tmp_path, manual, config=cfg)
    n = line_of(root / "valid.csv", "patient64542/study1/view1_frontal.jpg")
    [skipped] = b.info.metadata["skipped_rows"]
    assert skipped["file"] == str(root / "valid.csv") and skipped["row"] == n
    assert b.info.splits["test"].num_examples == 1  # valid.csv: that study had one image


# ----------------------------------------------------------------------------- pad / derm


def test_pad_lesion_with_two_patients(tmp_path):
    manual = copy_dummy("pad_ufes20", tmp_path)
    csv_path = manual / "metadata.csv"
    lines = csv_path.read_text().splitlines()
    first = lines[1].split(",")
    # another row of the same lesion, now claiming another patient
    n = next(i for i, line in enumerate(lines[2:], start=3) if line.split(",")[1] == first[1])
    edit_line(csv_path, n, first[0] + ",", "PAT_9999,")
    with pytest.raises(
        BadInputError, match=rf"metadata\.csv, row {n}: case '{first[1]}' has patient"
    ):
        prepare(pad.PadUfes20, tmp_path, manual)
    assert_nothing_written(tmp_path)


def test_pad_unknown_diagnostic(tmp_path):
    manual = copy_dummy("pad_ufes20", tmp_path)
    csv_path = manual / "metadata.csv"
    n = line_of(csv_path, ",NEV,")
    edit_line(csv_path, n, ",NEV,", ",NEVUS,")
    with pytest.raises(
        BadInputError, match=rf"row {n}: unknown value 'NEVUS' in field 'diagnostic'"
    ):
        prepare(pad.PadUfes20, tmp_path, manual)


def test_derm_csv_unknown_label_and_bad_settings(tmp_path):
    manual = copy_dummy("derm_csv", tmp_path)
    cfg = derm.DermCsvConfig(name="fixed", class_names=("Acne", "Eczema", "Other"))
    n = line_of(manual / "labels.csv", ",Psoriasis,")
    with pytest.raises(BadInputError, match=rf"labels\.csv, row {n}: unknown value 'Psoriasis'"):
        prepare(derm.DermCsv, tmp_path, manual, config=cfg)
    (manual / "derm_csv.json").write_text(json.dumps({"patient_col": "patient_id"}))
    with pytest.raises(BadInputError, match=r"derm_csv\.json: unknown setting.*patient_col"):
        prepare(derm.DermCsv, tmp_path, manual)
    (manual / "derm_csv.json").write_text(json.dumps({"patient_column": "patient"}))
    with pytest.raises(BadInputError, match=r"labels\.csv, row 1: header lacks.*'patient'"):
        prepare(derm.DermCsv, tmp_path, manual)
    assert_nothing_written(tmp_path)


def test_derm_csv_one_file_named_two_ways_is_a_duplicate(tmp_path):
    """'images/x.png' and './images/x.png' are one image: a second row naming it another way is
    a duplicate (it could otherwise sit in two cases, even two splits: leakage)."""
    manual = copy_dummy("derm_csv", tmp_path)
    csv_path = manual / "labels.csv"
    lines = csv_path.read_text().splitlines()
    first = lines[1].split(",")[0]
    other = next(line for line in lines[2:] if line.split(",")[1] != lines[1].split(",")[1])
    lines.append(",".join(["./" + first, *other.split(",")[1:]]))
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError, match=rf"row {len(lines)}: duplicate image id '{first}'"):
        prepare(derm.DermCsv, tmp_path, manual)


def test_derm_csv_patient_in_two_splits(tmp_path):
    manual = copy_dummy("derm_csv", tmp_path)
    csv_path = manual / "labels.csv"
    lines = csv_path.read_text().splitlines()
    # P001 has two cases; move the second one to another split
    n = max(i for i, line in enumerate(lines, start=1) if ",P001," in line)
    split = lines[n - 1].rsplit(",", 1)[1]
    edit_line(csv_path, n, "," + split, ",validation" if split != "validation" else ",test")
    cfg = derm.DermCsvConfig(name="s", patient_column="patient_id", split_column="split")
    with pytest.raises(BadInputError, match=rf"row {n}: .*patient 'P001' is in split"):
        prepare(derm.DermCsv, tmp_path, manual, config=cfg)


# ----------------------------------------------------------------------------- image folder


def test_phone_camera_multi_picture_jpeg_is_a_valid_image(tmp_path):
    """Phones write JPEGs with an MPF segment (PIL: 'MPO'); TF decodes them, so the builders'
    image check must accept them rather than reject the row."""
    import numpy as np
    import tensorflow as tf
    from etils import epath
    from PIL import Image

    from data_builders import common as builder_common
    from medssl_jax.datasets import decode_float

    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8))
    path = tmp_path / "phone.jpg"
    photo.save(path, format="MPO", save_all=True, append_images=[photo.rotate(90)])
    with Image.open(path) as im:
        assert im.format == "MPO"
    assert builder_common.check_image(epath.Path(path)) is None
    assert decode_float(tf.constant(path.read_bytes())).shape == (24, 24, 3)
    photo.save(tmp_path / "scan.gif", format="GIF")
    assert "is GIF, expected" in builder_common.check_image(epath.Path(tmp_path / "scan.gif"))


def test_image_folder_bad_files(tmp_path):
    manual = copy_dummy("image_folder_unlabeled", tmp_path)
    bad = manual / "patient2" / "study0" / "img1.jpeg"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match=rf"{re.escape(str(bad))}: cannot decode image"):
        prepare(ifu.ImageFolderUnlabeled, tmp_path, manual)
    shallow = manual / "patient4" / "loose.png"
    shutil.copy(manual / "patient1" / "study0" / "img1.png", shallow)
    with pytest.raises(BadInputError, match=rf"{re.escape(str(shallow))}: image is 1 folder"):
        prepare(ifu.ImageFolderUnlabeled, tmp_path, manual, config="study")
    assert_nothing_written(tmp_path)
    b = prepare(ifu.ImageFolderUnlabeled, tmp_path, manual, config="study", skip_bad_rows=True)
    skipped = {r["file"] for r in b.info.metadata["skipped_rows"]}
    assert skipped == {str(bad), str(shallow)}
    ids = {
        i.decode()
        for ex in tfds.as_numpy(
            b.as_dataset("train", decoders={"images": tfds.decode.SkipDecoding()})
        )
        for i in ex["image_ids"]
    }
    assert "patient2/study0/img1.jpeg" not in ids and "patient2/study0/img0.jpg" in ids


def test_prepared_dataset_is_not_reused_for_another_manual_dir(tmp_path):
    """Pointing config.data.manual_dir at new files with the same data_dir must not silently
    train on the dataset prepared from the old ones."""
    from medssl_jax import datasets

    a = copy_dummy("derm_csv", tmp_path / "a")
    b = copy_dummy("derm_csv", tmp_path / "b")
    data_dir = str(tmp_path / "data")
    store, _ = datasets.load("derm_csv", "train", data_dir=data_dir, manual_dir=str(a))
    again, _ = datasets.load("derm_csv", "train", data_dir=data_dir, manual_dir=str(a) + "/")
    assert again.num_cases == store.num_cases  # the same source (spelled differently) reuses it
    datasets.load("derm_csv", "train", data_dir=data_dir)  # no manual_dir given: reuses it
    with pytest.raises(datasets.DatasetSourceError) as e:
        datasets.load("derm_csv", "train", data_dir=data_dir, manual_dir=str(b))
    msg = str(e.value)
    assert msg.startswith("config.data.manual_dir: ") and str(a) in msg and str(b) in msg
