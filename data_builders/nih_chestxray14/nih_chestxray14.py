"""NIH ChestX-ray14 (Wang et al. 2017) as MICLe cases: one TFDS example = one patient (default)
or one image.

Reads the released layout (NIH Box, or the Kaggle copy 'nih-chest-xrays/data'):
`Data_Entry_2017.csv` (or `Data_Entry_2017_v2020.csv`), `train_val_list.txt`, `test_list.txt`
and the PNGs in `images_001/images/` ... `images_012/images/` (or one flat `images/` folder).
Per image: the 14 findings as a multi-hot vector `findings` (order `FINDINGS`; 'No Finding' =
all zeros), the follow-up number, age, sex and view position (AP/PA). The multi-label targets
come from the reader hook `read_transform` (labels.py).

Splits: `test` = the images of test_list.txt (official); `train` / `validation` = the patients of
train_val_list.txt split with `medssl_jax.data_splits.patient_split` (salt 'nih_chestxray14',
`validation_fraction` 0.1 by default). The official lists are patient-disjoint: a patient with
images in both is bad input, as is an image in neither list or a listed image without a CSV row.
Images of a case are ordered by follow-up number.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_builders import case_builder, common
from medssl_jax.data_splits import patient_split

# The 14 findings in the order of the paper / the usual label vector (CSV spelling).
FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
_FINDING_INDEX = {f: i for i, f in enumerate(FINDINGS)}
SEXES = ("female", "male", "unknown")  # as chexpert
_SEX_OF_VALUE = {"F": 0, "M": 1, "": 2}
AP_PA = ("ap", "pa", "ll", "rl", "unknown")  # as chexpert's 'ap_pa' (NIH has AP and PA only)
_AP_PA_OF_VALUE = {"AP": 0, "PA": 1, "LL": 2, "RL": 3, "": 4}
CASE_LEVELS = ("patient", "image")
SALT = "nih_chestxray14"

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # first found wins
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
_IMAGE_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")
_AGE = re.compile(r"^(\d+)\s*([YMD]?)$", re.IGNORECASE)  # '58', '058Y' (original release), '11M'

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (or the Kaggle copy
'nih-chest-xrays/data'), unpack the image archives and give the folder holding the CSV and the
two split lists as manual_dir. Expected files:
  <manual_dir>/Data_Entry_2017.csv        (or Data_Entry_2017_v2020.csv; columns Image Index,
                                           Finding Labels, Follow-up #, Patient ID, Patient Age,
                                           Patient Gender, View Position, ...)
  <manual_dir>/train_val_list.txt         (official split: one image file name per line)
  <manual_dir>/test_list.txt
  <manual_dir>/images_001/images/00000001_000.png ... images_012/images/*.png
                                          (or all PNGs in one flat <manual_dir>/images/ folder)
"""


@dataclasses.dataclass(eq=False)
class NihChestXray14Config(case_builder.CaseBuilderConfig):
    """`case_level`: 'patient' (all follow-ups of a patient) or 'image' (one case per image);
    `validation_fraction`: share of the train_val_list.txt patients held out as 'validation'."""

    case_level: str = "patient"
    validation_fraction: float = 0.1


class NihChestXray14(case_builder.CaseBuilder):
    """NIH ChestX-ray14 frontal chest X-rays, 14 findings (multi-label), patient cases."""

    name = "nih_chestxray14"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Patient/image cases; official test list, patient-level val split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        NihChestXray14Config(
            name="patient", case_level="patient", description="One case per patient."
        ),
        NihChestXray14Config(name="image", case_level="image", description="One case per image."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "patient"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                f"NIH ChestX-ray14: one example per {self.builder_config.case_level}; per image "
                "the 14 findings as a multi-hot bool vector 'findings' (order in "
                "metadata['findings']; all false = No Finding), follow-up number, age (years, "
                "-1 unknown), sex and view position ('ap_pa')."
            ),
            features=case_builder.case_features(
                tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                findings=tfds.features.Tensor(shape=(len(FINDINGS),), dtype=np.bool_),
                follow_up=tfds.features.Scalar(dtype=np.int32),
                age=tfds.features.Scalar(dtype=np.int32),
                sex=tfds.features.ClassLabel(names=list(SEXES)),
                ap_pa=tfds.features.ClassLabel(names=list(AP_PA)),
            ),
            homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        cfg = self.builder_config
        if cfg.case_level not in CASE_LEVELS:
            raise ValueError(
                f"nih_chestxray14: case_level must be one of {CASE_LEVELS}, got {cfg.case_level!r}"
            )
        if not 0.0 <= cfg.validation_fraction < 1.0:
            raise ValueError(
                "nih_chestxray14: validation_fraction must be in [0, 1), got "
                f"{cfg.validation_fraction!r}"
            )
        manual_dir = epath.Path(dl_manager.manual_dir)
        csv_path, lists = find_files(manual_dir)
        index = index_images(manual_dir)
        log = self.new_problem_log()
        entries, csv_images = read_data_entry(csv_path, log)
        rows = []
        for r in entries:
            try:
                rows.append(parse_row(r, index, manual_dir, cfg.case_level))
            except ValueError as e:
                log.add(r.file, r.line, str(e))
        rows = common.check_unique_image_ids(rows, log)
        rows = assign_official_lists(rows, csv_path.name, csv_images, lists, log)
        cases = common.group_cases(rows, log)
        for c in cases:
            c.images.sort(key=lambda r: (r.fields["follow_up"], r.image_id))
        log.check(f"reading {csv_path.name}, {TRAIN_VAL_LIST} and {TEST_LIST}")
        cases = common.validate_case_images(cases, log)
        splits = split_cases(cases, cfg.validation_fraction)
        return self.finish(
            log,
            splits,
            root=str(manual_dir),
            data_entry_csv=csv_path.name,
            case_level=cfg.case_level,
            validation_fraction=cfg.validation_fraction,
            findings=list(FINDINGS),
        )

    def _generate_examples(self, cases: Sequence[common.Case]) -> Iterator[tuple[str, dict]]:
        return common.generate_examples(cases)


def find_files(manual_dir: epath.Path) -> tuple[epath.Path, dict[str, epath.Path]]:
    """(Data_Entry CSV, {list name: path}); BadInputError naming every missing file."""
    csv_path = next((manual_dir / n for n in CSV_NAMES if (manual_dir / n).exists()), None)
    lists = {n: manual_dir / n for n in (TRAIN_VAL_LIST, TEST_LIST)}
    missing = [] if csv_path else [" or ".join(reversed(CSV_NAMES))]
    missing += [n for n, p in lists.items() if not p.exists()]
    if missing:
        raise common.BadInputError(
            f"nih_chestxray14: missing in {manual_dir}: {', '.join(missing)}.\n"
            f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return csv_path, lists


def image_folders(manual_dir: epath.Path) -> list[epath.Path]:
    """images/ and images_NNN/images/ (also a flat images_NNN/), in name order."""
    numbered = sorted(p for p in manual_dir.glob("images_*") if p.is_dir())
    return [manual_dir / "images", *(f for p in numbered for f in (p / "images", p))]


def index_images(manual_dir: epath.Path) -> dict[str, epath.Path]:
    """Maps PNG file name -> path; BadInputError when there is no image folder at all."""
    folders = [f for f in image_folders(manual_dir) if f.is_dir()]
    if not folders:
        raise common.BadInputError(
            f"nih_chestxray14: no image folder in {manual_dir} (expected images_001/images/ ... "
            f"images_012/images/, or images/).\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return common.index_images(folders, (".png",))


def read_data_entry(
    path: epath.Path, log: common.ProblemLog
) -> tuple[list[common.CsvRow], set[str]]:
    """Rows of Data_Entry_2017*.csv with 1-based line numbers; values of `_COLUMNS` only.

    Tolerates the 2017 file's trailing comma (an empty last column, in the header and/or the
    rows; when the header has it, a row ending in an empty value must have it too, so a dropped
    value is not mistaken for it) and a header naming 'OriginalImage[Width,Height]' as one quoted
    field (two values in every row). Wrong value counts go to `log`; a missing/empty file or
    header is raised. Also returns the 'Image Index' of every data line, bad ones included (so
    a listed image with a malformed row is not reported again as missing from the CSV)."""
    if not path.exists():
        raise common.BadInputError(f"nih_chestxray14: CSV file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise common.BadInputError(f"{path}: not UTF-8 text ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise common.BadInputError(f"{path}, row 1: empty file, expected a header row") from None
    except csv.Error as e:
        raise common.BadInputError(f"{path}, row 1: malformed header: {e}") from None
    trailing = bool(header) and not header[-1]  # the 2017 file: a trailing comma on each line
    while header and not header[-1]:
        header.pop()
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise common.BadInputError(
            f"{path}, row 1: header lacks required column(s) {missing}; header is {header}"
        )
    widths = [h.count(",") + 1 for h in header]
    width = sum(widths)
    position = {c: sum(widths[: header.index(c)]) for c in _COLUMNS}
    rows: list[common.CsvRow] = []
    names: set[str] = set()
    for line, end, values in common.csv_records(reader, path, log):
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) > position["Image Index"]:
            names.add(values[position["Image Index"]].strip())
        last_empty = not values[-1].strip()
        if len(values) == width + 1 and last_empty:
            values = values[:-1]  # the trailing comma
        elif len(values) != width or (trailing and last_empty):
            n = len(values) - (1 if last_empty and (trailing or len(values) > width) else 0)
            log.add(path, line, f"expected {width} values, got {n}" + common.span_note(line, end))
            continue
        rows.append(
            common.CsvRow(str(path), line, {c: values[position[c]].strip() for c in _COLUMNS})
        )
    if not rows and not log.problems:
        raise common.BadInputError(f"{path}: the header is there but no data row follows")
    return rows, names


def parse_findings(text: str) -> list[bool]:
    """'Cardiomegaly|Effusion' -> multi-hot over FINDINGS; 'No Finding' -> all False."""
    field = "Finding Labels"
    if not text:
        raise ValueError(f"field '{field}' is empty (use '{NO_FINDING}' for an image without)")
    names = [n.strip() for n in text.split("|")]
    if names == [NO_FINDING]:
        return [False] * len(FINDINGS)
    if NO_FINDING in names:
        raise ValueError(f"field '{field}': {NO_FINDING!r} together with findings in {text!r}")
    multi_hot = [False] * len(FINDINGS)
    for n in names:
        if n not in _FINDING_INDEX:
            valid = ", ".join(repr(f) for f in (*FINDINGS, NO_FINDING))
            raise ValueError(f"unknown finding {n!r} in field '{field}' (valid: {valid})")
        multi_hot[_FINDING_INDEX[n]] = True
    return multi_hot


def parse_age(text: str) -> int:
    """Age in years: '58', '058Y'; 'NNM' months and 'NND' days round down; '' -> -1."""
    if not text:
        return -1
    m = _AGE.match(text)
    if not m:
        raise ValueError(f"field 'Patient Age' is not an age: {text!r}")
    value, unit = int(m.group(1)), m.group(2).upper()
    years = {"": value, "Y": value, "M": value // 12, "D": value // 365}[unit]
    if years > 999:  # the 2017 file has a few data errors of 148-414 years, kept as they are
        raise ValueError(f"field 'Patient Age' is out of range: {text!r}")
    return years


def parse_row(
    row: common.CsvRow, index: dict[str, epath.Path], manual_dir: epath.Path, level: str
) -> common.ImageRow:
    """One Data_Entry row -> ImageRow (split not yet set); ValueError naming the bad field."""
    v = row.values
    name = v["Image Index"]
    m = _IMAGE_NAME.match(name)
    if not m:
        raise ValueError(
            f"field 'Image Index': {name!r} is not <8-digit patient id>_<3-digit number>.png"
        )
    prefix = m.group(1)
    pid = v["Patient ID"]
    if not pid.isdigit() or int(pid) != int(prefix):
        raise ValueError(
            f"field 'Patient ID': {pid!r} does not match the patient prefix {prefix!r} of the "
            f"image name {name!r}"
        )
    fields = {
        "findings": parse_findings(v["Finding Labels"]),
        "follow_up": common.parse_int(v["Follow-up #"], field="Follow-up #"),
        "age": parse_age(v["Patient Age"]),
        "sex": common.parse_choice(v["Patient Gender"], _SEX_OF_VALUE, field="Patient Gender"),
        "ap_pa": common.parse_choice(v["View Position"], _AP_PA_OF_VALUE, field="View Position"),
    }
    path = index.get(name)
    if path is None:
        raise ValueError(
            f"field 'Image Index': image file not found: {name} in {manual_dir}/"
            "images_NNN/images/ (or images/)"
        )
    return common.ImageRow(
        file=row.file,
        row=row.line,
        path=path,
        image_id=name,
        case_id=prefix if level == "patient" else name,
        patient_id=prefix,
        fields=fields,
    )


def read_list(path: epath.Path) -> list[tuple[int, str]]:
    """(1-based line, image name) of the non-blank lines of a split list."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise common.BadInputError(f"{path}: not UTF-8 text ({e})") from None
    return [(i, s.strip()) for i, s in enumerate(lines, start=1) if s.strip()]


def assign_official_lists(
    rows: Sequence[common.ImageRow],
    csv_name: str,
    csv_images: set[str],
    lists: dict[str, epath.Path],
    log: common.ProblemLog,
) -> list[common.ImageRow]:
    """Sets each row's split to 'train_val' or 'test' from the official lists.

    Problems (to `log`): an image listed twice or in both lists (list file + line), a listed
    image without a CSV row (list file + line), a CSV image in neither list (CSV row), and a
    patient with images in both lists (the CSV row of its first test image). Returns the rows
    that keep a split (an image in both lists, and every image of a patient in both lists, is
    left out when skipping)."""
    split_of_list = {TRAIN_VAL_LIST: "train_val", TEST_LIST: "test"}
    where: dict[str, tuple[str, int]] = {}  # image -> (list name, line)
    ambiguous: set[str] = set()
    for list_name, path in lists.items():
        for line, name in read_list(path):
            if name in where:
                first_list, first_line = where[name]
                also = "listed twice" if first_list == list_name else f"also in {first_list}"
                log.add(
                    path,
                    line,
                    f"image {name!r} is {also} (line {first_line}); each image must be in one list",
                )
                if first_list != list_name:
                    ambiguous.add(name)
                continue
            where[name] = (list_name, line)
            if name not in csv_images:
                log.add(
                    path,
                    line,
                    f"image {name!r} is listed but has no row in {csv_name}",
                )
    kept = []
    for r in rows:
        if r.image_id in ambiguous:
            continue
        if r.image_id not in where:
            log.add(
                r.file,
                r.row,
                f"field 'Image Index': image {r.image_id!r} is in neither {TRAIN_VAL_LIST} nor "
                f"{TEST_LIST}",
            )
            continue
        r.split = split_of_list[where[r.image_id][0]]
        kept.append(r)
    by_patient: dict[str, dict[str, list[common.ImageRow]]] = {}
    for r in kept:
        by_patient.setdefault(r.patient_id, {}).setdefault(r.split, []).append(r)
    mixed = {p for p, groups in by_patient.items() if len(groups) > 1}
    for p in sorted(mixed):
        tv, te = by_patient[p]["train_val"][0], by_patient[p]["test"][0]
        n = sum(len(g) for g in by_patient[p].values())
        log.add(
            te.file,
            te.row,
            f"field 'Patient ID': patient {p!r} has images in both {TRAIN_VAL_LIST} "
            f"({tv.image_id}, line {where[tv.image_id][1]}) and {TEST_LIST} ({te.image_id}, "
            f"line {where[te.image_id][1]}); the official lists are patient-disjoint (all {n} "
            "images of this patient are left out when skipping bad rows)",
        )
    return [r for r in kept if r.patient_id not in mixed]


def split_cases(
    cases: Sequence[common.Case], validation_fraction: float
) -> dict[str, list[common.Case]]:
    """'test' from the official list; train_val patients -> 'train' / 'validation' by hash."""
    fractions = {"train": 1.0 - validation_fraction, "validation": validation_fraction}
    fractions = {k: v for k, v in fractions.items() if v > 0}
    out: dict[str, list[common.Case]] = {"train": [], "validation": [], "test": []}
    for c in cases:
        if c.split != "test":
            c.split = patient_split(c.patient_id, fractions, salt=SALT)
        out[c.split].append(c)
    return out
