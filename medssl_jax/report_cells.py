"""The report's table cells: a metric over seeds per (initialisation, label fraction), its
patient-bootstrap CI from the runs' prediction CSVs, the chance level, and the cell's text."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medssl_jax import confidence, predictions
from medssl_jax.results import ResultsError, Run

__all__ = ["Cell", "PredictionCache", "aggregate", "chance_level", "format_cell", "with_ci"]


# ----------------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell: a metric on a split for one (init, label fraction) over its seeds."""

    mean: float
    std: float  # over seeds (ddof=1); 0 for one seed
    values: tuple[float, ...]  # one per seed
    ci: tuple[float, float] | None = None  # 95% patient-bootstrap CI of the seed-mean

    @property
    def n(self) -> int:
        return len(self.values)


def aggregate(runs: Sequence[Run], split: str, metric: str) -> dict[tuple[str, float], Cell]:
    """(init, label_fraction) -> Cell (mean and sd over seeds, no CI) of one metric on a split."""
    acc: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r.results["seed"]):
        v = r.metric(split, metric)
        if v is not None:
            acc[(r.results["init"], float(r.results["label_fraction"]))].append(v)
    return {k: _cell(v) for k, v in acc.items()}


def _cell(values: list[float], ci: tuple[float, float] | None = None) -> Cell:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return Cell(float(arr.mean()), std, tuple(float(v) for v in arr), ci)


class PredictionCache:
    """Prediction CSVs read once per report (several metrics and plots use each)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], predictions.Predictions] = {}

    def get(self, run: Run, split: str) -> predictions.Predictions | None:
        rel = run.results.get("predictions", {}).get(split)
        if rel is None:
            return None
        key = (str(run.source), split)
        if key not in self._cache:
            csv_path = run.folder / rel
            try:
                pred = predictions.read_predictions_csv(csv_path)
            except ValueError as e:
                raise ResultsError(
                    f"{run.source}: prediction CSV for split '{split}': {e}"
                ) from None
            if list(pred.class_names) != list(run.results["class_names"]):
                raise ResultsError(
                    f"{run.source}: {csv_path} classes {pred.class_names} differ from class_names"
                )
            self._cache[key] = pred
        return self._cache[key]


def with_ci(
    cells: dict[tuple[str, float], Cell],
    runs: Sequence[Run],
    split: str,
    metric: str,
    preds: PredictionCache,
    replicates: int,
    notes: set[str],
) -> dict[tuple[str, float], Cell]:
    """The cells with their patient-bootstrap CI, where every seed has a prediction CSV."""
    if replicates <= 0 or not confidence.supports(metric):
        return cells
    out = {}
    for key, cell in cells.items():
        members = [
            r
            for r in runs
            if (r.results["init"], float(r.results["label_fraction"])) == key
            and r.metric(split, metric) is not None
        ]
        loaded = [preds.get(r, split) for r in members]
        ci = None
        if loaded and any(p is None for p in loaded):
            notes.add(
                f"no CI for {metric} on {split} ({key[0]}, {key[1]:g}): a seed has no "
                "prediction CSV for it"
            )
        if loaded and all(p is not None for p in loaded):
            if any(p.patients_from_cases for p in loaded):
                notes.add(
                    "some prediction CSVs have no patient_id column: their CIs resample cases"
                )
            try:
                point, lo, hi = confidence.bootstrap_ci(loaded, metric, num_replicates=replicates)
                ci = (lo, hi) if math.isfinite(lo) else None
                if ci is None:
                    notes.add(
                        f"no CI for {metric} on {split} ({key[0]}, {key[1]:g}): fewer than "
                        f"{confidence.MIN_PATIENTS} patients, or the metric is undefined in most "
                        "bootstrap replicates (a class too rare)"
                    )
                if abs(point - cell.mean) > 1e-3:
                    notes.add(
                        f"{metric} on {split} ({key[0]}, {key[1]:g}): the prediction CSVs give "
                        f"{point:.4f}, results.json {cell.mean:.4f}; the CI is the CSVs'"
                    )
            except ValueError as e:
                notes.add(f"no CI for {metric} on {split} ({key[0]}, {key[1]:g}): {e}")
        out[key] = dataclasses.replace(cell, ci=ci)
    return out


def chance_level(
    runs: Sequence[Run], split: str, metric: str, preds: PredictionCache
) -> float | None:
    """What a model without information scores: AUC 0.5, kappa 0, balanced accuracy 1 / classes
    present, top-1 the majority-class rate of the split (labels of any run's predictions)."""
    if metric == "auc_mean" or metric.startswith("auc/"):
        return 0.5
    if metric == "kappa_quadratic":
        return 0.0
    for r in runs:
        p = preds.get(r, split)
        if p is None:
            continue
        if p.multilabel:
            if metric != "accuracy":
                return None
            y, m = p.labels > 0.5, p.label_mask
            pos = (y & m).sum(0)
            return float(np.maximum(pos, m.sum(0) - pos).sum() / m.sum())
        counts = np.bincount(p.labels[p.label_mask], minlength=len(p.class_names))
        if metric == "top1":
            return float(counts.max() / counts.sum())
        if metric == "balanced_accuracy":
            return 1.0 / int((counts > 0).sum())
        return None
    if metric == "top1":
        found = [r.metric(split, "majority_top1") for r in runs]
        found = [v for v in found if v is not None]
        return found[0] if found else None
    return None


def _decimals(cell: Cell) -> int:
    """Down to the first significant digit of the CI half-width (2-4 decimals)."""
    if cell.ci is None:
        return 3
    half = (cell.ci[1] - cell.ci[0]) / 2
    return 4 if half <= 0 else int(min(4, max(2, -math.floor(math.log10(half)))))


def format_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    d = _decimals(cell)
    text = f"{cell.mean:.{d}f}"
    if cell.ci is not None:
        text += f" [{cell.ci[0]:.{d}f}, {cell.ci[1]:.{d}f}]"
    return text + (f"; sd {cell.std:.{d}f} (n={cell.n})" if cell.n > 1 else " (n=1)")
