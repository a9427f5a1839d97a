"""Kaggle/EyePACS diabetic retinopathy as patient cases, read from the TFDS catalogue.

Source: the TFDS catalogue dataset `diabetic_retinopathy_detection` (3.0.0; features `name`
like '10_left', `image` JPEG, `label` ClassLabel(num_classes=5), grade 0-4), which needs a
MANUAL download from Kaggle and must already be prepared in the same data_dir (or the config's
`source_data_dir`); see `INSTRUCTIONS`. Which catalogue config is read is our config's
`source_config` (our configs are named after them): 'btgraham-300' (default: images
preprocessed as the 2015 winner did, eyeball radius 300 px, cropped, JPEG q72), '250K', '1M'
(about that many pixels) or 'original'.

One TFDS example = one case = one PATIENT: the left and right eye images of patient '10'
('10_left', '10_right') form case '10' (patient_id '10'), images in the order left, right
(`eye` feature), each with its own grade. Class names `GRADES` ('no_dr', 'mild', 'moderate',
'severe', 'proliferative') keep the catalogue's order 0-4; the task is graded (use
`--config.graded=True` for the quadratic kappa).

Splits: the catalogue's train / validation / test (Kaggle train; the Public and Private parts
of the Kaggle test set) are kept. Its 'sample' split (10 unlabelled quick-test images) is not
read. A patient with images in two catalogue splits is a bad row (`BadInputError` naming the
patient) unless `split_conflict='heldout'`: then all that patient's images go to the LAST of
its splits in the order train < validation < test (a test image never leaves test, and no
patient seen in evaluation is trained on); moved images are listed in metadata.json
('moved_images'). With skip_bad_rows=True the images outside the patient's first split are
dropped instead. Other bad rows: a `name` that is not '<patient>_left' / '<patient>_right', a
repeated name, two images of one eye.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from data_builders import case_builder, catalog, common

CATALOGUE = "diabetic_retinopathy_detection"
GRADES: tuple[str, ...] = ("no_dr", "mild", "moderate", "severe", "proliferative")
EYES: tuple[str, ...] = ("left", "right")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# The catalogue's configs, smallest images first; ours are named after them.
SOURCE_CONFIGS: tuple[str, ...] = ("btgraham-300", "250K", "1M", "original")
DEFAULT_SOURCE_CONFIG = "btgraham-300"
SPLIT_CONFLICTS: tuple[str, ...] = ("error", "heldout")
_MAX_MOVED_LISTED = 1000

INSTRUCTIONS = f"""\
The TFDS catalogue dataset 'diabetic_retinopathy_detection/<source_config>' must be prepared
in the same TFDS data_dir first; it needs a MANUAL download:
  1. Download the competition data from
     https://www.kaggle.com/c/diabetic-retinopathy-detection/data into a folder <manual_dir>:
     unpack train.zip into <manual_dir>/train/, test.zip into <manual_dir>/test/, sample.zip
     into <manual_dir>/sample/, and unpack trainLabels.csv (and sampleSubmission.csv) into
     <manual_dir>/.
  2. Prepare it (TFDS also fetches the test labels, retinopathy_solution.csv):
       tfds build diabetic_retinopathy_detection --config=<source_config> \\
           --data_dir=<data_dir> --manual_dir=<manual_dir>
     or in Python: tfds.builder('diabetic_retinopathy_detection', config='<source_config>',
     data_dir=<data_dir>).download_and_prepare(
     download_config=tfds.download.DownloadConfig(manual_dir='<manual_dir>'))
<source_config> is one of {", ".join(SOURCE_CONFIGS)} (default {DEFAULT_SOURCE_CONFIG}), the
`source_config` of this builder's config (e.g. load 'diabetic_retinopathy/250K'). Or set
DiabeticRetinopathyConfig.source_data_dir to the data_dir where it is prepared. This builder
needs no manual_dir of its own.
"""


@dataclasses.dataclass(eq=False)
class DiabeticRetinopathyConfig(case_builder.CaseBuilderConfig):
    """`source_config`: config of the catalogue `diabetic_retinopathy_detection` to read.
    `source_data_dir`: data_dir where that is prepared (None: this builder's data_dir).
    `split_conflict`: 'error' (a patient in two catalogue splits is a bad row) or 'heldout'
    (its images all go to its last split in the order train, validation, test).
    A config with other values than the predefined ones needs a name of its own (TFDS rule);
    its data then lives under diabetic_retinopathy/<that name>/."""

    source_config: str = DEFAULT_SOURCE_CONFIG
    source_data_dir: str | None = None
    split_conflict: str = "error"


class DiabeticRetinopathy(case_builder.CaseBuilder):
    """EyePACS fundus images (DR grade 0-4), one case per patient (left and right eye)."""

    name = "diabetic_retinopathy"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Patient cases from the catalogue's diabetic_retinopathy_detection 3.0.0."
    }
    BUILDER_CONFIGS = [
        DiabeticRetinopathyConfig(
            name=c, source_config=c, description=f"From diabetic_retinopathy_detection/{c}."
        )
        for c in SOURCE_CONFIGS
    ]
    DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_SOURCE_CONFIG

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Kaggle diabetic retinopathy detection (EyePACS) fundus photographs from the "
                f"TFDS catalogue diabetic_retinopathy_detection/{self.builder_config.source_config}"
                ", one example per patient with its left and right eye images; per-image DR "
                "grade (0 no_dr ... 4 proliferative) and eye."
            ),
            features=case_builder.case_features(
                tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                tfds.features.ClassLabel(names=list(GRADES)),
                eye=tfds.features.ClassLabel(names=list(EYES)),
            ),
            homepage="https://www.kaggle.com/c/diabetic-retinopathy-detection/data",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing is downloaded: the catalogue dataset is read
        cfg = self.builder_config
        if cfg.split_conflict not in SPLIT_CONFLICTS:
            raise ValueError(
                f"{self.name}: split_conflict must be one of {SPLIT_CONFLICTS}, "
                f"got {cfg.split_conflict!r}"
            )
        self._source = catalog.open_catalogue(
            self.name,
            CATALOGUE,
            cfg.source_config,
            cfg.source_data_dir or self.data_dir_root,
            INSTRUCTIONS,
        )
        catalog.check_class_count(self.name, self._source, len(GRADES))
        log = self.new_problem_log()
        rows: list[common.ImageRow] = []
        for split in SPLITS:
            file = catalog.where(self._source, split)
            for rec in catalog.read_records(self._source, split, "name"):
                try:
                    rows.append(parse_record(rec, file, self._source.data_path))
                except ValueError as e:
                    log.add(file, rec.index + 1, str(e))
        rows = common.check_unique_image_ids(rows, log)
        cases, moved = group_patients(rows, log, cfg.split_conflict)
        log.check(f"reading the catalogue dataset {catalog.describe(self._source)}")
        self._origin = {r.image_id: r.split for r in rows}
        splits = common.cases_by_split(cases, SPLITS)
        return self.finish(
            log,
            splits,
            source=catalog.source_metadata(self._source),
            split_conflict=cfg.split_conflict,
            num_moved_images=len(moved),
            moved_images=moved[:_MAX_MOVED_LISTED],
        )

    def _generate_examples(self, cases: Sequence[common.Case]) -> Iterator[tuple[str, dict]]:
        return catalog.case_examples(self, cases, "name", ("label", "eye"))


def parse_name(name: str) -> tuple[str, str]:
    """'10_left' -> ('10', 'left'); ValueError naming the field otherwise."""
    patient, sep, eye = name.rpartition("_")
    if not sep or not patient or eye not in EYES:
        raise ValueError(f"field 'name': {name!r} is not '<patient>_left' or '<patient>_right'")
    return patient, eye


def parse_record(rec: catalog.SourceRecord, file: str, path) -> common.ImageRow:
    """One catalogue example -> ImageRow of its patient's case (split = catalogue split)."""
    patient, eye = parse_name(rec.key)
    if not -1 <= rec.label < len(GRADES):
        raise ValueError(f"field 'label': {rec.label} is not a grade 0-4 (or -1, no label)")
    return common.ImageRow(
        file=file,
        row=rec.index + 1,
        path=path,
        image_id=rec.key,
        case_id=patient,
        patient_id=patient,
        fields={"label": rec.label, "eye": EYES.index(eye)},
        split=rec.split,
    )


def group_patients(
    rows: Sequence[common.ImageRow], log: common.ProblemLog, split_conflict: str
) -> tuple[list[common.Case], list[dict[str, str]]]:
    """One case per patient (images left, right), sorted by patient id; returns the cases and
    the images moved to another split ('heldout').

    A second image of one eye is a bad row. A patient in two catalogue splits: 'error' -> its
    images outside its first split (train < validation < test) are bad rows; 'heldout' -> all
    its images go to its last split.
    """
    by_patient: dict[str, list[common.ImageRow]] = {}
    for r in rows:
        by_patient.setdefault(r.patient_id, []).append(r)
    cases: list[common.Case] = []
    moved: list[dict[str, str]] = []
    for patient in sorted(by_patient):
        members = sorted(by_patient[patient], key=lambda r: (SPLITS.index(r.split), r.row))
        good: list[common.ImageRow] = []
        for r in members:
            twin = next((g for g in good if g.fields["eye"] == r.fields["eye"]), None)
            if twin is not None:
                log.add(
                    r.file,
                    r.row,
                    f"patient {patient!r} has a second {EYES[r.fields['eye']]} eye image "
                    f"{r.image_id!r} (first {twin.image_id!r} at {twin.file}, row {twin.row})",
                )
            else:
                good.append(r)
        if not good:
            continue
        splits = sorted({r.split for r in good}, key=SPLITS.index)
        split = splits[0]
        if len(splits) > 1 and split_conflict == "heldout":
            split = splits[-1]
            for r in good:
                if r.split != split:
                    moved.append({"image_id": r.image_id, "from": r.split, "to": split})
        elif len(splits) > 1:
            head = good[0]
            for r in good:
                if r.split != split:
                    log.add(
                        r.file,
                        r.row,
                        f"patient {patient!r} has {r.image_id!r} in catalogue split "
                        f"{r.split!r} but {head.image_id!r} in split {split!r} ({head.file}, "
                        f"row {head.row}); one split per patient (set the config's "
                        "split_conflict='heldout' to put both eyes in the later split)",
                    )
            good = [r for r in good if r.split == split]
        good.sort(key=lambda r: r.fields["eye"])
        cases.append(common.Case(patient, patient, good, split))
    return cases, moved
