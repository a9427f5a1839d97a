"""PNG plots for the results report (matplotlib, object API on the Agg canvas, no pyplot).

Using `matplotlib.figure.Figure` directly keeps no global figure state and never needs a
display, so it is safe in headless jobs and in tests running in parallel.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medssl_jax import paths

__all__ = ["plot_attention", "plot_label_efficiency", "plot_roc_panels", "plot_shift_bars"]


class CellLike(Protocol):
    """A metric over seeds (`medssl_jax.report.Cell`): mean, sd, per-seed values, 95% CI."""

    mean: float
    std: float
    values: tuple[float, ...]
    ci: tuple[float, float] | None


def _yerr(cells: Sequence[CellLike]) -> np.ndarray:
    """[2, N] error bars: the CI where known, else +- the seeds' sd."""
    lo = [c.mean - (c.ci[0] if c.ci else c.mean - c.std) for c in cells]
    hi = [(c.ci[1] if c.ci else c.mean + c.std) - c.mean for c in cells]
    return np.maximum(np.array([lo, hi]), 0.0)


def _finish_axis(ax, chance: float | None, values: Sequence[float]) -> None:
    """Chance level drawn; a [0, 1] metric shown on its whole range (no zoom that makes a
    chance-level difference look large)."""
    if chance is not None:
        ax.axhline(chance, color="black", ls=":", lw=1.0, label=f"chance ({chance:.3f})")
    if all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(0.0, 1.0)


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """PNG bytes rendered in memory, then written through epath (local, gs://, ...)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    paths.path(path).write_bytes(buf.getvalue())


def plot_label_efficiency(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[tuple[float, CellLike]]],
    *,
    title: str,
    ylabel: str,
    chance: float | None = None,
) -> None:
    """Metric vs label fraction (log x), one line per init: error bars = 95% CI (sd over seeds
    where no CI), each seed a dot, the chance level dotted.

    series: init -> [(label_fraction, cell), ...].
    """
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    fractions: set[float] = set()
    shown: list[float] = []
    for i, (init, points) in enumerate(sorted(series.items())):
        pts = sorted(points, key=lambda p: p[0])
        x = np.array([p[0] for p in pts])
        cells = [p[1] for p in pts]
        mean = np.array([c.mean for c in cells])
        fractions.update(x.tolist())
        ax.errorbar(x, mean, yerr=_yerr(cells), marker="o", capsize=3, label=init, color=f"C{i}")
        for xi, c in zip(x, cells, strict=True):
            ax.scatter([xi] * len(c.values), c.values, s=8, color=f"C{i}", alpha=0.5)
            shown += [*c.values, *(c.ci or ())]
    _finish_axis(ax, chance, shown)
    ax.set_xscale("log")
    ticks = sorted(fractions)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("label fraction (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="init", fontsize=8)
    _save(fig, path)


def plot_roc_panels(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, np.ndarray, float]]]],
    *,
    title: str,
) -> None:
    """One subplot per panel (e.g. the best run of each init) with one ROC curve per class.

    panels: [(panel_title, [(class_name, fpr, tpr, auc), ...]), ...]. With many classes the
    legend is dropped and the panel title carries the mean AUC.
    """
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.3 * cols, 4.3 * rows + 0.4), layout="constrained")
    fig.suptitle(title, fontsize=10)
    for i, (panel_title, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, fpr, tpr, auc in curves:
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        mean_auc = float(np.mean([c[3] for c in curves])) if curves else float("nan")
        ax.set_title(f"{panel_title}\nmean AUC {mean_auc:.3f}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if 0 < len(curves) <= 12:
            ax.legend(fontsize=6, loc="lower right", title="class (AUC)", title_fontsize=6)
    _save(fig, path)


def plot_shift_bars(
    path: str | os.PathLike,
    values: Mapping[tuple[str, float, str], CellLike],
    *,
    splits: Sequence[str],
    title: str,
    ylabel: str,
    chance: Mapping[str, float | None] | None = None,
) -> None:
    """Grouped bars: one group per label fraction, one bar per (init, split), 95% CI error bars
    (sd where no CI), the chance level of the in-distribution split dotted.

    values: (init, label_fraction, split) -> cell; the first split is the in-distribution one
    (solid), later ones are shifted (hatched).
    """
    inits = sorted({k[0] for k in values})
    fractions = sorted({k[1] for k in values})
    fig = Figure(figsize=(max(6.0, 1.6 * len(fractions) * len(inits)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    n_bars = len(inits) * len(splits)
    width = 0.8 / n_bars
    colors = [f"C{i}" for i in range(len(inits))]
    hatches = ["", "//", "xx", "..", "\\\\"]
    for i, init in enumerate(inits):
        for j, split in enumerate(splits):
            offset = (i * len(splits) + j - (n_bars - 1) / 2) * width
            xs, cells = [], []
            for f_idx, frac in enumerate(fractions):
                if (init, frac, split) in values:
                    xs.append(f_idx + offset)
                    cells.append(values[(init, frac, split)])
            ax.bar(
                xs,
                [c.mean for c in cells],
                width=width,
                yerr=_yerr(cells) if cells else None,
                capsize=2,
                color=colors[i],
                hatch=hatches[j % len(hatches)],
                edgecolor="black",
                linewidth=0.5,
                label=f"{init} / {split}",
            )
    shown = [v for c in values.values() for v in (*c.values, *(c.ci or ()))]
    _finish_axis(ax, (chance or {}).get(splits[0]), shown)
    ax.set_xticks(range(len(fractions)))
    ax.set_xticklabels([f"{f:g}" for f in fractions])
    ax.set_xlabel("label fraction")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=max(1, len(inits)))
    _save(fig, path)


def plot_attention(
    path: str | os.PathLike,
    rows: Sequence[tuple[str, Mapping[str, float]]],
    *,
    title: str,
) -> None:
    """DVME: stacked horizontal bars, one per run group, of the mean attention each encoder
    receives (a distribution: the bars end at 1; the dotted line is uniform attention).

    rows: [(label, {encoder: weight}), ...].
    """
    encoders = sorted({e for _, w in rows for e in w})
    fig = Figure(figsize=(6.5, 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(rows))
    for i, enc in enumerate(encoders):
        widths = np.array([w.get(enc, 0.0) for _, w in rows])
        ax.barh(range(len(rows)), widths, left=left, color=f"C{i}", label=enc, edgecolor="white")
        left += widths
    for k in range(1, len(encoders)):
        ax.axvline(k / len(encoders), color="black", ls=":", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean attention received (per example, averaged over the split)")
    ax.set_title(title, fontsize=10)
    ax.legend(
        fontsize=7, ncols=max(1, len(encoders)), loc="upper center", bbox_to_anchor=(0.5, -0.35)
    )
    _save(fig, path)
