"""Final answers: extracted from a generation (and from a target), then compared.

A generated chain of thought is judged by its final answer only. An extractor
pulls that answer out of the text (``None`` when there is none: the item is
then wrong, never an error), a comparison decides whether it equals the
target. Both are parsed from a benchmark entry once, at load time, so a bad
regex or an unknown name fails before any model runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from evomerge.errors import EvomergeError

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
"""A number as written in answers: ``-12``, ``1,234``, ``3.5``, ``.5`` (thousands separators allowed)."""
GSM8K_FINAL = re.compile(r"####\s*\$?\s*(" + NUMBER.pattern + ")")
"""The GSM8K convention: the solution ends in ``#### 72``."""
EXTRACTORS = ("last_number", "gsm8k", "regex", "after")
COMPARISONS = ("string", "numeric")


def _number_text(text: str) -> str:
    return text.replace(",", "")


@dataclass(frozen=True)
class Extractor:
    """How the final answer is read from a generation: ``whole`` (the stripped text), ``last_number``,
    ``gsm8k`` (what follows ``####``), ``regex`` (its one capture group, first match) or ``after``
    (the rest of the line after the last ``marker``)."""

    name: str = "whole"
    pattern: str | None = None   # regex: the pattern; after: the marker

    def __call__(self, text: str) -> str | None:
        if self.name == "whole":
            answer = text.strip()
        elif self.name == "last_number":
            numbers = NUMBER.findall(text)
            answer = numbers[-1] if numbers else None
        elif self.name == "gsm8k":
            match = GSM8K_FINAL.search(text)
            answer = match.group(1) if match else None
        elif self.name == "regex":
            match = re.search(self.pattern, text)
            answer = match.group(1) if match and match.group(1) is not None else None
        else:  # after
            at = text.rfind(self.pattern)
            answer = text[at + len(self.pattern):].strip().split("\n", 1)[0].strip().rstrip(".") if at >= 0 else None
        return answer if answer else None

    def target(self, answer: str) -> str:
        """The final answer an item's target stands for: a GSM8K solution's ``#### N``, else the target itself."""
        if self.name == "gsm8k":
            extracted = self(answer)
            if extracted is not None:
                return extracted
        return answer.strip()


@dataclass(frozen=True)
class Comparison:
    """Normalized string equality, or numeric equality within ``tolerance`` (absolute)."""

    name: str = "string"
    tolerance: float = 1e-6

    def __call__(self, answer: str | None, target: str) -> bool:
        if answer is None:
            return False
        if self.name == "string":
            return normalize(answer) == normalize(target)
        got, want = parse_number(answer), parse_number(target)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=self.tolerance)


def normalize(text: str) -> str:
    """Case, surrounding and repeated whitespace and thousands separators do not count."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return " ".join(text.split()).casefold()


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (``"$1,234.50"`` -> 1234.5), or None."""
    match = NUMBER.search(text)
    return float(_number_text(match.group(0))) if match else None


def parse_extractor(spec, where: str) -> Extractor:
    """``last_number`` | ``gsm8k`` | ``{regex: "..."}`` (one capture group) | ``{after: "<marker>"}``."""
    if spec is None:
        return Extractor()
    if isinstance(spec, str):
        if spec in ("last_number", "gsm8k"):
            return Extractor(spec)
        raise EvomergeError(f"{where}: extract {spec!r} is unknown; use last_number, gsm8k, "
                            "{regex: PATTERN} or {after: MARKER}")
    if isinstance(spec, dict) and len(spec) == 1:
        (name, value), = spec.items()
        if name == "regex":
            if not isinstance(value, str):
                raise EvomergeError(f"{where}: extract.regex must be a string")
            try:
                groups = re.compile(value).groups
            except re.error as exc:
                raise EvomergeError(f"{where}: extract.regex {value!r} is not a valid regular expression ({exc})") from None
            if groups != 1:
                raise EvomergeError(f"{where}: extract.regex {value!r} has {groups} capture groups; it needs exactly "
                                    "one, around the answer (use (?:...) for other groups)")
            return Extractor("regex", value)
        if name == "after":
            if not isinstance(value, str) or not value:
                raise EvomergeError(f"{where}: extract.after must be a non-empty marker such as 'The answer is'")
            return Extractor("after", value)
        raise EvomergeError(f"{where}: extract.{name} is unknown; use last_number, gsm8k, "
                            "{regex: PATTERN} or {after: MARKER}")
    raise EvomergeError(f"{where}: extract must be last_number, gsm8k, {{regex: PATTERN}} or {{after: MARKER}}, "
                        f"got {spec!r}")


def parse_comparison(spec, where: str) -> Comparison:
    """``string`` (default) | ``numeric`` | ``{numeric: <tolerance>}``."""
    if spec is None or spec == "string":
        return Comparison()
    if spec == "numeric":
        return Comparison("numeric")
    if isinstance(spec, dict) and set(spec) == {"numeric"}:
        tolerance = spec["numeric"]
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise EvomergeError(f"{where}: compare.numeric must be a tolerance >= 0, got {tolerance!r}")
        return Comparison("numeric", float(tolerance))
    raise EvomergeError(f"{where}: compare must be string, numeric or {{numeric: TOLERANCE}}, got {spec!r}")
