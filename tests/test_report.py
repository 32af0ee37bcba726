"""`evomerge report` on a short quick-zoo study: the page and every PNG, loaded in a real headless Chromium."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile

import pytest
import yaml
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.search.runs import open_existing_study
from test_search_e2e import write_space

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FIGURES = ("fitness", "pareto", "genome", "calibration", "timing")


def chromium() -> str:
    """Debian's chromium (.ci/run installs it); the test must run there, so only a developer box may skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no chromium: `apt-get install -y chromium` (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_in_browser(page_path, screenshot, n_plots: int) -> tuple[list[str], list[str], str]:
    """Open the page headless; returns (script errors, requests leaving the file, visible text)."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    errors, requests = [], []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("request", lambda request: None if request.url.startswith(("file:", "data:", "blob:"))
                    else requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_plots}", timeout=30_000)
            page.screenshot(path=str(screenshot), full_page=True)
            text = page.inner_text("body")
        finally:
            context.close()
    return errors, requests, text


def test_report_page_pngs_and_browser(zoo_dir, tmp_path, capsys):
    # 6 named baselines (2 uniform merges, the base, 3 experts alone), then the optimizer's own
    space_file = write_space(zoo_dir, tmp_path / "space.yaml", "nsga2", trials=8, name="seen")
    raw = yaml.safe_load(space_file.read_text())
    raw["optimizer"]["objectives"] = "per_task"  # several objectives: Pareto fronts too
    space_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "seen"
    assert main(["search", str(space_file), "--runs-root", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert main(["validate", str(run_dir), "--top", "2"]) == 0
    study = open_existing_study(run_dir)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert 0 <= trial.user_attrs["merge_s"] and 0 < trial.user_attrs["score_s"] < trial.duration.total_seconds()
    study.ask()  # a worker still searching: its RUNNING trial is counted, not drawn
    database = run_dir / "study.db"
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    capsys.readouterr()

    assert main(["report", str(run_dir)]) == 0
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before, "the report wrote to the study"
    out = run_dir / "report"
    assert str(out / "index.html") in capsys.readouterr().out
    for name in FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    page = (out / "index.html").read_text()
    network = re.search(r"""<(script|link|img)\b[^>]*\b(src|href)=["']?(https?:)?//""", page)
    assert network is None, f"the page loads {network.group(0)} from the network"
    assert "optuna-dashboard sqlite:///" in page
    costs = page[page.index('id="cost"'):]  # what each phase spent, as `evomerge status` prints it
    assert all(phase in costs for phase in ("calibration", "trials", "validation", "calibration + validation / trials"))

    screenshot = tmp_path / "report-screenshot.png"
    errors, requests, text = load_in_browser(out / "index.html", screenshot, n_plots=len(FIGURES))
    assert errors == [] and requests == []
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert "1 running" in text and "Pareto fronts per pair of benchmarks" in text
    assert "expert arith" in page  # baselines are marked by name


def test_report_says_which_extra_is_missing(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "plotly", None)  # import fails as if not installed
    assert main(["report", str(tmp_path)]) == 2
    assert "pip install 'evomerge[report]'" in capsys.readouterr().err
