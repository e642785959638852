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

from gold_ray.store import atomic_write_bytes


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
        (line,) = ax.plot(x, _nanmean_rows(grid), marker="o", label=f"{name} (n={len(runs)})")
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
