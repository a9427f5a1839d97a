"""CheXpert (Irvin et al. 2019) as MICLe cases: one TFDS example = one study (default) or patient.

Reads the released layout of `CheXpert-v1.0-small` or the full-size `CheXpert-v1.0`
(train.csv, valid.csv, train/, valid/). All 14 findings keep their 4 states (ClassLabel names
`FINDING_STATES`: 0 negative (CSV 0.0), 1 positive (1.0), 2 uncertain (-1.0), 3 not_mentioned
(blank)); the uncertainty policy and the condition set are READ-TIME options of
`read_transform` (labels.py), so one prepared dataset serves every policy.

Splits: train and validation (1% of train.csv's patients, held out by a stable patient hash,
for choosing checkpoints), and test = the official valid.csv (what papers report; chosen on it,
a result would be optimistic).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import registered

from data_builders import case_builder, common
from medssl_jax.data_splits import stable_unit_hash

# CSV column order of the 14 findings, and their feature keys.
FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
FINDING_KEYS: dict[str, str] = {f: f.lower().replace(" ", "_") for f in FINDINGS}
FINDING_STATES: tuple[str, ...] = ("negative", "positive", "uncertain", "not_mentioned")
_STATE_OF_VALUE = {
    "0.0": 0, "0": 0, "1.0": 1, "1": 1, "-1.0": 2, "-1": 2, "": 3,
}  # fmt: skip
SEXES = ("female", "male", "unknown")
_SEX_OF_VALUE = {"Female": 0, "Male": 1, "Unknown": 2, "": 2}
VIEWS = ("frontal", "lateral")
_VIEW_OF_VALUE = {"Frontal": 0, "Lateral": 1}
AP_PA = ("ap", "pa", "ll", "rl", "unknown")
_AP_PA_OF_VALUE = {"AP": 0, "PA": 1, "LL": 2, "RL": 3, "": 4}
_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS)
# Optional leading dataset folder, then <split>/patientN/studyN/viewN_<frontal|lateral>.jpg
_PATH = re.compile(
    r"^(?:[^/]+/)?(train|valid)/(patient\d+)/(study\d+)/(view\d+_(?:frontal|lateral)\.jpg)$"
)
_ROOT_NAMES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
# valid.csv (200 patients, radiologist consensus labels) is the labelled set papers report on,
# so it is the test split; checkpoints are chosen on "validation", patients held out of
# train.csv (chosen on the reported split, a result would be optimistic).
_CSV_OF_SPLIT = {"train": ("train.csv", "train"), "test": ("valid.csv", "valid")}
SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.01  # of train.csv's patients: ~650 of 64,540, ~2,200 images
_VALIDATION_SALT = "chexpert/validation"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Register and download CheXpert from https://stanfordmlgroup.github.io/competitions/chexpert/
(the ~11 GB `CheXpert-v1.0-small.zip`, or the full-size `CheXpert-v1.0`), unzip it and give the
folder that CONTAINS `CheXpert-v1.0-small/` (or `CheXpert-v1.0/`) as manual_dir; the dataset
folder itself also works. Expected files:
  <manual_dir>/CheXpert-v1.0-small/train.csv
  <manual_dir>/CheXpert-v1.0-small/valid.csv
  <manual_dir>/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg ...
  <manual_dir>/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg ...
"""


@dataclasses.dataclass(eq=False)
class ChexpertConfig(case_builder.CaseBuilderConfig):
    """`case_level`: 'study' (one case per study) or 'patient' (all studies of a patient)."""

    case_level: str = "study"


class Chexpert(case_builder.CaseBuilder, skip_registration=True):
    """CheXpert chest X-rays grouped into cases, all 14 findings with their 4 states."""

    name = "chexpert"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Case-level (study/patient) CheXpert with 4-state findings.",
        "1.1.0": "valid.csv is the test split; validation = 1% of train.csv's patients.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        ChexpertConfig(name="study", case_level="study", description="One case per study."),
        ChexpertConfig(
            name="patient", case_level="patient", description="One case per patient (all studies)."
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "study"

    def _info(self) -> tfds.core.DatasetInfo:
        findings = {
            key: tfds.features.ClassLabel(names=list(FINDING_STATES))
            for key in FINDING_KEYS.values()
        }
        return self.dataset_info_from_configs(
            description=(
                "CheXpert: one example per "
                f"{self.builder_config.case_level}; per-image findings (4 states), sex, age, "
                "view (frontal/lateral) and AP/PA. Blank finding = not_mentioned."
            ),
            features=case_builder.case_features(
                tfds.features.Image(shape=(None, None, 1), encoding_format="jpeg"),
                study_ids=tfds.features.Text(),
                findings=findings,
                sex=tfds.features.ClassLabel(names=list(SEXES)),
                age=tfds.features.Scalar(dtype=np.int32),
                view=tfds.features.ClassLabel(names=list(VIEWS)),
                ap_pa=tfds.features.ClassLabel(names=list(AP_PA)),
            ),
            homepage="https://stanfordmlgroup.github.io/competitions/chexpert/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        level = self.builder_config.case_level
        if level not in ("study", "patient"):
            raise ValueError(f"chexpert: case_level must be 'study' or 'patient', got {level!r}")
        root = find_root(epath.Path(dl_manager.manual_dir))
        log = self.new_problem_log()
        rows: list[common.ImageRow] = []
        for split, (csv_name, folder) in _CSV_OF_SPLIT.items():
            for r in common.read_csv(root / csv_name, _COLUMNS, log):
                try:
                    rows.append(parse_row(r, root, folder, split, level))
                except ValueError as e:
                    log.add(r.file, r.line, str(e))
        rows = common.check_unique_image_ids(rows, log)
        cases = common.group_cases(rows, log)
        log.check("reading the CSV files")
        cases = common.validate_case_images(cases, log)
        held_out = validation_patients(c.patient_id for c in cases if c.split == "train")
        for c in cases:
            if c.split == "train" and c.patient_id in held_out:
                c.split = "validation"
        splits = common.cases_by_split(cases, SPLITS)
        return self.finish(log, splits, root=str(root), case_level=level)

    def _generate_examples(self, cases: Sequence[common.Case]) -> Iterator[tuple[str, dict]]:
        return common.generate_examples(cases, stack_fields)


def stack_fields(images: Sequence[common.ImageRow]) -> dict[str, Any]:
    """Per-image fields of one case as lists; findings as {finding key: [M] states}."""
    out: dict[str, Any] = {
        key: [r.fields[key] for r in images] for key in ("study_ids", "sex", "age", "view", "ap_pa")
    }
    out["findings"] = {k: [r.fields["findings"][k] for r in images] for k in FINDING_KEYS.values()}
    return out


def find_root(manual_dir: epath.Path) -> epath.Path:
    """The folder holding train.csv / valid.csv: manual_dir itself or a CheXpert-v1.0* child."""
    for cand in [manual_dir, *(manual_dir / n for n in _ROOT_NAMES)]:
        if (cand / "train.csv").exists() and (cand / "valid.csv").exists():
            return cand
    raise common.BadInputError(
        f"chexpert: no train.csv + valid.csv in {manual_dir} or its {list(_ROOT_NAMES)} "
        f"sub-folders.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )


def validation_patients(patient_ids: Iterable[str]) -> set[str]:
    """The train.csv patients held out as the validation split: those whose stable hash falls
    below VALIDATION_FRACTION or, on a set too small to have one there, the lowest hash (none
    from a single patient: train keeps it)."""
    ids = sorted(set(patient_ids))
    if len(ids) < 2:
        return set()
    h = {p: stable_unit_hash(p, _VALIDATION_SALT) for p in ids}
    chosen = {p for p in ids if h[p] < VALIDATION_FRACTION}
    return chosen or ({min(ids, key=h.__getitem__)} if ids else set())


def parse_row(
    row: common.CsvRow, root: epath.Path, folder: str, split: str, level: str
) -> common.ImageRow:
    """One CSV row -> ImageRow; raises ValueError naming the bad field."""
    v = row.values
    m = _PATH.match(v["Path"].replace("\\", "/"))
    if not m:
        raise ValueError(
            f"field 'Path': {v['Path']!r} is not <dataset>/{folder}/patientN/studyN/viewN_"
            "<frontal|lateral>.jpg"
        )
    path_split, patient, study, view_file = m.groups()
    if path_split != folder:
        raise ValueError(f"field 'Path': {v['Path']!r} is not under {folder}/ like its CSV")
    image_id = f"{folder}/{patient}/{study}/{view_file}"
    study_id = f"{patient}/{study}"
    findings = {
        FINDING_KEYS[f]: common.parse_choice(v[f], _STATE_OF_VALUE, field=f) for f in FINDINGS
    }
    fields = {
        "study_ids": study_id,
        "sex": common.parse_choice(v["Sex"], _SEX_OF_VALUE, field="Sex"),
        "age": common.parse_int(v["Age"], field="Age"),
        "view": common.parse_choice(v["Frontal/Lateral"], _VIEW_OF_VALUE, field="Frontal/Lateral"),
        "ap_pa": common.parse_choice(v["AP/PA"], _AP_PA_OF_VALUE, field="AP/PA"),
        "findings": findings,
    }
    return common.ImageRow(
        file=row.file,
        row=row.line,
        path=root / image_id,
        image_id=image_id,
        case_id=study_id if level == "study" else patient,
        patient_id=patient,
        fields=fields,
        split=split,
    )


# TFDS ships a legacy `chexpert` builder (one example per image, 3.1.0). This case-level builder
# takes the name over on import, so `tfds.builder('chexpert')` and
# `medssl_jax.datasets.load('chexpert')` use it (its data lives under chexpert/<config>/1.0.0).
# TFDS's legacy builders are imported first (once; about 0.1 s): imported after the takeover,
# its own Chexpert class would fail to register and take every other catalogue builder of its
# package down with it (e.g. `diabetic_retinopathy_detection` would be "not found").
registered._import_legacy_builders()  # noqa: SLF001
registered._DATASET_REGISTRY[Chexpert.name] = Chexpert  # noqa: SLF001
