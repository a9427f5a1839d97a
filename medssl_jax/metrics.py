"""Evaluation metrics on gathered host-side predictions (NumPy only, no scikit-learn).

Used after the predictions of a whole split have been gathered to the host: softmax
(multi-class) and sigmoid (multi-label, CheXpert-style masked) metrics, ROC AUC with
sklearn-compatible tie handling, quadratic-weighted Cohen's kappa and expected calibration
error. Prediction CSVs live in `medssl_jax.predictions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "balanced_accuracy",
    "cohen_kappa_quadratic",
    "expected_calibration_error",
    "roc_auc",
    "roc_curve",
    "sigmoid_metrics",
    "softmax_metrics",
    "top_k_accuracy",
]


# ----------------------------------------------------------------------------- validation


def _finite_2d(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, K] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name} has a non-finite value at row {bad[0]}, class {bad[1]}")
    return x


def _int_labels(name: str, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{name}[{bad[0]}] = {labels[bad[0]]} is outside [0, {num_classes}) "
            f"({bad.size} bad rows)"
        )
    return labels.astype(np.int64)


def _class_keys(class_names: Sequence[str] | None, k: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} entries but the logits have {k} classes")
    if len(set(names)) != k:
        raise ValueError(f"class_names must be unique, got {names}")
    return names


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # stable in both tails
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def probabilities(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    """float64 [N, K] sigmoid (multi-label) or softmax (multi-class) probabilities of logits.

    In float64, so a confident score stays below 1: in float32 every sigmoid of a logit above
    ~16.6 is exactly 1.0, and a confident error then ties with the confident hits.
    """
    logits = np.asarray(logits, np.float64)
    return _sigmoid(logits) if multilabel else np.exp(_log_softmax(logits))


# ----------------------------------------------------------------------------- ROC


def _binary_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"scores has a non-finite value at index {np.flatnonzero(~np.isfinite(scores))[0]}"
        )
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:10]}")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(
            "ROC AUC is undefined: labels contain a single class "
            f"({int(labels.sum())} positives of {labels.size})"
        )
    return scores, labels


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given their average rank (like scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary ROC AUC (Mann-Whitney U with average ranks; ties count 1/2 like sklearn).

    Raises ValueError when labels hold a single class (AUC undefined).
    """
    scores, labels = _binary_inputs(scores, labels)
    ranks = _average_ranks(scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds), same points as sklearn.metrics.roc_curve.

    thresholds are decreasing and start with +inf (the point (0, 0)); drop_intermediate
    removes collinear points.
    """
    scores, labels = _binary_inputs(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = labels[order].astype(np.float64)
    threshold_idx = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[threshold_idx]
    fps = 1 + threshold_idx - tps
    thresholds = s[threshold_idx]
    if drop_intermediate and tps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


# ----------------------------------------------------------------------------- other metrics


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores.

    Ties are broken towards the lower class index (the np.argmax convention), so k=1 equals
    mean(argmax == label).
    """
    logits = _finite_2d("logits", logits)
    n, num_classes = logits.shape
    labels = _int_labels("labels", labels, n, num_classes)
    if not 1 <= k <= num_classes:
        raise ValueError(f"k={k} must be in [1, {num_classes}]")
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [N, k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def balanced_accuracy(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in `label` (int [N] each).

    Unlike top-1 it does not reward predicting the majority class: that scores 1 / (number of
    classes present), as does any constant prediction.
    """
    pred = _int_labels("pred", pred, np.asarray(pred).size, num_classes)
    label = _int_labels("label", label, pred.size, num_classes)
    if label.size == 0:
        raise ValueError("balanced_accuracy: no labels")
    hits = np.bincount(label[pred == label], minlength=num_classes)
    counts = np.bincount(label, minlength=num_classes)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def cohen_kappa_quadratic(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Quadratic-weighted Cohen's kappa of integer grades in [0, num_classes).

    Weights are (i - j)^2 on the grade values (all num_classes grades, even absent ones).
    Returns NaN when the expected disagreement is zero (e.g. a single grade everywhere).
    """
    pred = np.asarray(pred)
    n = pred.shape[0] if pred.ndim == 1 else -1
    if pred.ndim != 1 or n == 0:
        raise ValueError(f"pred must be a non-empty 1-D array, got shape {pred.shape}")
    pred = _int_labels("pred", pred, n, num_classes)
    label = _int_labels("label", label, n, num_classes)
    observed = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(observed, (label, pred), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / n
    grades = np.arange(num_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    denom = float(np.sum(weights * expected))
    if denom == 0.0:
        return float("nan")
    return float(1.0 - np.sum(weights * observed) / denom)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Expected calibration error with num_bins equal-width bins (lo, hi] over [0, 1].

    probs [N, K] with integer labels [N]: confidence = max prob, outcome = (argmax == label).
    probs [N] with labels [N] in [0, 1]: confidence = probs, outcome = labels (e.g. the
    probability of a positive finding and its 0/1 label, or a confidence and a correct flag).
    ECE = sum_b (n_b / N) * |mean(outcome)_b - mean(confidence)_b|.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2:
        probs = _finite_2d("probs", probs)
        labels = _int_labels("labels", labels, probs.shape[0], probs.shape[1])
        conf = probs.max(axis=1)
        outcome = (np.argmax(probs, axis=1) == labels).astype(np.float64)
    elif probs.ndim == 1:
        conf = probs
        outcome = np.asarray(labels, dtype=np.float64)
        if outcome.shape != conf.shape:
            raise ValueError(f"labels shape {outcome.shape} must match probs shape {conf.shape}")
        if np.any((outcome < 0) | (outcome > 1)) or not np.all(np.isfinite(outcome)):
            raise ValueError("with 1-D probs, labels must be outcomes in [0, 1]")
    else:
        raise ValueError(f"probs must be [N, K] or [N], got shape {probs.shape}")
    if conf.size == 0:
        raise ValueError("expected_calibration_error needs at least one example")
    if not np.all(np.isfinite(conf)) or np.any((conf < 0) | (conf > 1 + 1e-6)):
        raise ValueError("probabilities must be finite and in [0, 1]")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # searchsorted(side='left') - 1 puts c into bin i with edges[i] < c <= edges[i+1].
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    conf_sum = np.bincount(bins, weights=conf, minlength=num_bins)
    out_sum = np.bincount(bins, weights=outcome, minlength=num_bins)
    return float(np.sum(np.abs(out_sum - conf_sum)) / conf.size)


# ----------------------------------------------------------------------------- split metrics


def softmax_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    graded: bool = False,
    num_bins: int = 15,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Multi-class metrics of a whole split from logits [N, K] and integer labels [N].

    Keys: loss (mean softmax cross-entropy), top1, balanced_accuracy (mean per-class recall),
    majority_top1 (the top-1 of always predicting the split's most frequent class: the chance
    level to read top1 against), top3 (when K >= 3), auc/<class> (one-vs-rest on softmax
    probabilities, only for classes with both label values present), auc_mean,
    auc_num_skipped, ece, num_examples, and kappa_quadratic when graded=True (ordinal labels).
    """
    logits = _finite_2d("logits", logits)
    n, k = logits.shape
    labels = _int_labels("labels", labels, n, k)
    keys = _class_keys(class_names, k)
    log_probs = _log_softmax(logits)
    probs = np.exp(log_probs)
    out: dict[str, float] = {
        "num_examples": float(n),
        "loss": float(-np.mean(log_probs[np.arange(n), labels])),
        "top1": top_k_accuracy(logits, labels, 1),
        "balanced_accuracy": balanced_accuracy(np.argmax(logits, axis=1), labels, k),
        "majority_top1": float(np.bincount(labels, minlength=k).max() / n),
    }
    if k >= 3:
        out["top3"] = top_k_accuracy(logits, labels, 3)
    aucs = []
    for c, key in enumerate(keys):
        is_c = labels == c
        if is_c.all() or not is_c.any():
            continue
        out[f"auc/{key}"] = roc_auc(probs[:, c], is_c)
        aucs.append(out[f"auc/{key}"])
    out["auc_mean"] = float(np.mean(aucs)) if aucs else float("nan")
    out["auc_num_skipped"] = float(k - len(aucs))
    out["ece"] = expected_calibration_error(probs, labels, num_bins)
    if graded:
        out["kappa_quadratic"] = cohen_kappa_quadratic(np.argmax(logits, axis=1), labels, k)
    return out


def sigmoid_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    class_names: Sequence[str] | None = None,
    num_bins: int = 15,
    ece: bool = True,
) -> dict[str, float]:
    """Multi-label metrics (e.g. CheXpert) from logits [N, K], 0/1 labels [N, K], mask [N, K].

    Only entries with mask == 1 count (labels elsewhere may be anything, e.g. -1 = uncertain).
    Keys: loss (masked mean sigmoid BCE), accuracy (masked, at probability 0.5), auc/<class>
    and ece/<class> over that class's valid examples, auc_mean / ece_mean over classes with
    both label values, auc_num_skipped, num_examples, num_labels (valid entries).
    """
    logits = _finite_2d("logits", logits)
    n, k = logits.shape
    labels = np.asarray(labels, dtype=np.float64)
    if labels.shape != (n, k):
        raise ValueError(f"labels must have shape {(n, k)}, got {labels.shape}")
    if mask is None:
        valid = np.ones((n, k), dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != (n, k):
            raise ValueError(f"mask must have shape {(n, k)}, got {mask.shape}")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"mask must be 0/1, got values {np.unique(mask)[:10]}")
        valid = mask.astype(bool)
    bad = np.argwhere(valid & ~((labels == 0) | (labels == 1)))
    if bad.size:
        r, c = bad[0]
        raise ValueError(f"labels[{r}, {c}] = {labels[r, c]} must be 0 or 1 where mask == 1")
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("sigmoid_metrics: the mask leaves no valid label")
    keys = _class_keys(class_names, k)
    y = np.where(valid, labels, 0.0)
    # BCE with logits: max(x, 0) - x*y + log(1 + exp(-|x|)).
    bce = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
    probs = _sigmoid(logits)
    correct = (logits > 0) == (y > 0.5)
    out: dict[str, float] = {
        "num_examples": float(n),
        "num_labels": float(num_valid),
        "loss": float(np.sum(bce * valid) / num_valid),
        "accuracy": float(np.sum(correct & valid) / num_valid),
    }
    aucs, eces = [], []
    for c, key in enumerate(keys):
        v = valid[:, c]
        yc = y[v, c]
        if yc.size == 0 or yc.all() or not yc.any():
            continue
        out[f"auc/{key}"] = roc_auc(probs[v, c], yc)
        aucs.append(out[f"auc/{key}"])
        if ece:
            out[f"ece/{key}"] = expected_calibration_error(probs[v, c], yc, num_bins)
            eces.append(out[f"ece/{key}"])
    out["auc_mean"] = float(np.mean(aucs)) if aucs else float("nan")
    out["auc_num_skipped"] = float(k - len(aucs))
    if ece:
        out["ece_mean"] = float(np.mean(eces)) if eces else float("nan")
    return out
