"""A figure described once, drawn twice: interactive on the page (plotly) and as a PNG (matplotlib).

The report's figures are built as these plain records (`evomerge.report.figures`),
so what is plotted is decided in one place; `html.py` and `png.py` only know how
to draw the few trace kinds below. NaN in a line's coordinates breaks the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# one palette for both renderers
BLUE, ORANGE, GREEN, RED, PURPLE, GREY, LIGHT_GREY = (
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#7F7F7F", "#C7C7C7")
SYMBOLS = ("circle", "circle-open", "diamond", "square", "triangle-up", "triangle-down", "x", "star", "cross")


@dataclass
class Scatter:
    """Points and/or a line; ``hover`` is shown on the page, ``labels`` are written beside the points."""

    x: list[float]
    y: list[float]
    name: str
    mode: str = "markers"  # markers | lines | lines+markers
    color: str = BLUE
    symbol: str = "circle"
    size: float = 7.0
    step: str = ""  # "hv": hold the value until the next point (best so far); "vh": jump at the point (front)
    dash: bool = False
    hover: list[str] | None = None
    labels: list[str] | None = None
    legend: bool = True


@dataclass
class Heatmap:
    """``z[row][column]`` on a colour scale from ``zmin`` to ``zmax``; NaN cells stay empty."""

    z: list[list[float]]
    columns: list[str]
    rows: list[str]
    zmin: float
    zmax: float
    name: str = ""
    annotate: bool = True


@dataclass
class Bars:
    """Stacked bars: one stack per x, ``stacks`` maps a part's name to its heights."""

    x: list[float]
    stacks: dict[str, list[float]]
    colors: dict[str, str] = field(default_factory=dict)


@dataclass
class Panel:
    title: str
    x_label: str = ""
    y_label: str = ""
    traces: list = field(default_factory=list)
    same_range: bool = False  # x and y share one range (estimated vs measured)
    height: int = 360  # pixels on the page; PNG panels scale from it


@dataclass
class Figure:
    """One figure of the report: file stem, heading, a caption that says how to read it, its panels."""

    slug: str
    title: str
    caption: str
    panels: list[Panel]
    columns: int = 1

    @property
    def rows(self) -> int:
        return -(-len(self.panels) // self.columns)
