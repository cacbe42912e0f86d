"""Report layer: tables (markdown, CSV, JSON) and the deferral-curve plot, written atomically.

Metrics are computed in cscr/eval/metrics.py; nothing here computes a metric.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_write, atomic_write_json, atomic_write_text
from cscr.eval.evaluate import EvalResult

NOT_REACHED = "not reached"
COLUMNS = ["router", "audc", "qnc", "qnc_ratio", "peak", "cost_at_peak", "n_points", "n_distinct_points"]


def _num(v: float | None, fmt: str) -> str:
    return NOT_REACHED if v is None else format(v, fmt)


def metrics_rows(result: EvalResult) -> list[dict[str, Any]]:
    """One dict per router (sorted by AUDC, best first)."""
    rows = [r.summary() for r in result.routers.values()]
    return sorted(rows, key=lambda d: -d["audc"])


def format_table(result: EvalResult, markdown: bool = False) -> str:
    """The main table (AUDC / QNC / peak per router), plain text or markdown."""
    unit = result.cost_unit
    head = ["router", "AUDC", f"QNC ({unit})", "QNC / best", "peak", f"cost at peak ({unit})", "points"]
    body = [
        [d["router"], f"{d['audc']:.4f}", _num(d["qnc"], ".4g"), _num(d["qnc_ratio"], ".3f"), f"{d['peak']:.4f}",
         f"{d['cost_at_peak']:.4g}", f"{d['n_distinct_points']}/{d['n_points']}"]
        for d in metrics_rows(result)
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in body]])


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
    lines = [f"| expert | mean quality | mean cost ({result.cost_unit}) |", "|---|---:|---:|"]
    for j in np.argsort(result.expert_cost):
        mark = " (best)" if result.expert_names[j] == result.best_expert else ""
        lines.append(f"| {result.expert_names[j]}{mark} | {result.expert_quality[j]:.4f} | {result.expert_cost[j]:.4g} |")
    return "\n".join(lines)


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


def plot_deferral(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    """One PNG: every router's curve and operating points; the single experts (also the
    ``single:*`` routers) as labelled markers; the pool's cost range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    cmap = plt.get_cmap("tab10")
    ranked = sorted(result.routers.items(), key=lambda kv: -kv[1].audc)
    for k, (name, r) in enumerate(kv for kv in ranked if not kv[0].startswith("single:")):
        color = cmap(k % 10)
        cx, cy = r.curve.plot_xy(result.pool_hi)
        label = f"{name} (AUDC {r.audc:.3f})"
        if len(r.curve.x) == 1:  # a single operating point (random, ...)
            ax.plot(r.curve.x, r.curve.y, "o", color=color, label=label, ms=7)
        else:
            ax.plot(cx, cy, "-", color=color, label=label, lw=1.6)
            ax.plot(r.costs, r.qualities, ".", color=color, ms=3, alpha=0.5)
    ax.scatter(result.expert_cost, result.expert_quality, marker="x", color="black", zorder=5,
               label="single experts (dotted: the best one's quality)")
    for n_, c, q in zip(result.expert_names, result.expert_cost, result.expert_quality, strict=True):
        ax.annotate(n_.split("/")[-1], (c, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(result.best_quality, color="grey", ls=":", lw=1)
    ax.axvspan(result.pool_lo, result.pool_hi, color="grey", alpha=0.06)
    ax.set_xlabel(f"mean cost per prompt ({result.cost_unit})")
    ax.set_ylabel("mean quality")
    ax.set_title(f"Deferral curves: {result.source} ({len(result.rows)} test prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return out


def write_report(result: EvalResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.md, metrics.json, metrics.csv and deferral.png into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "deferral.png": plot_deferral(result, out / "deferral.png"),
        "metrics.json": atomic_write_json(out / "metrics.json", to_json(result)),
        "metrics.csv": atomic_write_text(out / "metrics.csv", metrics_csv(result)),
        "report.md": atomic_write_text(out / "report.md", report_markdown(result)),
    }
