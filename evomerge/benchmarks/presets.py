"""Dataset presets: the entry settings for the column layouts users have on disk.

A preset is a partial benchmark entry (fields, template, scoring, extraction,
...); anything the entry also sets overrides it (``fields`` and ``fewshot``
key by key). Layouts are those of the Hugging Face datasets as they download:

| preset | columns | scoring |
|---|---|---|
| gsm8k | question, answer (solution ending ``#### N``) | generate, ``#### N`` extracted from generation and target |
| mgsm | question, answer_number (answer: worked solution, train split) | generate, last number |
| arc | question, choices {text, label}, answerKey | multiple choice over the choice texts |
| mmlu | question, choices (4 texts), answer (index) | multiple choice over the letters A-D |
| hellaswag | activity_label, ctx, endings, label | multiple choice over the endings |
"""

from __future__ import annotations

import copy
import re

from evomerge.errors import EvomergeError

MATH_STOP = ["\n\n", "Question:"]

PRESETS: dict[str, dict] = {
    "gsm8k": {
        "scoring": "generate", "template": "Question: {question}\nAnswer:", "fields": {"answer": "answer"},
        "delimiter": " ", "max_new_tokens": 256, "stop": MATH_STOP, "extract": "gsm8k", "compare": "numeric",
    },
    "mgsm": {
        "scoring": "generate", "template": "Question: {question}\nStep-by-Step Answer:",
        "fields": {"answer": "answer_number"}, "fewshot": {"column": "answer"},   # shots show the worked solution
        "delimiter": " ", "max_new_tokens": 256, "stop": MATH_STOP, "extract": "last_number", "compare": "numeric",
    },
    "arc": {
        "scoring": "multiple_choice", "template": "Question: {question}\nAnswer:",
        "fields": {"choices": "choices", "label": "answerKey"}, "delimiter": " ",
    },
    "mmlu": {
        "scoring": "multiple_choice",
        "template": "{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:",
        "choices": ["A", "B", "C", "D"], "fields": {"label": "answer"}, "delimiter": " ",
    },
    "hellaswag": {
        "scoring": "multiple_choice", "template": "{activity_label}: {ctx}",
        "fields": {"choices": "endings", "label": "label"}, "delimiter": " ",
    },
}
MERGED_BY_KEY = ("fields", "fewshot")

_LEADING_LABEL = re.compile(r"^[^\n:：]{1,40}[:：]\s*")


def _mgsm_row(record: dict) -> dict:
    """MGSM's train rows carry their own labels ("Question: ...", "Step-by-Step Answer: ...",
    localized); the test rows do not. Strip them so a worked example reads like a test prompt."""
    if not record.get("answer"):
        return record
    return {**record, **{key: _LEADING_LABEL.sub("", record[key], count=1)
                         for key in ("question", "answer") if isinstance(record.get(key), str)}}


ROW_ADAPTERS = {"mgsm": _mgsm_row}
"""Presets whose dataset rows need a fix-up before templating (applied to scored and few-shot rows)."""


def with_preset(options: dict, where: str) -> dict:
    """The entry's options over its preset's (``preset`` stays, for error messages)."""
    name = options.get("preset")
    if name is None:
        return dict(options)
    if not isinstance(name, str) or name not in PRESETS:
        raise EvomergeError(f"{where}: preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    merged = copy.deepcopy(PRESETS[name])
    for key, value in options.items():
        if key in MERGED_BY_KEY and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
