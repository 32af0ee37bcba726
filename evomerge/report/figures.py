"""The report's figures, built from a run's `StudyData` as renderer-neutral specs.

fitness over trials, Pareto fronts per pair of tasks (several objectives), the
best genome as heatmaps, estimator calibration and where a trial's time goes.
A figure with nothing to show yet (no validated trial, one objective) is left out.
"""

from __future__ import annotations

import itertools
import math
import statistics

from evomerge.report.data import StudyData
from evomerge.report.spec import (BLUE, GREEN, GREY, LIGHT_GREY, ORANGE, PURPLE, RED, Bars, Figure, Heatmap,
                                  Panel, Scatter)
from evomerge.search.records import TrialRecord

NAN = float("nan")
MAX_ANNOTATED_CELLS = 80


def report_figures(data: StudyData) -> list[Figure]:
    """Every figure the data can fill, in page order."""
    best, why = data.best()
    figures = [
        fitness_figure(data),
        pareto_figure(data),
        genome_figure(data, best.number, why) if best else None,
        calibration_figure(data),
        timing_figure(data),
    ]
    return [f for f in figures if f is not None]


def card_figures(data: StudyData, trial_number: int) -> list[Figure]:
    """What a model card embeds: the exported trial's genome and the fitness curve."""
    figures = [genome_figure(data, trial_number, "exported"), fitness_figure(data, highlight=trial_number)]
    return [f for f in figures if f is not None]


def _trial_hover(trial: TrialRecord, data: StudyData) -> str:
    parts = [f"trial {trial.number}", f"fitness {trial.fitness:.3f}"]
    parts += [f"{task} {trial.estimates[task]:.3f}" for task in data.tasks if task in trial.estimates]
    if trial.method and any(g.choices for g in data.genes.values()):  # the method is searched too
        parts.append(trial.method)
    if trial.baseline:
        parts.append(trial.baseline)
    return "\n".join(parts)


def shared_labels(x: list[float], y: list[float], names: list[str], char_width: float = 0.013,
                  near_y: float = 0.05) -> list[str]:
    """Labels for points, written rightwards from each point; a name whose text would overprint an
    earlier label (same height within ``near_y`` of the y span, overlapping in x, ``char_width`` of the
    x span per character) joins that label instead ("base, expert arith"). Empty names stay unlabelled."""
    def span(values):
        return (max(values) - min(values)) or 1.0

    x_span, y_span = span(x), span(y)
    labels = [""] * len(names)
    anchors: list[int] = []

    def right_end(i: int, text: str) -> float:
        return x[i] + (len(text) + 2) * char_width * x_span

    for i, name in enumerate(names):
        if not name:
            continue
        anchor = next((a for a in anchors if abs(y[a] - y[i]) < near_y * y_span
                       and x[i] < right_end(a, labels[a]) and x[a] < right_end(i, name)), None)
        if anchor is None:
            anchors.append(i)
            labels[i] = name
        else:
            labels[anchor] += f", {name}"
    return labels


# ---------------------------------------------------------------- fitness
def fitness_figure(data: StudyData, highlight: int | None = None) -> Figure | None:
    trials = sorted(data.complete, key=lambda t: t.number)
    if not trials:
        return None
    fitness_name = "fitness" if len(data.tasks) == 1 else "fitness (weighted mean)"
    traces = [Scatter([t.number for t in trials], [t.fitness for t in trials], "trial (estimated)", color=BLUE,
                      size=6, hover=[_trial_hover(t, data) for t in trials])]
    best_x, best_y, best = [], [], -math.inf
    for trial in trials:
        best = max(best, trial.fitness)
        best_x.append(trial.number)
        best_y.append(best)
    traces.append(Scatter(best_x, best_y, "best so far (estimated)", mode="lines", color=ORANGE, step="hv"))
    validated = [t for t in trials if data.measured_fitness(t.number) is not None]
    if validated:
        gap_x, gap_y = [], []
        for t in validated:
            gap_x += [t.number, t.number, NAN]
            gap_y += [t.fitness, data.measured_fitness(t.number), NAN]
        traces.append(Scatter(gap_x, gap_y, "estimate -> measured", mode="lines", color=RED, dash=True, legend=False))
        traces.append(Scatter(
            [t.number for t in validated], [data.measured_fitness(t.number) for t in validated],
            "validated (measured, all items)", color=RED, symbol="diamond", size=9,
            hover=[f"trial {t.number}\nmeasured {data.measured_fitness(t.number):.3f}\n"
                   f"estimated {t.fitness:.3f}" for t in validated]))
    baselines = [t for t in trials if t.baseline]
    if baselines:
        x, y = [t.number for t in baselines], [t.fitness for t in baselines]
        traces.append(Scatter(x, y, "baseline (enqueued)", color=GREEN, symbol="square", size=9,
                              labels=shared_labels(x, y, [t.baseline for t in baselines], char_width=0.006),
                              hover=[_trial_hover(t, data) for t in baselines]))
    if highlight is not None and any(t.number == highlight for t in trials):
        chosen = next(t for t in trials if t.number == highlight)
        traces.append(Scatter([chosen.number], [chosen.fitness], f"trial {highlight} (exported)", color=PURPLE,
                              symbol="star", size=14))
    objective = ("the search's objective" if data.n_objectives == 1 else
                 "the weighted mean of its per-benchmark objectives, by which `evomerge status` ranks trials")
    caption = (
        f"Each dot is one complete trial's estimated fitness ({objective}; {data.estimator} estimates from the "
        "benchmark subsets); the orange step is the best estimate so far. "
        "Red diamonds are trials re-scored on every item (`evomerge validate`), joined to their estimate by a "
        "dashed line: the gap is the estimator's error, and at the top of a long search mostly the winner's "
        "curse. Green squares are the genomes enqueued before the optimizer's own (uniform merges, experts "
        "alone, the base).")
    panel = Panel(f"{len(trials)} complete trials", "trial", fitness_name, traces)
    return Figure("fitness", "Fitness over trials", caption, [panel])


# ---------------------------------------------------------------- pareto
def _front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (maximising)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _full_front(trials: list[TrialRecord]) -> set[int]:
    """Numbers of the trials no other trial beats on every objective (maximising)."""
    return {t.number for t in trials
            if not any(all(o >= s for o, s in zip(other.values, t.values)) and other.values != t.values
                       for other in trials)}


def pareto_figure(data: StudyData) -> Figure | None:
    """One panel per pair of objectives (several objectives only: one per benchmark)."""
    trials = [t for t in data.complete if t.values is not None and len(t.values) == len(data.tasks)]
    if data.n_objectives < 2 or not trials:
        return None
    on_front = _full_front(trials)
    panels = []
    for i, j in itertools.combinations(range(len(data.tasks)), 2):
        task_x, task_y = data.tasks[i], data.tasks[j]
        points = [(t.values[i], t.values[j]) for t in trials]
        hover = [_trial_hover(t, data) for t in trials]
        traces = [Scatter([p[0] for p in points], [p[1] for p in points], "trial", color=LIGHT_GREY, size=6,
                          hover=hover)]
        front = _front(points)
        traces.append(Scatter([points[k][0] for k in front], [points[k][1] for k in front],
                              "front of this pair", mode="lines+markers", color=BLUE, size=6, step="vh",
                              hover=[hover[k] for k in front]))
        marked = [k for k, t in enumerate(trials) if t.baseline]
        if marked:
            x, y = [points[k][0] for k in marked], [points[k][1] for k in marked]
            traces.append(Scatter(x, y, "baseline (enqueued)", color=GREEN, symbol="square", size=9,
                                  labels=shared_labels(x, y, [trials[k].baseline for k in marked]),
                                  hover=[hover[k] for k in marked]))
        full = [k for k, t in enumerate(trials) if t.number in on_front]
        traces.append(Scatter([points[k][0] for k in full], [points[k][1] for k in full],
                              "on the front of all objectives", color=ORANGE, symbol="circle-open", size=14,
                              hover=[hover[k] for k in full]))
        panels.append(Panel(f"{task_y} vs {task_x}", f"{task_x} (estimated)", f"{task_y} (estimated)", traces))
    caption = (
        "One panel per pair of benchmarks (each is one objective). Grey: every complete trial's estimated "
        "accuracies; blue line: the trials no other trial beats on both benchmarks of the panel; orange: the "
        "trials on the Pareto front of all objectives together (`evomerge status` ranks them by their weighted "
        "mean). Green squares: enqueued reference genomes (experts alone, the base, uniform merges), "
        "labelled by name.")
    return Figure("pareto", "Pareto fronts per pair of benchmarks", caption, panels, columns=min(3, len(panels)))


# ---------------------------------------------------------------- genome
def _split_group(group: str) -> tuple[str, str | None]:
    """``G0_attention`` -> (G0, attention); ``rest`` / ``G0`` / ``L3`` -> (itself, None)."""
    block, _, module = group.partition("_")
    return block, module or None


def genome_figure(data: StudyData, trial_number: int, why: str) -> Figure | None:
    """The trial's genome, one heatmap per parameter: layer groups across, expert x module down."""
    trial = data.trial(trial_number)
    structure = [data.genes[n] for n in data.genes  # the genome's own order; the method gene is in the title
                 if n in trial.params and data.genes[n].choices is None]
    genes = {(g.param, g.owner, g.group): trial.params[g.name] for g in structure}
    if not genes:
        return None
    bounds = {(g.param, g.owner, g.group): g.bounds for g in structure}
    panels = []
    for param in dict.fromkeys(p for p, _, _ in genes):
        mine = {k: v for k, v in genes.items() if k[0] == param}
        blocks = list(dict.fromkeys(_split_group(g)[0] for _, _, g in mine))
        blocks = [b for b in blocks if b != "rest"] + (["rest"] if "rest" in blocks else [])
        modules = list(dict.fromkeys(m for _, _, g in mine if (m := _split_group(g)[1]))) or [None]
        owners = list(dict.fromkeys(e for _, e, _ in mine))
        owners = [e for e in data.experts if e in owners] + [e for e in owners if e not in data.experts]
        rows = [(e, m) for e in owners for m in modules]
        z = [[NAN] * len(blocks) for _ in rows]
        for (_, expert, group), value in mine.items():
            block, module = _split_group(group)
            for r, (e, m) in enumerate(rows):
                if e == expert and (module is None or m == module):
                    z[r][blocks.index(block)] = float(value)
        row_names = [" ".join(x for x in (e or "all experts", m) if x) for e, m in rows]
        known = [b for b in (bounds[key] for key in mine) if all(map(math.isfinite, b))]
        zmin = min(b[0] for b in known) if known else min(mine.values())
        zmax = max(b[1] for b in known) if known else max(mine.values())
        annotate = len(rows) * len(blocks) <= MAX_ANNOTATED_CELLS
        panels.append(Panel(f"{param} (range {zmin:g} to {zmax:g})", "layers", "", [
            Heatmap(z, ["all layers" if b == "all" else b for b in blocks], row_names, zmin, zmax, name=param,
                    annotate=annotate)],
            height=max(220, 90 + 34 * len(rows))))
    caption = (
        f"Trial {trial.number} ({why}): each cell is one gene, the coefficient the merge uses for one "
        "expert's tensors in one block of layers (columns; `rest` is the embeddings, final norm and lm_head) "
        "and one module kind (attention with its norms, or MLP). One heatmap per merge parameter, coloured "
        "over the parameter's search range. A data-flow genome shows `include` per pass (r0, r1, ...) and "
        "source layer (on the path when >= 0.5) and `level`, the log2 scale after each source layer "
        "(E: its embedding).")
    method = f", {trial.method}" if trial.method and any(g.choices for g in data.genes.values()) else ""
    return Figure("genome", f"Best genome (trial {trial.number}{method}, {why})", caption, panels)


# ---------------------------------------------------------------- calibration
def calibration_figure(data: StudyData) -> Figure | None:
    if not data.calibration:
        return None
    panels = []
    for task in data.tasks:
        points = [p for p in data.calibration if p.task == task]
        if not points:
            continue
        traces = []
        values = [v for p in points for v in (p.estimated, p.measured)]
        lo, hi = max(0.0, min(values) - 0.03), min(1.0, max(values) + 0.03)
        traces.append(Scatter([lo, hi], [lo, hi], "estimated = measured", mode="lines", color=GREY, dash=True))
        notes = []
        for kind, color, symbol in (("calibration model", PURPLE, "circle"), ("validated trial", RED, "diamond")):
            mine = [p for p in points if p.kind == kind]
            if not mine:
                continue
            errors = [p.estimated - p.measured for p in mine]
            notes.append(f"{kind}s: bias {statistics.fmean(errors):+.3f}, "
                         f"RMSE {math.sqrt(statistics.fmean(e * e for e in errors)):.3f}")
            traces.append(Scatter(
                [p.estimated for p in mine], [p.measured for p in mine], kind, color=color, symbol=symbol, size=8,
                hover=[f"{p.model}\nestimated {p.estimated:.3f}\nmeasured {p.measured:.3f}" for p in mine],
                labels=shared_labels([p.estimated for p in mine], [p.measured for p in mine],
                                     ["" if p.model.startswith("calib") else p.model for p in mine])
                if kind == "calibration model" else None))
        panels.append(Panel(f"{task}\n" + "\n".join(notes), "estimated accuracy", "measured accuracy (all items)",
                            traces, same_range=True, height=420))
    caption = (
        f"Per benchmark, the {data.estimator} estimate from the subset answers (x) against the accuracy on every "
        "item (y); on the dashed diagonal the estimate is exact, below it the estimate is too high. Purple: "
        "the calibration models (base, experts, random merges) the estimator was fitted on, so their error is "
        "in-sample; red: trials re-scored by `evomerge validate`, the honest check. Bias is estimated minus "
        "measured.")
    return Figure("calibration", "Estimator calibration", caption, panels, columns=min(3, len(panels)))


# ---------------------------------------------------------------- timing
def timing_figure(data: StudyData) -> Figure | None:
    trials = sorted((t for t in data.complete if t.duration_s is not None), key=lambda t: t.number)
    if not trials:
        return None
    merge, score, rest, total = [], [], [], []
    for t in trials:
        split = t.merge_s is not None and t.score_s is not None
        merge.append(t.merge_s if split else 0.0)
        score.append(t.score_s if split else 0.0)
        rest.append(max(0.0, t.duration_s - merge[-1] - score[-1]) if split else 0.0)
        total.append(0.0 if split else t.duration_s)
    stacks = {"merge": merge, "scoring + estimate": score, "bookkeeping (sampling, storage)": rest}
    colors = {"merge": BLUE, "scoring + estimate": GREEN, "bookkeeping (sampling, storage)": LIGHT_GREY,
              "whole trial (not broken down)": ORANGE}
    if any(total):
        stacks["whole trial (not broken down)"] = total
    medians = ", ".join(f"{name} {statistics.median(v):.3g} s" for name, v in stacks.items() if any(v))
    title = f"median trial {statistics.median(t.duration_s for t in trials):.3g} s ({medians})"
    panel = Panel(title, "trial", "seconds", [Bars([t.number for t in trials], stacks, colors)])
    caption = (
        "Wall time of each complete trial, from its creation to its result being stored, split into building "
        "the candidate (the in-place merge), scoring the benchmark subsets with the estimate, and the rest: "
        "the optimizer's sampling and the storage's commits. Trials from before evomerge recorded the split "
        "show their whole duration.")
    return Figure("timing", "Where a trial's time goes", caption, [panel])
