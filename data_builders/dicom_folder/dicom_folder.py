"""Unlabeled DICOM images from a folder tree, such as a PACS export, grouped by DICOM tags.

Every file under the root (manual_dir) whose bytes say DICOM ('DICM' after the preamble), or
that ends in .dcm/.dicom, is read; DICOMDIR and hidden files are ignored. The patient is
PatientID; the case (the MICLe bag) is the study (StudyInstanceUID, default), the series
(SeriesInstanceUID: CT/MR slices of one series) or the single image. Each frame of a
multi-frame file, and each slice of a series, is one 2-D image of its case, ordered by
InstanceNumber. Pixels: `dicom_io.read_frames` (modality LUT, window per modality or the file's
VOI, MONOCHROME1 inversion), stored as 16-bit grey PNG.

Privacy: ids are pseudonymised by default (`hash_ids`: SHA-256 of salt + id); no other tag
(names, birth dates, ...) is read into the dataset, its metadata or any log. Bad files (no
pixel data, unsupported transfer syntax, truncated) are named errors, or with skip_bad_rows
recorded skips, like bad rows of the CSV builders. Settings: `DicomFolderConfig`, overridden
by an optional `dicom_folder.json` in the root (keys = SETTINGS).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from data_builders import case_builder, common, dicom_io

SETTINGS = (
    "case_by",
    "windows",
    "modalities",
    "hash_ids",
    "salt",
    "heldout_fraction",
    "skip_bad_rows",
)
CASE_BY = ("study", "series", "image")
DICOM_EXTENSIONS = (".dcm", ".dicom")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Give the root folder of the DICOM export as manual_dir (any layout; files with or without a
.dcm extension). Optional <root>/dicom_folder.json, e.g. {"case_by": "series",
"windows": {"CT": "ct_lung", "MR": [300, 600]}, "modalities": ["CR", "DX", "CT"]}.
"""


@dataclasses.dataclass(eq=False)
class DicomFolderConfig(case_builder.CaseBuilderConfig):
    """Case grouping, windows per modality, modality filter, pseudonymisation, held-out part."""

    case_by: str = "study"
    windows: tuple[tuple[str, Any], ...] = ()  # (("CT", "ct_lung"), ("MR", (300, 600)))
    modalities: tuple[str, ...] = ()  # () = every modality with pixel data
    hash_ids: bool = True
    salt: str = "dicom_folder"
    heldout_fraction: float = 0.0
    settings_file: str | None = "dicom_folder.json"


class DicomFolder(case_builder.CaseBuilder):
    """DICOM files grouped into cases by study, series or image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "DICOM folder, 16-bit grey images, cases by DICOM tags."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        DicomFolderConfig(name="study", description="case = study (StudyInstanceUID)."),
        DicomFolderConfig(
            name="series", case_by="series", description="case = series (SeriesInstanceUID)."
        ),
        DicomFolderConfig(name="image", case_by="image", description="one image per case."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "study"

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 1), dtype=np.uint16, encoding_format="png")
        return self.dataset_info_from_configs(
            description="Unlabeled 2-D DICOM images, cases by study, series or image.",
            features=case_builder.case_features(image),
            metadata=tfds.core.MetadataDict(),
        )

    def settings(self, root: epath.Path) -> dict[str, Any]:
        cfg = self.builder_config
        s = {k: getattr(cfg, k) for k in SETTINGS}
        if cfg.settings_file:
            s.update(common.read_overrides(root, cfg.settings_file, SETTINGS))
        if self._skip_bad_rows_kwarg is not None:
            s["skip_bad_rows"] = self._skip_bad_rows_kwarg
        where = root / (cfg.settings_file or "")
        if s["case_by"] not in CASE_BY:
            raise common.BadInputError(f"{where}: case_by must be one of {CASE_BY}")
        windows = dict(s["windows"])
        for modality, w in windows.items():
            ok = (
                w in dicom_io.WINDOWS
                if isinstance(w, str)
                else (isinstance(w, list | tuple) and len(w) == 2 and float(w[1]) > 0)
            )
            if not ok:
                raise common.BadInputError(
                    f"{where}: windows[{modality!r}] must be [centre, width > 0] or one of "
                    f"{sorted(dicom_io.WINDOWS)}"
                )
        s["windows"] = windows
        s["modalities"] = tuple(str(m).upper() for m in s["modalities"])
        if not 0.0 <= float(s["heldout_fraction"]) < 1.0:
            raise common.BadInputError(f"{where}: heldout_fraction must be in [0, 1)")
        return s

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        s = self.settings(root)
        self._windows = s["windows"]
        log = common.ProblemLog(self.name, bool(s["skip_bad_rows"]))
        rows, ignored = [], 0
        for rel in list_dicom_files(root):
            path = root / rel
            try:
                tags = dicom_io.grouping_tags(path)
                if s["modalities"] and tags.modality.upper() not in s["modalities"]:
                    ignored += 1
                    continue
                n_frames = len(dicom_io.read_frames(path, windows=self._windows))
            except dicom_io.DicomError as e:
                log.add(path, None, str(e))
                continue
            rows += image_rows(path, tags, n_frames, s)
        if ignored:
            tf.get_logger().info("dicom_folder: %d file(s) of other modalities ignored", ignored)
        if not rows and not log.problems:
            raise common.BadInputError(f"dicom_folder: no DICOM image under {root}")
        # One instance exported twice (PACS exports often are) must not become two "different"
        # images of a case (a MICLe pair of identical pixels): an error naming both files.
        rows = common.check_unique_image_ids(rows, log)
        cases = common.group_cases(rows, log)
        log.check("reading the DICOM files")
        h = float(s["heldout_fraction"])
        if h > 0:
            fractions = (("train", 1.0 - h), ("validation", h))
            splits = common.assign_patient_splits(cases, fractions, salt=self.name)
        else:
            splits = {"train": list(cases)}
        settings = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items() if k != "salt"
        }
        return self.finish(log, splits, settings=settings)

    def _generate_examples(self, cases: Sequence[common.Case]):
        windows = getattr(self, "_windows", {})
        for c in cases:
            images, cache = [], {}
            for r in c.images:
                key = str(r.path)
                if key not in cache:
                    cache = {key: dicom_io.read_frames(r.path, windows=windows)}
                images.append(cache[key][r.fields["frame"]][..., None])
            yield (
                c.case_id,
                {
                    "case_id": c.case_id,
                    "patient_id": c.patient_id,
                    "images": images,
                    "image_ids": [r.image_id for r in c.images],
                },
            )


def list_dicom_files(root: epath.Path) -> list[str]:
    """Sorted relative posix paths of the DICOM files under `root` (by extension, else by the
    'DICM' preamble; DICOMDIR index files skipped)."""

    def keep(path: str, name: str) -> bool:
        if name.upper() == "DICOMDIR":
            return False
        return posixpath.splitext(name)[1].lower() in DICOM_EXTENSIONS or dicom_io.is_dicom(path)

    return common.list_files(root, keep, "dicom_folder")


def image_rows(
    path: epath.Path, tags: dicom_io.DicomTags, n_frames: int, s: dict[str, Any]
) -> list[common.ImageRow]:
    """One ImageRow per frame; ids pseudonymised unless hash_ids is off."""

    def ident(value: str) -> str:
        return dicom_io.hash_id(value, str(s["salt"])) if s["hash_ids"] else value

    patient = ident(tags.patient_id)
    case = ident(
        {"study": tags.study_uid, "series": tags.series_uid, "image": tags.instance_uid}[
            s["case_by"]
        ]
    )
    # Sort key within a case: series, instance number, frame (zero-padded ids sort right).
    prefix = f"{ident(tags.series_uid)}_{tags.instance_number:06d}_{ident(tags.instance_uid)}"
    return [
        common.ImageRow(
            file=str(path),
            row=None,
            path=path,
            image_id=f"{prefix}_{f:04d}",
            case_id=case,
            patient_id=patient,
            fields={"frame": f},
        )
        for f in range(n_frames)
    ]
