"""Unlabeled images from an arbitrary folder tree (png/jpg/jpeg, any depth) for pretraining.

Cases and patients come from directory levels of each image's path relative to the root
(manual_dir): level 0 is the top-level folder under the root, level 1 the folder below it, ...
With `case_level=1, patient_level=0`, `root/p7/s2/x.png` belongs to case 'p7/s2' of patient 'p7'.
`case_level=None` makes every image its own case; `patient_level=None` sets patient = case.
Single split 'train', or with `heldout_fraction` > 0 a patient-level 'validation' split
(`patient_split`, salt 'image_folder_unlabeled'). No label feature (the reader then reports
label_kind 'none', label -1). Hidden files/folders (leading '.') and other extensions are
ignored. Settings: `ImageFolderConfig`, overridden by an optional JSON file in the root
(`image_folder_unlabeled.json`; keys = the config field names in SETTINGS).
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from data_builders import case_builder, common

SETTINGS = ("case_level", "patient_level", "heldout_fraction", "extensions", "skip_bad_rows")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Give the root folder of the image tree as manual_dir, e.g. <root>/<patient>/<study>/<image>.png.
Choose the directory levels of case and patient with the config ('patient': case = patient =
level 0; 'study': case = level 1, patient = level 0; 'image': every image is a case) or with
<root>/image_folder_unlabeled.json, e.g. {"case_level": 1, "patient_level": 0,
"heldout_fraction": 0.05}.
"""


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(case_builder.CaseBuilderConfig):
    """Directory levels of case / patient, held-out fraction, image channels (1 or 3)."""

    case_level: int | None = 0
    patient_level: int | None = 0
    heldout_fraction: float = 0.0
    channels: int = 3
    extensions: tuple[str, ...] = common.IMAGE_EXTENSIONS
    settings_file: str | None = "image_folder_unlabeled.json"


class ImageFolderUnlabeled(case_builder.CaseBuilder):
    """Unlabeled image tree grouped into cases by directory level."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Unlabeled image tree, cases by directory level."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        ImageFolderConfig(name="patient", description="case = patient = top-level folder."),
        ImageFolderConfig(
            name="study", case_level=1, description="case = level-1 folder, patient = level 0."
        ),
        ImageFolderConfig(
            name="image", case_level=None, patient_level=None, description="one image per case."
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "patient"

    def _info(self) -> tfds.core.DatasetInfo:
        channels = self.builder_config.channels
        if channels not in (1, 3):
            raise ValueError(f"image_folder_unlabeled: channels must be 1 or 3, got {channels}")
        return self.dataset_info_from_configs(
            description="Unlabeled images from a folder tree, cases by directory level.",
            features=case_builder.case_features(tfds.features.Image(shape=(None, None, channels))),
            metadata=tfds.core.MetadataDict(),
        )

    def settings(self, root: epath.Path) -> dict[str, Any]:
        """Config fields overridden by the optional JSON settings file, validated."""
        cfg = self.builder_config
        s = {k: getattr(cfg, k) for k in SETTINGS}
        if cfg.settings_file:
            s.update(common.read_overrides(root, cfg.settings_file, SETTINGS))
        if self._skip_bad_rows_kwarg is not None:
            s["skip_bad_rows"] = self._skip_bad_rows_kwarg
        case, patient = s["case_level"], s["patient_level"]
        for key in ("case_level", "patient_level"):
            if s[key] is not None and (not isinstance(s[key], int) or s[key] < 0):
                raise ValueError(f"image_folder_unlabeled: {key} must be None or an int >= 0")
        if case is not None and patient is not None and patient > case:
            raise ValueError(
                f"image_folder_unlabeled: patient_level ({patient}) must be <= case_level ({case})"
            )
        if not 0.0 <= float(s["heldout_fraction"]) < 1.0:
            raise ValueError("image_folder_unlabeled: heldout_fraction must be in [0, 1)")
        s["extensions"] = tuple(e.lower() for e in s["extensions"])
        return s

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        s = self.settings(root)
        log = common.ProblemLog(self.name, bool(s["skip_bad_rows"]))
        rows = []
        for rel in list_images(root, s["extensions"]):
            try:
                rows.append(image_row(root, rel, s["case_level"], s["patient_level"]))
            except ValueError as e:
                log.add(root / rel, None, str(e))
        if not rows and not log.problems:
            raise common.BadInputError(
                f"image_folder_unlabeled: no {list(s['extensions'])} images under {root}"
            )
        cases = common.group_cases(rows, log)
        log.check("scanning the image tree")
        cases = common.validate_case_images(cases, log)
        h = float(s["heldout_fraction"])
        if h > 0:
            fractions = (("train", 1.0 - h), ("validation", h))
            splits = common.assign_patient_splits(cases, fractions, salt=self.name)
        else:
            splits = {"train": list(cases)}
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
        return self.finish(log, splits, settings=settings)


def list_images(root: epath.Path, extensions: tuple[str, ...]) -> list[str]:
    """Sorted relative posix paths of the images under `root` (hidden entries skipped)."""

    def keep(path: str, name: str) -> bool:
        return posixpath.splitext(name)[1].lower() in extensions

    return common.list_files(root, keep, "image_folder_unlabeled")


def image_row(
    root: epath.Path, rel: str, case_level: int | None, patient_level: int | None
) -> common.ImageRow:
    """ImageRow of image `rel` (relative path); ValueError if it is too shallow for the levels."""
    dirs = rel.split("/")[:-1]
    need = max(x for x in (case_level, patient_level, -1) if x is not None)
    if len(dirs) <= need:
        raise ValueError(
            f"image is {len(dirs)} folder(s) deep, but case_level={case_level} / "
            f"patient_level={patient_level} need at least {need + 1}"
        )
    case = rel if case_level is None else "/".join(dirs[: case_level + 1])
    patient = case if patient_level is None else "/".join(dirs[: patient_level + 1])
    return common.ImageRow(
        file=str(root / rel), row=None, path=root / rel, image_id=rel, case_id=case,
        patient_id=patient, fields={},
    )  # fmt: skip
