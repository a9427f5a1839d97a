"""Shared machinery of the real-data TFDS builders (chexpert, ham10000, pad_ufes20, derm_csv,
image_folder_unlabeled): CSV rows with line numbers, image validation by decoding, the bad-row
policy (fail early, or skip and record), grouping image rows into cases (one TFDS example = one
MICLe bag) and patient-level splits.

Bad-row policy: every problem (missing/undecodable image, malformed CSV row, bad value, unknown
label) is collected with its file and 1-based line number. Unless `skip_bad_rows` is set, the
build stops with a `BadInputError` listing them BEFORE any example is written (problems are
checked inside `_split_generators`, before TFDS consumes the example generators). With
`skip_bad_rows=True` those rows are dropped, logged as warnings and stored in the dataset's
`metadata.json` (`info.metadata['skipped_rows']`, `info.metadata['num_skipped_rows']`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image as PILImage

from medssl_jax.data_splits import patient_split

# Default patient-level split layout for data sets without an official split.
DEFAULT_SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (
    ("train", 0.7),
    ("validation", 0.15),
    ("test", 0.15),
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_MAX_LISTED = 25  # problems listed in an exception message
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class BadInputError(ValueError):
    """Bad input data (file/row/field named in the message); raised before anything is written."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad input row: `row` is the 1-based line number in `file` (None: the file itself)."""

    file: str
    row: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}, row {self.row}"
        return f"{where}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "reason": self.reason}


class ProblemLog:
    """Collects bad rows; raises them together (default) or records them as skipped."""

    def __init__(self, dataset: str, skip_bad_rows: bool):
        self.dataset = dataset
        self.skip_bad_rows = skip_bad_rows
        self.problems: list[Problem] = []
        self._bad: set[tuple[str, int | None]] = set()

    def add(self, file: str | os.PathLike, row: int | None, reason: str) -> None:
        """Records a problem with `file` at 1-based line `row`."""
        file = os.fspath(file)
        self.problems.append(Problem(file, row, reason))
        self._bad.add((file, row))

    def is_bad(self, file: str | os.PathLike, row: int | None) -> bool:
        return (os.fspath(file), row) in self._bad

    def check(self, stage: str) -> None:
        """Raises `BadInputError` listing all problems so far, unless skipping bad rows."""
        if not self.problems or self.skip_bad_rows:
            return
        listed = "\n  ".join(str(p) for p in self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise BadInputError(
            f"{self.dataset}: {len(self.problems)} bad input row(s) found while {stage}; "
            f"nothing was written:\n  {listed}{tail}\n"
            "Fix the data, or rerun with --config.data.skip_bad_rows=True to drop these rows "
            "(they are then listed in the dataset's metadata.json under 'skipped_rows')."
        )

    def record(self, metadata: tfds.core.MetadataDict | None) -> None:
        """Logs skipped rows and stores them in the dataset metadata (metadata.json)."""
        for p in self.problems:
            logging.warning("%s: skipped bad row: %s", self.dataset, p)
        if self.problems:
            logging.warning(
                "%s: skipped %d bad row(s) (skip_bad_rows=True); listed in metadata.json",
                self.dataset,
                len(self.problems),
            )
        if metadata is not None:
            metadata["num_skipped_rows"] = len(self.problems)
            metadata["skipped_rows"] = [p.to_json() for p in self.problems]


# ----------------------------------------------------------------------------- CSV


@dataclasses.dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file: its 1-based line number and values by column name."""

    file: str
    line: int
    values: dict[str, str]


def read_csv(
    path: epath.PathLike,
    required: Sequence[str],
    log: ProblemLog,
    delimiter: str = ",",
) -> list[CsvRow]:
    """Reads a CSV with a header row; rows with a wrong column count go to `log`.

    Values are stripped of surrounding whitespace; empty lines are ignored. A missing file, a
    header without the `required` columns or no data row at all raises `BadInputError` at once
    (not skippable).
    """
    path = epath.Path(path)
    if not path.exists():
        raise BadInputError(f"{log.dataset}: CSV file not found: {path}")
    rows: list[CsvRow] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise BadInputError(f"{path}, row 1: empty file, expected a header row") from None
    except csv.Error as e:
        raise BadInputError(f"{path}, row 1: malformed header: {e}") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise BadInputError(
            f"{path}, row 1: header lacks required column(s) {missing}; header is {header}"
        )
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise BadInputError(f"{path}, row 1: duplicate column name(s) {dup}")
    for line, end, values in csv_records(reader, path, log):
        if not values or all(not v.strip() for v in values) and len(values) <= 1:
            continue  # blank line
        if len(values) != len(header):
            log.add(
                path,
                line,
                f"expected {len(header)} columns ({','.join(header)}), got {len(values)}"
                + span_note(line, end),
            )
            continue
        rows.append(
            CsvRow(
                os.fspath(path), line, {h: v.strip() for h, v in zip(header, values, strict=True)}
            )
        )
    if not rows and not log.problems:  # never build (and cache) an empty dataset
        raise BadInputError(f"{path}: the header is there but no data row follows")
    return rows


def csv_records(
    reader: Any, path: str | os.PathLike, log: ProblemLog
) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, values) of each record `reader` (a csv.reader past the header)
    yields; a record the csv module rejects is logged at its first line."""
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            log.add(path, start, f"malformed CSV: {e}")
            continue
        yield start, reader.line_num, values


def span_note(start: int, end: int) -> str:
    """For a malformed record over several lines: an unbalanced quote swallowed the lines after
    it (the csv module reads on to the next quote), so say which rows it took."""
    if end == start:
        return ""
    return f'; this record runs over rows {start}-{end}: an unbalanced quote (") joins them'


def parse_int(text: str, *, field: str, missing: int | None = None, minimum: int | None = 0) -> int:
    """Parses an integer ('68', '68.0'); '' -> `missing` if given. ValueError names `field`."""
    if text == "" or text.lower() in ("nan", "unk"):
        if missing is not None:
            return missing
        raise ValueError(f"field '{field}' is empty")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"field '{field}' is not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"field '{field}' is not an integer: {text!r}")
    if abs(value) > 2**31 - 1:  # stored as int32
        raise ValueError(f"field '{field}' is out of range: {text!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"field '{field}' must be >= {minimum}, got {text!r}")
    return int(value)


def parse_choice(text: str, choices: Mapping[str, Any], *, field: str) -> Any:
    """Maps `text` through `choices`; unknown values raise ValueError listing the valid ones."""
    if text not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown value {text!r} in field '{field}' (valid: {valid})")
    return choices[text]


# ----------------------------------------------------------------------------- images


def check_image(path: epath.Path) -> str | None:
    """Decodes the image fully; returns why it is unusable, or None if it is a valid JPEG/PNG.
    PIL calls a phone camera's multi-picture JPEG 'MPO'; it is a JPEG (TF decodes its first
    picture, the photo), so it is accepted."""
    if not path.exists():
        return f"image file not found: {path}"
    try:
        with path.open("rb") as f, PILImage.open(f) as im:
            fmt = im.format
            im.load()  # full decode: catches truncated and corrupt files
    except Exception as e:  # noqa: BLE001 - any decoder failure means unusable
        return f"cannot decode image {path}: {type(e).__name__}: {e}"
    if fmt not in ("JPEG", "MPO", "PNG"):
        return f"image {path} is {fmt}, expected JPEG or PNG"
    return None


def validate_images(
    items: Sequence[tuple[epath.Path, str, int | None]],
    log: ProblemLog,
    num_workers: int | None = None,
) -> None:
    """Decodes every image (path, source file, source row) in parallel; failures go to `log`."""
    workers = num_workers or min(32, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(lambda item: check_image(item[0]), items, chunksize=64))
    for (_, file, row), reason in zip(items, reasons, strict=True):
        if reason is not None:
            log.add(file, row, reason)


def index_images(
    folders: Iterable[epath.Path], extensions=IMAGE_EXTENSIONS
) -> dict[str, epath.Path]:
    """Maps file name -> path for images directly inside `folders` (first folder wins)."""
    index: dict[str, epath.Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in extensions and p.name not in index:
                index[p.name] = p
    return index


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class ImageRow:
    """One image of a case, with its source (file, row) for error messages."""

    file: str
    row: int | None
    path: epath.Path
    image_id: str
    case_id: str
    patient_id: str
    fields: dict[str, Any]  # per-image features (beyond images / image_ids)
    split: str | None = None


@dataclasses.dataclass
class Case:
    """One TFDS example: a MICLe bag of images sharing a case id (and a patient)."""

    case_id: str
    patient_id: str
    images: list[ImageRow]
    split: str | None = None


def check_unique_image_ids(rows: Sequence[ImageRow], log: ProblemLog) -> list[ImageRow]:
    """Reports repeated image ids (pointing at the first occurrence); returns the first ones."""
    first: dict[str, ImageRow] = {}
    kept = []
    for r in rows:
        if r.image_id in first:
            f = first[r.image_id]
            at = f.file if f.row is None else f"{f.file}, row {f.row}"
            log.add(r.file, r.row, f"duplicate image id {r.image_id!r} (first at {at})")
            continue
        first[r.image_id] = r
        kept.append(r)
    return kept


def group_cases(rows: Sequence[ImageRow], log: ProblemLog) -> list[Case]:
    """Groups rows into cases sorted by case id (images sorted by image id).

    A case must have one patient and (when rows carry splits) one split; a patient must not be in
    two splits. Offending rows go to `log` (the case keeps its first patient/split).
    """
    by_case: dict[str, list[ImageRow]] = {}
    for r in rows:
        by_case.setdefault(r.case_id, []).append(r)
    cases = []
    patient_split_of: dict[str, tuple[str | None, ImageRow]] = {}
    for case_id in sorted(by_case):
        members = by_case[case_id]
        head = members[0]
        good = []
        for r in members:
            if r.patient_id != head.patient_id:
                log.add(
                    r.file,
                    r.row,
                    f"case {case_id!r} has patient {r.patient_id!r} but patient "
                    f"{head.patient_id!r} at {head.file}, row {head.row}",
                )
            elif r.split != head.split:
                log.add(
                    r.file,
                    r.row,
                    f"case {case_id!r} is in split {r.split!r} but in split {head.split!r} at "
                    f"{head.file}, row {head.row}",
                )
            else:
                good.append(r)
        prev = patient_split_of.setdefault(head.patient_id, (head.split, head))
        if prev[0] != head.split:
            for r in good:
                log.add(
                    r.file,
                    r.row,
                    f"patient {head.patient_id!r} is in split {head.split!r} but also in split "
                    f"{prev[0]!r} ({prev[1].file}, row {prev[1].row}); one split per patient",
                )
            continue
        good.sort(key=lambda r: r.image_id)
        cases.append(Case(case_id, head.patient_id, good, head.split))
    return cases


def assign_patient_splits(
    cases: Sequence[Case], fractions: Sequence[tuple[str, float]], salt: str
) -> dict[str, list[Case]]:
    """Patient-level split (hash of patient id, `medssl_jax.data_splits.patient_split`)."""
    frac = dict(fractions)
    if len(frac) != len(fractions):
        raise ValueError(f"{salt}: duplicate split name in split_fractions {fractions}")
    for name in frac:
        if not _SPLIT_NAME.match(name):
            raise ValueError(f"{salt}: split name {name!r} must match [A-Za-z0-9_]+")
    out: dict[str, list[Case]] = {name: [] for name in frac}
    for c in cases:
        c.split = patient_split(c.patient_id, frac, salt=salt)
        out[c.split].append(c)
    return out


def cases_by_split(cases: Sequence[Case], split_names: Sequence[str]) -> dict[str, list[Case]]:
    """Groups cases whose `split` is already set (e.g. from a CSV column)."""
    out: dict[str, list[Case]] = {name: [] for name in split_names}
    for c in cases:
        out.setdefault(c.split, []).append(c)
    return out


def check_split_name(name: str, *, field: str) -> str:
    """Validates a split name from the data; raises ValueError naming `field`."""
    if not _SPLIT_NAME.match(name):
        raise ValueError(f"field '{field}': split name {name!r} must match [A-Za-z0-9_]+")
    return name


def generate_examples(
    cases: Sequence[Case], to_fields: Callable[[Sequence[ImageRow]], dict[str, Any]] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (case_id, example); per-image `fields` become lists (Sequence features).

    `to_fields` may replace the default stacking of `ImageRow.fields` (e.g. for nested dicts).
    """
    for c in cases:
        ex: dict[str, Any] = {
            "case_id": c.case_id,
            "patient_id": c.patient_id,
            "images": [os.fspath(r.path) for r in c.images],
            "image_ids": [r.image_id for r in c.images],
        }
        if to_fields is not None:
            ex.update(to_fields(c.images))
        else:
            for key in c.images[0].fields:
                ex[key] = [r.fields[key] for r in c.images]
        yield c.case_id, ex


def validate_case_images(cases: Sequence[Case], log: ProblemLog) -> list[Case]:
    """Decodes every image of `cases`; drops unusable images, then cases left without any."""
    validate_images([(r.path, r.file, r.row) for c in cases for r in c.images], log)
    out = []
    for c in cases:
        good = [r for r in c.images if not log.is_bad(r.file, r.row)]
        if good:
            out.append(dataclasses.replace(c, images=good))
    return out


# ----------------------------------------------------------------------------- overrides


def read_overrides(manual_dir: epath.Path, filename: str, allowed: Sequence[str]) -> dict[str, Any]:
    """Settings from an optional JSON file in the manual dir (e.g. `derm_csv.json`).

    Lets `medssl_jax.datasets.load(name, manual_dir=...)` build a custom layout without code.
    Unknown keys raise `BadInputError` naming the file and the valid keys.
    """
    path = manual_dir / filename
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}, row {e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise BadInputError(
            f"{path}: expected a JSON object of settings, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadInputError(f"{path}: unknown setting(s) {unknown}; valid: {sorted(allowed)}")
    return data


def split_counts(splits: Mapping[str, Sequence[Case]]) -> dict[str, dict[str, int]]:
    """Cases / images / patients per split, for logs and metadata."""
    return {
        name: {
            "cases": len(cs),
            "images": sum(len(c.images) for c in cs),
            "patients": len({c.patient_id for c in cs}),
        }
        for name, cs in splits.items()
    }


def list_files(root: epath.Path, keep: Callable[[str, str], bool], builder: str) -> list[str]:
    """Sorted relative posix paths of the files under `root` for which `keep(path, name)`;
    hidden files and folders (leading '.') are skipped. BadInputError naming `builder` if
    `root` is not a folder."""
    if not root.is_dir():
        raise BadInputError(f"{builder}: root folder not found: {root}")
    out = []
    base = str(root)
    for dirpath, dirnames, filenames in tf.io.gfile.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = posixpath.relpath(str(dirpath).replace("\\", "/"), base.replace("\\", "/"))
        for name in filenames:
            if name.startswith(".") or not keep(posixpath.join(str(dirpath), name), name):
                continue
            out.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(out)
