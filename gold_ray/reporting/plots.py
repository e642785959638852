"""Small plotting helpers (matplotlib, no display needed): one function per figure or axes.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so
nothing touches matplotlib's global state or needs a GUI backend: saving renders with Agg. Each
``plot_*`` function draws onto an ``Axes`` it is given, so a report can lay out its own figures
and reuse them.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gold_ray.run.store import atomic_write_bytes


def new_figure(ncols: int = 1, *, width: float = 5.5, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    """A figure with ``ncols`` axes side by side.

    Args:
        ncols: Number of axes.
        width: Width of one axes' column, in inches.
        height: Figure height, in inches.

    Returns:
        The figure and its axes, left to right.
    """
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> None:
    """Render ``fig`` as PNG (Agg) and write it atomically to ``path``.

    Args:
        fig: The figure.
        path: Target file.
        dpi: Resolution.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buf.getvalue())


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def plot_metric_curves(
    ax: Axes,
    curves: Mapping[str, Sequence[Sequence[float | None]]],
    *,
    metric: str = "accuracy",
    reference: float | None = None,
    reference_label: str = "teacher few-shot",
) -> None:
    """One line per name: the mean over its runs of a metric per iteration, each run faint behind it.

    Args:
        ax: Where to draw.
        curves: Name (e.g. strategy) to a list of runs, each a list of per-iteration values
            (None where an iteration has no value).
        metric: The metric's name, for the y label.
        reference: A constant to draw as a dashed horizontal line (e.g. the teacher's own score).
        reference_label: Legend label of ``reference``.
    """
    for name, runs in curves.items():
        runs = [r for r in runs if len(r)]
        if not runs:
            continue
        width = max(len(r) for r in runs)
        grid = np.full((len(runs), width), math.nan)
        for i, r in enumerate(runs):
            grid[i, : len(r)] = _finite(r)
        x = np.arange(1, width + 1)
        (line,) = ax.plot(x, _nanmean_rows(grid), marker="o", label=f"{name} ({len(runs)} run{'' if len(runs) == 1 else 's'})")
        if len(runs) > 1:
            for row in grid:
                ax.plot(x, row, color=line.get_color(), alpha=0.25, linewidth=1)
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"{reference_label} ({reference:.3f})")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"student {metric} (eval set)")
    ax.set_title(f"{metric} per iteration")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.has_data():
        ax.legend(fontsize="small")


def _nanmean_rows(grid: np.ndarray) -> np.ndarray:
    counts = np.isfinite(grid).sum(axis=0)
    sums = np.where(np.isfinite(grid), grid, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def plot_score_distributions(
    ax: Axes,
    scores: Mapping[str, Sequence[float] | np.ndarray],
    *,
    score_name: str = "energy",
    bins: int = 40,
    title: str | None = None,
) -> None:
    """Overlaid density histograms of a score, one per name, on shared bins.

    Args:
        ax: Where to draw.
        scores: Name to its scores (non-finite values are ignored; empty entries are skipped).
        score_name: The score's name, for the x label.
        bins: Number of shared bins.
        title: Axes title; default names the score.
    """
    clean = {name: np.asarray(v, dtype=float) for name, v in scores.items()}
    clean = {name: v[np.isfinite(v)] for name, v in clean.items()}
    clean = {name: v for name, v in clean.items() if v.size}
    if clean:
        pooled = np.concatenate(list(clean.values()))
        lo, hi = float(pooled.min()), float(pooled.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for name, v in clean.items():
            ax.hist(v, bins=edges, density=True, histtype="step", linewidth=1.5,
                    label=f"{name} (n={v.size}, median {np.median(v):.2f})")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{score_name} (higher = more out-of-distribution)")
    ax.set_ylabel("density")
    ax.set_title(title or f"{score_name} of accepted data")


# ---- run report figures (gold_ray.reporting.report) ------------------------------------------------


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure as PNG bytes (Agg; no display, no pyplot state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def grid_figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    """A figure with a ``nrows`` x ``ncols`` grid of axes (always a 2-D array), each ``width`` x ``height`` inches."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def mark_empty(ax: Axes, text: str) -> None:
    """Write ``text`` in the middle of an axes that has nothing to plot, without ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_iteration_series(ax: Axes, series: dict[str, list[float | None]], *, ylabel: str, title: str,
                          final: dict[str, float] | None = None) -> None:
    """Lines over iterations 1..n, one per name, with each name's final value as a star after them."""
    n = 0
    for name, values in series.items():
        y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
        if not np.isfinite(y).any():
            continue
        n = max(n, len(y))
        (line,) = ax.plot(np.arange(1, len(y) + 1), y, marker="o", label=name)
        value = (final or {}).get(name)
        if value is not None and math.isfinite(value):
            ax.plot([len(y) + 1], [value], marker="*", markersize=14, color=line.get_color(), linestyle="none")
    for name, value in (final or {}).items():
        if name not in series and value is not None and math.isfinite(value):
            ax.plot([n + 1], [value], marker="*", markersize=14, linestyle="none", label=f"{name}")
    if not ax.has_data():
        mark_empty(ax, "no values yet")
        ax.set_title(title)
        return
    ticks = list(range(1, n + 2 if final else n + 1))
    ax.set_xticks(ticks, [str(t) if t <= n else "final" for t in ticks])
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_energy_band(ax: Axes, scores: np.ndarray, *, band: tuple[float, float], selected: np.ndarray | None = None,
                     score_name: str = "energy", title: str = "") -> None:
    """A histogram of OOD scores with the feedback band (rank quantiles ``band``) shaded.

    Args:
        ax: Where to draw.
        scores: The probes' scores (non-finite values are ignored).
        band: The band as rank quantiles, e.g. ``(0.5, 0.8)``.
        selected: Scores of the probes picked as feedback, drawn as a rug.
        score_name: The score's name, for the x label.
        title: Axes title.
    """
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    ax.set_title(title)
    if s.size == 0:
        mark_empty(ax, "no scored probes")
        return
    ax.hist(s, bins=min(30, max(5, s.size // 2)), color="#8da0cb", edgecolor="white")
    lo, hi = (float(np.quantile(s, q)) for q in band)
    ax.axvspan(lo, hi if hi > lo else lo + 1e-9, color="#fc8d62", alpha=0.3,
               label=f"feedback band (rank {band[0]:.0%}-{band[1]:.0%})")
    if selected is not None and np.isfinite(selected).any():
        sel = np.asarray(selected, dtype=float)
        sel = sel[np.isfinite(sel)]
        ax.plot(sel, np.zeros_like(sel), "|", color="#d62728", markersize=16, markeredgewidth=2,
                label=f"picked as feedback ({sel.size})")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_xlabel(f"{score_name} (higher = more out-of-distribution)")
    ax.set_ylabel("probes")
    ax.legend(fontsize="x-small")


def plot_stacked_bars(ax: Axes, counts: dict[str, dict[str, float]], *, xlabel: str, ylabel: str, title: str,
                      horizontal: bool = False) -> None:
    """Bars per category (outer keys), stacked by series (inner keys)."""
    ax.set_title(title)
    cats = list(counts)
    series = sorted({k for inner in counts.values() for k in inner})
    if not cats or not series or not any(v for inner in counts.values() for v in inner.values()):
        mark_empty(ax, "nothing to show")
        return
    pos = np.arange(len(cats))
    base = np.zeros(len(cats))
    for name in series:
        values = np.array([float(counts[c].get(name, 0) or 0) for c in cats])
        if horizontal:
            ax.barh(pos, values, left=base, label=name)
        else:
            ax.bar(pos, values, bottom=base, label=name)
        base += values
    if horizontal:
        ax.set_yticks(pos, cats)
        ax.set_xlabel(ylabel)
        ax.set_ylabel(xlabel)
        ax.invert_yaxis()
    else:
        ax.set_xticks(pos, cats)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")


def plot_grouped_bars(ax: Axes, counts: dict[str, dict[str, float]], *, ylabel: str, title: str) -> None:
    """Bars per category (outer keys) side by side per series (inner keys), e.g. two runs."""
    ax.set_title(title)
    cats = list(counts)
    series = list(dict.fromkeys(k for inner in counts.values() for k in inner))
    if not cats or not series:
        mark_empty(ax, "nothing to show")
        return
    width = 0.8 / len(series)
    pos = np.arange(len(cats))
    for i, name in enumerate(series):
        ax.bar(pos + i * width - 0.4 + width / 2, [float(counts[c].get(name, 0) or 0) for c in cats], width,
               label=name)
    ax.set_xticks(pos, cats, rotation=20 if len(cats) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
