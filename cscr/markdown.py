"""One formatter for every report: numbers to text, and rows to a markdown or plain-text table.

Used by the evaluation report (cscr/eval/report.py), the experiment reports
(cscr/experiments/report.py), the project report (cscr/report.py), the sweep summary
(cscr/sweep.py) and the benchmarks, so that a number reads the same wherever it is printed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MISSING = "—"
NOT_REACHED = "not reached"


def num(value: Any, fmt: str = ".4f", none: str = MISSING) -> str:
    """``value`` formatted with ``fmt``; ``none`` for None, "—" for NaN or infinity; other
    values (strings, ints where ``fmt`` does not apply) as ``str``."""
    if value is None:
        return none
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return MISSING
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def _align(columns: Sequence[str], align: str | None) -> str:
    align = align or "l" + "r" * (len(columns) - 1)
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} must be one l or r per column ({len(columns)} columns)")
    return align


def _cells(rows: Sequence[Sequence[Any]], width: int) -> list[list[str]]:
    out = []
    for r in rows:
        if len(r) != width:
            raise ValueError(f"row {list(r)!r} has {len(r)} cells, the table has {width} columns")
        out.append([str(c).replace("|", "\\|").replace("\n", " ") for c in r])
    return out


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` one letter per column, l or r (default: the first left, the
    rest right). Cells are ``str``-ed (format numbers with ``num`` first); "|" is escaped."""
    al = _align(columns, align)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in al) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(rows, len(columns))]
    return "\n".join(lines)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """The same table as plain text for a terminal: columns padded, a dashed rule under the head."""
    al = _align(columns, align)
    body = [[str(c) for c in r] for r in rows]
    if any(len(r) != len(columns) for r in body):
        raise ValueError(f"every row needs {len(columns)} cells")
    widths = [max(len(r[i]) for r in [list(columns), *body]) for i in range(len(columns))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, al, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *[line(r) for r in body]])
