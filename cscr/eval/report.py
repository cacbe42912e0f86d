"""Report layer: tables (markdown, CSV, JSON) and the deferral-curve plot (cscr/eval/plots.py),
written atomically. Tables go through the one formatter (cscr/markdown.py).

Metrics are computed in cscr/eval/metrics.py; nothing here computes a metric.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_write_json, atomic_write_text
from cscr.eval.evaluate import EvalResult
from cscr.eval.plots import plot_deferral
from cscr.markdown import NOT_REACHED, markdown_table, num, text_table

__all__ = ["COLUMNS", "experts_table", "format_header", "format_table", "metrics_csv", "metrics_rows",
           "plot_deferral", "report_markdown", "to_json", "write_report"]

SINGLE = "single:"
COLUMNS = ["router", "audc", "audc_paper", "qnc", "qnc_ratio", "peak", "cost_at_peak", "n_points", "n_distinct_points"]


def metrics_rows(result: EvalResult) -> list[dict[str, Any]]:
    """One dict per router (sorted by AUDC, best first)."""
    rows = [r.summary() for r in result.routers.values()]
    return sorted(rows, key=lambda d: -d["audc"])


def format_table(result: EvalResult, markdown: bool = False) -> str:
    """The main table (AUDC / QNC / peak per router), plain text or markdown."""
    unit = result.cost_unit
    head = ["router", "AUDC", "AUDC (write-up)", f"QNC ({unit})", "QNC / best", "peak", f"cost at peak ({unit})", "points"]
    body = [
        [d["router"], num(d["audc"]), num(d["audc_paper"]), num(d["qnc"], ".4g", NOT_REACHED), num(d["qnc_ratio"], ".3f", NOT_REACHED),
         num(d["peak"]), num(d["cost_at_peak"], ".4g"), f"{d['n_distinct_points']}/{d['n_points']}"]
        for d in metrics_rows(result) if not d["router"].startswith(SINGLE)
    ]
    if markdown:  # report.md lists the single experts in a section of their own (experts_table)
        return markdown_table(head, body)
    return text_table(head, body) + singles_text(result)


def singles_text(result: EvalResult) -> str:
    """The ``single:*`` routers evaluated, by mean quality and cost (each is one operating point: an
    AUDC would only say where that point lies in the pool's cost range, so none is shown)."""
    names = [n for n in result.routers if n.startswith(SINGLE)]
    if not names:
        return ""
    col = {n: j for j, n in enumerate(result.expert_names)}
    rows = sorted(([n, num(float(result.expert_quality[col[n[len(SINGLE):]]])),
                    num(float(result.expert_cost[col[n[len(SINGLE):]]]), ".4g")] for n in names if n[len(SINGLE):] in col),
                  key=lambda r: float(r[2]))
    return ("\n\nsingle experts (one operating point each: mean quality and cost, no curve and so no AUDC)\n"
            + text_table(["expert", "quality", f"cost ({result.cost_unit})"], rows))


def format_header(result: EvalResult) -> str:
    """Pool and data lines printed above the table."""
    pool = "" if result.candidates is None else f"; routing among {', '.join(result.candidates)}"
    return (
        f"source: {result.source}{pool}; evaluated prompts: {len(result.rows)} "
        f"(dropped for a missing quality cell: {result.n_dropped}); experts: {len(result.expert_names)}\n"
        f"pool cost range ({result.cost_unit}): {result.pool_lo:.4g} .. {result.pool_hi:.4g}; "
        f"best single expert: {result.best_expert} (quality {result.best_quality:.4f}, "
        f"mean cost {result.best_cost:.4g})"
    )


def experts_table(result: EvalResult) -> str:
    """The single experts, cheapest first, by their mean quality and mean cost (one operating point
    each: an AUDC would only say where the point lies in the pool's cost range, so none is given)."""
    rows = []
    for j in np.argsort(result.expert_cost):
        mark = " (best)" if result.expert_names[j] == result.best_expert else ""
        rows.append([f"{result.expert_names[j]}{mark}", num(float(result.expert_quality[j])),
                     num(float(result.expert_cost[j]), ".4g")])
    return markdown_table(["expert", "mean quality", f"mean cost ({result.cost_unit})"], rows)


def to_json(result: EvalResult) -> dict[str, Any]:
    """Everything but the per-prompt choices (those stay in memory for significance tests)."""
    cfg = result.config
    routers = {}
    for name, r in result.routers.items():
        cx, cy = r.curve.plot_xy(result.pool_hi)
        routers[name] = {
            **r.summary(),
            "lambdas": r.lambdas.tolist(),
            "points": {"cost": r.costs.tolist(), "quality": r.qualities.tolist()},
            "curve": {"cost": cx.tolist(), "quality": cy.tolist()},
        }
    return {
        "source": result.source,
        "cost_unit": result.cost_unit,
        "n_evaluated": int(len(result.rows)),
        "n_dropped_missing_quality": result.n_dropped,
        "pool_range": [result.pool_lo, result.pool_hi],
        "candidates": result.candidates,
        "best_expert": {"name": result.best_expert, "quality": result.best_quality, "cost": result.best_cost},
        "experts": {n: {"cost": float(c), "quality": float(q)}
                    for n, c, q in zip(result.expert_names, result.expert_cost, result.expert_quality, strict=True)},
        "config": {"n_lambdas": cfg.n_lambdas, "bootstrap": cfg.bootstrap, "seed": cfg.seed,
                   "binarize_at": cfg.binarize_at},
        "routers": routers,
        "significance": [s.to_dict() for s in result.significance],
        "notes": {
            "audc": "area under the curve over the pool cost range, clipped to [max(pool lo, router's cheapest "
                    "point), pool hi], divided by the range",
            "audc_paper": "the write-up's AUDC (second ruler): raw operating points, no hull, flat left of the "
                          "router's cheapest point, interpolated on 25 costs from pool lo to pool hi, trapezoid area "
                          "over the width",
            "qnc": "least mean cost at which the curve reaches the best single expert's quality; null = not reached",
            "mcnemar_budget": "each router at its highest-quality operating point with mean cost <= budget "
                              "(default: the best single expert's mean cost)",
        },
    }


def metrics_csv(result: EvalResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for d in metrics_rows(result):
        w.writerow({k: ("" if d[k] is None else d[k]) for k in COLUMNS})
    return buf.getvalue()


def report_markdown(result: EvalResult, title: str = "Deferral-curve evaluation") -> str:
    """report.md of one evaluation: header, main table, significance, single experts, the figure."""
    parts = [f"# {title}", "", format_header(result).replace("\n", "  \n"), "", format_table(result, markdown=True), ""]
    parts += ["QNC: least mean cost at which a router's curve reaches the best single expert's quality "
              f"(\"{NOT_REACHED}\" when it never does); QNC / best: that cost over the best expert's mean cost. "
              "AUDC is normalised by the pool's cost range; a router is not credited left of its cheapest point.", ""]
    if result.significance:
        parts += ["## Significance", ""] + [f"- {s.line()}" for s in result.significance] + [""]
        parts += ["Paired bootstrap over the evaluated prompts (one-sided p: the fraction of resamples in which "
                  "the first router's AUDC is not higher). McNemar: exact two-sided test on per-prompt correctness "
                  f"(quality >= {result.config.binarize_at}), each router at its best operating point with mean "
                  "cost within the budget (default: the best single expert's mean cost).", ""]
    parts += ["## Single experts", "", experts_table(result), "", "![deferral curves](deferral.png)", ""]
    return "\n".join(parts)


def write_report(result: EvalResult, out_dir: str | os.PathLike[str], title: str | None = None,
                 log_cost: bool = False) -> dict[str, Path]:
    """Write report.md, metrics.json, metrics.csv and deferral.png into ``out_dir`` (atomically).
    ``title``: the figure's title (default: source and prompt count); ``log_cost``: log cost axis."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "deferral.png": plot_deferral(result, out / "deferral.png", title=title, log_cost=log_cost),
        "metrics.json": atomic_write_json(out / "metrics.json", to_json(result)),
        "metrics.csv": atomic_write_text(out / "metrics.csv", metrics_csv(result)),
        "report.md": atomic_write_text(out / "report.md", report_markdown(result)),
    }
