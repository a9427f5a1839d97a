"""Turn fine-tuning / linear-eval result folders into a Markdown report with PNG plots.

Usage: python -m medssl_jax.report DIR [DIR ...] [--out OUT_DIR] [--metric top1 ...]

Each DIR is a run folder holding `results.json` (schema: `ResultsJson`) or a sweep folder
searched recursively. The report has one table per (dataset, kind): rows init x label
fraction, columns metric per split as mean +- std over seeds (n = number of seeds), plus
label-efficiency curves, in-distribution vs shifted bars, and per-class ROC curves of the best
run of each init (read from the prediction CSVs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from medssl_jax import metrics, paths, plots, predictions
from medssl_jax.paths import Path  # epath: local, gs://, ...

__all__ = [
    "RESULTS_FILENAME",
    "ResultsError",
    "ResultsJson",
    "Run",
    "aggregate",
    "build_report",
    "load_runs",
    "main",
    "validate_results",
    "write_results",
]

RESULTS_FILENAME = "results.json"
KINDS = ("finetune", "linear_eval", "pretrain")
LABEL_KINDS = ("multiclass", "multilabel")
SHIFT_PREFIX = "test_"  # splits named test_* (e.g. test_shifted) are compared with "test"


class _ResultsRequired(TypedDict):
    kind: str  # one of KINDS
    name: str  # run name
    dataset: str  # e.g. "derm", "chexpert"
    label_kind: str  # one of LABEL_KINDS
    init: str  # pretraining used: "micle", "simclr", "scratch", "imagenet_simclr", ...
    label_fraction: float  # in (0, 1]
    seed: int
    step: int  # training step the metrics were taken at
    class_names: list[str]
    splits: dict[str, dict[str, float]]  # split -> metric name -> value


class ResultsJson(_ResultsRequired, total=False):
    """Schema of results.json written by fine-tuning / linear evaluation.

    `predictions` maps a split to its prediction CSV (see predictions.write_predictions_csv),
    relative to the results folder. Pretraining runs (kind == "pretrain") may carry other keys
    and are skipped by the report.
    """

    predictions: dict[str, str]


# field -> (accepted types, description) for the error messages.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "kind": ((str,), f"one of {KINDS}"),
    "name": ((str,), "run name"),
    "dataset": ((str,), "dataset name"),
    "label_kind": ((str,), f"one of {LABEL_KINDS}"),
    "init": ((str,), "pretraining used, e.g. 'micle'"),
    "label_fraction": ((int, float), "number in (0, 1]"),
    "seed": ((int,), "integer"),
    "step": ((int,), "integer >= 0"),
    "class_names": ((list,), "list of class names"),
    "splits": ((dict,), "object split -> {metric: number}"),
}


class ResultsError(ValueError):
    """A results.json (or a prediction CSV it names) is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One validated results.json and the folder it lives in."""

    source: Path  # the results.json file
    results: ResultsJson

    @property
    def folder(self) -> Path:
        return self.source.parent

    def metric(self, split: str, name: str) -> float | None:
        value = self.results["splits"].get(split, {}).get(name)
        return None if value is None or not math.isfinite(value) else float(value)


def validate_results(obj: object, source: str | os.PathLike) -> ResultsJson:
    """Check a parsed results.json against ResultsJson; errors name the file and the field."""
    if not isinstance(obj, dict):
        raise ResultsError(f"{source}: top level must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ResultsError(f"{source}: field 'kind' must be one of {KINDS}, got {kind!r}")
    if kind == "pretrain":
        return obj  # type: ignore[return-value]
    for field, (types, what) in _FIELDS.items():
        if field not in obj:
            raise ResultsError(f"{source}: missing field '{field}' ({what})")
        value = obj[field]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ResultsError(f"{source}: field '{field}' must be {what}, got {value!r}")
    if obj["label_kind"] not in LABEL_KINDS:
        raise ResultsError(f"{source}: field 'label_kind' must be one of {LABEL_KINDS}")
    if not 0 < obj["label_fraction"] <= 1:
        raise ResultsError(f"{source}: field 'label_fraction' must be in (0, 1]")
    names = obj["class_names"]
    if (
        not names
        or not all(isinstance(c, str) and c for c in names)
        or len(set(names)) != len(names)
    ):
        raise ResultsError(f"{source}: field 'class_names' must be unique non-empty strings")
    if not obj["splits"]:
        raise ResultsError(f"{source}: field 'splits' is empty")
    for split, values in obj["splits"].items():
        if not isinstance(values, dict):
            raise ResultsError(f"{source}: field 'splits.{split}' must be an object")
        for name, v in values.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ResultsError(f"{source}: field 'splits.{split}.{name}' must be a number")
    preds = obj.get("predictions", {})
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise ResultsError(f"{source}: field 'predictions' must map split -> CSV path")
    for split, rel in preds.items():
        if not (paths.path(source).parent / rel).is_file():
            raise ResultsError(f"{source}: field 'predictions.{split}': file {rel!r} not found")
    return obj  # type: ignore[return-value]


def write_results(folder: str | os.PathLike, results: ResultsJson) -> Path:
    """Validate and write `folder/results.json` (the writer side of the schema)."""
    path = paths.path(folder) / RESULTS_FILENAME
    validate_results(results, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic locally; object stores have no partial objects
    return path


def load_runs(dirs: Sequence[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """Find and validate every results.json under dirs; returns (runs, notes for the report)."""
    files: list[Path] = []
    for d in dirs:
        d = paths.path(d)
        if not d.is_dir():
            raise ResultsError(f"{d}: not a directory")
        found = sorted(
            paths.path(root) / RESULTS_FILENAME
            for root, _, names in d.walk()
            if RESULTS_FILENAME in names
        )
        if not found:
            raise ResultsError(f"{d}: no {RESULTS_FILENAME} found (searched recursively)")
        files.extend(found)
    notes: list[str] = []
    by_key: dict[tuple, Run] = {}
    for f in dict.fromkeys(_canonical(p) for p in files):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{f}: invalid JSON ({e})") from None
        res = validate_results(obj, f)
        if res["kind"] == "pretrain":
            notes.append(f"skipped pretraining run `{f}`")
            continue
        run = Run(f, res)
        key = (res["dataset"], res["kind"], res["init"], float(res["label_fraction"]), res["seed"])
        if key in by_key:
            old = by_key[key]
            keep, drop = (run, old) if res["step"] > old.results["step"] else (old, run)
            notes.append(f"duplicate run for {key}: kept `{keep.source}`, ignored `{drop.source}`")
            by_key[key] = keep
        else:
            by_key[key] = run
    runs = list(by_key.values())
    return runs, notes


def _canonical(p: Path) -> Path:
    """One name per file (symlinks and `..` resolved) for local paths; URLs as they are."""
    return p if paths.is_remote(p) else paths.path(os.path.realpath(p))


# ----------------------------------------------------------------------------- aggregation


def _stat(values: list[float]) -> plots.Stat:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def aggregate(runs: Sequence[Run], split: str, metric: str) -> dict[tuple[str, float], plots.Stat]:
    """(init, label_fraction) -> (mean, std over seeds (ddof=1), n) of one metric on one split."""
    acc: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        v = r.metric(split, metric)
        if v is not None:
            acc[(r.results["init"], float(r.results["label_fraction"]))].append(v)
    return {k: _stat(v) for k, v in acc.items()}


def _score(run: Run, split: str, metric: str) -> float:
    v = run.metric(split, metric)
    return -math.inf if v is None else v


def _split_order(splits: set[str]) -> list[str]:
    def key(s: str) -> tuple[int, str]:
        if s == "test":
            return 0, s
        if s.startswith(SHIFT_PREFIX):
            return 1, s
        return (2, s) if s in ("validation", "valid", "val") else (3, s)

    return sorted(splits, key=key)


def _fmt(stat: plots.Stat | None) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.4f} (n=1)" if n == 1 else f"{mean:.4f} ± {std:.4f} (n={n})"


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_")


def _roc_curves(run: Run, split: str) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """Per-class ROC curves of one run's prediction CSV (one-vs-rest or per condition)."""
    csv_path = run.folder / run.results["predictions"][split]
    try:
        pred = predictions.read_predictions_csv(csv_path)
    except ValueError as e:
        raise ResultsError(f"{run.source}: prediction CSV for split '{split}': {e}") from None
    if list(pred.class_names) != list(run.results["class_names"]):
        raise ResultsError(
            f"{run.source}: {csv_path} classes {pred.class_names} differ from class_names"
        )
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
    runs: list[Run], out_dir: Path, metric_names: Sequence[str] | None, written: list[Path]
) -> list[str]:
    """Markdown lines (table + plots) for runs sharing dataset, kind and label kind."""
    r0 = runs[0].results
    dataset, kind, label_kind = r0["dataset"], r0["kind"], r0["label_kind"]
    default = "top1" if label_kind == "multiclass" else "auc_mean"
    wanted = list(metric_names) if metric_names else [default]
    splits = _split_order({s for r in runs for s in r.results["splits"]})
    lines = [f"## {dataset} / {kind} ({label_kind})", ""]
    lines.append(f"{len(runs)} runs; cells are mean ± std over seeds (n = number of seeds).")
    lines.append("")
    cols = [(m, s) for m in wanted for s in splits]
    table = {c: aggregate(runs, c[1], c[0]) for c in cols}
    present = [c for c in cols if table[c]]
    missing = sorted({m for m in wanted} - {m for m, _ in present})
    if missing:
        lines += [f"Metric(s) not found in any split: {', '.join(missing)}.", ""]
    if not present:
        return lines
    rows = sorted({k for c in present for k in table[c]})
    lines.append("| init | label fraction | " + " | ".join(f"{s} {m}" for m, s in present) + " |")
    lines.append("|---|---:|" + "---:|" * len(present))
    for init, frac in rows:
        cells = [_fmt(table[c].get((init, frac))) for c in present]
        lines.append(f"| {init} | {frac:g} | " + " | ".join(cells) + " |")
    lines.append("")

    def add_png(name: str, caption: str) -> None:
        written.append(out_dir / name)
        lines.extend([f"![{caption}]({name})", ""])

    for m, s in present:
        series: dict[str, list] = defaultdict(list)
        for (init, frac), stat in table[(m, s)].items():
            series[init].append((frac, stat))
        name = _slug("label_efficiency", dataset, kind, s, m) + ".png"
        title = f"{dataset} {kind}: {m} on {s}"
        plots.plot_label_efficiency(out_dir / name, series, title=title, ylabel=m)
        add_png(name, f"label efficiency {m} {s}")

    shifted = [s for s in splits if s.startswith(SHIFT_PREFIX)]
    if "test" in splits and shifted:
        for m in wanted:
            values = {
                (init, frac, s): stat
                for s in ["test", *shifted]
                for (init, frac), stat in table.get((m, s), {}).items()
            }
            if not any(k[2] != "test" for k in values) or not any(k[2] == "test" for k in values):
                continue
            name = _slug("shift", dataset, kind, m) + ".png"
            title = f"{dataset} {kind}: {m}, in-distribution vs shifted"
            plots.plot_shift_bars(
                out_dir / name, values, splits=["test", *shifted], title=title, ylabel=m
            )
            add_png(name, f"in-distribution vs shifted {m}")

    pred_splits = _split_order({s for r in runs for s in r.results.get("predictions", {})})
    for s in pred_splits:
        panels = []
        for init in sorted({r.results["init"] for r in runs}):
            cands = [
                r
                for r in runs
                if r.results["init"] == init and s in r.results.get("predictions", {})
            ]
            if not cands:
                continue
            best = max(cands, key=lambda r, s=s: _score(r, s, wanted[0]))
            rb = best.results
            title = f"{init} (fraction {rb['label_fraction']:g}, seed {rb['seed']})"
            panels.append((title, _roc_curves(best, s)))
            best_value = _score(best, s, wanted[0])
            lines.append(
                f"- ROC `{s}` for {init}: run `{rb['name']}` (fraction "
                f"{rb['label_fraction']:g}, seed {rb['seed']}, {wanted[0]} = {best_value:.4f})"
            )
        lines.append("")
        name = _slug("roc", dataset, kind, s) + ".png"
        title = f"{dataset} {kind}: per-class ROC on {s}, best run (by {wanted[0]}) of each init"
        plots.plot_roc_panels(out_dir / name, panels, title=title)
        add_png(name, f"ROC curves {s}")
    return lines


def build_report(
    dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    metric_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write report.md and PNGs for the results under dirs; returns the paths written.

    metric_names defaults to top1 (multiclass) or auc_mean (multilabel) per group.
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
        lines += _group_section(groups[key], out, metric_names, written)
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
        help="metric to tabulate and plot (repeatable); default top1 or auc_mean",
    )
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.dirs, args.out, args.metric)
    except ResultsError as e:
        parser.error(str(e))
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
