"""PAD-UFES-20 (Pacheco et al. 2020) smartphone skin-lesion images as MICLe cases.

One TFDS example = one lesion (case_id = lesion_id) of one patient (patient_id). No official
split: train / validation / test are assigned per PATIENT with
`medssl_jax.data_splits.patient_split` (salt 'pad_ufes20'), deterministic.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_builders import case_builder, common

CLASSES: tuple[str, ...] = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
_COLUMNS = ("patient_id", "lesion_id", "img_id", "diagnostic", "age", "gender", "region")
# The Mendeley archive unpacks images into images/imgs_part_{1,2,3}; a flat images/ also works.
_IMAGE_FOLDERS = (
    "images",
    "images/imgs_part_1",
    "images/imgs_part_2",
    "images/imgs_part_3",
    "imgs_part_1",
    "imgs_part_2",
    "imgs_part_3",
)
_BOOL = {"True": 1, "False": 0, "": -1, "UNK": -1}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download PAD-UFES-20 from https://data.mendeley.com/datasets/zr7vgbcyr2/1 , unzip it (and the
image zips inside) and give the folder holding metadata.csv as manual_dir:
  <manual_dir>/metadata.csv    (patient_id, lesion_id, ..., diagnostic, ..., img_id, biopsed)
  <manual_dir>/images/imgs_part_1/PAT_1516_1765_530.png ...   (also imgs_part_2, imgs_part_3;
                                                               a flat images/ folder works too)
"""


class PadUfes20Config(case_builder.SplitCaseBuilderConfig):
    """The patient-level split by `split_fractions`."""


class PadUfes20(case_builder.CaseBuilder):
    """PAD-UFES-20 lesions (6 classes), one case per lesion, patient-level splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Lesion-level cases, patient-level 70/15/15 split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [PadUfes20Config(name="default", description="70/15/15 patient split.")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "PAD-UFES-20 clinical (smartphone) skin-lesion images, one example per lesion; "
                "per-image diagnostic label (6 classes), age (-1 unknown), gender and region "
                "('unknown' when blank), fitspatrick (-1 unknown), biopsed (1/0, -1 unknown)."
            ),
            features=case_builder.case_features(
                tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                tfds.features.ClassLabel(names=list(CLASSES)),
                age=tfds.features.Scalar(dtype=np.int32),
                gender=tfds.features.Text(),
                region=tfds.features.Text(),
                fitspatrick=tfds.features.Scalar(dtype=np.int32),
                biopsed=tfds.features.Scalar(dtype=np.int32),
            ),
            homepage="https://data.mendeley.com/datasets/zr7vgbcyr2/1",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        csv_path = manual_dir / "metadata.csv"
        if not csv_path.exists():
            raise common.BadInputError(
                f"pad_ufes20: no metadata.csv in {manual_dir}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        index = common.index_images([manual_dir / f for f in _IMAGE_FOLDERS], (".png",))
        log = self.new_problem_log()
        rows = []
        for r in common.read_csv(csv_path, _COLUMNS, log):
            try:
                rows.append(parse_row(r, index, manual_dir))
            except ValueError as e:
                log.add(r.file, r.line, str(e))
        rows = common.check_unique_image_ids(rows, log)
        cases = common.group_cases(rows, log)
        log.check("reading metadata.csv")
        cases = common.validate_case_images(cases, log)
        splits = common.assign_patient_splits(
            cases, self.builder_config.split_fractions, salt="pad_ufes20"
        )
        return self.finish(log, splits)


def parse_row(
    row: common.CsvRow, index: dict[str, epath.Path], manual_dir: epath.Path
) -> common.ImageRow:
    """One metadata row -> ImageRow; raises ValueError naming the bad field."""
    v = row.values
    for key in ("patient_id", "lesion_id", "img_id"):
        if not v[key]:
            raise ValueError(f"field '{key}' is empty")
    path = index.get(v["img_id"])
    if path is None:
        raise ValueError(
            f"image file not found: {v['img_id']} in {manual_dir}/images (or imgs_part_1..3)"
        )
    fields = {
        "label": common.parse_choice(
            v["diagnostic"], {c: i for i, c in enumerate(CLASSES)}, field="diagnostic"
        ),
        "age": common.parse_int(v["age"], field="age", missing=-1),
        "gender": v["gender"] or "unknown",
        "region": v["region"] or "unknown",
        "fitspatrick": common.parse_int(v.get("fitspatrick", ""), field="fitspatrick", missing=-1),
        "biopsed": common.parse_choice(v.get("biopsed", ""), _BOOL, field="biopsed"),
    }
    return common.ImageRow(
        file=row.file,
        row=row.line,
        path=path,
        image_id=v["img_id"],
        case_id=v["lesion_id"],
        patient_id=v["patient_id"],
        fields=fields,
    )
