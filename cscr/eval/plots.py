"""Deferral-curve figures: one colour per router in every figure, single experts as labelled
points that do not overlap, the legend outside the data, an optional log cost axis.

Colours are fixed by router name (``ROUTER_COLOURS``), so a router looks the same in the main
table's figure, the unseen-experts figure and every OOD figure; a name outside the map (a new
router) gets a colour from its name's hash, never one of the named routers' colours. Variants
``<router>@<kind>`` keep their router's colour and take a dash pattern of their own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscr.atomic import atomic_write

if TYPE_CHECKING:
    from cscr.eval.evaluate import EvalResult

# one colour per registered router (tab10 / tab20 hues; oracle black and dashed: a ceiling, not a router)
ROUTER_COLOURS: dict[str, str] = {
    "cscr": "#d62728",
    "vanilla": "#ff7f0e",
    "umr": "#2ca02c",
    "knn": "#1f77b4",
    "parametric": "#9467bd",
    "softmax-gate": "#8c564b",
    "soft-moe": "#e377c2",
    "thompson": "#17becf",
    "pareto-random": "#bcbd22",
    "random": "#7f7f7f",
    "oracle": "#000000",
}
# for names outside the map: hues none of the named routers uses
_SPARE = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
          "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
_DASHES = ["--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]
EXPERT_COLOUR = "#000000"


def _hash(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


def router_style(name: str) -> tuple[str, Any]:
    """(colour, line style) of router ``name``, the same in every figure."""
    base, _, variant = name.partition("@")
    colour = ROUTER_COLOURS.get(base) or _SPARE[_hash(base) % len(_SPARE)]
    if variant:
        return colour, _DASHES[_hash(variant) % len(_DASHES)]
    return colour, "--" if base == "oracle" else "-"


def _overlaps(box: Any, others: Sequence[Any]) -> bool:
    return any(box.overlaps(o) for o in others)


def _text_box(t: Any, renderer: Any) -> Any:
    """Window extent of an annotation's text alone (not its leader line)."""
    from matplotlib.text import Text

    t.update_positions(renderer)
    return Text.get_window_extent(t, renderer)


def place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: float = 7.5) -> list[Any]:
    """Annotate each point with its label where it overlaps no other label, no point and stays inside
    the axes: candidate offsets are tried nearest first, and a label that fits nowhere near is put
    further out with a leader line. Returns the text artists."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in pts]  # the markers themselves
    near = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"), (-6, -4, "right", "top"),
            (0, 8, "center", "bottom"), (0, -8, "center", "top")]
    far = [(dx, dy, "left" if dx >= 0 else "right", "center") for r in (18, 30, 44, 60)
           for dx, dy in ((r, r), (r, -r), (-r, r), (-r, -r), (r, 0), (-r, 0))]
    texts = []
    order = np.argsort([p[0] for p in pts])
    for i in order:
        best = None
        others = taken[:i] + taken[i + 1:]  # the point's own marker may touch its label
        for k, (dx, dy, ha, va) in enumerate(near + far):
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, zorder=6,
                            arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if k >= len(near) else None)
            box = _text_box(t, renderer).expanded(1.04, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not _overlaps(box, others):
                best = (t, box)
                break
            t.remove()
        if best is None:  # nowhere free: keep the nearest spot (still inside the figure)
            dx, dy, ha, va = near[0]
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, zorder=6)
            best = (t, _text_box(t, renderer))
        texts.append(best[0])
        taken.append(best[1])
    return texts


def _log_axis(ax: Any, values: np.ndarray) -> None:
    pos = values[np.isfinite(values) & (values > 0)]
    if len(pos) == len(values[np.isfinite(values)]):
        ax.set_xscale("log")
    else:  # a zero cost: linear near zero, log above the smallest positive cost
        ax.set_xscale("symlog", linthresh=float(pos.min()) if len(pos) else 1e-6)


def plot_deferral(result: EvalResult, path: str | os.PathLike[str], title: str | None = None,
                  log_cost: bool = False) -> Path:
    """One PNG (``deferral_figure``), written atomically."""
    import matplotlib.pyplot as plt

    fig = deferral_figure(result, title, log_cost)
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def deferral_figure(result: EvalResult, title: str | None = None, log_cost: bool = False) -> Any:
    """The figure: every router's curve and operating points in its own colour; the single experts
    as black points labelled with their name and mean quality; the best expert's quality dotted;
    the pool's cost range shaded; the legend to the right of the axes. ``title``: what the figure
    shows (default: the source and prompt count); ``log_cost``: a logarithmic cost axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    ranked = sorted(((n, r) for n, r in result.routers.items() if not n.startswith("single:")),
                    key=lambda kv: -kv[1].audc)
    xs_all = [np.asarray(result.expert_cost, dtype=np.float64)]
    for name, r in ranked:
        colour, ls = router_style(name)
        cx, cy = r.curve.plot_xy(result.pool_hi)
        label = f"{name} (AUDC {r.audc:.3f})"
        if len(r.curve.x) == 1:  # a single operating point (random, ...)
            ax.plot(r.curve.x, r.curve.y, "o", color=colour, label=label, ms=7, zorder=4)
        else:
            ax.plot(cx, cy, linestyle=ls, color=colour, label=label, lw=1.7, zorder=3)
            ax.plot(r.costs, r.qualities, ".", color=colour, ms=3, alpha=0.5, zorder=3)
        xs_all += [np.asarray(cx, dtype=np.float64), np.asarray(r.costs, dtype=np.float64)]
    ax.scatter(result.expert_cost, result.expert_quality, marker="o", s=28, color=EXPERT_COLOUR, zorder=5,
               label="single experts (mean quality)")
    ax.axhline(result.best_quality, color="grey", ls=":", lw=1, label=f"best single expert ({result.best_quality:.3f})")
    ax.axvspan(result.pool_lo, result.pool_hi, color="grey", alpha=0.06)
    if log_cost:
        _log_axis(ax, np.concatenate(xs_all))
    ax.set_xlabel(f"mean cost per prompt ({result.cost_unit}{', log scale' if log_cost else ''})")
    ax.set_ylabel("mean quality")
    ax.set_title(title or f"Deferral curves: {result.source} ({len(result.rows)} test prompts)", fontsize=10)
    ax.grid(alpha=0.3, which="both" if log_cost else "major")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    ax.margins(x=0.08, y=0.08)
    fig.tight_layout()
    labels = [f"{n.split('/')[-1]} ({q:.3f})" for n, q in zip(result.expert_names, result.expert_quality, strict=True)]
    place_labels(ax, list(result.expert_cost), list(result.expert_quality), labels)
    return fig
