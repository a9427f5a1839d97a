"""Turn fine-tuning / linear-eval result folders into a Markdown report with PNG plots.

Usage: python -m medssl_jax.report DIR [DIR ...] [--out OUT_DIR] [--metric top1 ...]

Each DIR is a run folder holding `results.json` (schema: `medssl_jax.results`) or a sweep
folder searched recursively. One table per (dataset, kind): rows init x label fraction (plus
the chance level), columns metric per split. A cell is the mean over seeds, its 95% confidence
interval from resampling PATIENTS of the prediction CSVs (`medssl_jax.confidence`), and the
spread over seeds (sd, n). Plots: label-efficiency curves and in-distribution vs shifted bars
with CI error bars, the seeds as dots and the chance level drawn; per-class ROC curves of one
run per init, chosen on the VALIDATION split (nothing anywhere is chosen on a test split).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medssl_jax import confidence, metrics, paths, plots, predictions
from medssl_jax.paths import Path  # epath: local, gs://, ...
from medssl_jax.results import (  # noqa: F401 (the report's public names)
    RESULTS_FILENAME,
    SHIFT_PREFIX,
    ResultsError,
    ResultsJson,
    Run,
    load_runs,
    validate_results,
    write_results,
)

__all__ = [
    "Cell",
    "aggregate",
    "build_report",
    "choose_run",
    "default_metrics",
    "main",
]

VALIDATION_SPLITS = ("validation", "valid", "val")


def default_metrics(label_kind: str) -> list[str]:
    """Top-1 never alone: on imbalanced sets (HAM10000 is 67% one class) it hides a model that
    predicts the majority class, which balanced accuracy and AUC expose."""
    return ["top1", "balanced_accuracy", "auc_mean"] if label_kind == "multiclass" else ["auc_mean"]


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


class _Predictions:
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


def _with_ci(
    cells: dict[tuple[str, float], Cell],
    runs: Sequence[Run],
    split: str,
    metric: str,
    preds: _Predictions,
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
        if loaded and all(p is not None for p in loaded):
            if any(p.patients_from_cases for p in loaded):
                notes.add(
                    "some prediction CSVs have no patient_id column: their CIs resample cases"
                )
            try:
                point, lo, hi = confidence.bootstrap_ci(loaded, metric, num_replicates=replicates)
                ci = (lo, hi) if math.isfinite(lo) else None
                if abs(point - cell.mean) > 1e-3:
                    notes.add(
                        f"{metric} on {split} ({key[0]}, {key[1]:g}): the prediction CSVs give "
                        f"{point:.4f}, results.json {cell.mean:.4f}; the CI is the CSVs'"
                    )
            except ValueError as e:
                notes.add(f"no CI for {metric} on {split} ({key[0]}, {key[1]:g}): {e}")
        out[key] = dataclasses.replace(cell, ci=ci)
    return out


def chance_level(runs: Sequence[Run], split: str, metric: str, preds: _Predictions) -> float | None:
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


def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    d = _decimals(cell)
    text = f"{cell.mean:.{d}f}"
    if cell.ci is not None:
        text += f" [{cell.ci[0]:.{d}f}, {cell.ci[1]:.{d}f}]"
    return text + (f"; sd {cell.std:.{d}f} (n={cell.n})" if cell.n > 1 else " (n=1)")


def _split_order(splits: set[str]) -> list[str]:
    def key(s: str) -> tuple[int, str]:
        if s == "test":
            return 0, s
        if s.startswith(SHIFT_PREFIX):
            return 1, s
        return (2, s) if s in VALIDATION_SPLITS else (3, s)

    return sorted(splits, key=key)


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_")


def choose_run(cands: Sequence[Run], metric_order: Sequence[str]) -> tuple[Run, str]:
    """One run to show (e.g. ROC curves): the best on the validation split by the first metric
    of `metric_order` that some candidate has there, ties to the lower seed; without any
    validation score, the largest label fraction's lowest seed (fixed in advance). Never looks
    at a test split. Returns (run, how it was chosen)."""
    for metric in metric_order:
        for split in VALIDATION_SPLITS:
            scored = [r for r in cands if r.metric(split, metric) is not None]
            if scored:
                best = max(scored, key=lambda r: (r.metric(split, metric), -r.results["seed"]))
                return best, f"best {split} {metric} = {best.metric(split, metric):.4f}"
    first = min(cands, key=lambda r: (-float(r.results["label_fraction"]), r.results["seed"]))
    return first, "no validation score: largest label fraction, lowest seed"


def _roc_curves(run: Run, split: str, preds: _Predictions | None = None):
    """Per-class ROC curves [(class, fpr, tpr, auc)] of one run's prediction CSV."""
    pred = (preds or _Predictions()).get(run, split)
    if pred is None:
        raise ResultsError(f"{run.source}: no prediction CSV for split '{split}'")
    curves = []
    for c, name in enumerate(pred.class_names):
        if pred.multilabel:
            valid = pred.label_mask[:, c]
            y = pred.labels[valid, c]
        else:
            valid = pred.label_mask
            y = (pred.labels[valid] == c).astype(np.float64)
        if y.size == 0 or y.min() == y.max():
            continue  # AUC undefined for a single label value
        s = pred.scores[valid, c]
        fpr, tpr, _ = metrics.roc_curve(s, y)
        curves.append((name, fpr, tpr, metrics.roc_auc(s, y)))
    return curves


# ----------------------------------------------------------------------------- report


def _group_section(
    runs: list[Run],
    out_dir: Path,
    metric_names: Sequence[str] | None,
    written: list[Path],
    replicates: int,
) -> list[str]:
    """Markdown lines (table + plots) for runs sharing dataset, kind and label kind."""
    r0 = runs[0].results
    dataset, kind, label_kind = r0["dataset"], r0["kind"], r0["label_kind"]
    wanted = list(metric_names) if metric_names else default_metrics(label_kind)
    splits = _split_order({s for r in runs for s in r.results["splits"]})
    preds = _Predictions()
    notes: set[str] = set()
    lines = [f"## {dataset} / {kind} ({label_kind})", ""]
    lines.append(
        f"{len(runs)} runs. A cell is the mean over seeds, [its 95% CI from resampling "
        f"patients ({replicates} replicates)], and the seeds' sd (n = number of seeds)."
    )
    lines.append("")
    cols = [(m, s) for m in wanted for s in splits]
    table = {}
    for m, s in cols:
        table[(m, s)] = _with_ci(aggregate(runs, s, m), runs, s, m, preds, replicates, notes)
    present = [c for c in cols if table[c]]
    missing = sorted(set(wanted) - {m for m, _ in present})
    if missing:
        lines += [f"Metric(s) not found in any split: {', '.join(missing)}.", ""]
    if not present:
        return lines
    chance = {c: chance_level(runs, c[1], c[0], preds) for c in present}
    rows = sorted({k for c in present for k in table[c]})
    lines.append("| init | label fraction | " + " | ".join(f"{s} {m}" for m, s in present) + " |")
    lines.append("|---|---:|" + "---:|" * len(present))
    for init, frac in rows:
        cells = [_fmt(table[c].get((init, frac))) for c in present]
        lines.append(f"| {init} | {frac:g} | " + " | ".join(cells) + " |")
    lines.append(
        "| chance | – | "
        + " | ".join("–" if chance[c] is None else f"{chance[c]:.3f}" for c in present)
        + " |"
    )
    lines.append("")
    lines += [f"- {n}" for n in sorted(notes)] + ([""] if notes else [])
    lines += _subset_table(table, chance, present, splits)

    def add_png(name: str, caption: str) -> None:
        written.append(out_dir / name)
        lines.extend([f"![{caption}]({name})", ""])

    for m, s in present:
        series: dict[str, list] = defaultdict(list)
        for (init, frac), cell in table[(m, s)].items():
            series[init].append((frac, cell))
        name = _slug("label_efficiency", dataset, kind, s, m) + ".png"
        title = f"{dataset} {kind}: {m} on {s}"
        plots.plot_label_efficiency(
            out_dir / name, series, title=title, ylabel=m, chance=chance[(m, s)]
        )
        add_png(name, f"label efficiency {m} {s}")

    shifted = [s for s in splits if s.startswith(SHIFT_PREFIX)]
    # In-distribution reference: the test split, or validation where the dataset has no
    # labelled test split (CheXpert's official validation set is the one reported).
    ref = "test" if "test" in splits else next((s for s in VALIDATION_SPLITS if s in splits), "")
    if ref and shifted:
        for m in wanted:
            values = {
                (init, frac, s): cell
                for s in [ref, *shifted]
                for (init, frac), cell in table.get((m, s), {}).items()
            }
            if not any(k[2] != ref for k in values) or not any(k[2] == ref for k in values):
                continue
            name = _slug("shift", dataset, kind, m) + ".png"
            title = f"{dataset} {kind}: {m}, in-distribution vs shifted"
            plots.plot_shift_bars(
                out_dir / name,
                values,
                splits=[ref, *shifted],
                title=title,
                ylabel=m,
                chance={s: chance.get((m, s)) for s in [ref, *shifted]},
            )
            add_png(name, f"in-distribution vs shifted {m}")

    lines += _attention_section(runs, dataset, kind, out_dir, written)
    # What the runs' checkpoints were chosen by, then the defaults (older results lack it).
    chosen_by = [r.results.get("selection_metric") for r in runs]
    select_on = [m for m in dict.fromkeys(chosen_by) if m]
    select_on += ["balanced_accuracy", "auc_mean", "top1"]
    pred_splits = _split_order({s for r in runs for s in r.results.get("predictions", {})})
    for s in pred_splits:
        panels = []
        for init in sorted({r.results["init"] for r in runs}):
            cands = [r for r in runs if r.results["init"] == init and preds.get(r, s) is not None]
            if not cands:
                continue
            best, why = choose_run(cands, select_on)
            rb = best.results
            title = f"{init} (fraction {rb['label_fraction']:g}, seed {rb['seed']})"
            panels.append((title, _roc_curves(best, s, preds)))
            lines.append(
                f"- ROC `{s}` for {init}: run `{rb['name']}` (fraction "
                f"{rb['label_fraction']:g}, seed {rb['seed']}; {why})"
            )
        lines.append("")
        name = _slug("roc", dataset, kind, s) + ".png"
        title = f"{dataset} {kind}: per-class ROC on {s}, one run per init (chosen on validation)"
        plots.plot_roc_panels(out_dir / name, panels, title=title)
        add_png(name, f"ROC curves {s}")
    return lines


def _subset_table(
    table: dict, chance: dict, present: list[tuple[str, str]], splits: list[str]
) -> list[str]:
    """The paper's layout (Truong et al.): rows = initialisation, columns = label subsets, for
    the first metric on the first reported split (test, else validation)."""
    test_like = [s for s in splits if s == "test" or s in VALIDATION_SPLITS]
    if not test_like:
        return []
    key = next((c for c in present if c[1] == test_like[0]), None)
    if key is None:
        return []
    cells = table[key]
    fracs = sorted({f for _, f in cells})
    if len(fracs) < 2:
        return []
    m, s = key
    lines = [f"### {m} on {s} by label subset (rows: initialisation)", ""]
    lines.append("| init | " + " | ".join(f"{f:g} of labels" for f in fracs) + " |")
    lines.append("|---|" + "---:|" * len(fracs))
    for init in sorted({i for i, _ in cells}):
        lines.append(f"| {init} | " + " | ".join(_fmt(cells.get((init, f))) for f in fracs) + " |")
    if chance.get(key) is not None:
        lines.append("| chance | " + " | ".join(f"{chance[key]:.3f}" for _ in fracs) + " |")
    return lines + [""]


def _attention_section(
    runs: list[Run], dataset: str, kind: str, out_dir: Path, written: list[Path]
) -> list[str]:
    """DVME runs: the mean attention each encoder receives, per split, averaged over seeds."""
    acc: dict[tuple[str, float, str], list[dict[str, float]]] = defaultdict(list)
    for r in runs:
        for split, w in r.results.get("dvme", {}).get("mean_encoder_weights", {}).items():
            if len(w) < 2:  # one encoder (a probe): attention is trivially 1
                continue
            acc[(r.results["init"], float(r.results["label_fraction"]), split)].append(w)
    if not acc:
        return []
    lines = ["### DVME: attention each encoder receives", ""]
    lines.append("| init | label fraction | split | mean attention (over seeds) |")
    lines.append("|---|---:|---|---|")
    rows = []
    for init, frac, split in sorted(acc, key=lambda k: (k[0], k[1], _split_order({k[2]}))):
        ws = acc[(init, frac, split)]
        mean = {
            e: float(np.mean([w.get(e, 0.0) for w in ws]))
            for e in sorted({e for w in ws for e in w})
        }
        text = ", ".join(f"{e} {v:.3f}" for e, v in mean.items())
        lines.append(f"| {init} | {frac:g} | {split} | {text} (n={len(ws)}) |")
        rows.append((f"{init} {frac:g} {split}", mean))
    lines.append("")
    name = _slug("dvme_attention", dataset, kind) + ".png"
    plots.plot_attention(
        out_dir / name, rows, title=f"{dataset} {kind}: DVME attention per encoder"
    )
    written.append(out_dir / name)
    return lines + [f"![DVME attention]({name})", ""]


def build_report(
    dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    metric_names: Sequence[str] | None = None,
    *,
    bootstrap: int = 1000,
) -> list[Path]:
    """Write report.md and PNGs for the results under dirs; returns the paths written.

    metric_names defaults to `default_metrics(label_kind)` per group; bootstrap is the number
    of patient-resampling replicates per CI (0: no CIs).
    """
    runs, notes = load_runs(dirs)
    out = paths.path(out_dir if out_dir is not None else dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# Results report", ""]
    lines.append(f"{len(runs)} runs from: " + ", ".join(f"`{d}`" for d in dirs))
    lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.results["dataset"], r.results["kind"], r.results["label_kind"])].append(r)
    for key in sorted(groups):
        lines += _group_section(groups[key], out, metric_names, written, bootstrap)
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return [report, *written]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the paths written."""
    parser = argparse.ArgumentParser(
        prog="python -m medssl_jax.report",
        description="Markdown table + PNG plots from fine-tuning results.json folders.",
    )
    parser.add_argument("dirs", nargs="+", help="run folders or sweep folders (recursive)")
    parser.add_argument("--out", default=None, help="output folder (default: first DIR)")
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric to tabulate and plot (repeatable); default top1, balanced_accuracy and "
        "auc_mean (multi-class) or auc_mean (multi-label)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="patient-resampling replicates per 95%% CI (0: no CIs)",
    )
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.dirs, args.out, args.metric, bootstrap=args.bootstrap)
    except ResultsError as e:
        parser.error(str(e))
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
