"""The report's figures as PNG files (matplotlib, no pyplot: no display, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

from evomerge.files import atomic_write
from evomerge.report.spec import Bars, Figure, Heatmap, Panel, Scatter

MARKERS = {"circle": "o", "circle-open": "o", "diamond": "D", "square": "s", "triangle-up": "^", "triangle-down": "v", "x": "x",
           "star": "*", "cross": "P"}
DRAWSTYLES = {"": "default", "hv": "steps-post", "vh": "steps-pre"}
PANEL_WIDTH_IN = {1: 10.0, 2: 6.0, 3: 4.8}
DPI = 110


def write_png(figure: Figure, path: Path) -> Path:
    """Draw ``figure`` into ``path`` (written through a temporary sibling)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    cols, rows = figure.columns, figure.rows
    heights = [max(p.height for p in figure.panels[r * cols:(r + 1) * cols]) / 90 for r in range(rows)]
    width = PANEL_WIDTH_IN.get(cols, 4.5) * cols
    fig = MplFigure(figsize=(width, sum(heights) + 1.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(figure.title, fontsize=13, fontweight="bold")
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"height_ratios": heights})
    legend: dict[str, object] = {}
    for index, panel in enumerate(figure.panels):
        _draw_panel(fig, axes[index // cols][index % cols], panel, legend)
    for index in range(len(figure.panels), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(4, len(legend)),
                   fontsize=9, frameon=False)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return Path(path)


def _draw_panel(fig, ax, panel: Panel, legend: dict) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.x_label)
    ax.set_ylabel(panel.y_label)
    for trace in panel.traces:
        if isinstance(trace, Scatter):
            _scatter(ax, trace, legend)
        elif isinstance(trace, Heatmap):
            _heatmap(fig, ax, trace)
        elif isinstance(trace, Bars):
            _bars(ax, trace, legend)
        else:
            raise TypeError(f"cannot draw {type(trace).__name__}")
    if panel.same_range:
        values = [v for t in panel.traces if isinstance(t, Scatter) for v in t.x + t.y if not math.isnan(v)]
        ax.set_xlim(min(values), max(values))
        ax.set_ylim(min(values), max(values))
        ax.set_aspect("equal", adjustable="box")
    low, high = ax.get_xlim()
    for text in ax.texts:  # labels near the right edge go to the left of their point
        if hasattr(text, "xyann") and text.xy[0] > low + 0.75 * (high - low):
            text.set_horizontalalignment("right")
            text.xyann = (-text.xyann[0], text.xyann[1])
    if not any(isinstance(t, Heatmap) for t in panel.traces):
        ax.locator_params(nbins=6)
        ax.grid(True, color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)


def _scatter(ax, trace: Scatter, legend: dict) -> None:
    marker = MARKERS.get(trace.symbol, "o")
    if "lines" in trace.mode:
        (handle,) = ax.plot(trace.x, trace.y, color=trace.color, linestyle="--" if trace.dash else "-",
                            drawstyle=DRAWSTYLES[trace.step], linewidth=1.6,
                            marker=marker if "markers" in trace.mode else None, markersize=trace.size * 0.7)
    elif trace.symbol.endswith("-open"):  # a ring around points drawn before
        handle = ax.scatter(trace.x, trace.y, marker=marker, s=(trace.size * 0.85) ** 2, facecolors="none",
                            edgecolors=trace.color, linewidths=1.6, zorder=4)
    else:
        handle = ax.scatter(trace.x, trace.y, color=trace.color, marker=marker, s=(trace.size * 0.85) ** 2,
                            edgecolors="white" if marker not in ("x", "+") else None, linewidths=0.5, zorder=3)
    for i, (x, y, text) in enumerate(zip(trace.x, trace.y, trace.labels or [])):
        # above and below in turn, so labels of close points (two baselines) do not overprint
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -11), fontsize=7,
                    color="#333")
    if trace.legend and trace.name not in legend:
        legend[trace.name] = handle


def _heatmap(fig, ax, trace: Heatmap) -> None:
    import numpy as np

    z = np.array(trace.z, dtype=float)
    image = ax.imshow(np.ma.masked_invalid(z), aspect="auto", cmap="viridis", vmin=trace.zmin, vmax=trace.zmax,
                      interpolation="nearest")
    ax.set_xticks(range(len(trace.columns)), trace.columns, fontsize=8,
                  rotation=90 if len(trace.columns) > 12 else 0)
    ax.set_yticks(range(len(trace.rows)), trace.rows, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01)
    if trace.annotate:
        middle = (trace.zmin + trace.zmax) / 2
        for (r, c), value in np.ndenumerate(z):
            if not math.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > middle else "white")


def _bars(ax, trace: Bars, legend: dict) -> None:
    bottom = [0.0] * len(trace.x)
    width = 0.8 * min((b - a for a, b in zip(trace.x, trace.x[1:]) if b > a), default=1)
    for name, heights in trace.stacks.items():
        if not any(heights):
            continue
        handle = ax.bar(trace.x, heights, bottom=bottom, width=width, color=trace.colors.get(name), label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
        legend.setdefault(name, handle)
