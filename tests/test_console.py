"""Tables keep their full width without a terminal; warnings print as one line."""

from __future__ import annotations

import warnings

from evomerge.console import one_line_warnings
from evomerge.errors import EvomergeWarning
from evomerge.evaluation import print_accuracy_table


def test_tables_are_printed_whole_in_a_pipe(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    tasks = ["benchmark_with_a_long_name", "anchor_items_of_another_benchmark", "third_benchmark_name"]
    print_accuracy_table({"task_arithmetic (uniform, weight 0.5)": {t: 0.5 for t in tasks}}, tasks)
    out = capsys.readouterr().out
    assert "…" not in out
    assert all(task in out for task in tasks) and "task_arithmetic (uniform, weight 0.5)" in out


def test_an_evomerge_warning_is_one_line(capsys):
    with one_line_warnings():
        warnings.warn("tensor x holds 2 NaN/inf value(s)", EvomergeWarning)
    assert capsys.readouterr().err == "evomerge: warning: tensor x holds 2 NaN/inf value(s)\n"
