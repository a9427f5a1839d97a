"""Per-example prediction CSVs: case id, image id, patient id, label(s), one probability per class.

No identifiers beyond the dataset's own case, image and patient ids are written (the patient id
is what confidence intervals resample: `medssl_jax.confidence`). `read_predictions_csv`
reads them back exactly (for reports and ROC curves) with errors naming file, row and column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np

from medssl_jax import paths
from medssl_jax.metrics import _class_keys, _finite_2d, _int_labels

__all__ = [
    "Predictions",
    "join_process_shards",
    "read_predictions_csv",
    "shard_name",
    "write_predictions_csv",
]


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Contents of a prediction CSV.

    labels: int [N] (multiclass, -1 where masked) or float [N, K] (multilabel, 0 where
    masked); label_mask: bool, same shape as labels; scores: float64 [N, K] probabilities.
    patient_ids: from the CSV's patient_id column; files written before it existed fall back
    to the case ids, and `patients_from_cases` says so.
    """

    case_ids: list[str]
    image_ids: list[str]
    patient_ids: list[str]
    patients_from_cases: bool
    labels: np.ndarray
    label_mask: np.ndarray
    scores: np.ndarray
    class_names: tuple[str, ...]

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


def _as_str_ids(name: str, ids: Sequence, n: int) -> list[str]:
    out = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in np.asarray(ids).tolist()]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries, expected {n}")
    return out


def write_predictions_csv(
    path: str | os.PathLike,
    *,
    case_ids: Sequence,
    image_ids: Sequence,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    label_mask: np.ndarray | None = None,
    patient_ids: Sequence | None = None,
) -> None:
    """Write one row per example: case_id, image_id, [patient_id], label column(s), score/<class>.

    Multiclass: labels int [N] -> one 'label' column (class index). Multilabel: labels [N, K]
    -> 'label/<class>' columns. Entries with label_mask == 0 are left empty. scores are
    probabilities [N, K] written at full (shortest round-trip) precision; no other identifiers
    are written.
    """
    raw = np.asarray(scores)
    scores = _finite_2d("scores", raw)
    n, k = scores.shape
    names = _class_keys(class_names, k)
    if np.any((scores < 0) | (scores > 1)):
        r, c = np.argwhere((scores < 0) | (scores > 1))[0]
        raise ValueError(f"scores[{r}, {c}] = {scores[r, c]} is not a probability in [0, 1]")
    labels = np.asarray(labels)
    multilabel = labels.ndim == 2
    if labels.shape != ((n, k) if multilabel else (n,)):
        raise ValueError(f"labels must have shape ({n},) or {(n, k)}, got {labels.shape}")
    mask = np.ones(labels.shape, bool) if label_mask is None else np.asarray(label_mask)
    if mask.shape != labels.shape:
        raise ValueError(f"label_mask shape {mask.shape} must match labels shape {labels.shape}")
    mask = mask.astype(bool)
    case_ids = _as_str_ids("case_ids", case_ids, n)
    image_ids = _as_str_ids("image_ids", image_ids, n)
    ids = [case_ids, image_ids]
    if patient_ids is not None:
        ids.append(_as_str_ids("patient_ids", patient_ids, n))
    if multilabel:
        lab = labels.astype(np.float64)
        if not np.all(np.isfinite(lab[mask])):
            raise ValueError("multilabel labels must be finite where label_mask == 1")
        label_txt = [
            [format(v, "g") if m else "" for v, m in zip(row, mrow, strict=True)]
            for row, mrow in zip(lab.tolist(), mask.tolist(), strict=True)
        ]
        header = [f"label/{c}" for c in names]
    else:
        ok = _int_labels("labels (unmasked rows)", labels[mask], int(mask.sum()), k)
        lab = np.full((n,), -1, np.int64)
        lab[mask] = ok
        label_txt = [
            [str(v) if m else ""] for v, m in zip(lab.tolist(), mask.tolist(), strict=True)
        ]
        header = ["label"]
    id_cols = ["case_id", "image_id"] + (["patient_id"] if patient_ids is not None else [])
    header = id_cols + header + [f"score/{c}" for c in names]
    # Shortest text that round-trips the scores' own float dtype (float32 stays short).
    dtype = raw.dtype if raw.dtype in (np.float32, np.float64) else np.float64
    score_txt = scores.astype(dtype).astype(str)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for i in range(n):
        w.writerow([*(col[i] for col in ids), *label_txt[i], *score_txt[i].tolist()])
    paths.path(path).write_bytes(buf.getvalue().encode("utf-8"))  # local, gs://, ...


def shard_name(name: str, process_index: int, process_count: int) -> str:
    """The file one process writes its own rows of `name` to (`name` itself with one process)."""
    return name if process_count == 1 else name.replace(".csv", f".p{process_index}.csv")


def join_process_shards(
    folder: str | os.PathLike, names: Sequence[str], process_count: int
) -> None:
    """With several processes, each wrote its rows of every CSV in `names` to `shard_name`;
    once all have, process 0 joins them (in process order) into `names` and removes the shards:
    the report's patient-bootstrap CIs need the whole split in one file. Every process calls it."""
    if process_count == 1 or not names:
        return
    from medssl_jax import sharding

    def join() -> None:
        folder_ = paths.path(folder)
        for name in names:
            shards = [folder_ / shard_name(name, i, process_count) for i in range(process_count)]
            texts = [s.read_text(encoding="utf-8").splitlines(keepends=True) for s in shards]
            for s, t in zip(shards[1:], texts[1:], strict=True):
                if t[:1] != texts[0][:1]:
                    raise ValueError(f"{s}: header differs from {shards[0]}'s")
            rows = [line for t in texts for line in t[1:]]
            (folder_ / name).write_text("".join(texts[0][:1] + rows), encoding="utf-8")
            for s in shards:
                s.unlink()

    sharding.barrier("prediction shards written")
    sharding.first_then_others("join the prediction CSVs", join, others=lambda: None)


def read_predictions_csv(path: str | os.PathLike) -> Predictions:
    """Read a CSV written by write_predictions_csv; errors name the file, row and column."""
    path = paths.path(path)
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))
    if not rows:
        raise ValueError(f"{path}: empty predictions file (no header)")
    header = rows[0]
    if header[:2] != ["case_id", "image_id"]:
        raise ValueError(f"{path}: header must start with case_id,image_id, got {header[:2]}")
    score_cols = [i for i, h in enumerate(header) if h.startswith("score/")]
    label_cols = [i for i, h in enumerate(header) if h == "label" or h.startswith("label/")]
    names = tuple(header[i][len("score/") :] for i in score_cols)
    if not names:
        raise ValueError(f"{path}: no score/<class> columns in header")
    multilabel = header[label_cols[0]] != "label" if label_cols else False
    if multilabel:
        label_names = tuple(header[i][len("label/") :] for i in label_cols)
        if label_names != names:
            raise ValueError(f"{path}: label columns {label_names} differ from scores {names}")
    elif len(label_cols) != 1:
        raise ValueError(f"{path}: expected one 'label' column or label/<class> columns")
    with_patients = len(header) > 2 and header[2] == "patient_id"
    n_ids = 3 if with_patients else 2
    if len(label_cols) + len(score_cols) + n_ids != len(header):
        raise ValueError(f"{path}: unexpected columns in header {header}")
    body = rows[1:]
    n, k = len(body), len(names)
    scores = np.zeros((n, k), np.float64)
    labels = np.zeros((n, k), np.float64) if multilabel else np.full((n,), -1, np.int64)
    mask = np.zeros(labels.shape, bool)

    def parse(row_no: int, col: int, text: str, kind: type):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(
                f"{path}: row {row_no}, column {header[col]!r}: cannot parse {text!r}"
            ) from None

    for r, row in enumerate(body):
        row_no = r + 2  # 1-based file line, header is line 1
        if len(row) != len(header):
            raise ValueError(
                f"{path}: row {row_no} has {len(row)} fields, header has {len(header)}"
            )
        for j, col in enumerate(score_cols):
            scores[r, j] = parse(row_no, col, row[col], float)
        for j, col in enumerate(label_cols):
            if row[col] == "":
                continue
            if multilabel:
                labels[r, j] = parse(row_no, col, row[col], float)
                mask[r, j] = True
            else:
                labels[r] = parse(row_no, col, row[col], int)
                mask[r] = True
    case_ids = [row[0] for row in body]
    if with_patients:
        empty = [r + 2 for r, row in enumerate(body) if not row[2]]
        if empty:
            raise ValueError(f"{path}: row {empty[0]}, column 'patient_id': empty")
    return Predictions(
        case_ids=case_ids,
        image_ids=[row[1] for row in body],
        patient_ids=[row[2] for row in body] if with_patients else case_ids,
        patients_from_cases=not with_patients,
        labels=labels,
        label_mask=mask,
        scores=scores,
        class_names=names,
    )
