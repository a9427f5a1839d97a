"""HAM10000 (Tschandl et al. 2018) dermatoscopy as MICLe cases: one TFDS example = one lesion.

The data has no patient id: patient_id = lesion_id (so the patient-level split is a lesion-level
split; the dataset notes that some lesions were imaged under different lesion ids, which this
cannot catch). No official split: train / validation / test are assigned per lesion with
`medssl_jax.data_splits.patient_split` (salt 'ham10000'), deterministic.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_builders import case_builder, common

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DX_TYPES: tuple[str, ...] = ("confocal", "consensus", "follow_up", "histo")
SEXES: tuple[str, ...] = ("female", "male", "unknown")
_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
_METADATA_FILES = (("HAM10000_metadata.csv", ","), ("HAM10000_metadata.tab", "\t"))
# Harvard Dataverse zips unpack to the first two; the Kaggle copy also has lower-case twins.
_IMAGE_FOLDERS = (
    "HAM10000_images_part_1",
    "HAM10000_images_part_2",
    "ham10000_images_part_1",
    "ham10000_images_part_2",
    "HAM10000_images",
)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download HAM10000 from https://doi.org/10.7910/DVN/DBW86T (or the Kaggle copy
'skin-cancer-mnist-ham10000'), unzip the two image archives and give their parent folder as
manual_dir:
  <manual_dir>/HAM10000_metadata.csv   (columns lesion_id,image_id,dx,dx_type,age,sex,localization;
                                        the tab-separated HAM10000_metadata.tab also works)
  <manual_dir>/HAM10000_images_part_1/ISIC_0024306.jpg ...
  <manual_dir>/HAM10000_images_part_2/ISIC_0029306.jpg ...
"""


class Ham10000Config(case_builder.SplitCaseBuilderConfig):
    """The lesion-level split by `split_fractions`."""


class Ham10000(case_builder.CaseBuilder):
    """HAM10000 lesions (7 classes), one case per lesion_id with all its images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Lesion-level cases, lesion-level 70/15/15 split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [Ham10000Config(name="default", description="70/15/15 lesion-level split.")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "HAM10000 dermatoscopic images, one example per lesion (MICLe bag); per-image "
                "dx label (7 classes), dx_type, age (-1 unknown), sex, localization. "
                "patient_id = lesion_id (no patient ids in the data)."
            ),
            features=case_builder.case_features(
                tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                tfds.features.ClassLabel(names=list(CLASSES)),
                dx_type=tfds.features.ClassLabel(names=list(DX_TYPES)),
                age=tfds.features.Scalar(dtype=np.int32),
                sex=tfds.features.ClassLabel(names=list(SEXES)),
                localization=tfds.features.Text(),
            ),
            homepage="https://doi.org/10.7910/DVN/DBW86T",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        csv_path, delimiter = find_metadata(manual_dir)
        index = common.index_images([manual_dir / f for f in _IMAGE_FOLDERS], (".jpg", ".jpeg"))
        log = self.new_problem_log()
        rows = []
        for r in common.read_csv(csv_path, _COLUMNS, log, delimiter=delimiter):
            try:
                rows.append(parse_row(r, index, manual_dir))
            except ValueError as e:
                log.add(r.file, r.line, str(e))
        rows = common.check_unique_image_ids(rows, log)
        cases = common.group_cases(rows, log)
        log.check("reading the metadata CSV")
        cases = common.validate_case_images(cases, log)
        splits = common.assign_patient_splits(
            cases, self.builder_config.split_fractions, salt="ham10000"
        )
        return self.finish(log, splits)


def find_metadata(manual_dir: epath.Path) -> tuple[epath.Path, str]:
    """(metadata file, delimiter); clear error naming the expected files when absent."""
    for name, delimiter in _METADATA_FILES:
        if (manual_dir / name).exists():
            return manual_dir / name, delimiter
    raise common.BadInputError(
        f"ham10000: no HAM10000_metadata.csv in {manual_dir}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )


def parse_row(
    row: common.CsvRow, index: dict[str, epath.Path], manual_dir: epath.Path
) -> common.ImageRow:
    """One metadata row -> ImageRow; raises ValueError naming the bad field."""
    v = row.values
    lesion, image_id = v["lesion_id"], v["image_id"]
    if not lesion:
        raise ValueError("field 'lesion_id' is empty")
    if not image_id:
        raise ValueError("field 'image_id' is empty")
    name = image_id if image_id.lower().endswith((".jpg", ".jpeg")) else f"{image_id}.jpg"
    path = index.get(name)
    if path is None:
        folders = ", ".join(_IMAGE_FOLDERS[:2])
        raise ValueError(f"image file not found: {name} in {manual_dir} / {{{folders}}}")
    fields = {
        "label": common.parse_choice(v["dx"], {c: i for i, c in enumerate(CLASSES)}, field="dx"),
        "dx_type": common.parse_choice(
            v["dx_type"], {c: i for i, c in enumerate(DX_TYPES)}, field="dx_type"
        ),
        "age": common.parse_int(v["age"], field="age", missing=-1),
        "sex": common.parse_choice(
            v["sex"] or "unknown", {c: i for i, c in enumerate(SEXES)}, field="sex"
        ),
        "localization": v["localization"] or "unknown",
    }
    return common.ImageRow(
        file=row.file,
        row=row.line,
        path=path,
        image_id=image_id,
        case_id=lesion,
        patient_id=lesion,
        fields=fields,
    )
