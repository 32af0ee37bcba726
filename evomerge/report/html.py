"""The report page: one self-contained HTML file, plotly.js inlined, interactive figures, no network."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from evomerge.files import write_text_atomic
from evomerge.report.data import StudyData
from evomerge.search.costs import COST_COLUMNS, cost_rows
from evomerge.report.spec import Bars, Figure, Heatmap, Panel, Scatter

LEGEND_SPACE_PX = 100
PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "toImageButtonOptions": {"format": "png", "scale": 2}}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
p.caption { max-width: 60em; line-height: 1.45; color: #333; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.7em; text-align: right; border-bottom: 1px solid #eee; }
th { background: #f4f4f4; } code, pre { background: #f4f4f4; padding: 0.1em 0.3em; }
pre { padding: 0.6em; overflow-x: auto; } nav a { margin-right: 1em; }
"""


def _text(value: str) -> str:
    """Plain caption text as HTML: escaped, `code` spans kept."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(value))


def _js(values):
    """Plotly wants None for gaps, not NaN."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def _br(value: str) -> str:
    return html.escape(value).replace("\n", "<br>")


def plotly_figure(figure: Figure):
    """The spec as a plotly figure (subplots share one legend)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = figure.rows, figure.columns
    row_heights = [max(p.height for p in figure.panels[r * cols:(r + 1) * cols]) for r in range(rows)]
    spacing = 0.12 if rows > 1 else 0.0
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_br(p.title) for p in figure.panels],
                        row_heights=row_heights, vertical_spacing=min(spacing, 0.9 / max(rows - 1, 1)),
                        horizontal_spacing=0.08 if cols > 1 else 0.0)
    shown = set()
    for index, panel in enumerate(figure.panels):
        row, col = index // cols + 1, index % cols + 1
        for trace in panel.traces:
            for item in _plotly_traces(trace, shown, fig, row, col):
                fig.add_trace(item, row=row, col=col)
        _axes(fig, panel, row, col)
    top = 50 + 16 * max(p.title.count("\n") for p in figure.panels)
    height = sum(row_heights) + top + LEGEND_SPACE_PX
    fig.update_layout(
        height=height, margin=dict(l=70, r=40, t=top, b=LEGEND_SPACE_PX), template="plotly_white",
        barmode="stack", hovermode="closest",
        # below the lowest axis title, whatever the figure's height
        legend=dict(orientation="h", yanchor="top", xanchor="center", x=0.5,
                    y=-(LEGEND_SPACE_PX - 30) / (height - top - LEGEND_SPACE_PX)),
    )
    fig.update_annotations(font_size=13)
    return go, fig


def _plotly_traces(trace, shown: set, fig, row: int, col: int):
    import plotly.graph_objects as go

    if isinstance(trace, Scatter):
        mode = trace.mode + ("+text" if trace.labels else "")
        first = trace.legend and trace.name not in shown
        shown.add(trace.name)
        yield go.Scatter(
            x=_js(trace.x), y=_js(trace.y), mode=mode, name=trace.name, legendgroup=trace.name, showlegend=first,
            marker=dict(color=trace.color, symbol=trace.symbol, size=trace.size),
            line=dict(color=trace.color, shape=trace.step or "linear", dash="dash" if trace.dash else None),
            text=trace.labels, textposition=_label_positions(trace), textfont=dict(size=10), cliponaxis=False,
            hovertext=[h.replace("\n", "<br>") for h in trace.hover] if trace.hover else None,
            hoverinfo="text" if trace.hover else "x+y+name",
        )
    elif isinstance(trace, Heatmap):
        xaxis, yaxis = fig.get_subplot(row, col).xaxis, fig.get_subplot(row, col).yaxis
        y0, y1 = yaxis.domain
        yield go.Heatmap(
            z=[_js(r) for r in trace.z], x=trace.columns, y=trace.rows, zmin=trace.zmin, zmax=trace.zmax,
            colorscale="Viridis", name=trace.name, xgap=1, ygap=1,
            texttemplate="%{z:.2f}" if trace.annotate else None,
            hovertemplate=f"{trace.name} %{{y}}, %{{x}}: %{{z:.3f}}<extra></extra>",
            colorbar=dict(x=xaxis.domain[1] + 0.01, y=(y0 + y1) / 2, len=max(y1 - y0, 0.1), yanchor="middle",
                          thickness=14),
        )
    elif isinstance(trace, Bars):
        for name, heights in trace.stacks.items():
            if not any(heights):
                continue
            first = name not in shown
            shown.add(name)
            yield go.Bar(x=trace.x, y=heights, name=name, legendgroup=name, showlegend=first,
                         marker_color=trace.colors.get(name))
    else:
        raise TypeError(f"cannot draw {type(trace).__name__}")


def _label_positions(trace: Scatter) -> list[str] | None:
    """Above and below in turn, so labels of close points (two baselines) do not overprint."""
    if not trace.labels:
        return None
    return ["top right" if i % 2 == 0 else "bottom right" for i in range(len(trace.labels))]


def _axes(fig, panel: Panel, row: int, col: int) -> None:
    fig.update_xaxes(title_text=panel.x_label, row=row, col=col)
    fig.update_yaxes(title_text=panel.y_label, row=row, col=col)
    if any(isinstance(t, Heatmap) for t in panel.traces):
        fig.update_yaxes(autorange="reversed", row=row, col=col)
    if panel.same_range:
        values = [v for t in panel.traces if isinstance(t, Scatter) for v in t.x + t.y if not math.isnan(v)]
        span = [min(values), max(values)]
        fig.update_xaxes(range=span, row=row, col=col)
        fig.update_yaxes(range=span, row=row, col=col)


def write_page(path: Path, data: StudyData, figures: list[Figure], png_names: dict[str, str]) -> Path:
    """Write the page (atomically: a browser never sees half of it)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    sections = []
    for figure in figures:
        _, fig = plotly_figure(figure)
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                          div_id=f"plot-{figure.slug}")
        png = png_names.get(figure.slug)
        link = f' <a href="{html.escape(png)}">PNG</a>' if png else ""
        sections.append(f'<section id="{figure.slug}"><h2>{html.escape(figure.title)}</h2>'
                        f'<p class="caption">{_text(figure.caption)}{link}</p>{div}</section>')
    nav = " ".join(f'<a href="#{f.slug}">{html.escape(f.title)}</a>' for f in figures)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>evomerge report: {html.escape(data.study_name)}</title><style>{STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<h1>evomerge study <code>{html.escape(data.study_name)}</code></h1>{_summary(data)}"
        f'<nav>{nav} <a href="#trials">Best trials</a> <a href="#cost">Cost</a> '
        '<a href="#dashboard">optuna-dashboard</a></nav>'
        + "".join(sections) + _best_table(data) + _cost_table(data) + _dashboard(data) + "</body></html>\n"
    )
    return write_text_atomic(path, page)


def _summary(data: StudyData) -> str:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(data.counts().items())) or "no trials yet"
    best, why = data.best()
    best_text = "none yet" if best is None else f"trial {best.number} ({why}), estimated fitness {best.fitness:.3f}"
    if best is not None and data.measured_fitness(best.number) is not None:
        best_text += f", measured {data.measured_fitness(best.number):.3f}"
    objectives = ("one per benchmark" if data.n_objectives > 1 else "weighted mean of the benchmarks"
                  if len(data.tasks) > 1 else "one")
    items = {
        "run folder": str(data.run_dir), "storage": data.storage, "trials": counts,
        "benchmarks (weight)": ", ".join(f"{t} ({data.weights[t]:g})" for t in data.tasks),
        "objectives": objectives, "estimator": data.estimator, "best": best_text, "made": data.made_at,
    }
    return '<dl class="summary">' + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items.items()) + "</dl>"


def _best_table(data: StudyData, top: int = 10) -> str:
    trials = sorted(data.complete, key=lambda t: -t.fitness)[:top]
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["trial", "fitness", *data.tasks, "measured", "note"])
    rows = []
    for trial in trials:
        measured = data.measured_fitness(trial.number)
        cells = [str(trial.number), f"{trial.fitness:.3f}",
                 *(f"{trial.estimates[t]:.3f}" if t in trial.estimates else "" for t in data.tasks),
                 "" if measured is None else f"{measured:.3f}", trial.baseline or ""]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ('<section id="trials"><h2>Best trials</h2><p class="caption">By estimated fitness (per-benchmark '
            "columns are estimates; measured: all items, from `evomerge validate`).</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></section>").replace(
        "`evomerge validate`", "<code>evomerge validate</code>")


def _cost_table(data: StudyData) -> str:
    """Item evaluations and seconds per phase, as `evomerge status` prints them."""
    if not data.costs:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COST_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in cost_rows(data.costs))
    return ('<section id="cost"><h2>What the run spent</h2><p class="caption">Item evaluations (one model '
            "answering one benchmark item) and seconds per phase, summed over every process that worked on the "
            "study: calibration (fitting the item parameters), the trials (the search loop), validation (the top "
            "trials re-scored) and the demo's final table (every model on every item: a demo-only cost).</p>"
            f"<table><tr>{head}</tr>{rows}</table></section>")


def _dashboard(data: StudyData) -> str:
    return ('<section id="dashboard"><h2>Open the study in optuna-dashboard</h2><p class="caption">The Optuna '
            "storage is the study's own, so optuna-dashboard shows the same trials live (history, parameter "
            "importances, user attrs of each trial):</p>"
            f"<pre>pip install optuna-dashboard\noptuna-dashboard {html.escape(data.storage)}</pre></section>")
