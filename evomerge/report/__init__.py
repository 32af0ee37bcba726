"""`evomerge report`: a run's study as one self-contained HTML page with interactive plots, plus PNGs.

    write_report("runs/demo")   # -> runs/demo/report/index.html, fitness.png, genome.png, ...

The page inlines plotly.js (opens offline, from a file or a mail); the same
figures are drawn as PNG files beside it by matplotlib. Both come with the
optional extra ``pip install 'evomerge[report]'``. Reading the study writes
nothing to it, so a report can be made while workers search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.files import writing
from evomerge.report.data import load_study_data
from evomerge.report.figures import card_figures, report_figures
from evomerge.report.html import write_page
from evomerge.report.png import write_png

REPORT_DIR = "report"
PAGE = "index.html"
EXTRA_HINT = "pip install 'evomerge[report]'"


@dataclass
class ReportFiles:
    page: Path
    pngs: dict[str, Path]


def plotting_missing(modules: tuple[str, ...] = ("plotly", "matplotlib")) -> str | None:
    """None when the plotting libraries import; else the message that says what to install."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed: the report's plots need the `report` extra ({EXTRA_HINT})"


def write_report(run_dir: str | Path, storage: str | None = None, out_dir: str | Path | None = None) -> ReportFiles:
    """Read the run's study and write the page and one PNG per figure into ``out_dir`` (default RUN/report)."""
    problem = plotting_missing()
    if problem:
        raise EvomergeError(f"evomerge report: {problem}")
    data = load_study_data(run_dir, storage)
    out = Path(out_dir) if out_dir else Path(run_dir) / REPORT_DIR
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    figures = report_figures(data)
    pngs = {f.slug: write_png(f, out / f"{f.slug}.png") for f in figures}
    page = write_page(out / PAGE, data, figures, {slug: path.name for slug, path in pngs.items()})
    return ReportFiles(page, pngs)


def write_card_figures(run_dir: str | Path, study, trial_number: int, out_dir: str | Path) -> list[tuple[str, str]]:
    """PNGs a model card embeds (the trial's genome, the fitness curve) in ``out_dir``/figures.

    Returns (title, path relative to ``out_dir``) pairs; none when the plotting extra is missing.
    """
    if plotting_missing(("matplotlib",)):
        return []
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    data = load_study_data(run_dir, study=study)
    return [(f.title, write_png(f, folder / f"{f.slug}.png").relative_to(out_dir).as_posix())
            for f in card_figures(data, trial_number)]
