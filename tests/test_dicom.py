"""DICOM: real files that pydicom ships (CT, MR, RLE, JPEG 2000, multi-frame, truncated, no
pixels) and generated ones (MONOCHROME1, windows, 12-bit, multi-frame) against NumPy; the
dicom_folder builder groups by tags, names bad files, and writes no identifying tag anywhere."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_builders import dicom_io
from data_builders.common import BadInputError
from data_builders.dicom_folder import DicomFolder

NAME, BIRTH = "DOE^JANE", "19700101"  # identifying tags that must never leave the files


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom does not ship {name}")
    return path


def u16(y: np.ndarray) -> np.ndarray:
    return np.round(np.clip(y, 0, 1) * 65535).astype(np.uint16)


def linear_window(x, c, w):  # PS3.3 C.11.2.1.2.1, independent of dicom_io
    out = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, 1.0)
    mid = (x > c - 0.5 - (w - 1) / 2) & (x <= c - 0.5 + (w - 1) / 2)
    return np.where(mid, ((x - (c - 0.5)) / (w - 1) + 0.5), out)


def make_dicom(
    path: pathlib.Path,
    pixels: np.ndarray,
    *,
    patient="PAT-0001",
    study=None,
    series=None,
    modality="CT",
    photometric="MONOCHROME2",
    bits=16,
    slope=1.0,
    intercept=0.0,
    window=None,
    instance=1,
) -> dict:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    uids = {"study": study or generate_uid(), "series": series or generate_uid()}
    uids["sop"] = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uids["sop"]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uids["sop"]
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = NAME, BIRTH, patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.Modality, ds.InstanceNumber = modality, instance
    ds.set_pixel_data(pixels, photometric, bits)
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uids


# --------------------------------------------------------------------------------------------
# The reader against NumPy, on shipped files.


def test_ct_hounsfield_window_matches_numpy():
    path = shipped("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    (got,) = dicom_io.read_frames(path, windows={"CT": (40.0, 400.0)})
    np.testing.assert_array_equal(got, u16(linear_window(hu, 40.0, 400.0)))
    (lung,) = dicom_io.read_frames(path, windows={"CT": "ct_lung"})
    np.testing.assert_array_equal(lung, u16(linear_window(hu, -600.0, 1500.0)))


def test_compressed_and_multiframe_files_decode():
    mr = dicom_io.read_frames(shipped("MR_small.dcm"))
    rle = dicom_io.read_frames(shipped("MR_small_RLE.dcm"))  # RLE Lossless, same pixels
    np.testing.assert_array_equal(mr[0], rle[0])
    dose = pydicom.dcmread(shipped("rtdose.dcm"))
    frames = dicom_io.read_frames(shipped("rtdose.dcm"))
    assert len(frames) == int(dose.NumberOfFrames) > 1
    assert all(f.shape == (dose.Rows, dose.Columns) and f.dtype == np.uint16 for f in frames)
    j2k = dicom_io.read_frames(shipped("JPEG2000.dcm"))  # pylibjpeg-openjpeg
    assert j2k[0].shape == (1024, 256) and j2k[0].max() > j2k[0].min()


def test_colour_files_become_luminance_once(tmp_path):
    """RGB and YBR_FULL files of one image give its luminance (pydicom >= 3 already returns YBR
    as RGB: converting again skewed every pixel by up to 0.39), and a shipped YBR JPEG too."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    want = u16(rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255)
    make_dicom(tmp_path / "rgb.dcm", rgb, modality="US", photometric="RGB", bits=8)
    (got,) = dicom_io.read_frames(tmp_path / "rgb.dcm")
    np.testing.assert_array_equal(got, want)
    # YBR_FULL (PS3.3 C.7.6.3.1.2), written with NumPy: Y is the luminance itself.
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    ybr = np.stack(
        [
            y,
            128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
            128 + 0.5 * r - 0.418688 * g - 0.081312 * b,
        ],
        -1,
    )
    make_dicom(
        tmp_path / "ybr.dcm",
        np.clip(np.round(ybr), 0, 255).astype(np.uint8),
        modality="US",
        photometric="YBR_FULL",
        bits=8,
    )
    (got,) = dicom_io.read_frames(tmp_path / "ybr.dcm")
    assert np.abs(got.astype(float) - want).max() / 65535 < 3 / 255  # YBR's 8-bit rounding
    ds = pydicom.dcmread(shipped("SC_rgb_jpeg_dcmtk.dcm"))  # YBR_FULL, baseline JPEG
    (jpeg,) = dicom_io.read_frames(shipped("SC_rgb_jpeg_dcmtk.dcm"))
    ref = ds.pixel_array.astype(np.float64) @ [0.299, 0.587, 0.114] / 255  # RGB in pydicom 3
    assert np.abs(jpeg / 65535 - ref).max() < 1e-4 and jpeg.max() > 60000  # white stays white


def test_palette_colour_is_the_luminance_of_the_palette():
    path = shipped("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    tables = [  # the palette from the raw tag bytes, independent of pydicom's LUT helper
        np.frombuffer(
            getattr(ds, f"{c}PaletteColorLookupTableData"), np.uint16 if bits > 8 else np.uint8
        ).astype(np.float64)
        for c in ("Red", "Green", "Blue")
    ]
    idx = np.clip(ds.pixel_array.astype(np.int64) - first, 0, len(tables[0]) - 1)
    lum = sum(w * t[idx] for w, t in zip((0.299, 0.587, 0.114), tables, strict=True)) / (
        2**bits - 1
    )
    (got,) = dicom_io.read_frames(path)
    np.testing.assert_allclose(got / 65535, lum, atol=1 / 65535)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("MR_truncated.dcm", "undecodable pixel data"),
        ("rtplan.dcm", "no pixel data"),
        ("JPGExtended.dcm", "unsupported transfer syntax"),
    ],
)
def test_bad_shipped_files_are_named_errors(name, reason):
    with pytest.raises(dicom_io.DicomError, match=reason):
        dicom_io.read_frames(shipped(name))


def test_not_a_dicom_file(tmp_path):
    f = tmp_path / "x.dcm"
    f.write_text("hello")
    with pytest.raises(dicom_io.DicomError, match="not a DICOM file"):
        dicom_io.read_frames(f)


# --------------------------------------------------------------------------------------------
# Generated files: inversion, file windows, precision, frames.


def test_monochrome1_is_inverted(tmp_path):
    x = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    make_dicom(tmp_path / "m2.dcm", x, photometric="MONOCHROME2", bits=12)
    make_dicom(tmp_path / "m1.dcm", x, photometric="MONOCHROME1", bits=12)
    (m2,) = dicom_io.read_frames(tmp_path / "m2.dcm")
    (m1,) = dicom_io.read_frames(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(m1.astype(np.int64) + m2, 65535)
    assert m2[0, 0] == 0 and m2.max() == 65535


def test_file_window_and_rescale_and_12_bit_precision(tmp_path):
    x = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # a 12-bit ramp
    make_dicom(tmp_path / "w.dcm", x, bits=12, slope=2.0, intercept=-1024.0, window=(1000, 3000))
    (got,) = dicom_io.read_frames(tmp_path / "w.dcm")
    want = u16(linear_window(x * 2.0 - 1024.0, 1000.0, 3000.0))
    np.testing.assert_array_equal(got, want)
    make_dicom(tmp_path / "raw.dcm", x, bits=12)  # no window: min-max, every level kept
    (raw,) = dicom_io.read_frames(tmp_path / "raw.dcm")
    assert len(np.unique(raw)) == 4096  # 8 bits would keep 256
    # A configured window for the modality wins over the file's.
    (cfg,) = dicom_io.read_frames(tmp_path / "w.dcm", windows={"CT": (0.0, 100.0)})
    np.testing.assert_array_equal(cfg, u16(linear_window(x * 2.0 - 1024.0, 0.0, 100.0)))


def test_generated_multiframe_gives_each_frame(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65535, size=(3, 16, 16), dtype=np.uint16)
    make_dicom(tmp_path / "mf.dcm", x, modality="MR", window=(30000, 20000))
    frames = dicom_io.read_frames(tmp_path / "mf.dcm")
    assert len(frames) == 3
    for f, xf in zip(frames, x, strict=True):
        np.testing.assert_array_equal(f, u16(linear_window(xf.astype(np.float64), 30000, 20000)))


# --------------------------------------------------------------------------------------------
# The builder.


def _export(root: pathlib.Path) -> dict:
    """A small PACS export: 2 patients; patient A has 2 studies (one a 2-series CT with 2
    slices each), patient B one CR study with a 3-frame file; no file extensions."""
    rng = np.random.default_rng(1)

    def img():
        return rng.integers(0, 4095, size=(24, 24), dtype=np.uint16)

    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    se1, se2 = generate_uid(), generate_uid()
    for i in range(2):
        make_dicom(root / "a" / f"ct1_{i}", img(), patient="A-123", study=s1, series=se1,
                   instance=i + 1, bits=12)  # fmt: skip
        make_dicom(root / "a" / f"ct2_{i}", img(), patient="A-123", study=s1, series=se2,
                   instance=i + 1, bits=12)  # fmt: skip
    make_dicom(root / "a" / "mr", img(), patient="A-123", study=s2, modality="MR", bits=12)
    mf = rng.integers(0, 4095, size=(3, 24, 24), dtype=np.uint16)
    make_dicom(root / "b" / "cr", mf, patient="B-456", study=s3, modality="CR", bits=12)
    (root / "notes.txt").write_text("not dicom")  # ignored: no DICM, no .dcm
    return {"studies": (s1, s2, s3), "series": (se1, se2)}


def _prepare(root, data_dir, **kwargs) -> tfds.core.DatasetBuilder:
    b = DicomFolder(data_dir=str(data_dir), **kwargs)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root), try_download_gcs=False)
    )
    return b


def _cases(builder) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split="train")))


def test_builder_groups_by_study_or_series_and_keeps_16_bits(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "export"
    uids = _export(root)
    study = _cases(_prepare(root, tmp_path / "d1"))
    assert sorted(len(c["images"]) for c in study) == [1, 3, 4]  # MR; CR frames; CT slices
    patients = {c["patient_id"].decode() for c in study}
    assert len(patients) == 2 and not patients & {"A-123", "B-456"}  # pseudonyms
    assert all(c["images"].dtype == np.uint16 for c in study)
    ct = next(c for c in study if len(c["images"]) == 4)
    assert len(np.unique(ct["images"])) > 256  # 12-bit data kept beyond 8 bits
    ids = [i.decode() for i in ct["image_ids"]]
    assert ids == sorted(ids)  # series, then instance number, then frame
    (root / "dicom_folder.json").write_text(json.dumps({"case_by": "series"}))
    series = _cases(_prepare(root, tmp_path / "d2"))
    assert sorted(len(c["images"]) for c in series) == [1, 2, 2, 3]
    # No identifying value anywhere in the dataset files, its metadata, or the log.
    secrets = [NAME, BIRTH, "A-123", "B-456", *uids["studies"], *uids["series"]]
    for f in (tmp_path / "d1").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in secrets:
                assert s.encode() not in data, (s, f)
    for s in secrets:
        assert s not in caplog.text


def test_builder_names_bad_dicom_and_skips_it_when_asked(tmp_path):
    root = tmp_path / "export"
    _export(root)
    bad = root / "b" / "cr"
    data = bad.read_bytes()
    (root / "b" / "cut.dcm").write_bytes(data[: len(data) - 500])  # truncated pixel data
    with pytest.raises(BadInputError, match=r"cut\.dcm: undecodable pixel data"):
        _prepare(root, tmp_path / "d1")
    assert not list((tmp_path / "d1").rglob("dataset_info.json"))
    b = _prepare(root, tmp_path / "d2", skip_bad_rows=True)
    assert b.info.metadata["num_skipped_rows"] == 1
    assert sum(len(c["images"]) for c in _cases(b)) == 8


def test_builder_names_an_instance_exported_twice(tmp_path):
    root = tmp_path / "export"
    _export(root)
    (root / "again").mkdir()
    (root / "again" / "cr.dcm").write_bytes((root / "b" / "cr").read_bytes())  # same SOP UID
    with pytest.raises(BadInputError, match=r"duplicate image id .*\(first at ") as e:
        _prepare(root, tmp_path / "d1")
    assert "again/cr.dcm" in str(e.value) and "b/cr" in str(e.value)  # both files named
    b = _prepare(root, tmp_path / "d2", skip_bad_rows=True)
    assert b.info.metadata["num_skipped_rows"] == 3  # one per frame of the copy
    cases = _cases(b)
    assert sum(len(c["images"]) for c in cases) == 8  # as without the copy
    for c in cases:
        assert len(set(c["image_ids"])) == len(c["image_ids"])


def test_dicom_dataset_feeds_the_input_pipeline(tmp_path):
    from medssl_jax import datasets, input_pipeline

    root = tmp_path / "export"
    _export(root)
    data = {"name": "dicom_folder", "data_dir": str(tmp_path / "d"), "manual_dir": str(root)}
    store = input_pipeline.load_store(data, "train")
    assert store.spec.label_kind == "none" and store.num_cases == 3
    encoded = store.read([(0, 0)])[0]
    img = datasets.decode_image(encoded).numpy()
    assert img.shape[-1] == 3 and img.dtype == np.uint8 and img.max() > img.min()
    wide = datasets.decode_float(encoded).numpy()  # 16 bits kept until the crop
    assert wide.dtype == np.float32 and len(np.unique(wide)) > len(np.unique(img))


def test_file_window_of_zero_width_is_a_named_error(tmp_path):
    make_dicom(tmp_path / "w0.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4), window=(8, 0))
    with pytest.raises(dicom_io.DicomError, match="WindowWidth must be > 0, got 0"):
        dicom_io.read_frames(tmp_path / "w0.dcm")
