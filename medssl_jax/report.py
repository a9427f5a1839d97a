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
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medssl_jax import metrics, paths, plots
from medssl_jax.paths import Path  # epath: local, gs://, ...
from medssl_jax.report_cells import (  # noqa: F401 (Cell and aggregate are public here too)
    Cell,
    PredictionCache,
    aggregate,
    chance_level,
    format_cell,
    with_ci,
)
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


def _roc_curves(run: Run, split: str, preds: PredictionCache | None = None):
    """Per-class ROC curves [(class, fpr, tpr, auc)] of one run's prediction CSV."""
    pred = (preds or PredictionCache()).get(run, split)
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
    preds = PredictionCache()
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
        table[(m, s)] = with_ci(aggregate(runs, s, m), runs, s, m, preds, replicates, notes)
    present = [c for c in cols if table[c]]
    for s in sorted({s for _, s in present} & {r.results.get("selected_on") for r in runs}):
        notes.add(
            f"checkpoints were chosen on {s}: its numbers are optimistic, report another split"
        )
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
        cells = [format_cell(table[c].get((init, frac))) for c in present]
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
    # labelled test split.
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
        lines.append(
            f"| {init} | " + " | ".join(format_cell(cells.get((init, f))) for f in fracs) + " |"
        )
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
