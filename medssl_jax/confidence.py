"""95% confidence intervals by bootstrapping PATIENTS, not images.

Images of one patient are not independent (follow-ups, several views, one lesion photographed
twice), so resampling images understates the uncertainty. Each bootstrap replicate draws as
many patients as the split has, with replacement, and takes all images of every drawn patient
(a patient drawn twice counts twice). Runs that share a split (the seeds of one table cell)
use the SAME drawn patients per replicate, so the interval is that of their seed-mean; the
spread over seeds is reported separately. Intervals are percentile intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medssl_jax import metrics
from medssl_jax.predictions import Predictions

__all__ = [
    "CI_METRICS",
    "bootstrap_ci",
    "metric_from_predictions",
    "patient_counts",
    "replicate_values",
    "supports",
]

# Metrics computable from a prediction CSV (probabilities + labels); also 'auc/<class>'.
CI_METRICS = ("top1", "balanced_accuracy", "auc_mean", "kappa_quadratic", "accuracy")


def supports(name: str) -> bool:
    """Whether `metric_from_predictions` can compute this metric (hence get a CI)."""
    return name in CI_METRICS or name.startswith("auc/")


def _auc_or_nan(scores: np.ndarray, y: np.ndarray) -> float:
    return metrics.roc_auc(scores, y) if 0 < y.sum() < y.size else float("nan")


def metric_from_predictions(pred: Predictions, name: str, rows: np.ndarray | None = None) -> float:
    """One metric of a prediction CSV's rows (all rows, or an index array with repeats).

    Multiclass: top1, balanced_accuracy, auc_mean (one-vs-rest over classes with both label
    values), auc/<class>, kappa_quadratic. Multilabel: auc_mean and auc/<class> over each
    class's valid (masked) entries, accuracy at probability 0.5. NaN where undefined.

    The means (auc_mean, balanced_accuracy) are over the classes defined on ALL rows of
    `pred`, as the point estimate is. A resample (`rows`) that lacks one of them is NaN,
    not a mean over fewer classes: that would be a different, usually easier, quantity.
    """
    if not supports(name):
        raise ValueError(f"no bootstrap for metric {name!r}; supported: {CI_METRICS}, auc/<c>")
    idx = np.arange(len(pred.case_ids)) if rows is None else np.asarray(rows)
    scores, labels, mask = pred.scores[idx], pred.labels[idx], pred.label_mask[idx]
    k = scores.shape[1]
    classes = list(pred.class_names)
    if name.startswith("auc/") and name[4:] not in classes:
        raise ValueError(f"metric {name!r}: no class {name[4:]!r} in {classes}")
    if pred.multilabel:
        if name in ("top1", "balanced_accuracy", "kappa_quadratic"):
            raise ValueError(f"metric {name!r} is for multi-class predictions")

        def auc(c: int) -> float:
            v = mask[:, c]
            return _auc_or_nan(scores[v, c], labels[v, c] > 0.5)

        if name == "accuracy":
            return float(np.mean(((scores > 0.5) == (labels > 0.5))[mask]))
    else:
        if name == "accuracy":
            raise ValueError("metric 'accuracy' is for multi-label predictions; use top1")
        scores, labels = scores[mask], labels[mask]
        if labels.size == 0:
            return float("nan")
        top = np.argmax(scores, axis=1)
        if name == "top1":
            return float(np.mean(top == labels))
        if name == "balanced_accuracy":
            whole = pred.labels[pred.label_mask]
            if rows is not None and not np.array_equal(_present(labels, k), _present(whole, k)):
                return float("nan")
            return metrics.balanced_accuracy(top, labels, k)
        if name == "kappa_quadratic":
            return metrics.cohen_kappa_quadratic(top, labels, k)

        def auc(c: int) -> float:
            return _auc_or_nan(scores[:, c], labels == c)

    if name.startswith("auc/"):
        return auc(classes.index(name[4:]))
    values = np.array([auc(c) for c in range(k)])
    defined = np.isfinite(values)
    if rows is not None and np.any(defined != _auc_defined(pred)):
        return float("nan")
    return float(np.mean(values[defined])) if defined.any() else float("nan")


def _present(labels: np.ndarray, k: int) -> np.ndarray:
    """bool [K]: the classes among integer `labels`."""
    return np.bincount(labels.astype(np.int64), minlength=k) > 0


def _auc_defined(pred: Predictions) -> np.ndarray:
    """bool [K]: classes whose one-vs-rest AUC is defined (both label values among valid
    rows) on the whole prediction: the classes auc_mean averages over."""
    k = len(pred.class_names)
    if pred.multilabel:
        pos = np.array([(pred.labels[pred.label_mask[:, c], c] > 0.5).sum() for c in range(k)])
        n = pred.label_mask.sum(axis=0)
    else:
        labels = pred.labels[pred.label_mask].astype(np.int64)
        pos, n = np.bincount(labels, minlength=k), np.full(k, labels.size)
    return (pos > 0) & (pos < n)


def patient_counts(num_patients: int, num_replicates: int, seed: int) -> np.ndarray:
    """int [B, P]: how often each patient is drawn in each replicate (P draws with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_patients, size=(num_replicates, num_patients))
    return np.stack([np.bincount(d, minlength=num_patients) for d in draws])


def _patient_index(pred: Predictions, patients: dict[str, int]) -> np.ndarray:
    return np.array([patients[p] for p in pred.patient_ids], np.int64)


def replicate_values(
    preds: Sequence[Predictions], name: str, counts: np.ndarray, patients: Sequence[str]
) -> np.ndarray:
    """float [B]: the metric averaged over `preds` (e.g. seeds) on each replicate's patients.

    counts: int [B, P] from `patient_counts`; patients: the P patient ids it indexes. Row i of
    a prediction enters a replicate counts[b, patient(i)] times.
    """
    lookup = {p: j for j, p in enumerate(patients)}
    idx = []
    for p in preds:
        missing = sorted(set(p.patient_ids) - lookup.keys())
        if missing:
            raise ValueError(f"patients {missing[:3]} of a prediction are not in `patients`")
        idx.append(_patient_index(p, lookup))
    out = np.empty(counts.shape[0])
    for b, c in enumerate(counts):
        vals = []
        for p, pi in zip(preds, idx, strict=True):
            rows = np.repeat(np.arange(pi.size), c[pi])
            vals.append(metric_from_predictions(p, name, rows) if rows.size else float("nan"))
        out[b] = np.mean(vals)
    return out


def _patients(preds: Sequence[Predictions], what: str) -> list[str]:
    """The patients every prediction covers (one split), sorted; raises if they differ."""
    if not preds:
        raise ValueError(f"{what}: no predictions")
    sets = [set(p.patient_ids) for p in preds]
    if any(s != sets[0] for s in sets[1:]):
        raise ValueError(
            f"{what}: the predictions cover different patients; they must be one split"
        )
    return sorted(sets[0])


# Fewer patients than this give no interval: resampling 1-9 patients has a handful of
# distinct outcomes (one patient: a zero-width "interval"), which no percentile makes a CI.
MIN_PATIENTS = 10


def _interval(
    point: float, values: np.ndarray, num_replicates: int, level: float, num_patients: int
) -> tuple[float, float, float]:
    """(point, low, high): the percentile interval of the finite replicate values; NaN bounds
    when more than half of the replicates are undefined (e.g. a class absent) or there are
    fewer than MIN_PATIENTS patients."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = values[np.isfinite(values)]
    if values.size < num_replicates / 2 or num_patients < MIN_PATIENTS:
        return point, float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return point, float(low), float(high)


def _seed_mean(preds: Sequence[Predictions], name: str) -> float:
    return float(np.mean([metric_from_predictions(p, name) for p in preds]))


def bootstrap_ci(
    preds: Sequence[Predictions],
    name: str,
    *,
    num_replicates: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(point, low, high): the seed-mean metric and its patient-bootstrap percentile interval.

    All `preds` must hold predictions of the same split (same patients). Replicates where the
    metric is undefined (e.g. a class absent) are dropped; NaN bounds if more than half are,
    or with fewer than MIN_PATIENTS patients.
    """
    patients = _patients(preds, "bootstrap_ci")
    counts = patient_counts(len(patients), num_replicates, seed)
    values = replicate_values(preds, name, counts, patients)
    return _interval(_seed_mean(preds, name), values, num_replicates, level, len(patients))


def paired_difference_ci(
    preds_a: Sequence[Predictions],
    preds_b: Sequence[Predictions],
    name: str,
    *,
    num_replicates: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(point, low, high) of seed-mean(a) - seed-mean(b) on the same split, each replicate
    drawing ONE set of patients for both: the interval of a difference between two models,
    which is narrower than comparing their separate intervals (the patients are shared)."""
    if not preds_a or not preds_b:
        raise ValueError("paired_difference_ci: no predictions")
    patients = _patients([*preds_a, *preds_b], "paired_difference_ci")
    counts = patient_counts(len(patients), num_replicates, seed)
    diff = replicate_values(preds_a, name, counts, patients) - replicate_values(
        preds_b, name, counts, patients
    )
    point = _seed_mean(preds_a, name) - _seed_mean(preds_b, name)
    return _interval(point, diff, num_replicates, level, len(patients))
