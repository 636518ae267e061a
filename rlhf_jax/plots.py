"""PNG plots of training curves and pass@k curves (matplotlib, Agg canvas, no pyplot state).

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so importing
this module never changes the user's matplotlib backend and works without a display.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter


def _as_runs(metrics_rows) -> dict[str, Sequence[Mapping]]:
    """A list of rows is one unnamed run; a dict maps run name -> rows (overlaid)."""
    if isinstance(metrics_rows, Mapping):
        return dict(metrics_rows)
    return {"": list(metrics_rows)}


def finite_series(rows: Sequence[Mapping], key: str, x_key: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for rows holding a finite numeric `key`, sorted by x."""
    xs, ys = [], []
    for row in rows:
        value, x = row.get(key), row.get(x_key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or x is None:
            continue
        if math.isfinite(value):
            xs.append(float(x))
            ys.append(float(value))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(ys)[order]


def _save(figure: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return path


def plot_curves(metrics_rows, keys: Sequence[str], path: str | os.PathLike,
                title: str | None = None, *, x_key: str = "step", columns: int = 3) -> str:
    """One subplot per metric key (e.g. loss, reward, KL) against `x_key`; returns `path`.

    Args:
      metrics_rows: rows as read by `read_metrics` (dicts with `step` and metric values), or
        a dict run name -> rows to overlay several runs in each subplot.
      keys: metric names, one subplot each; a key with no finite values shows "no data".
      path: output PNG file (its directory is created).
      title: figure title.
      x_key: the row field used as the x axis.
      columns: subplots per row.
    """
    return _save(curves_figure(metrics_rows, keys, title, x_key=x_key, columns=columns), path)


def curves_figure(metrics_rows, keys: Sequence[str], title: str | None = None, *,
                  x_key: str = "step", columns: int = 3) -> Figure:
    """The figure `plot_curves` saves (same arguments, no path)."""
    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves: `keys` must name at least one metric")
    if columns < 1:
        raise ValueError(f"plot_curves: columns must be >= 1, got {columns}")
    runs = _as_runs(metrics_rows)
    ncols = min(columns, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    figure = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for axis, key in zip(axes, keys):
        drawn = False
        for index, (name, rows) in enumerate(runs.items()):  # a run keeps its colour in every subplot
            x, y = finite_series(rows, key, x_key)
            if x.size:
                axis.plot(x, y, marker="." if x.size < 30 else None, label=name or None,
                          color=f"C{index % 10}")
                drawn = True
        if not drawn:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(key)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
        if drawn and len(runs) > 1:
            axis.legend(fontsize="small")
    for axis in axes[len(keys):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    return figure


def plot_pass_at_k(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   path: str | os.PathLike, title: str | None = "pass@k") -> str:
    """pass@k against k on a log2 x axis, one line per model; returns `path`.

    Args:
      curves: model name -> (ks, pass@k values), e.g. from `pass_at_k_curve`.
      path: output PNG file.
      title: axis title.
    """
    if not curves:
        raise ValueError("plot_pass_at_k: `curves` is empty")
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    axis = figure.subplots()
    for name, (ks, values) in curves.items():
        ks, values = np.asarray(ks, dtype=float), np.asarray(values, dtype=float)
        if ks.shape != values.shape or ks.ndim != 1:
            raise ValueError(f"plot_pass_at_k: curve `{name}` needs 1-D ks and values of equal "
                             f"length, got {ks.shape} and {values.shape}")
        if np.any(ks < 1):
            raise ValueError(f"plot_pass_at_k: curve `{name}` has k < 1")
        axis.plot(ks, values, marker="o", markersize=3, label=name)
    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4, ... rather than 2^k
    axis.set_xlabel("k (samples per problem)")
    axis.set_ylabel("pass@k")
    axis.set_ylim(0.0, 1.02)
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    if title:
        axis.set_title(title)
    return _save(figure, path)
