"""Graders: does an expert's answer match the reference? A pluggable registry of pure functions.

Built in (each ``(answer, reference) -> float`` in [0, 1]):

- ``exact``: case, surrounding punctuation and whitespace ignored; the answer may go on after
  the reference (``"Yes. Because ..."`` matches ``"yes"``), but must start with it;
- ``mc``: multiple choice: the first standalone option letter (A-J) in the answer, or the letter
  after "answer is"/"answer:" when the answer says so, equals the reference letter;
- ``numeric``: the answer's number equals the reference within a relative tolerance of 1e-6.
  The answer's number is the one after the first "=" when the first line is an equation
  ("12 + 7 = 19"), else the first number in the answer (thousands separators allowed).

``@register_grader("name")`` adds a grader; ``grade(name, answer, reference)`` applies one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Grader = Callable[[str, str], float]
GRADERS: dict[str, Grader] = {}

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")
_SAID = re.compile(r"answer\s*(?:is|:)\s*\(?([A-J])\b", re.IGNORECASE)


def register_grader(name: str) -> Callable[[Grader], Grader]:
    def deco(fn: Grader) -> Grader:
        GRADERS[name] = fn
        return fn
    return deco


def get_grader(name: str) -> Grader:
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; known: {sorted(GRADERS)}")
    return GRADERS[name]


def grade(name: str, answer: str | None, reference: str) -> float:
    """Grade one answer (a missing answer scores 0: the expert did not answer)."""
    if answer is None:
        return 0.0
    return float(get_grader(name)(str(answer), str(reference)))


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


@register_grader("exact")
def exact_match(answer: str, reference: str) -> float:
    a, r = _norm(answer), _norm(reference)
    return float(bool(r) and (a == r or a.startswith(r + " ")))


def extract_letter(answer: str) -> str | None:
    m = _SAID.search(answer)
    if m:
        return m.group(1).upper()
    m = _LETTER.search(answer.strip())
    return m.group(1).upper() if m else None


@register_grader("mc")
def multiple_choice(answer: str, reference: str) -> float:
    return float(extract_letter(answer) == reference.strip().upper())


def extract_number(answer: str) -> float | None:
    first = answer.strip().split("\n", 1)[0]
    text = first.split("=", 1)[1] if "=" in first else answer
    m = _NUM.search(text) or _NUM.search(answer)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


@register_grader("numeric")
def numeric(answer: str, reference: str) -> float:
    got, ref = extract_number(answer), float(reference)
    if got is None:
        return 0.0
    return float(abs(got - ref) <= 1e-6 * max(1.0, abs(ref)))
