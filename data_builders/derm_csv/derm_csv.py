"""Any dermatology set described by one CSV (e.g. the paper's private teledermatology data).

One row per image; configurable columns for the image path, case id, label and optional patient
id and split. One TFDS example = one case (all its rows). Settings come from `DermCsvConfig`
(pass `config=DermCsvConfig(name=..., ...)` to the builder) and, for use through
`medssl_jax.datasets.load('derm_csv', manual_dir=...)` without code, from an optional JSON file in
the manual dir (`derm_csv.json` by default; keys = DermCsvConfig field names below; it overrides
the config). Relative image paths are resolved against `image_root` (default: the CSV's folder).
Class names: `class_names` if given (then other labels are errors), else the sorted distinct
labels of the CSV. Splits: from `split_column` if set (a patient must stay in one split), else
patient-level `patient_split` (salt 'derm_csv') with `split_fractions`.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from data_builders import case_builder, common

# Settings a JSON file in the manual dir may give.
SETTINGS = (
    "csv_file",
    "image_column",
    "case_column",
    "label_column",
    "patient_column",
    "split_column",
    "class_names",
    "image_root",
    "delimiter",
    "split_fractions",
    "skip_bad_rows",
)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the CSV (default name labels.csv) and the images in the manual_dir. Default columns:
image_path (relative to the CSV's folder, or absolute), case_id, label; optional patient_id and
split columns when configured. Column names and the rest are set by DermCsvConfig or by a
<manual_dir>/derm_csv.json such as
  {"csv_file": "teleder.csv", "image_column": "file", "case_column": "case",
   "label_column": "condition", "patient_column": "patient", "split_column": "split",
   "class_names": ["Acne", "Eczema", "Other"]}
"""


@dataclasses.dataclass(eq=False)
class DermCsvConfig(case_builder.SplitCaseBuilderConfig):
    """Columns and options of a CSV-described dermatology set (see module docstring)."""

    csv_file: str = "labels.csv"  # relative to the manual dir, or absolute
    image_column: str = "image_path"
    case_column: str = "case_id"
    label_column: str = "label"
    patient_column: str | None = None  # None: patient_id = case_id
    split_column: str | None = None  # None: patient-level hash split by split_fractions
    class_names: tuple[str, ...] | None = None  # None: sorted distinct labels
    image_root: str | None = None  # base of relative image paths; None: the CSV's folder
    delimiter: str = ","
    settings_file: str | None = "derm_csv.json"  # optional JSON overrides in the manual dir


class DermCsv(case_builder.CaseBuilder):
    """Multi-class dermatology cases from a CSV with configurable columns."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "CSV-described dermatology cases."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [DermCsvConfig(name="default", description="Columns from derm_csv.json.")]

    def _info(self) -> tfds.core.DatasetInfo:
        names = self.builder_config.class_names
        label = tfds.features.ClassLabel(names=list(names)) if names else tfds.features.ClassLabel()
        return self.dataset_info_from_configs(
            description="Dermatology cases from a CSV (one example per case, per-image labels).",
            features=case_builder.case_features(tfds.features.Image(shape=(None, None, 3)), label),
            metadata=tfds.core.MetadataDict(),
        )

    def settings(self, manual_dir: epath.Path) -> dict[str, Any]:
        """Config fields overridden by the optional JSON settings file."""
        cfg = self.builder_config
        out = {k: getattr(cfg, k) for k in SETTINGS}
        if cfg.settings_file:
            over = common.read_overrides(manual_dir, cfg.settings_file, SETTINGS)
            if (
                "class_names" in over
                and cfg.class_names
                and tuple(over["class_names"]) != tuple(cfg.class_names)
            ):
                raise common.BadInputError(
                    f"{manual_dir / cfg.settings_file}: class_names {over['class_names']} differ "
                    f"from the config's {list(cfg.class_names)}"
                )
            out.update(over)
        if self._skip_bad_rows_kwarg is not None:
            out["skip_bad_rows"] = self._skip_bad_rows_kwarg
        return out

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        s = self.settings(manual_dir)
        csv_path = epath.Path(s["csv_file"])
        if not csv_path.is_absolute():
            csv_path = manual_dir / csv_path
        if not csv_path.exists():
            raise common.BadInputError(
                f"derm_csv: CSV file not found: {csv_path}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        image_root = csv_path.parent
        if s["image_root"]:
            image_root = epath.Path(s["image_root"])
            if not image_root.is_absolute():
                image_root = manual_dir / image_root
        log = common.ProblemLog(self.name, bool(s["skip_bad_rows"]))
        columns = [s["image_column"], s["case_column"], s["label_column"]]
        columns += [c for c in (s["patient_column"], s["split_column"]) if c]
        csv_rows = common.read_csv(csv_path, columns, log, delimiter=s["delimiter"])
        names = list(
            s["class_names"] or sorted({r.values[s["label_column"]] for r in csv_rows} - {""})
        )
        if not names:
            raise common.BadInputError(f"{csv_path}: no labels in column '{s['label_column']}'")
        label_feature = self.info.features["label"].feature
        label_feature.names = names  # no-op when the config gave them
        rows = []
        for r in csv_rows:
            try:
                rows.append(parse_row(r, s, {n: i for i, n in enumerate(names)}, image_root))
            except ValueError as e:
                log.add(r.file, r.line, str(e))
        rows = common.check_unique_image_ids(rows, log)
        cases = common.group_cases(rows, log)
        log.check(f"reading {csv_path.name}")
        cases = common.validate_case_images(cases, log)
        if s["split_column"]:
            splits = common.cases_by_split(cases, sorted({c.split for c in cases}))
        else:
            splits = common.assign_patient_splits(
                cases, [tuple(x) for x in s["split_fractions"]], salt="derm_csv"
            )
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
        return self.finish(log, splits, settings=settings, class_names=names)


def parse_row(
    row: common.CsvRow, s: Mapping[str, Any], label_ids: Mapping[str, int], image_root: epath.Path
) -> common.ImageRow:
    """One CSV row -> ImageRow; raises ValueError naming the bad field."""
    v = row.values
    image, case = v[s["image_column"]], v[s["case_column"]]
    if not image:
        raise ValueError(f"field '{s['image_column']}' is empty")
    if not case:
        raise ValueError(f"field '{s['case_column']}' is empty")
    patient = v[s["patient_column"]] if s["patient_column"] else case
    if not patient:
        raise ValueError(f"field '{s['patient_column']}' is empty")
    split = None
    if s["split_column"]:
        split = common.check_split_name(v[s["split_column"]], field=s["split_column"])
    # One file named two ways ('a.jpg', './a.jpg', 'x/../a.jpg') is one image id, so the
    # duplicate check catches it (else it could sit in two cases, even two splits).
    image_id = posixpath.normpath(image)
    path = epath.Path(image_id)
    if not path.is_absolute():
        path = image_root / image_id
    return common.ImageRow(
        file=row.file,
        row=row.line,
        path=path,
        image_id=image_id,
        case_id=case,
        patient_id=patient,
        fields={
            "label": common.parse_choice(v[s["label_column"]], label_ids, field=s["label_column"])
        },
        split=split,
    )
