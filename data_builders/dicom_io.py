"""DICOM files -> 16-bit grey 2-D images, and the few tags that group them into cases.

`read_frames` applies, in DICOM's order: the modality LUT (rescale slope/intercept, e.g. CT
Hounsfield units), then a window (configured per modality, else the file's VOI LUT or window
centre/width, else the frame's min-max), MONOCHROME1 inversion, and returns each frame (a
multi-frame file gives several) as uint16 [H, W] spanning 0..65535: 12-16-bit data keep their
precision. Colour images (ultrasound, secondary capture; RGB, YBR or palette colour) become
luminance.

`grouping_tags` reads only PatientID and the study / series / instance UIDs (never pixels, never
names or dates). Nothing here logs tag values; errors name the file and the reason only.
Compressed transfer syntaxes decode as far as the installed pydicom plugins allow (RLE natively,
baseline JPEG through Pillow, JPEG 2000 through pylibjpeg-openjpeg); others are a DicomError
naming the transfer syntax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

import numpy as np
from etils import epath

WINDOWS = {  # (centre, width) presets a config can name per modality
    "ct_lung": (-600.0, 1500.0),
    "ct_mediastinum": (50.0, 350.0),
    "ct_brain": (40.0, 80.0),
    "ct_bone": (400.0, 1800.0),
}


class DicomError(ValueError):
    """An unusable DICOM file; the message says why (never a tag value)."""


@dataclasses.dataclass(frozen=True)
class DicomTags:
    """What grouping needs: raw ids (hash them before they are stored) and the modality."""

    patient_id: str
    study_uid: str
    series_uid: str
    instance_uid: str
    modality: str
    instance_number: int


def is_dicom(path: str | os.PathLike) -> bool:
    """Part-10 files carry DICM after a 128-byte preamble (PACS exports often lack an extension)."""
    try:
        with epath.Path(path).open("rb") as f:  # local, gs://, ...
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read(path: str | os.PathLike, *, pixels: bool):
    import pydicom

    try:
        with epath.Path(path).open("rb") as f:  # local, gs://, ... (read whole, then closed)
            return pydicom.dcmread(f, stop_before_pixels=not pixels)
    except pydicom.errors.InvalidDicomError as e:
        raise DicomError(f"not a DICOM file ({e})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise DicomError(f"unreadable DICOM ({type(e).__name__}: {e})") from None


def grouping_tags(path: str | os.PathLike) -> DicomTags:
    ds = _read(path, pixels=False)
    missing = [t for t in ("PatientID", "StudyInstanceUID", "SOPInstanceUID") if not ds.get(t)]
    if missing:
        raise DicomError(f"missing tag(s) {missing}")
    number = ds.get("InstanceNumber")
    return DicomTags(
        patient_id=str(ds.PatientID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID") or ds.StudyInstanceUID),
        instance_uid=str(ds.SOPInstanceUID),
        modality=str(ds.get("Modality") or "OT"),
        instance_number=int(number) if number not in (None, "") else 0,
    )


def hash_id(value: str, salt: str) -> str:
    """A stable pseudonym: 16 hex digits of SHA-256(salt + value)."""
    return hashlib.sha256(f"{salt}\0{value}".encode()).hexdigest()[:16]


def read_frames(
    path: str | os.PathLike,
    *,
    windows: Mapping[str, tuple[float, float] | str] | None = None,
) -> list[np.ndarray]:
    """The file's frames as uint16 [H, W]; `windows` maps a modality ('CT') to (centre, width)
    or to a preset name in WINDOWS, overriding the file's own VOI."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read(path, pixels=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("no pixel data")
    try:
        arr = ds.pixel_array
    except NotImplementedError as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise DicomError(f"unsupported transfer syntax {name} ({e})") from None
    except (ValueError, RuntimeError, AttributeError, EOFError, OSError) as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        why = " ".join(str(e).split())
        if isinstance(e, RuntimeError) and "Unable to decode" in why:  # no plugin for it
            raise DicomError(
                f"unsupported transfer syntax {getattr(ts, 'name', ts)} ({why})"
            ) from None
        raise DicomError(f"undecodable pixel data ({type(e).__name__}: {why})") from None
    samples = int(ds.get("SamplesPerPixel", 1))
    frames_n = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples == 3 or photometric == "PALETTE COLOR":  # colour: luminance
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
        if photometric == "PALETTE COLOR":  # indices into colour tables, not intensities
            from pydicom.pixels import apply_color_lut

            try:
                arr = apply_color_lut(arr, ds)
                bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            except (ValueError, AttributeError, KeyError, IndexError) as e:
                raise DicomError(f"unusable palette colour tables ({e})") from None
        # pydicom >= 3 already returns YBR as RGB (converting again skewed every pixel).
        arr = arr.astype(np.float64) @ np.asarray([0.299, 0.587, 0.114])
        scale = float(2**bits - 1)
        frames = arr.reshape(frames_n, *arr.shape[-2:]) if frames_n > 1 else arr[None]
        return [_to_uint16(f / scale) for f in frames]
    frames = arr if frames_n > 1 else arr[None]  # [F, H, W]
    modality = str(ds.get("Modality") or "OT")
    window = _configured_window(windows, modality)
    out = []
    for frame in frames:
        x = np.asarray(apply_modality_lut(frame, ds), np.float64)
        if window is not None:
            y = _window(x, *window)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            fn = str(ds.get("VOILUTFunction") or "LINEAR").upper()
            width = _first(ds.WindowWidth)
            if not width > 0:  # PS3.3 C.11.2.1.2: >= 1 (LINEAR), > 0 (the others)
                raise DicomError(f"the file's WindowWidth must be > 0, got {width}")
            y = _window(x, _first(ds.WindowCenter), width, fn)
        elif "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            y = np.asarray(apply_voi_lut(x, ds, index=0), np.float64) / float(2**bits - 1)
        else:
            lo, hi = float(x.min()), float(x.max())
            y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            y = 1.0 - y
        out.append(_to_uint16(y))
    return out


def _configured_window(windows, modality: str) -> tuple[float, float] | None:
    if not windows or modality not in windows:
        return None
    w = windows[modality]
    if isinstance(w, str):
        if w not in WINDOWS:
            raise DicomError(f"unknown window preset {w!r} for {modality}; known: {list(WINDOWS)}")
        w = WINDOWS[w]
    centre, width = (float(v) for v in w)
    if width <= 0:
        raise DicomError(f"window width for {modality} must be > 0, got {width}")
    return centre, width


def _first(value) -> float:
    """WindowCenter / WindowWidth may hold several values; the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(x: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM's VOI functions (PS3.3 C.11.2.1.2), scaled to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    c, w = centre - 0.5, width - 1.0
    if w <= 0:
        return (x > c).astype(np.float64)
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _to_uint16(y: np.ndarray) -> np.ndarray:
    return np.round(np.clip(y, 0.0, 1.0) * 65535.0).astype(np.uint16)
